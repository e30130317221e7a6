"""Lease take-over, stale owners and fire-time uniqueness (guarantees 1 to 3)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import anyio
import pytest
from apscheduler import (
    ConflictPolicy,
    Job,
    JobAdded,
    JobOutcome,
    JobResult,
    Schedule,
)
from apscheduler.abc import EventBroker
from apscheduler.triggers.interval import IntervalTrigger
from time_machine import TimeMachineFixture

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._cleanup import FIRE_TIME_RETENTION

from .support.events import Recorder
from .support.items import add_task, due_schedule, processed

pytestmark = pytest.mark.anyio

SHORT_LEASE = timedelta(seconds=0.3)
LONG_LEASE = timedelta(minutes=5)


async def add_due_schedule(store: MongoDBDataStore, schedule_id: str = "s") -> None:
    trigger = IntervalTrigger(
        minutes=1, start_time=datetime.now(timezone.utc) - timedelta(seconds=30)
    )
    schedule = Schedule(
        id=schedule_id, task_id="task", trigger=trigger, job_executor="async"
    )
    schedule.next_fire_time = trigger.next()
    await add_task(store)
    await store.add_schedule(schedule, ConflictPolicy.exception)


def job_for(
    schedule: Schedule,
    jitter: timedelta = timedelta(0),
    result_expiration_time: timedelta = timedelta(minutes=5),
) -> Job:
    assert schedule.next_fire_time is not None
    return Job(
        task_id=schedule.task_id,
        executor="async",
        schedule_id=schedule.id,
        scheduled_fire_time=schedule.next_fire_time + jitter,
        jitter=jitter,
        result_expiration_time=result_expiration_time,
    )


class TestJobLeaseTakeover:
    """A lapsed job lease passes to another scheduler; the old owner cannot write."""

    async def test_stale_release_changes_nothing(
        self, store: MongoDBDataStore, other_store: MongoDBDataStore
    ) -> None:
        await add_task(store)
        await store.add_job(
            Job(task_id="task", executor="async", result_expiration_time=60)
        )
        [stale] = await store.acquire_jobs("old", SHORT_LEASE, 1)
        assert not await other_store.acquire_jobs("new", LONG_LEASE, 1)

        await anyio.sleep(SHORT_LEASE.total_seconds() + 0.2)
        [taken] = await other_store.acquire_jobs("new", LONG_LEASE, 1)
        assert taken.id == stale.id

        # The old owner wakes up and releases: nothing happens
        result = JobResult.from_job(
            stale,
            JobOutcome.success,
            return_value="old",
        )
        await store.release_job("old", stale, result)
        assert [job.id for job in await store.get_jobs()] == [stale.id]
        assert (await store.get_jobs())[0].acquired_by == "new"
        assert await store.get_job_result(stale.id) is None

        # The new owner's release counts
        await other_store.release_job(
            "new",
            taken,
            JobResult.from_job(
                taken,
                JobOutcome.success,
                return_value="new",
            ),
        )
        assert await store.get_jobs() == []
        result_ = await store.get_job_result(taken.id)
        assert result_ is not None
        assert result_.return_value == "new"


class TestScheduleLeaseTakeover:
    """A lapsed schedule lease passes over; the old owner's release is ignored."""

    async def test_stale_release_changes_nothing(
        self, store: MongoDBDataStore, other_store: MongoDBDataStore
    ) -> None:
        await add_due_schedule(store)
        [stale] = await store.acquire_schedules("old", SHORT_LEASE, 10)
        assert not await other_store.acquire_schedules("new", LONG_LEASE, 10)

        await anyio.sleep(SHORT_LEASE.total_seconds() + 0.2)
        [taken] = await other_store.acquire_schedules("new", LONG_LEASE, 10)
        assert taken.id == stale.id
        assert stale.next_fire_time is not None

        far_future = stale.next_fire_time + timedelta(days=365)
        await store.release_schedules("old", [processed(stale, far_future)])
        [current] = await store.get_schedules()
        assert current.acquired_by == "new"
        assert current.next_fire_time == stale.next_fire_time

        new_next = stale.next_fire_time + timedelta(minutes=1)
        await other_store.release_schedules(
            "new", [processed(taken, new_next, stale.next_fire_time)]
        )
        [current] = await store.get_schedules()
        assert current.acquired_by is None
        assert current.next_fire_time == new_next


class TestOneJobPerFireTime:
    """A fire time yields one job, even when its scheduler died mid-processing."""

    @pytest.mark.parametrize(
        "expiration",
        [pytest.param(0, id="no-result"), pytest.param(60, id="result")],
    )
    async def test_reprocessing_after_crash_adds_no_second_job(
        self,
        store: MongoDBDataStore,
        other_store: MongoDBDataStore,
        expiration: int,
    ) -> None:
        await add_due_schedule(store)
        added: list[JobAdded] = []
        marker_seen = anyio.Event()

        def record(event: Any) -> None:
            if event.task_id:
                added.append(event)
            else:  # the marker: every event published before it has arrived
                marker_seen.set()

        store._event_broker.subscribe(record, {JobAdded})

        # Scheduler A processes the schedule, adds the job, and dies before
        # releasing the schedule. A worker runs the job meanwhile.
        [schedule] = await store.acquire_schedules("A", SHORT_LEASE, 10)
        first = job_for(schedule, result_expiration_time=timedelta(seconds=expiration))
        await store.add_job(first)
        [running] = await store.acquire_jobs("worker", LONG_LEASE)
        await store.release_job(
            "worker", running, JobResult.from_job(running, JobOutcome.success)
        )
        await store.get_job_result(running.id)
        await store.cleanup()  # must not forget the fire time yet

        # Scheduler B takes the schedule over and processes the same fire time,
        # with a different jitter, as APScheduler would
        await anyio.sleep(SHORT_LEASE.total_seconds() + 0.2)
        [again] = await other_store.acquire_schedules("B", LONG_LEASE, 10)
        assert again.next_fire_time == schedule.next_fire_time
        await other_store.add_job(job_for(again, jitter=timedelta(seconds=1)))

        assert await store.get_jobs() == []
        assert await other_store.acquire_jobs("worker", LONG_LEASE) == []
        marker = JobAdded(job_id=uuid4(), task_id="", schedule_id=None)
        await store._event_broker.publish(marker)
        with anyio.fail_after(3):
            await marker_seen.wait()

        assert [event.job_id for event in added] == [first.id]

    @pytest.mark.usefixtures("other_store")
    async def test_next_fire_time_gets_its_job(
        self, store: MongoDBDataStore, time_machine: TimeMachineFixture
    ) -> None:
        """After the release, the following fire time is free and the record goes."""
        await add_due_schedule(store)
        [schedule] = await store.acquire_schedules("A", LONG_LEASE, 10)
        assert schedule.next_fire_time is not None
        await store.add_job(job_for(schedule))
        [job] = await store.acquire_jobs("worker", LONG_LEASE)
        await store.release_job(
            "worker", job, JobResult.from_job(job, JobOutcome.success)
        )
        await store.get_job_result(job.id)
        next_fire_time = schedule.next_fire_time + timedelta(minutes=1)
        await store.release_schedules("A", [processed(schedule, next_fire_time)])

        later = Job(
            task_id="task",
            executor="async",
            schedule_id=schedule.id,
            scheduled_fire_time=next_fire_time,
        )
        await store.add_job(later)
        assert [queued.id for queued in await store.get_jobs()] == [later.id]

        # cleanup() forgets the used fire time the schedule has moved past, once
        # it is older than FIRE_TIME_RETENTION, and keeps the queued job
        jobs = store._jobs
        await store.cleanup()
        assert await jobs.count_documents({"state": "finished"}) == 1
        later_on = datetime.now(timezone.utc) + FIRE_TIME_RETENTION
        time_machine.move_to(later_on + timedelta(seconds=1), tick=False)
        await store.cleanup()
        assert await jobs.count_documents({"state": "finished"}) == 0
        assert [queued.id for queued in await store.get_jobs()] == [later.id]

    async def test_used_fire_time_kept_while_schedule_unreleased(
        self, store: MongoDBDataStore
    ) -> None:
        """cleanup() keeps the record while the schedule may still be reprocessed."""
        await add_due_schedule(store)
        [schedule] = await store.acquire_schedules("A", SHORT_LEASE, 10)
        await store.add_job(job_for(schedule))
        [job] = await store.acquire_jobs("worker", LONG_LEASE)
        await store.release_job(
            "worker", job, JobResult.from_job(job, JobOutcome.success)
        )
        await store.get_job_result(job.id)

        await store.cleanup()
        await anyio.sleep(SHORT_LEASE.total_seconds() + 0.2)
        [again] = await store.acquire_schedules("B", LONG_LEASE, 10)
        await store.add_job(job_for(again))
        assert await store.get_jobs() == []


class TestStalledOwner:
    """A scheduler that stalls past its lease cannot add a job for a used fire time."""

    async def test_late_add_job_after_schedule_moved_on(
        self,
        store: MongoDBDataStore,
        other_store: MongoDBDataStore,
        local_broker: EventBroker,
        time_machine: TimeMachineFixture,
    ) -> None:
        await add_task(store)
        schedule = due_schedule("s")
        first = schedule.next_fire_time
        assert first is not None
        await store.add_schedule(schedule, ConflictPolicy.exception)
        time_machine.move_to(datetime.now(timezone.utc), tick=False)

        # A claims the schedule and stalls past its lease
        [stalled] = await store.acquire_schedules("A", timedelta(seconds=30), 10)
        time_machine.shift(31)

        # B takes over, adds the job, it runs, and B releases the schedule
        [taken] = await other_store.acquire_schedules("B", LONG_LEASE, 10)
        await other_store.add_job(
            Job(
                task_id="task",
                executor="async",
                schedule_id="s",
                scheduled_fire_time=first,
            )
        )
        [job] = await other_store.acquire_jobs("worker", LONG_LEASE, 10)
        await other_store.release_job(
            "worker", job, JobResult.from_job(job, JobOutcome.success)
        )
        await other_store.release_schedules(
            "B", [processed(taken, first + timedelta(minutes=1), first)]
        )

        # Long after, the fire time record is forgotten; then A wakes up
        time_machine.shift(FIRE_TIME_RETENTION.total_seconds() + 60)
        await other_store.cleanup()
        assert await store._jobs.count_documents({}) == 0
        added = Recorder(local_broker, JobAdded, timeout=3)
        await store.add_job(
            Job(
                task_id="task",
                executor="async",
                schedule_id=stalled.id,
                scheduled_fire_time=first,
            )
        )
        assert await store.get_jobs() == []
        assert await added.settled() == []


class TestExtensionOfALostLease:
    """Extending a lease another scheduler took over does not make this store
    believe it still holds it (which would let it add a job for a fire time the
    new holder may have moved past)."""

    async def test_schedule(
        self, store: MongoDBDataStore, other_store: MongoDBDataStore
    ) -> None:
        await add_task(store)
        await store.add_schedule(due_schedule(), ConflictPolicy.exception)
        [taken] = await store.acquire_schedules("a", timedelta(milliseconds=100), 10)
        await anyio.sleep(0.3)
        assert len(await other_store.acquire_schedules("b", timedelta(minutes=1), 10))
        await store.extend_acquired_schedule_leases(
            "a", {taken.id}, timedelta(minutes=5)
        )
        assert not store._leases.holds(taken.id)

    async def test_schedule_still_held(self, store: MongoDBDataStore) -> None:
        await add_task(store)
        await store.add_schedule(due_schedule(), ConflictPolicy.exception)
        [taken] = await store.acquire_schedules("a", timedelta(milliseconds=300), 10)
        await store.extend_acquired_schedule_leases(
            "a", {taken.id}, timedelta(minutes=5)
        )
        await anyio.sleep(0.4)  # the first term is over; the extended one is not
        assert store._leases.holds(taken.id)
