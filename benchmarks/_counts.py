"""
Count the server commands per job lifecycle and per schedule firing.

Counts come from pymongo's command monitoring on the store's own client, taken
after ``start()`` (so index creation and the like are left out), phase by phase:
they are exact, whatever the machine's speed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler import ConflictPolicy, Job, JobOutcome, JobResult, Schedule, Task
from apscheduler._structures import ScheduleResult
from apscheduler.abc import DataStore
from apscheduler.triggers.interval import IntervalTrigger

from _common import CommandCounter, StoreKind, start_store, summarize
from _seed import drop_database

LEASE = timedelta(minutes=1)
SCHEDULER = "bench"
#: Commands that read documents (a read of a schedule after claiming it is a re-read)
READS = frozenset({"find", "getMore", "aggregate", "count", "distinct"})
#: The job lifecycle cases: label, max_running_jobs of the task, jobs per batch
JOB_CASES: list[tuple[str, int | None, int]] = [
    ("uncapped, single job", None, 1),
    ("uncapped, batch of 100", None, 100),
    ("capped (max_running_jobs=100), single job", 100, 1),
    ("capped (max_running_jobs=100), batch of 100", 100, 100),
]
SCHEDULE_CASES: list[tuple[str, int]] = [
    ("single schedule", 1),
    ("batch of 100", 100),
]

Commands = list[tuple[str, str]]


async def job_lifecycle(
    store: DataStore, counter: CommandCounter, task_id: str, batch: int
) -> dict[str, Commands]:
    """
    Add ``batch`` jobs, acquire them ``batch`` at a time and release each.

    Between acquiring and releasing, ``get_task`` is called once per job, as
    APScheduler's scheduler does (to find the function to run); its commands are kept
    apart.
    """
    counter.take()
    for _ in range(batch):
        await store.add_job(Job(task_id=task_id, executor="bench"))

    phases: dict[str, Commands] = {
        "add": counter.take(),
        "acquire": [],
        "get_task": [],
        "release": [],
    }
    remaining = batch
    while remaining:
        jobs = await store.acquire_jobs(SCHEDULER, LEASE, batch)
        phases["acquire"] += counter.take()
        if not jobs:
            raise RuntimeError(f"{remaining} jobs were added but cannot be acquired")

        for job in jobs:
            await store.get_task(job.task_id)

        phases["get_task"] += counter.take()
        for job in jobs:
            result = JobResult.from_job(job, JobOutcome.success)
            await store.release_job(SCHEDULER, job, result)

        phases["release"] += counter.take()
        remaining -= len(jobs)

    return phases


def job_for(schedule: Schedule, fire_time: datetime) -> Job:
    """Return the job the scheduler creates for ``schedule`` firing at ``fire_time``."""
    return Job(
        task_id=schedule.task_id,
        args=schedule.args,
        kwargs=schedule.kwargs,
        schedule_id=schedule.id,
        scheduled_fire_time=fire_time,
        executor=schedule.job_executor,
        result_expiration_time=schedule.job_result_expiration_time,
        metadata=schedule.metadata.copy(),
    )


async def add_due_schedules(
    store: DataStore, task_id: str, prefix: str, count: int
) -> None:
    """Add ``count`` schedules firing every minute, each due once right now."""
    start = datetime.now(timezone.utc) - timedelta(seconds=5)
    for n in range(count):
        trigger = IntervalTrigger(minutes=1, start_time=start)
        schedule = Schedule(
            id=f"{prefix}-{n}", task_id=task_id, trigger=trigger, job_executor="bench"
        )
        schedule.next_fire_time = trigger.next()
        await store.add_schedule(schedule, ConflictPolicy.replace)


async def schedule_firing(
    store: DataStore, counter: CommandCounter, task_id: str, batch: int
) -> dict[str, Commands]:
    """
    Fire ``batch`` due schedules the way the scheduler does.

    ``acquire_schedules``, then ``add_job`` for each schedule's fire time, then one
    ``release_schedules`` with each schedule's next fire time.
    """
    await add_due_schedules(store, task_id, f"firing{batch}", batch)
    counter.take()
    schedules = await store.acquire_schedules(SCHEDULER, LEASE, batch)
    phases: dict[str, Commands] = {"acquire": counter.take()}
    if len(schedules) != batch:
        raise RuntimeError(f"acquired {len(schedules)} of {batch} due schedules")

    results = []
    for schedule in schedules:
        assert schedule.next_fire_time is not None
        await store.add_job(job_for(schedule, schedule.next_fire_time))
        results.append(
            ScheduleResult(
                schedule_id=schedule.id,
                task_id=schedule.task_id,
                trigger=schedule.trigger,
                last_fire_time=schedule.next_fire_time,
                next_fire_time=schedule.trigger.next(),
            )
        )

    phases["add_job"] = counter.take()
    await store.release_schedules(SCHEDULER, results)
    phases["release"] = counter.take()
    return phases


def rereads(phases: dict[str, Commands]) -> dict[str, int]:
    """
    Count the reads of the schedules collection made after the claim, by phase.

    The claim is the first write to ``schedules`` in the acquire phase; every later
    read of ``schedules`` (in acquire, add_job or release) is a re-read.
    """
    found: Counter[str] = Counter()
    claimed = False
    for phase in ("acquire", "add_job", "release"):
        for name, collection in phases.get(phase, []):
            if collection != "schedules":
                continue

            if name not in READS:
                claimed = True
            elif claimed or phase != "acquire":
                found[f"{name} schedules in {phase}"] += 1

    return dict(found)


def _per_item(phases: dict[str, Commands], items: int) -> dict[str, float]:
    return {phase: len(commands) / items for phase, commands in phases.items()}


def _details(phases: dict[str, Commands]) -> dict[str, str]:
    return {phase: summarize(commands) for phase, commands in phases.items()}


async def count_commands(kind: StoreKind, uri: str) -> dict[str, Any]:
    """Count one store's commands for every job and schedule case."""
    database = f"apscheduler_bench_counts_{kind}"
    await drop_database(uri, database)
    counter = CommandCounter()
    jobs: list[dict[str, Any]] = []
    schedules: list[dict[str, Any]] = []
    async with AsyncExitStack() as exit_stack:
        store = await start_store(
            kind, uri, database, exit_stack, listener=counter, fresh=True
        )
        for task_id, cap in (("uncapped", None), ("capped", 100)):
            task = Task(
                id=task_id,
                func="builtins:len",
                job_executor="bench",
                max_running_jobs=cap,
            )
            await store.add_task(task)

        for label, cap, batch in JOB_CASES:
            task_id = "uncapped" if cap is None else "capped"
            phases = await job_lifecycle(store, counter, task_id, batch)
            per = _per_item(phases, batch)
            lifecycle = per["add"] + per["acquire"] + per["release"]
            jobs.append(
                {
                    "case": label,
                    "batch": batch,
                    "capped": cap is not None,
                    "per_job": per,
                    "lifecycle": lifecycle,
                    "lifecycle_with_get_task": lifecycle + per["get_task"],
                    "detail": _details(phases),
                }
            )

        for label, batch in SCHEDULE_CASES:
            phases = await schedule_firing(store, counter, "uncapped", batch)
            per = _per_item(phases, batch)
            schedules.append(
                {
                    "case": label,
                    "batch": batch,
                    "per_firing": per,
                    "total": sum(per.values()),
                    "rereads": rereads(phases),
                    "detail": _details(phases),
                }
            )

    await drop_database(uri, database)
    return {"store": kind, "jobs": jobs, "schedules": schedules}


def ours_only_lines(result: dict[str, Any]) -> Sequence[str]:
    """Format one store's counts as plain lines (for ``count_commands.py``)."""
    rows: list[tuple[str, float, str]] = []
    for row in result["jobs"]:
        detail = "; ".join(f"{k}: {v or '-'}" for k, v in row["detail"].items())
        rows.append((f"job, {row['case']}", row["lifecycle"], detail))

    for row in result["schedules"]:
        detail = "; ".join(f"{k}: {v or '-'}" for k, v in row["detail"].items())
        rows.append((f"schedule firing, {row['case']}", row["total"], detail))

    width = max(len(row[0]) for row in rows)
    lines = [f"{'operation':<{width}}  per item  (commands by phase)"]
    lines += [f"{name:<{width}}  {per:8.2f}  ({detail})" for name, per, detail in rows]
    lines.append("(job rows leave out get_task; its commands are in the detail)")
    return lines
