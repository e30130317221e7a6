"""Tasks, schedules, jobs and schedule results, built as the tests need them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler import Job, Schedule, Task
from apscheduler._structures import ScheduleResult
from apscheduler.abc import DataStore
from apscheduler.triggers.interval import IntervalTrigger


async def add_task(
    store: DataStore, max_running_jobs: int | None = None, task_id: str = "task"
) -> None:
    """Add a task whose jobs the tests claim and release (they never run)."""
    await store.add_task(
        Task(
            id=task_id,
            func="builtins:len",
            job_executor="async",
            max_running_jobs=max_running_jobs,
        )
    )


def due_schedule(schedule_id: str = "s", task_id: str = "task") -> Schedule:
    """Return a schedule firing every minute, its first fire time a second ago."""
    start = datetime.now(timezone.utc) - timedelta(seconds=1)
    trigger = IntervalTrigger(minutes=1, start_time=start)
    schedule = Schedule(
        id=schedule_id, task_id=task_id, trigger=trigger, job_executor="async"
    )
    schedule.next_fire_time = trigger.next()
    return schedule


def scheduled_job(
    schedule_id: str, fire_time: datetime, task_id: str = "task", **options: Any
) -> Job:
    """Return the job a scheduler adds for a fire time of schedule ``schedule_id``."""
    return Job(
        task_id=task_id,
        executor="async",
        schedule_id=schedule_id,
        scheduled_fire_time=fire_time,
        **options,
    )


def next_job(schedule: Schedule, **options: Any) -> Job:
    """Return the job a scheduler adds for ``schedule``'s next fire time."""
    assert schedule.next_fire_time is not None, f"{schedule.id!r} does not fire"
    return scheduled_job(
        schedule.id, schedule.next_fire_time, schedule.task_id, **options
    )


def processed(
    schedule: Schedule,
    next_fire_time: datetime | None,
    last_fire_time: datetime | None = None,
) -> ScheduleResult:
    """
    Return what a scheduler releases ``schedule`` with once it processed it.

    :param last_fire_time: the fire time processed; by default the schedule's next
        fire time (as it was acquired)
    """
    last = schedule.next_fire_time if last_fire_time is None else last_fire_time
    assert last is not None, f"schedule {schedule.id!r} has no fire time to process"
    return ScheduleResult(
        schedule_id=schedule.id,
        task_id=schedule.task_id,
        trigger=schedule.trigger,
        last_fire_time=last,
        next_fire_time=next_fire_time,
    )
