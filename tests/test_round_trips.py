"""The hot paths make the round trips the design promises (counted, not timed)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from apscheduler import ConflictPolicy, Job, JobOutcome, JobResult, Schedule, Task
from apscheduler.triggers.interval import IntervalTrigger

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo.metrics import prometheus_meter_provider

from .support.commands import CommandLog
from .support.items import add_task, processed, scheduled_job

pytestmark = [pytest.mark.anyio, pytest.mark.wire]

LEASE = timedelta(minutes=1)


@pytest.fixture(params=[False, True], ids=["unmetered", "metered"])
def meter_provider(request: pytest.FixtureRequest) -> Any:
    """Every count is made both without metrics and with them collected (for
    Prometheus): metrics are counted in memory, and add no command."""
    return prometheus_meter_provider()[0] if request.param else None


async def add_schedule(store: MongoDBDataStore, next_fire_time: datetime) -> None:
    """Add task ``t`` and its schedule ``s`` (every 10 s), next firing then."""
    await store.add_task(Task(id="t", func="builtins:len", job_executor="async"))
    trigger = IntervalTrigger(seconds=10)
    schedule = Schedule(id="s", task_id="t", trigger=trigger, job_executor="async")
    schedule.next_fire_time = next_fire_time
    await store.add_schedule(schedule, ConflictPolicy.exception)


class TestJobLifecycle:
    """Add, acquire and release of one job: four commands in all."""

    @pytest.mark.parametrize("cap", [None, 5], ids=["uncapped", "capped"])
    async def test_single_job(
        self, counted_store: MongoDBDataStore, command_log: CommandLog, cap: int | None
    ) -> None:
        store = counted_store
        await add_task(store, cap, "t")
        with command_log.recording() as sent:
            job = Job(task_id="t", executor="async")
            await store.add_job(job)
            [acquired] = await store.acquire_jobs("me", LEASE, 10)
            await store.release_job(
                "me", acquired, JobResult.from_job(acquired, JobOutcome.success)
            )

        # add: insert; acquire: one aggregate (the jobs, their tasks and, beside
        # them, what the running jobs hold, capped task or not), the claim;
        # release: update
        assert [name.split()[0] for name in sent] == [
            "insert",
            "aggregate",
            "update",
            "update",
        ], sent

    @pytest.mark.parametrize("cap", [None, 5], ids=["uncapped", "capped"])
    async def test_what_a_scheduler_sends(
        self, counted_store: MongoDBDataStore, command_log: CommandLog, cap: int | None
    ) -> None:
        # The scheduler asks for each acquired job's task before running it: the
        # claim just read it, so that costs nothing
        store = counted_store
        await add_task(store, cap, "t")
        jobs = [Job(task_id="t", executor="async") for _ in range(3)]
        for job in jobs:
            await store.add_job(job)

        with command_log.recording() as sent:
            acquired = await store.acquire_jobs("me", LEASE, 10)
            tasks = [await store.get_task(job.task_id) for job in acquired]
            for job in acquired:
                result = JobResult.from_job(job, JobOutcome.success)
                await store.release_job("me", job, result)

        assert len(acquired) == 3
        assert [task.running_jobs for task in tasks] == [3, 3, 3]
        assert [name.split()[0] for name in sent] == [
            "aggregate",
            "update",
            *["update"] * 3,
        ], sent


class TestGetTask:
    """A task and the count of its running jobs come in one round trip."""

    async def test_one_command(
        self, counted_store: MongoDBDataStore, command_log: CommandLog
    ) -> None:
        store = counted_store
        await store.add_task(Task(id="t", func="builtins:len", job_executor="async"))
        await store.add_job(Job(task_id="t", executor="async"))
        await store.acquire_jobs("me", LEASE, 10)
        store._claimed_tasks.forget()  # as after any other call of the store
        with command_log.recording() as sent:
            task = await store.get_task("t")

        assert task.running_jobs == 1
        assert sent == ["aggregate tasks"], sent


class TestScheduleFiring:
    """A schedule firing: find, claim, one insert per job, release; no re-reads."""

    async def test_firing(
        self, counted_store: MongoDBDataStore, command_log: CommandLog
    ) -> None:
        store = counted_store
        await add_schedule(store, datetime.now(timezone.utc) - timedelta(seconds=1))
        with command_log.recording() as sent:
            [taken] = await store.acquire_schedules("me", LEASE, 10)
            assert taken.next_fire_time is not None
            await store.add_job(scheduled_job("s", taken.next_fire_time, "t"))
            next_fire_time = datetime.now(timezone.utc) + LEASE
            await store.release_schedules("me", [processed(taken, next_fire_time)])

        assert [name.split()[0] for name in sent] == [
            "find",
            "update",
            "insert",
            "update",
        ], sent

    async def test_job_after_lease_lapsed_checks_the_schedule(
        self, counted_store: MongoDBDataStore, command_log: CommandLog
    ) -> None:
        # Without the lease, add_job reads the schedule (a stalled owner must not
        # add a job for a fire time the schedule has moved past)
        store = counted_store
        fire_time = datetime.now(timezone.utc)
        await add_schedule(store, fire_time)
        with command_log.recording() as sent:
            await store.add_job(scheduled_job("s", fire_time, "t"))

        assert [name.split()[0] for name in sent] == ["find", "insert"], sent
