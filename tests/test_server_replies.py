"""
What real servers answer that the stand-in never does, injected at the wire.

A :class:`~tests.support.faults.FaultPlan` in front of the wire server plays a
replica set member whose writes time out waiting for a majority, a mongos whose shard
is unreachable, a server older than ``hello``, Amazon DocumentDB with change streams
off; and it records the write concern and read preference of every command.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from apscheduler import (
    ConflictPolicy,
    Job,
    JobOutcome,
    JobReleased,
    JobResult,
    RetrySettings,
    TaskAdded,
)
from apscheduler._events import Event
from apscheduler.eventbrokers.local import LocalEventBroker
from pymongo.errors import OperationFailure
from tenacity import stop_after_attempt, wait_fixed

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker
from apscheduler_mongo._layout import ACQUIRED, FINISHED

from .support.faults import Command, FaultPlan
from .support.items import (
    add_task,
    due_schedule,
    next_job,
    processed,
    scheduled_job,
)
from .support.proxy import LOOPBACK, FaultyProxy
from .support.tiers import WIRE_ONLY

pytestmark = [pytest.mark.anyio, *WIRE_ONLY]

LEASE = timedelta(minutes=5)
TIMEOUT = 20
#: Enough attempts to outlast three injected failures in a row, without waiting
FOUR_ATTEMPTS = RetrySettings(stop=stop_after_attempt(4), wait=wait_fixed(0.05))
WRITES = ("insert", "update", "delete", "findAndModify")


@pytest.fixture
def proxy_retries() -> RetrySettings:
    return FOUR_ATTEMPTS


async def started_store(
    exit_stack: AsyncExitStack,
    uri: str,
    database: str,
    broker: Any,
    logger: logging.Logger,
    retry_settings: RetrySettings = FOUR_ATTEMPTS,
) -> MongoDBDataStore:
    store = MongoDBDataStore(uri, database=database, retry_settings=retry_settings)
    await store.start(exit_stack, broker, logger)
    return store


async def started_broker(
    exit_stack: AsyncExitStack,
    uri: str,
    database: str,
    logger: logging.Logger,
    **options: Any,
) -> MongoDBEventBroker:
    options.setdefault("poll_interval", 0.02)
    options.setdefault("retry_settings", FOUR_ATTEMPTS)
    broker = MongoDBEventBroker(uri, database=database, **options)
    await broker.start(exit_stack, logger)
    return broker


async def a_job_lifecycle(store: MongoDBDataStore) -> None:
    """Send every kind of write the store makes for a schedule's fire time."""
    await add_task(store)
    await store.add_schedule(due_schedule(), ConflictPolicy.exception)
    [schedule] = await store.acquire_schedules("me", LEASE, 10)
    await store.add_job(next_job(schedule, result_expiration_time=timedelta(minutes=1)))
    await store.release_schedules("me", [processed(schedule, None)])
    [job] = await store.acquire_jobs("me", LEASE, 10)
    await store.extend_acquired_job_leases("me", {job.id}, LEASE)
    await store.release_job(
        "me", job, JobResult.from_job(job, JobOutcome.success, return_value=1)
    )
    assert await store.get_job_result(job.id) is not None
    await store.remove_schedules(["s"])
    await store.cleanup()


def writes_of(plan: FaultPlan, database: str) -> list[Command]:
    return [c for c in plan.seen(*WRITES) if c.database == database]


def is_claim(collection: str) -> Callable[[Mapping[str, Any]], bool]:
    """Match the bulk ``update`` of a claim (it sets ``acquired_by``)."""

    def matches(body: Mapping[str, Any]) -> bool:
        return body.get("update") == collection

    return matches


@pytest.mark.usefixtures("client")  # drops the test's database afterwards
class TestWriteConcern:
    """Writes wait for a majority unless the user chose otherwise, and a reply
    with a write concern error is not taken as a success (guarantee 9)."""

    async def test_writes_wait_for_a_majority(
        self,
        plan: FaultPlan,
        through: Callable[..., str],
        database_name: str,
        logger: logging.Logger,
        figures: Callable[[str], None],
    ) -> None:
        async with AsyncExitStack() as exit_stack:
            broker = await started_broker(
                exit_stack, through(), database_name, logger, mode="polling"
            )
            store = await started_store(
                exit_stack, through(), database_name, broker, logger
            )
            with anyio.fail_after(TIMEOUT):
                await a_job_lifecycle(store)

        writes = writes_of(plan, database_name)
        kinds = {(c.name, c.collection) for c in writes}
        assert {("insert", "jobs"), ("update", "jobs"), ("update", "events")} <= kinds
        majority = [c for c in writes if (c.write_concern or {}).get("w") == "majority"]
        assert majority == writes, [c for c in writes if c not in majority]
        assert {(c.write_concern or {}).get("wtimeout") for c in writes} == {10_000}
        figures(f"{len(majority)} of {len(writes)} writes carried w: majority")

    async def test_the_users_write_concern_holds(
        self,
        plan: FaultPlan,
        through: Callable[..., str],
        database_name: str,
        local_events: LocalEventBroker,
        logger: logging.Logger,
    ) -> None:
        async with AsyncExitStack() as exit_stack:
            store = await started_store(
                exit_stack, through(w=1), database_name, local_events, logger
            )
            broker = await started_broker(
                exit_stack, through(w=1), database_name, logger, mode="polling"
            )
            with anyio.fail_after(TIMEOUT):
                await a_job_lifecycle(store)
                await broker.publish(TaskAdded(task_id="x"))

        writes = writes_of(plan, database_name)
        assert writes
        assert {repr(c.write_concern) for c in writes} == {repr({"w": 1})}

    async def test_claim_with_write_concern_error_settled_once(
        self,
        plan: FaultPlan,
        proxied_store: MongoDBDataStore,
        database: Any,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        store = proxied_store
        await add_task(store)
        for _ in range(3):
            await store.add_job(Job(task_id="task", executor="async"))

        # The claim's bulk write reaches the server, which applies it, but a
        # majority does not confirm it in time
        plan.write_concern_error("update", where=is_claim("jobs"))
        with anyio.fail_after(TIMEOUT):
            jobs = await store.acquire_jobs("me", LEASE, 10)

        assert plan.concern_errors == {"update": 1}
        assert len(jobs) == 3
        assert "Temporary MongoDB error" in caplog.text  # not taken as a success
        documents = await database["jobs"].find().to_list(None)
        assert [doc["state"] for doc in documents] == [ACQUIRED] * 3
        assert {doc["v"] for doc in documents} == {documents[0]["v"]}  # one claim

    async def test_release_with_write_concern_error_settled_once(
        self,
        plan: FaultPlan,
        proxied_store: MongoDBDataStore,
        database: Any,
        local_events: LocalEventBroker,
    ) -> None:
        store = proxied_store
        released: list[Event] = []
        local_events.subscribe(released.append)
        await add_task(store)
        await store.add_job(
            Job(
                task_id="task",
                executor="async",
                result_expiration_time=timedelta(minutes=1),
            )
        )
        [job] = await store.acquire_jobs("me", LEASE, 10)
        plan.write_concern_error("update")
        with anyio.fail_after(TIMEOUT):
            result = JobResult.from_job(job, JobOutcome.success, return_value=5)
            await store.release_job("me", job, result)
            [document] = await database["jobs"].find().to_list(None)
            stored = await store.get_job_result(job.id)
            await anyio.sleep(0.1)  # the local broker delivers in a task

        assert plan.concern_errors == {"update": 1}
        assert stored is not None
        assert stored.return_value == 5
        assert len([e for e in released if isinstance(e, JobReleased)]) == 1
        assert document["state"] == FINISHED

    async def test_unsatisfiable_write_concern_raised_at_once(
        self, plan: FaultPlan, proxied_store: MongoDBDataStore
    ) -> None:
        plan.write_concern_error(
            "findAndModify",
            code=100,
            code_name="UnsatisfiableWriteConcern",
            message="Not enough data-bearing nodes",
        )
        with anyio.fail_after(TIMEOUT), pytest.raises(OperationFailure) as info:
            await add_task(proxied_store)

        assert info.value.code == 100
        assert plan.concern_errors == {"findAndModify": 1}


@pytest.mark.usefixtures("client")  # drops the test's database afterwards
class TestTemporaryServerErrors:
    """Codes of passing trouble are retried even when they come unlabelled."""

    @pytest.mark.parametrize(
        ("code", "code_name"),
        [
            pytest.param(6, "HostUnreachable", id="host-unreachable"),
            pytest.param(189, "PrimarySteppedDown", id="stepped-down"),
            pytest.param(91, "ShutdownInProgress", id="shutdown"),
            pytest.param(262, "ExceededTimeLimit", id="time-limit"),
        ],
    )
    async def test_three_in_a_row_on_a_read(
        self,
        plan: FaultPlan,
        proxied_store: MongoDBDataStore,
        code: int,
        code_name: str,
    ) -> None:
        store = proxied_store
        await add_task(store)
        plan.fail("find", code=code, code_name=code_name, count=3)
        with anyio.fail_after(TIMEOUT):
            tasks = await store.get_tasks()

        assert [task.id for task in tasks] == ["task"]
        assert plan.answered == {"find": 3}

    async def test_on_a_multi_document_write(
        self, plan: FaultPlan, proxied_store: MongoDBDataStore, database: Any
    ) -> None:
        # delete_many is no retryable write: pymongo never retries it by itself
        store = proxied_store
        await add_task(store)
        await store.add_schedule(due_schedule(), ConflictPolicy.exception)
        plan.fail("delete", code=11602, count=3)
        with anyio.fail_after(TIMEOUT):
            await store.remove_schedules(["s"])

        assert plan.answered == {"delete": 3}
        assert await database["schedules"].count_documents({}) == 0

    @pytest.mark.parametrize(
        ("code", "code_name"),
        [
            pytest.param(13, "Unauthorized", id="unauthorized"),
            pytest.param(18, "AuthenticationFailed", id="authentication"),
            pytest.param(2, "BadValue", id="bad-value"),
        ],
    )
    async def test_permanent_errors_raised_at_once(
        self,
        plan: FaultPlan,
        proxied_store: MongoDBDataStore,
        caplog: pytest.LogCaptureFixture,
        code: int,
        code_name: str,
    ) -> None:
        plan.fail("find", code=code, code_name=code_name, count=3)
        with anyio.fail_after(TIMEOUT), pytest.raises(OperationFailure) as info:
            await proxied_store.get_tasks()

        assert info.value.code == code
        assert plan.answered == {"find": 1}
        assert "Temporary MongoDB error" not in caplog.text


@pytest.mark.usefixtures("client")  # drops the test's database afterwards
class TestServerWithoutHello:
    """A server older than ``hello`` (MongoDB 4.4.0, 4.4.1) is asked ``isMaster``."""

    async def test_store_and_broker_start_and_work(
        self,
        plan: FaultPlan,
        through: Callable[..., str],
        database_name: str,
        logger: logging.Logger,
    ) -> None:
        plan.old_server()
        async with AsyncExitStack() as exit_stack:
            broker = await started_broker(exit_stack, through(), database_name, logger)
            store = await started_store(
                exit_stack, through(), database_name, broker, logger
            )
            with anyio.fail_after(TIMEOUT):
                await a_job_lifecycle(store)

        # Both asked "hello", were refused, and asked "isMaster" instead
        assert plan.answered.get("hello", 0) >= 2
        asked = [c for c in plan.seen("isMaster") if c.database == database_name]
        assert len(asked) >= 2


@pytest.mark.usefixtures("client")  # drops the test's database afterwards
class TestManagedServices:
    """A replica set that refuses change streams (Amazon DocumentDB by default)
    gets a polling broker in ``auto`` mode; a secondary read preference in the URI
    does not send the store's reads to a secondary."""

    @staticmethod
    def refuse_change_streams(plan: FaultPlan) -> None:
        plan.replica_set("rs0")
        plan.fail(
            "aggregate",
            code=136,
            message="modifyChangeStreams has not been run for this "
            "collection/database/cluster",
            count=1_000_000,
            where=lambda body: any(
                "$changeStream" in stage for stage in body["pipeline"]
            ),
        )

    async def test_auto_mode_polls_when_change_streams_are_refused(
        self,
        plan: FaultPlan,
        through: Callable[..., str],
        database_name: str,
        logger: logging.Logger,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        self.refuse_change_streams(plan)
        async with AsyncExitStack() as exit_stack:
            one = await started_broker(exit_stack, through(), database_name, logger)
            two = await started_broker(exit_stack, through(), database_name, logger)
            received = anyio.Event()
            two.subscribe(lambda _event: received.set(), {TaskAdded})
            await one.publish(TaskAdded(task_id="t"))
            with anyio.fail_after(TIMEOUT):
                await received.wait()

        assert one.active_mode == two.active_mode == "polling"
        assert plan.answered == {"aggregate": 2}
        assert caplog.text.count("refused a change stream") == 2  # once per broker

    async def test_change_stream_mode_fails_clearly(
        self,
        plan: FaultPlan,
        through: Callable[..., str],
        database_name: str,
        logger: logging.Logger,
    ) -> None:
        self.refuse_change_streams(plan)
        async with AsyncExitStack() as exit_stack:
            with pytest.raises(RuntimeError, match="modifyChangeStreams"):
                await started_broker(
                    exit_stack, through(), database_name, logger, mode="change_stream"
                )

    async def test_duplicate_fire_time_without_key_pattern(
        self,
        plan: FaultPlan,
        proxied_store: MongoDBDataStore,
        database: Any,
    ) -> None:
        # A second job for a fire time that has one is refused by the unique index;
        # a server whose duplicate key errors carry no keyPattern still names the
        # index in its message
        store = proxied_store
        await add_task(store)
        fire_time = datetime.now(timezone.utc)
        plan.fail(
            "insert",
            code=11000,
            message=f"E11000 duplicate key error collection: {database.name}.jobs "
            'index: fire_key dup key: { fire_key: "1/s" }',
        )
        with anyio.fail_after(TIMEOUT):
            await store.add_job(scheduled_job("s", fire_time))

        assert plan.answered == {"insert": 1}
        assert await database["jobs"].count_documents({}) == 0

    async def test_reads_stay_on_the_primary(
        self,
        plan: FaultPlan,
        proxy: FaultyProxy,
        database_name: str,
        logger: logging.Logger,
    ) -> None:
        if os.environ.get("MONGODB_URI"):
            pytest.skip("plays a replica set in front of the mongoeco server only")

        # A client that discovers a replica set (a direct connection would send
        # every read as primaryPreferred), whose URI asks for secondaries
        me = f"{LOOPBACK}:{proxy.port}"
        plan.replica_set("rs0", me=me)
        uri = (
            f"mongodb://{me}/?replicaSet=rs0&readPreference=secondaryPreferred"
            f"&serverSelectionTimeoutMS=5000"
        )
        async with AsyncExitStack() as exit_stack:
            broker = await started_broker(
                exit_stack, uri, database_name, logger, mode="polling"
            )
            store = await started_store(exit_stack, uri, database_name, broker, logger)
            with anyio.fail_after(TIMEOUT):
                await a_job_lifecycle(store)
                await anyio.sleep(0.1)  # a few polls

        reads = [
            c
            for c in plan.seen("find", "aggregate", "getMore", "count", "distinct")
            if c.database == database_name
        ]
        assert {c.collection for c in reads} >= {"jobs", "schedules", "events"}
        modes = {(c.read_preference or {}).get("mode", "primary") for c in reads}
        assert modes == {"primary"}, modes


@pytest.mark.real_server
class TestRealFailPoints:
    """On a real server with test commands on, its own fail points do what the
    injector plays: three unlabelled HostUnreachable replies in a row are cured."""

    async def test_three_errors_on_a_read(
        self, database_name: str, logger: logging.Logger
    ) -> None:
        uri = os.environ.get("MONGODB_URI")
        if not uri:
            pytest.skip("needs MONGODB_URI pointing at a real MongoDB")

        from pymongo import AsyncMongoClient

        admin: AsyncMongoClient[Any] = AsyncMongoClient(uri)
        fail_point = {
            "configureFailPoint": "failCommand",
            "mode": {"times": 3},
            "data": {"failCommands": ["find"], "errorCode": 6},
        }
        try:
            async with AsyncExitStack() as exit_stack:
                events = LocalEventBroker()
                await events.start(exit_stack, logger)
                store = await started_store(
                    exit_stack, uri, database_name, events, logger
                )
                await add_task(store)
                try:
                    await admin.admin.command(fail_point)
                except OperationFailure as exc:
                    pytest.skip(
                        f"the server has no fail points (enableTestCommands): {exc}"
                    )

                with anyio.fail_after(TIMEOUT):
                    tasks = await store.get_tasks()

            assert [task.id for task in tasks] == ["task"]
        finally:
            with contextlib.suppress(OperationFailure):  # none to turn off
                off = {"configureFailPoint": "failCommand", "mode": "off"}
                await admin.admin.command(off)

            await admin.drop_database(database_name)
            await admin.close()
