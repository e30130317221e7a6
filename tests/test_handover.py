"""
A scheduler that stops cleanly leaves no lease behind: the next one takes over at once.

Tried as a deploy does it: schedulers on one database are started and stopped in
turn (``stop()``, then ``wait_until_stopped()``) while a task capped at one running
job has a long queue. A stop cancels APScheduler's job loop and the jobs' tasks:

- a job that ran is released from a task that the stop may cancel in the middle of
  the release (APScheduler shields only the release of a job cut off mid-run): its
  result would be lost and its lease left to lapse, holding the task's only slot;
- a job can be taken and never started (the loop is cancelled between the claim and
  the job's run): it is never released.

Either way, without a handover the task runs nothing until the lease lapses.
"""

from __future__ import annotations

import logging
import random
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import anyio
import attrs
import pytest
from apscheduler import (
    AsyncScheduler,
    ConflictPolicy,
    Event,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobResult,
    RetrySettings,
    ScheduleUpdated,
)
from apscheduler.eventbrokers.local import LocalEventBroker
from pymongo.errors import AutoReconnect
from tenacity import stop_after_delay, wait_fixed

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._marshalling import uuid_to_bson

from .support.items import add_task, due_schedule

pytestmark = pytest.mark.anyio

#: Far longer than the test waits for the next scheduler to run a job
LEASE = timedelta(seconds=60)
STOPS = 12
JOB_TIME = 0.01
#: Jobs each scheduler runs before it is stopped (at least)
RUNS_PER_TURN = 3


async def short_job() -> None:
    await anyio.sleep(JOB_TIME)


async def leased(client: Any, database: str) -> dict[str, list[Any]]:
    """Return the ids of the jobs and schedules that carry a lease, by collection."""
    found: dict[str, list[Any]] = {}
    for name in ("jobs", "schedules"):
        cursor = client[database][name].find({"acquired_by": {"$ne": None}}, {"_id": 1})
        found[name] = [doc["_id"] async for doc in cursor]

    return found


@attrs.define
class Seen:
    """Counts events; ``enough`` is set once ``wanted`` have been seen."""

    wanted: int
    count: int = 0
    enough: anyio.Event = attrs.field(factory=anyio.Event)

    def __call__(self, _event: Event) -> None:
        self.count += 1
        if self.count >= self.wanted:
            self.enough.set()


class TestCleanStop:
    @pytest.mark.parametrize(
        "stop_on", [JobAcquired, JobReleased], ids=["acquired", "released"]
    )
    async def test_no_lease_left_behind(
        self,
        client: Any,
        database_name: str,
        logger: logging.Logger,
        stop_on: type[Event],
    ) -> None:
        """
        Each scheduler in turn runs a few jobs and stops (as it takes a job, or as
        one ends and it claims the next); none leaves a lease, so the next runs its
        first job at once (not a lease later).
        """
        first = MongoDBDataStore(client, database=database_name)
        async with AsyncScheduler(first, LocalEventBroker(), logger=logger) as setup:
            await setup.configure_task("t", func=short_job, max_running_jobs=1)
            for _ in range(STOPS * RUNS_PER_TURN * 3):
                await setup.add_job("t")

        for turn in range(STOPS):
            store = MongoDBDataStore(client, database=database_name)
            scheduler = AsyncScheduler(
                store,
                LocalEventBroker(),
                identity=f"deploy-{turn}",
                lease_duration=LEASE,
                logger=logger,
            )
            seen = Seen(RUNS_PER_TURN)
            async with scheduler:
                scheduler.subscribe(seen, {stop_on})
                await scheduler.start_in_background()
                # A lease left by the scheduler before would hold the task for a
                # minute; the runs are due in well under that
                with anyio.fail_after(20):
                    await seen.enough.wait()

                # Somewhere in the job loop's work: a claim, a run, a release
                await anyio.sleep(random.Random(turn).uniform(0, 3 * JOB_TIME))

                await scheduler.stop()
                await scheduler.wait_until_stopped()

            assert await leased(client, database_name) == {
                "jobs": [],
                "schedules": [],
            }, f"stop {turn + 1} left leases behind"


class TestHandBack:
    """What a stopping store gives back, deterministically (no scheduler's timing)."""

    async def test_jobs_never_started_go_back(
        self, client: Any, database_name: str, logger: logging.Logger
    ) -> None:
        """
        Jobs handed out and never released go back to the queue, with their slots,
        announced; a released job and a job another scheduler took over are left
        as they are.
        """
        announced: list[Event] = []
        async with AsyncExitStack() as outer:
            broker = LocalEventBroker()
            await broker.start(outer, logger)
            broker.subscribe(announced.append, {JobAdded})
            other = MongoDBDataStore(client, database=database_name)
            await other.start(outer, broker, logger)
            async with AsyncExitStack() as exit_stack:
                store = MongoDBDataStore(client, database=database_name)
                await store.start(exit_stack, broker, logger)
                await add_task(store, 2, "capped")
                await add_task(store, None, "free")
                for task_id in ("capped", "capped", "free", "free"):
                    await store.add_job(Job(task_id=task_id, executor="async"))

                taken = await store.acquire_jobs("leaving", LEASE, 10)
                assert len(taken) == 4
                done, lapsed, *never_started = taken
                await store.release_job(
                    "leaving", done, JobResult.from_job(done, JobOutcome.success)
                )
                # Another scheduler took this one over (its lease lapsed)
                await client[database_name]["jobs"].update_one(
                    {"_id": uuid_to_bson(lapsed.id)}, {"$set": {"acquired_by": "other"}}
                )
                await anyio.wait_all_tasks_blocked()  # earlier events delivered
                announced.clear()

            await anyio.wait_all_tasks_blocked()  # the events reach the subscriber
            jobs = {
                doc["_id"]: doc async for doc in client[database_name]["jobs"].find({})
            }
            for job in never_started:
                document = jobs[uuid_to_bson(job.id)]
                assert document["state"] == "queued"
                assert document.get("acquired_by") is None
                assert "slot_key" not in document

            assert jobs[uuid_to_bson(lapsed.id)]["acquired_by"] == "other"
            released = jobs.get(uuid_to_bson(done.id))
            assert released is None or released["state"] == "finished"
            assert sorted(str(event.job_id) for event in announced) == sorted(  # type: ignore[attr-defined]
                str(job.id) for job in never_started
            )

            # Taken over at once, slots and all
            again = await other.acquire_jobs("next", LEASE, 10)
            assert {job.id for job in never_started} <= {job.id for job in again}

    async def test_schedules_held_are_let_go(
        self, client: Any, database_name: str, logger: logging.Logger
    ) -> None:
        announced: list[Event] = []
        async with AsyncExitStack() as outer:
            broker = LocalEventBroker()
            await broker.start(outer, logger)
            broker.subscribe(announced.append, {ScheduleUpdated})
            async with AsyncExitStack() as exit_stack:
                store = MongoDBDataStore(client, database=database_name)
                await store.start(exit_stack, broker, logger)
                await add_task(store)
                schedule = due_schedule()
                await store.add_schedule(schedule, ConflictPolicy.exception)
                [acquired] = await store.acquire_schedules("leaving", LEASE, 10)
                await anyio.wait_all_tasks_blocked()  # earlier events delivered
                announced.clear()

            await anyio.wait_all_tasks_blocked()
            document = await client[database_name]["schedules"].find_one({"_id": "s"})
            assert document["acquired_by"] is None
            assert [event.schedule_id for event in announced] == ["s"]  # type: ignore[attr-defined]
            assert acquired.next_fire_time == announced[0].next_fire_time  # type: ignore[attr-defined]


class TestReleaseCutOff:
    """A release cut off by a stop: the command in flight runs to its end; a
    release retrying through an outage stops at once, leaving its lease to lapse."""

    @pytest.fixture
    async def held(
        self, client: Any, database_name: str, local_events: Any, logger: logging.Logger
    ) -> Any:
        async with AsyncExitStack() as exit_stack:
            store = MongoDBDataStore(
                client,
                database=database_name,
                start_from_scratch=True,
                # An outage's retries would go on for a minute
                retry_settings=RetrySettings(
                    stop=stop_after_delay(60), wait=wait_fixed(0.05)
                ),
            )
            await store.start(exit_stack, local_events, logger)
            await add_task(store)
            await store.add_job(Job(task_id="task", executor="async"))
            [job] = await store.acquire_jobs("me", timedelta(minutes=1), 1)
            yield store, job

    async def test_command_in_flight_lands(
        self, held: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store, job = held
        write = store._jobs.update_one

        async def slow(*args: Any, **kwargs: Any) -> Any:
            await anyio.sleep(0.3)  # the command is on its way when the stop comes
            return await write(*args, **kwargs)

        monkeypatch.setattr(store._jobs, "update_one", slow)
        result = JobResult.from_job(job, JobOutcome.success)
        async with anyio.create_task_group() as group:
            group.start_soon(store.release_job, "me", job, result)
            await anyio.sleep(0.1)
            group.cancel_scope.cancel()

        monkeypatch.undo()
        assert await store.get_jobs() == []  # released (its result kept for no time)

    async def test_retries_stop_at_once(
        self, held: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store, job = held

        async def unreachable(*_args: Any, **_kwargs: Any) -> Any:
            raise AutoReconnect("connection refused by the test")

        monkeypatch.setattr(store._jobs, "update_one", unreachable)
        result = JobResult.from_job(job, JobOutcome.success)
        with anyio.fail_after(5):  # not the retry settings' minute
            async with anyio.create_task_group() as group:
                group.start_soon(store.release_job, "me", job, result)
                await anyio.sleep(0.3)
                group.cancel_scope.cancel()

        monkeypatch.undo()
        [left] = await store.get_jobs()
        assert left.acquired_by == "me"  # its lease lapses, as after a crash
