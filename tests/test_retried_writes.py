"""Writes retried after a lost reply take effect once; stalled owners change nothing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from apscheduler import (
    ConflictPolicy,
    Job,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobResult,
    RetrySettings,
    Schedule,
    ScheduleAdded,
    Task,
    TaskRemoved,
)
from apscheduler._structures import ScheduleResult
from apscheduler.abc import EventBroker
from apscheduler.triggers.interval import IntervalTrigger
from pymongo.errors import AutoReconnect
from tenacity import stop_after_attempt, wait_fixed
from time_machine import TimeMachineFixture

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._cleanup import FIRE_TIME_RETENTION

from .conftest import another_store

pytestmark = pytest.mark.anyio

LEASE = timedelta(minutes=5)


class LostReply:
    """
    A collection whose method ``name`` applies its first call, then loses the reply.

    ``meanwhile`` runs between the applied write and the error, standing for what
    other schedulers do before the retry.
    """

    def __init__(
        self,
        collection: Any,
        name: str,
        meanwhile: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._collection = collection
        self._name = name
        self._meanwhile = meanwhile
        self.lost = 0

    def __getattr__(self, attribute: str) -> Any:
        target = getattr(self._collection, attribute)
        if attribute != self._name or self.lost:
            return target

        async def apply_then_lose(*args: Any, **kwargs: Any) -> Any:
            await target(*args, **kwargs)
            self.lost += 1
            if self._meanwhile is not None:
                await self._meanwhile()

            raise AutoReconnect("connection closed (simulated lost reply)")

        return apply_then_lose


@pytest.fixture
async def retrying_store(
    client: Any, database_name: str, local_broker: EventBroker, logger: logging.Logger
) -> AsyncIterator[MongoDBDataStore]:
    settings = RetrySettings(stop=stop_after_attempt(3), wait=wait_fixed(0))
    async with AsyncExitStack() as exit_stack:
        await local_broker.start(exit_stack, logger)
        store = MongoDBDataStore(
            client,
            database=database_name,
            start_from_scratch=True,
            retry_settings=settings,
        )
        await store.start(exit_stack, local_broker, logger)
        yield store


@pytest.fixture
async def other_store(
    client: Any,
    database_name: str,
    retrying_store: MongoDBDataStore,
    local_broker: EventBroker,
    logger: logging.Logger,
) -> AsyncIterator[MongoDBDataStore]:
    async with another_store(client, database_name, local_broker, logger) as other:
        yield other


class Recorder:
    """Records events of one type; ``settled()`` waits for all published so far."""

    def __init__(self, store: MongoDBDataStore, event_type: type) -> None:
        self.events: list[Any] = []
        self._broker = store._event_broker
        self._marker_seen = anyio.Event()
        self._broker.subscribe(self._record, {event_type, TaskRemoved})

    def _record(self, event: Any) -> None:
        if isinstance(event, TaskRemoved) and event.task_id == MARKER:
            self._marker_seen.set()
        elif not isinstance(event, TaskRemoved):
            self.events.append(event)

    async def settled(self) -> list[Any]:
        # Delivery is in order, so once the marker arrives, so has the rest
        await self._broker.publish(TaskRemoved(task_id=MARKER))
        with anyio.fail_after(3):
            await self._marker_seen.wait()

        return self.events


MARKER = "--marker--"


async def add_task_and_jobs(store: MongoDBDataStore, count: int) -> list[Job]:
    await store.add_task(Task(id="task", func="builtins:len", job_executor="async"))
    jobs = [
        Job(task_id="task", executor="async", result_expiration_time=60)
        for _ in range(count)
    ]
    for job in jobs:
        await store.add_job(job)

    return jobs


class TestLostReplies:
    """A write applied before its reply was lost is not applied twice."""

    async def test_claim_takes_no_more_than_limit(
        self, retrying_store: MongoDBDataStore
    ) -> None:
        await add_task_and_jobs(retrying_store, 6)
        lossy = LostReply(retrying_store._jobs, "update_each")
        retrying_store._jobs = lossy  # type: ignore[assignment]
        acquired = await retrying_store.acquire_jobs("me", LEASE, 3)

        assert lossy.lost == 1
        assert len(acquired) == 3
        held = await lossy.count_documents({"state": "acquired"})
        assert held == 3

    async def test_insert_claimed_before_retry_is_not_a_conflict(
        self, retrying_store: MongoDBDataStore, other_store: MongoDBDataStore
    ) -> None:
        await add_task_and_jobs(retrying_store, 0)
        added = Recorder(retrying_store, JobAdded)

        async def claim_it() -> None:
            assert len(await other_store.acquire_jobs("other", LEASE, 10)) == 1

        retrying_store._jobs = LostReply(retrying_store._jobs, "insert_one", claim_it)
        job = Job(task_id="task", executor="async")
        await retrying_store.add_job(job)  # no ConflictingIdError
        assert [event.job_id for event in await added.settled()] == [job.id]

    async def test_release_is_announced_once(
        self, retrying_store: MongoDBDataStore
    ) -> None:
        [job] = await add_task_and_jobs(retrying_store, 1)
        [acquired] = await retrying_store.acquire_jobs("me", LEASE, 1)
        released = Recorder(retrying_store, JobReleased)
        retrying_store._jobs = LostReply(retrying_store._jobs, "update_one")
        result = JobResult.from_job(acquired, JobOutcome.success, return_value=7)
        await retrying_store.release_job("me", acquired, result)

        assert [event.job_id for event in await released.settled()] == [job.id]
        stored = await retrying_store.get_job_result(job.id)
        assert stored is not None
        assert stored.return_value == 7

    async def test_release_announced_when_purged_before_retry(
        self, retrying_store: MongoDBDataStore, other_store: MongoDBDataStore
    ) -> None:
        await retrying_store.add_task(
            Task(id="task", func="builtins:len", job_executor="async")
        )
        job = Job(task_id="task", executor="async")  # keeps no result
        await retrying_store.add_job(job)
        [acquired] = await retrying_store.acquire_jobs("me", LEASE, 1)
        released = Recorder(retrying_store, JobReleased)

        async def purge() -> None:  # another scheduler's cleanup()
            await other_store.cleanup()
            assert await other_store._jobs.count_documents({}) == 0

        retrying_store._jobs = LostReply(retrying_store._jobs, "update_one", purge)
        result = JobResult.from_job(acquired, JobOutcome.success)
        await retrying_store.release_job("me", acquired, result)
        assert [event.job_id for event in await released.settled()] == [job.id]

    async def test_result_fetched_once_is_not_lost(
        self, retrying_store: MongoDBDataStore
    ) -> None:
        [job] = await add_task_and_jobs(retrying_store, 1)
        [acquired] = await retrying_store.acquire_jobs("me", LEASE, 1)
        result = JobResult.from_job(acquired, JobOutcome.success, return_value=7)
        await retrying_store.release_job("me", acquired, result)

        retrying_store._jobs = LostReply(retrying_store._jobs, "update_one")
        fetched = await retrying_store.get_job_result(job.id)
        assert fetched is not None
        assert fetched.return_value == 7
        assert await retrying_store.get_job_result(job.id) is None

    async def test_schedule_insert_claimed_before_retry(
        self, retrying_store: MongoDBDataStore, other_store: MongoDBDataStore
    ) -> None:
        added = Recorder(retrying_store, ScheduleAdded)
        trigger = IntervalTrigger(
            minutes=1, start_time=datetime.now(timezone.utc) - timedelta(seconds=1)
        )
        schedule = Schedule(
            id="s", task_id="task", trigger=trigger, job_executor="async"
        )
        schedule.next_fire_time = trigger.next()

        async def claim_it() -> None:
            assert len(await other_store.acquire_schedules("other", LEASE, 10)) == 1

        retrying_store._schedules = LostReply(
            retrying_store._schedules, "insert_one", claim_it
        )
        await retrying_store.add_schedule(schedule, ConflictPolicy.exception)
        assert [s.id for s in await retrying_store.get_schedules()] == ["s"]
        assert [event.schedule_id for event in await added.settled()] == ["s"]


class TestStalledOwner:
    """A scheduler that stalls past its lease cannot add a job for a used fire time."""

    async def test_late_add_job_after_schedule_moved_on(
        self,
        retrying_store: MongoDBDataStore,
        other_store: MongoDBDataStore,
        time_machine: TimeMachineFixture,
    ) -> None:
        store = retrying_store
        await add_task_and_jobs(store, 0)
        start = datetime.now(timezone.utc) - timedelta(seconds=1)
        trigger = IntervalTrigger(minutes=1, start_time=start)
        schedule = Schedule(
            id="s", task_id="task", trigger=trigger, job_executor="async"
        )
        first = trigger.next()
        assert first is not None
        schedule.next_fire_time = first
        await store.add_schedule(schedule, ConflictPolicy.exception)
        time_machine.move_to(datetime.now(timezone.utc), tick=False)

        # A claims the schedule and stalls past its lease
        [stalled] = await store.acquire_schedules("A", timedelta(seconds=30), 10)
        time_machine.shift(31)

        # B takes over, adds the job, it runs, and B releases the schedule
        [taken] = await other_store.acquire_schedules("B", LEASE, 10)
        await other_store.add_job(
            Job(
                task_id="task",
                executor="async",
                schedule_id="s",
                scheduled_fire_time=first,
            )
        )
        [job] = await other_store.acquire_jobs("worker", LEASE, 10)
        await other_store.release_job(
            "worker", job, JobResult.from_job(job, JobOutcome.success)
        )
        await other_store.release_schedules(
            "B",
            [
                ScheduleResult(
                    schedule_id="s",
                    task_id="task",
                    trigger=taken.trigger,
                    last_fire_time=first,
                    next_fire_time=first + timedelta(minutes=1),
                )
            ],
        )

        # Long after, the fire time record is forgotten; then A wakes up
        time_machine.shift(FIRE_TIME_RETENTION.total_seconds() + 60)
        await other_store.cleanup()
        assert await store._jobs.count_documents({}) == 0
        added = Recorder(store, JobAdded)
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


class Outage:
    """
    A collection whose method ``name`` applies its first call, then loses the reply,
    and whose every call fails from then on until :meth:`end` (the retries run out).
    """

    def __init__(self, collection: Any, name: str) -> None:
        self._collection = collection
        self._name = name
        self.down = False

    def end(self) -> Any:
        self.down = False
        return self._collection

    def __getattr__(self, attribute: str) -> Any:
        target = getattr(self._collection, attribute)
        if not callable(target):
            return target

        def fail(*args: Any, **kwargs: Any) -> Any:
            raise AutoReconnect("connection refused (simulated outage)")

        if self.down:
            return fail

        if attribute != self._name:
            return target

        async def apply_then_go_down(*args: Any, **kwargs: Any) -> Any:
            await target(*args, **kwargs)
            self.down = True
            fail()

        return apply_then_go_down


class TestClaimNeverDelivered:
    """
    A claim applied on the server whose reply never arrived (the retries ran out)
    leaves nothing leased to a scheduler that never saw it: the next claim or reaping
    puts it back, so a job is not reported abandoned without having run.
    """

    async def test_job_returns_to_the_queue(
        self, retrying_store: MongoDBDataStore
    ) -> None:
        store = retrying_store
        [job] = await add_task_and_jobs(store, 1)
        outage = Outage(store._jobs, "update_each")
        store._jobs = outage  # type: ignore[assignment]
        with pytest.raises(AutoReconnect):
            await store.acquire_jobs("me", LEASE, 10)

        store._jobs = outage.end()
        assert await store._jobs.count_documents({"state": "acquired"}) == 1

        # The restarted scheduler reaps its abandoned jobs first: this one never
        # reached it, so it is queued again instead, and then handed out
        released = Recorder(store, JobReleased)
        await store.reap_abandoned_jobs("me")
        assert await released.settled() == []
        [again] = await store.acquire_jobs("me", LEASE, 10)
        assert again.id == job.id
        await store.release_job(
            "me", again, JobResult.from_job(again, JobOutcome.success)
        )
        assert (await store.get_task("task")).running_jobs == 0

    async def test_schedule_is_free_for_others(
        self, retrying_store: MongoDBDataStore
    ) -> None:
        store = retrying_store
        await add_task_and_jobs(store, 0)
        schedule = Schedule(
            id="s",
            task_id="task",
            trigger=IntervalTrigger(minutes=1),
            job_executor="async",
        )
        schedule.next_fire_time = datetime.now(timezone.utc) - timedelta(seconds=1)
        await store.add_schedule(schedule, ConflictPolicy.exception)
        outage = Outage(store._schedules, "update_each")
        store._schedules = outage  # type: ignore[assignment]
        with pytest.raises(AutoReconnect):
            await store.acquire_schedules("me", LEASE, 10)

        store._schedules = outage.end()
        # A scheduler of another identity (a restart gets a new default identity)
        # need not wait for the lease of a claim nobody saw
        [taken] = await store.acquire_schedules("another", LEASE, 10)
        assert taken.id == "s"
