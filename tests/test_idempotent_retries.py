"""
Writes retried after a lost reply take effect once, and are told once (guarantee 5).

A write whose reply was lost may have been applied; the store (or broker) retries it,
and its idempotency is all that stands between the retry and a second effect.

In process, a collection of the store applies one write and then loses the reply
(:mod:`tests.support.lossy`), letting other schedulers act before the retry; when the
retries run out instead, the claim that was applied is not lost either.

Over real sockets, a :class:`~tests.support.proxy.FaultyProxy` between the client and
the wire server forwards a write to the server, which carries it out, then resets the
connection instead of forwarding the reply: pymongo raises
:exc:`~pymongo.errors.AutoReconnect` and the store (or broker) retries the write
itself. pymongo's own retryable writes do not run against a standalone server. Those
tests check everything afterwards through a client that does not go through the proxy.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import anyio
import attrs
import bson
import pytest
from apscheduler import (
    ConflictPolicy,
    Event,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobResult,
    RetrySettings,
    Schedule,
    ScheduleAdded,
    ScheduleUpdated,
    TaskAdded,
    TaskRemoved,
    TaskUpdated,
)
from apscheduler.abc import EventBroker
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.interval import IntervalTrigger
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect
from tenacity import stop_after_attempt, wait_fixed

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker
from apscheduler_mongo._layout import ACQUIRED, FINISHED

from .support.events import Recorder
from .support.items import add_task, due_schedule, processed, scheduled_job
from .support.logs import retry_messages
from .support.lossy import LostReply, Outage
from .support.proxy import FAULT_RETRIES, OP_MSG, FaultyProxy, command_name
from .support.stores import another_store
from .support.tiers import WIRE_ONLY

pytestmark = pytest.mark.anyio

LEASE = timedelta(minutes=5)
#: Bounds every wait for events in process
IN_PROCESS_TIMEOUT = 3
#: Bounds every wait over the wire: a lost reply costs a reconnection, well under a
#: second
TIMEOUT = 10


# In process: a store's collection loses the reply


@pytest.fixture
def raw_store(client: Any, database_name: str) -> MongoDBDataStore:
    """The store under test retries at once, three attempts at most."""
    return MongoDBDataStore(
        client,
        database=database_name,
        start_from_scratch=True,
        retry_settings=RetrySettings(stop=stop_after_attempt(3), wait=wait_fixed(0)),
    )


async def add_task_and_jobs(store: MongoDBDataStore, count: int) -> list[Job]:
    await add_task(store)
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
        self, store: MongoDBDataStore
    ) -> None:
        await add_task_and_jobs(store, 6)
        lossy = LostReply(store._jobs, "update_each")
        store._jobs = lossy.as_collection()
        acquired = await store.acquire_jobs("me", LEASE, 3)

        assert lossy.lost == 1
        assert len(acquired) == 3
        held = await store._jobs.count_documents({"state": "acquired"})
        assert held == 3

    async def test_insert_claimed_before_retry_is_not_a_conflict(
        self,
        store: MongoDBDataStore,
        other_store: MongoDBDataStore,
        local_broker: EventBroker,
    ) -> None:
        await add_task_and_jobs(store, 0)
        added = Recorder(local_broker, JobAdded, timeout=IN_PROCESS_TIMEOUT)

        async def claim_it() -> None:
            assert len(await other_store.acquire_jobs("other", LEASE, 10)) == 1

        store._jobs = LostReply(store._jobs, "insert_one", claim_it).as_collection()
        job = Job(task_id="task", executor="async")
        await store.add_job(job)  # no ConflictingIdError
        assert [event.job_id for event in await added.settled()] == [job.id]

    async def test_release_is_announced_once(
        self, store: MongoDBDataStore, local_broker: EventBroker
    ) -> None:
        [job] = await add_task_and_jobs(store, 1)
        [acquired] = await store.acquire_jobs("me", LEASE, 1)
        released = Recorder(local_broker, JobReleased, timeout=IN_PROCESS_TIMEOUT)
        store._jobs = LostReply(store._jobs, "update_one").as_collection()
        result = JobResult.from_job(acquired, JobOutcome.success, return_value=7)
        await store.release_job("me", acquired, result)

        assert [event.job_id for event in await released.settled()] == [job.id]
        stored = await store.get_job_result(job.id)
        assert stored is not None
        assert stored.return_value == 7

    async def test_release_announced_when_purged_before_retry(
        self,
        store: MongoDBDataStore,
        other_store: MongoDBDataStore,
        local_broker: EventBroker,
    ) -> None:
        await add_task(store)
        job = Job(task_id="task", executor="async")  # keeps no result
        await store.add_job(job)
        [acquired] = await store.acquire_jobs("me", LEASE, 1)
        released = Recorder(local_broker, JobReleased, timeout=IN_PROCESS_TIMEOUT)

        async def purge() -> None:  # another scheduler's cleanup()
            await other_store.cleanup()
            assert await other_store._jobs.count_documents({}) == 0

        store._jobs = LostReply(store._jobs, "update_one", purge).as_collection()
        result = JobResult.from_job(acquired, JobOutcome.success)
        await store.release_job("me", acquired, result)
        assert [event.job_id for event in await released.settled()] == [job.id]

    async def test_result_fetched_once_is_not_lost(
        self, store: MongoDBDataStore
    ) -> None:
        [job] = await add_task_and_jobs(store, 1)
        [acquired] = await store.acquire_jobs("me", LEASE, 1)
        result = JobResult.from_job(acquired, JobOutcome.success, return_value=7)
        await store.release_job("me", acquired, result)

        store._jobs = LostReply(store._jobs, "update_one").as_collection()
        fetched = await store.get_job_result(job.id)
        assert fetched is not None
        assert fetched.return_value == 7
        assert await store.get_job_result(job.id) is None

    async def test_schedule_insert_claimed_before_retry(
        self,
        store: MongoDBDataStore,
        other_store: MongoDBDataStore,
        local_broker: EventBroker,
    ) -> None:
        added = Recorder(local_broker, ScheduleAdded, timeout=IN_PROCESS_TIMEOUT)

        async def claim_it() -> None:
            assert len(await other_store.acquire_schedules("other", LEASE, 10)) == 1

        lossy = LostReply(store._schedules, "insert_one", claim_it)
        store._schedules = lossy.as_collection()
        await store.add_schedule(due_schedule("s"), ConflictPolicy.exception)
        assert [s.id for s in await store.get_schedules()] == ["s"]
        assert [event.schedule_id for event in await added.settled()] == ["s"]


class TestClaimNeverDelivered:
    """
    A claim applied on the server whose reply never arrived (the retries ran out)
    leaves nothing leased to a scheduler that never saw it: the next claim or reaping
    puts it back, so a job is not reported abandoned without having run.
    """

    @staticmethod
    async def claim_lost_in_an_outage(store: MongoDBDataStore) -> Job:
        """Add a job, and claim it in an outage that outlasts the retries."""
        [job] = await add_task_and_jobs(store, 1)
        outage = Outage(store._jobs, "update_each")
        store._jobs = outage.as_collection()
        with pytest.raises(AutoReconnect):
            await store.acquire_jobs("me", LEASE, 10)

        store._jobs = outage.end()
        return job

    @staticmethod
    async def given_back(
        store: MongoDBDataStore, local_broker: EventBroker, job: Job
    ) -> Job:
        """
        Reap as a restarted scheduler does first: the job never reached it, so it
        is queued again (no release announced), and then handed out; return it.
        """
        released = Recorder(local_broker, JobReleased, timeout=IN_PROCESS_TIMEOUT)
        await store.reap_abandoned_jobs("me")
        assert await released.settled() == []
        [again] = await store.acquire_jobs("me", LEASE, 10)
        assert again.id == job.id
        return again

    async def test_job_returns_to_the_queue(
        self, store: MongoDBDataStore, local_broker: EventBroker
    ) -> None:
        job = await self.claim_lost_in_an_outage(store)
        assert await store._jobs.count_documents({"state": "acquired"}) == 1
        again = await self.given_back(store, local_broker, job)
        await store.release_job(
            "me", again, JobResult.from_job(again, JobOutcome.success)
        )
        assert (await store.get_task("task")).running_jobs == 0

    async def test_job_returns_to_the_queue_after_a_restart(
        self,
        client: Any,
        raw_store: MongoDBDataStore,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        """A supervisor restarts a crashed scheduler on the same store object: the
        claim the crash left unconfirmed is still given back."""
        # Started twice, so not from scratch (which would empty the database)
        store = MongoDBDataStore(
            client, database=raw_store.database, retry_settings=raw_store.retry_settings
        )
        async with AsyncExitStack() as exit_stack:
            await local_broker.start(exit_stack, logger)
            async with AsyncExitStack() as first_run:
                await store.start(first_run, local_broker, logger)
                job = await self.claim_lost_in_an_outage(store)

            async with AsyncExitStack() as second_run:
                await store.start(second_run, local_broker, logger)
                await self.given_back(store, local_broker, job)

    async def test_schedule_is_free_for_others(self, store: MongoDBDataStore) -> None:
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
        store._schedules = outage.as_collection()
        with pytest.raises(AutoReconnect):
            await store.acquire_schedules("me", LEASE, 10)

        store._schedules = outage.end()
        # A scheduler of another identity (a restart gets a new default identity)
        # need not wait for the lease of a claim nobody saw
        [taken] = await store.acquire_schedules("another", LEASE, 10)
        assert taken.id == "s"


# Over real sockets: the proxy loses the reply


@pytest.fixture
async def direct_store(
    client: Any, proxied_store: MongoDBDataStore, logger: logging.Logger
) -> AsyncIterator[MongoDBDataStore]:
    """Another scheduler's store on the same database, not through the proxy."""
    async with another_store(client, proxied_store, logger) as other:
        yield other


def assert_lost_once(
    proxy: FaultyProxy, command: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Assert that one reply, to ``command``, was lost, and our own retry cured it."""
    assert proxy.replies_lost == 1
    assert proxy.lost_commands == [command]
    assert len(retry_messages(caplog)) == 1  # our own retry loop's


@attrs.define
class LosingWire:
    """A store whose client connects through the losing proxy, and its checks."""

    store: MongoDBDataStore
    proxy: FaultyProxy
    #: The test's database, reached directly (not through the proxy)
    database: Any
    #: The store's event broker
    events: LocalEventBroker
    caplog: pytest.LogCaptureFixture

    def recorder(self, *event_types: type[Event]) -> Recorder:
        """Record the events of these types that the store announces."""
        return Recorder(self.events, *event_types, timeout=TIMEOUT)

    def assert_lost_once(self, command: str) -> None:
        assert_lost_once(self.proxy, command, self.caplog)


@pytest.fixture
def wire(
    proxied_store: MongoDBDataStore,
    proxy: FaultyProxy,
    database: Any,
    local_events: LocalEventBroker,
    caplog: pytest.LogCaptureFixture,
) -> LosingWire:
    return LosingWire(proxied_store, proxy, database, local_events, caplog)


def op_msg(*sections: bytes, request_id: int = 7, flags: int = 0) -> bytes:
    body = flags.to_bytes(4, "little") + b"".join(sections)
    header = (16 + len(body)).to_bytes(4, "little", signed=True)
    header += request_id.to_bytes(4, "little") + bytes(4)
    return header + OP_MSG.to_bytes(4, "little") + body


@WIRE_ONLY
class TestLosingProxy:
    """The proxy loses exactly the armed reply, after the server carried it out."""

    def test_command_name(self) -> None:
        body = b"\0" + bson.encode({"update": "jobs", "ordered": False})
        documents = bson.encode({"q": {}, "u": {"$set": {"a": 1}}})
        name = b"updates\0"
        size = (4 + len(name) + len(documents)).to_bytes(4, "little")
        sequence = b"\1" + size + name + documents
        assert command_name(op_msg(body, sequence)) == "update"
        assert command_name(op_msg(sequence, body)) == "update"
        assert command_name(op_msg(body, bytes(4), flags=1)) == "update"
        assert command_name(op_msg(sequence)) is None
        assert command_name(op_msg(body)[:-1]) is None  # not one whole message
        compressed = bytearray(op_msg(body))
        compressed[12:16] = (2012).to_bytes(4, "little")
        assert command_name(bytes(compressed)) is None

    async def test_large_messages_pass_unchanged(
        self, proxy: FaultyProxy, through: Callable[..., str], database: Any
    ) -> None:
        payload = bytes(range(256)) * 4096  # 1 MiB: many partial reads
        client: AsyncMongoClient[Any] = AsyncMongoClient(through())
        try:
            with anyio.fail_after(TIMEOUT):
                collection = client[database.name]["blobs"]
                await collection.insert_many(
                    [{"_id": n, "payload": payload} for n in range(3)]
                )
                stored = await collection.find(sort=[("_id", 1)]).to_list(None)
        finally:
            await client.close()

        assert [doc["payload"] for doc in stored] == [payload] * 3
        assert await database["blobs"].count_documents({}) == 3
        assert proxy.replies_lost == 0

    async def test_loses_the_armed_reply_only(
        self, proxy: FaultyProxy, through: Callable[..., str], database: Any
    ) -> None:
        client: AsyncMongoClient[Any] = AsyncMongoClient(through())
        collection = client[database.name]["things"]
        try:
            with anyio.fail_after(TIMEOUT):
                await collection.find_one({})  # connected
                proxy.lose_reply_to("insert")
                await collection.find_one({})  # not armed: passes
                with pytest.raises(AutoReconnect):
                    await collection.insert_one({"_id": 1})

                assert proxy.lost_commands == ["insert"]
                await collection.insert_one({"_id": 2})  # disarmed after one
        finally:
            await client.close()

        # The server did carry out the insert whose reply was lost
        ids = await database["things"].distinct("_id")
        assert sorted(ids) == [1, 2]
        assert proxy.replies_lost == 1
        assert proxy.connections_cut == 0

    def test_arming_is_validated(self, proxy: FaultyProxy) -> None:
        with pytest.raises(ValueError, match="at least one command"):
            proxy.lose_reply_to()

        with pytest.raises(ValueError, match="must not be negative"):
            proxy.lose_reply_to("insert", count=-1)


@WIRE_ONLY
class TestJobs:
    """A job write retried after its reply was lost takes effect, and is told, once."""

    @pytest.mark.parametrize("from_schedule", [False, True], ids=["plain", "schedule"])
    async def test_add_job(self, wire: LosingWire, from_schedule: bool) -> None:
        await add_task(wire.store)
        added = wire.recorder(JobAdded)
        job = Job(task_id="task", executor="async")
        if from_schedule:  # also keyed by its fire time (a second unique index)
            job = scheduled_job("s", datetime.now(timezone.utc))
        wire.proxy.lose_reply_to("insert")
        with anyio.fail_after(TIMEOUT):
            await wire.store.add_job(job)  # no ConflictingIdError

        wire.assert_lost_once("insert")
        assert await wire.database["jobs"].count_documents({}) == 1
        assert [stored.id for stored in await wire.store.get_jobs()] == [job.id]
        events = await added.settled()
        assert [event.job_id for event in events] == [job.id]

    @pytest.mark.parametrize(
        ("max_running_jobs", "limit"),
        [pytest.param(None, 2, id="limit"), pytest.param(2, None, id="task_cap")],
    )
    async def test_acquire_jobs(
        self,
        wire: LosingWire,
        direct_store: MongoDBDataStore,
        max_running_jobs: int | None,
        limit: int | None,
    ) -> None:
        await add_task(wire.store, max_running_jobs)
        jobs = [Job(task_id="task", executor="async") for _ in range(3)]
        for job in jobs:
            await wire.store.add_job(job)

        acquired_events = wire.recorder(JobAcquired)
        wire.proxy.lose_reply_to("update")  # the claim is one bulk write
        with anyio.fail_after(TIMEOUT):
            acquired = await wire.store.acquire_jobs("me", LEASE, limit)

        wire.assert_lost_once("update")
        # The first two in queue order, handed out once, to the scheduler that
        # claimed them; none claimed but left out of the answer
        assert [job.id for job in acquired] == [job.id for job in jobs[:2]]
        assert all(job.acquired_by == "me" for job in acquired)
        held = await wire.database["jobs"].find({"state": ACQUIRED}).to_list()
        assert sorted(doc["acquired_by"] for doc in held) == ["me", "me"]
        assert {doc["_id"].as_uuid() for doc in held} == {job.id for job in jobs[:2]}
        events = await acquired_events.settled()
        assert [event.job_id for event in events] == [job.id for job in jobs[:2]]
        assert (await direct_store.get_task("task")).running_jobs == 2

        # Another scheduler gets the rest (only if the task allows more)
        others = await direct_store.acquire_jobs("other", LEASE, None)
        expected = [] if max_running_jobs else [jobs[2].id]
        assert [job.id for job in others] == expected

    async def test_release_job(
        self, wire: LosingWire, direct_store: MongoDBDataStore
    ) -> None:
        await add_task(wire.store, 1)
        job = Job(task_id="task", executor="async", result_expiration_time=60)
        queued = Job(task_id="task", executor="async")
        await wire.store.add_job(job)
        await wire.store.add_job(queued)
        [acquired] = await wire.store.acquire_jobs("me", LEASE, None)
        assert (await wire.store.get_task("task")).running_jobs == 1

        released = wire.recorder(JobReleased)
        result = JobResult.from_job(acquired, JobOutcome.success, return_value=7)
        wire.proxy.lose_reply_to("update")
        with anyio.fail_after(TIMEOUT):
            await wire.store.release_job("me", acquired, result)

        wire.assert_lost_once("update")
        events = await released.settled()
        assert [(event.job_id, event.outcome) for event in events] == [
            (job.id, JobOutcome.success)
        ]
        document = await wire.database["jobs"].find_one(
            {"_id": bson.Binary.from_uuid(job.id)}
        )
        assert document is not None
        assert document["state"] == FINISHED
        assert (await direct_store.get_task("task")).running_jobs == 0
        stored = await direct_store.get_job_result(job.id)
        assert stored is not None
        assert stored.return_value == 7

        # The task's only slot is free again
        [next_job] = await direct_store.acquire_jobs("other", LEASE, None)
        assert next_job.id == queued.id

    async def test_reap_abandoned_jobs(
        self, wire: LosingWire, direct_store: MongoDBDataStore
    ) -> None:
        await add_task(wire.store, 1)
        job = Job(task_id="task", executor="async", result_expiration_time=60)
        await wire.store.add_job(job)
        await wire.store.acquire_jobs("me", LEASE, None)
        released = wire.recorder(JobReleased)
        wire.proxy.lose_reply_to("update")  # the bulk write that finishes them
        with anyio.fail_after(TIMEOUT):
            await wire.store.reap_abandoned_jobs("me")

        wire.assert_lost_once("update")
        events = await released.settled()
        assert [(event.job_id, event.outcome) for event in events] == [
            (job.id, JobOutcome.abandoned)
        ]
        assert (await direct_store.get_task("task")).running_jobs == 0
        result = await direct_store.get_job_result(job.id)
        assert result is not None
        assert result.outcome is JobOutcome.abandoned

    async def test_get_job_result(self, wire: LosingWire) -> None:
        await add_task(wire.store)
        job = Job(task_id="task", executor="async", result_expiration_time=60)
        await wire.store.add_job(job)
        [acquired] = await wire.store.acquire_jobs("me", LEASE, None)
        result = JobResult.from_job(acquired, JobOutcome.success, return_value=7)
        await wire.store.release_job("me", acquired, result)

        wire.proxy.lose_reply_to("update")  # taking the result is a conditional update
        with anyio.fail_after(TIMEOUT):
            fetched = await wire.store.get_job_result(job.id)

        wire.assert_lost_once("update")
        assert fetched is not None
        assert fetched.return_value == 7
        assert await wire.store.get_job_result(job.id) is None  # taken once


@WIRE_ONLY
class TestTasks:
    """A task write retried after its reply was lost is reported as it happened."""

    async def test_add_task(self, wire: LosingWire) -> None:
        announced = wire.recorder(TaskAdded, TaskUpdated)
        wire.proxy.lose_reply_to("findAndModify")  # the upsert that stores the task
        with anyio.fail_after(TIMEOUT):
            await add_task(wire.store)

        wire.assert_lost_once("findAndModify")
        assert await wire.database["tasks"].count_documents({}) == 1
        # Announced once; the retry finds the task already stored, so the
        # announcement may be TaskUpdated rather than TaskAdded (as with
        # add_schedule(..., ConflictPolicy.replace): design.rst, "Known behaviours")
        [event] = await announced.settled()
        assert isinstance(event, TaskAdded | TaskUpdated)
        assert event.task_id == "task"

    async def test_remove_task(self, wire: LosingWire) -> None:
        await add_task(wire.store)
        removed = wire.recorder(TaskRemoved)
        wire.proxy.lose_reply_to("delete")
        with anyio.fail_after(TIMEOUT):
            await wire.store.remove_task("task")  # no TaskLookupError

        wire.assert_lost_once("delete")
        assert await wire.database["tasks"].count_documents({}) == 0
        events = await removed.settled()
        assert [event.task_id for event in events] == ["task"]


@WIRE_ONLY
class TestSchedules:
    """A schedule write retried after its reply was lost takes effect once."""

    @pytest.mark.parametrize(
        ("policy", "command"),
        [
            pytest.param(ConflictPolicy.exception, "insert", id="exception"),
            pytest.param(ConflictPolicy.replace, "findAndModify", id="replace"),
        ],
    )
    async def test_add_schedule(
        self, wire: LosingWire, policy: ConflictPolicy, command: str
    ) -> None:
        added = wire.recorder(ScheduleAdded, ScheduleUpdated)
        wire.proxy.lose_reply_to(command)
        with anyio.fail_after(TIMEOUT):
            await wire.store.add_schedule(due_schedule("s"), policy)

        wire.assert_lost_once(command)
        assert await wire.database["schedules"].count_documents({}) == 1
        events = await added.settled()
        assert [(type(event), event.schedule_id) for event in events] == [
            (ScheduleAdded, "s")
        ]

    async def test_replace_schedule(self, wire: LosingWire) -> None:
        await wire.store.add_schedule(due_schedule("s"), ConflictPolicy.exception)
        replaced = wire.recorder(ScheduleAdded, ScheduleUpdated)
        replacement = due_schedule("s")
        replacement.args = ("replacement",)
        wire.proxy.lose_reply_to("findAndModify")
        with anyio.fail_after(TIMEOUT):
            await wire.store.add_schedule(replacement, ConflictPolicy.replace)

        wire.assert_lost_once("findAndModify")
        assert await wire.database["schedules"].count_documents({}) == 1
        [stored] = await wire.store.get_schedules()
        assert stored.args == ("replacement",)
        # Announced once; as design.rst says under "Known behaviours", the retry
        # finds its own replacement and may announce it as added
        [event] = await replaced.settled()
        assert isinstance(event, ScheduleAdded | ScheduleUpdated)
        assert event.schedule_id == "s"

    async def test_acquire_schedules(
        self, wire: LosingWire, direct_store: MongoDBDataStore
    ) -> None:
        for schedule_id in ("s1", "s2"):
            await wire.store.add_schedule(
                due_schedule(schedule_id), ConflictPolicy.exception
            )

        wire.proxy.lose_reply_to("update")  # the claim is one update of both
        with anyio.fail_after(TIMEOUT):
            acquired = await wire.store.acquire_schedules("me", LEASE, 10)

        wire.assert_lost_once("update")
        assert sorted(schedule.id for schedule in acquired) == ["s1", "s2"]
        schedules = wire.database["schedules"]
        owners = {doc["_id"]: doc["acquired_by"] async for doc in schedules.find()}
        assert owners == {"s1": "me", "s2": "me"}
        assert await direct_store.acquire_schedules("other", LEASE, 10) == []

    async def test_release_schedules(
        self, wire: LosingWire, direct_store: MongoDBDataStore
    ) -> None:
        await wire.store.add_schedule(due_schedule("s"), ConflictPolicy.exception)
        [schedule] = await wire.store.acquire_schedules("me", LEASE, 10)
        assert schedule.next_fire_time is not None
        fire_time = schedule.next_fire_time
        next_time = fire_time + timedelta(minutes=1)
        released = wire.recorder(ScheduleUpdated)
        wire.proxy.lose_reply_to("update")
        with anyio.fail_after(TIMEOUT):
            await wire.store.release_schedules("me", [processed(schedule, next_time)])

        wire.assert_lost_once("update")
        events = await released.settled()
        assert [(event.schedule_id, event.next_fire_time) for event in events] == [
            ("s", next_time)
        ]
        document = await wire.database["schedules"].find_one({"_id": "s"})
        assert document is not None
        assert document["acquired_by"] is None
        [stored] = await direct_store.get_schedules({"s"})
        assert stored.next_fire_time == next_time
        assert stored.last_fire_time == fire_time


@WIRE_ONLY
class TestEventBroker:
    """An event whose publishing write lost its reply is stored and delivered once."""

    async def test_publish(
        self,
        proxy: FaultyProxy,
        through: Callable[..., str],
        client: Any,
        database: Any,
        logger: logging.Logger,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        async with AsyncExitStack() as exit_stack:
            receiver = MongoDBEventBroker(
                client, database=database.name, mode="polling", poll_interval=0.05
            )
            await receiver.start(exit_stack, logger)
            publisher = MongoDBEventBroker(
                through(),
                database=database.name,
                mode="polling",
                poll_interval=0.05,
                retry_settings=FAULT_RETRIES,
            )
            await publisher.start(exit_stack, logger)
            received = Recorder(receiver, JobAdded, timeout=TIMEOUT)
            heard_locally = Recorder(publisher, JobAdded, timeout=TIMEOUT)

            event = JobAdded(job_id=uuid4(), task_id="task", schedule_id=None)
            proxy.lose_reply_to("update")  # the upsert that stores the event
            with anyio.fail_after(TIMEOUT):
                await publisher.publish(event)

            assert_lost_once(proxy, "update", caplog)
            assert await received.settled(publisher) == [event]
            assert heard_locally.events == [event]
            await anyio.sleep(0.3)  # several more polls bring nothing new
            assert received.events == [event]

        stored = await database["events"].find().to_list()
        assert [(doc["type"], doc["seq"]) for doc in stored] == [
            ("JobAdded", 1),
            ("TaskRemoved", 2),
        ]
