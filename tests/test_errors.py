"""Bad input: wrong arguments, unreachable or refusing servers, corrupted documents."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, AsyncExitStack
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from apscheduler import (
    ConflictPolicy,
    Job,
    JobOutcome,
    RetrySettings,
    Schedule,
    Task,
    TaskLookupError,
)
from apscheduler.abc import EventBroker
from apscheduler.serializers.json import JSONSerializer
from apscheduler.triggers.date import DateTrigger
from bson import Binary
from pymongo import MongoClient
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError
from tenacity import stop_after_attempt, wait_fixed

from apscheduler_mongo import MongoDBDataStore

from .support.fake_servers import free_port
from .support.servers import mongoeco_process, needs_mongoeco

pytestmark = [
    pytest.mark.anyio,
    # mongomock's TTL index support calls datetime.utcnow() (deprecated in 3.12)
    pytest.mark.filterwarnings(
        "ignore:datetime.datetime.utcnow:DeprecationWarning:mongomock"
    ),
]

SECRET = "s3cret"
AUTH_USER = "scheduler"
AUTH_PASSWORD = "right-password"
GARBAGE = b"\x80\x05 this is not a pickle"
LEASE = timedelta(minutes=1)


def _retry_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("Temporary MongoDB error")
    ]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING
    ]


class TestClientOrUri:
    """Anything but a URI string or an asynchronous client is refused at once."""

    @pytest.mark.parametrize(
        ("value", "type_name"),
        [
            pytest.param(27017, "int", id="int"),
            pytest.param(None, "NoneType", id="none"),
            pytest.param(b"mongodb://127.0.0.1/", "bytes", id="bytes"),
            pytest.param(["mongodb://127.0.0.1/"], "list", id="list"),
        ],
    )
    def test_wrong_type(self, value: object, type_name: str) -> None:
        with pytest.raises(TypeError, match="client_or_uri") as exc_info:
            MongoDBDataStore(value)

        assert f"not {type_name}" in str(exc_info.value)
        assert "AsyncMongoClient" in str(exc_info.value)

    def test_synchronous_client(self) -> None:
        client: MongoClient[Any] = MongoClient("mongodb://127.0.0.1:1/", connect=False)
        try:
            with pytest.raises(TypeError, match="AsyncMongoClient") as exc_info:
                MongoDBDataStore(client)
        finally:
            client.close()

        assert "synchronous" in str(exc_info.value)

    @pytest.mark.parametrize(
        ("uri", "message"),
        [
            pytest.param("127.0.0.1:27017", "must start with", id="no-scheme"),
            pytest.param("http://x", "must start with", id="http"),
            pytest.param("mongodb://", "not a valid MongoDB URI", id="no-host"),
            pytest.param(
                "mongodb://host:notaport", "not a valid MongoDB URI", id="bad-port"
            ),
            pytest.param(
                "mongodb://host:99999/", "not a valid MongoDB URI", id="port-too-big"
            ),
            pytest.param("mongodb+srv://a,b", "exactly one host", id="srv-two-hosts"),
            pytest.param(
                "mongodb+srv://host:27017", "without a port", id="srv-with-port"
            ),
            pytest.param("mongodb+srv://", "exactly one host", id="srv-no-host"),
            pytest.param(
                "mongodb://host/?authMechanism=BOGUS",
                "authmechanism",
                id="bad-option",
            ),
        ],
    )
    def test_malformed_uri(self, uri: str, message: str) -> None:
        with pytest.raises(ValueError, match=re.escape(message)):
            MongoDBDataStore(uri)

    def test_good_uris_accepted(self) -> None:
        for uri in (
            "mongodb://127.0.0.1/",
            "mongodb://a:1,b:2/?replicaSet=rs0",
            "mongodb+srv://cluster.example.com/?retryWrites=true",
        ):
            assert MongoDBDataStore(uri).client_or_uri == uri


class TestOptions:
    """Keyword options of the wrong type or value are refused, naming the option."""

    @pytest.mark.parametrize(
        ("name", "message"),
        [
            pytest.param("", "must not be empty", id="empty"),
            pytest.param("a.b", "forbidden characters: '.'", id="dot"),
            pytest.param("a$b", "forbidden characters: '$'", id="dollar"),
            pytest.param("a/b", "forbidden characters: '/'", id="slash"),
            pytest.param("a b", "forbidden characters: ' '", id="space"),
            pytest.param("a\x00b", "forbidden characters", id="nul"),
            pytest.param("x" * 64, "longer than 63 bytes", id="too-long"),
            pytest.param("é" * 32, "longer than 63 bytes", id="too-long-in-utf8"),
        ],
    )
    def test_invalid_database_name(self, name: str, message: str) -> None:
        with pytest.raises(ValueError, match=re.escape(message)):
            MongoDBDataStore("mongodb://127.0.0.1/", database=name)

    @pytest.mark.parametrize(
        "name",
        [
            pytest.param(5, id="int"),
            pytest.param(None, id="none"),
            pytest.param(b"apscheduler", id="bytes"),
        ],
    )
    def test_database_name_not_a_string(self, name: object) -> None:
        with pytest.raises(TypeError, match="database must be a string"):
            MongoDBDataStore("mongodb://127.0.0.1/", database=name)  # type: ignore[arg-type]

    def test_longest_database_name_accepted(self) -> None:
        store = MongoDBDataStore("mongodb://127.0.0.1/", database="x" * 63)
        assert store.database == "x" * 63

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            pytest.param("serializer", "json", id="serializer-name"),
            pytest.param("serializer", JSONSerializer, id="serializer-class"),
            pytest.param("start_from_scratch", 1, id="start-from-scratch-int"),
            pytest.param("start_from_scratch", "yes", id="start-from-scratch-str"),
            pytest.param("retry_settings", {}, id="retry-settings-dict"),
            pytest.param("retry_settings", 3, id="retry-settings-int"),
        ],
    )
    def test_wrong_option_type(self, option: str, value: object) -> None:
        kwargs: dict[str, Any] = {option: value}
        with pytest.raises(TypeError, match=f"'{option}' must be"):
            MongoDBDataStore("mongodb://127.0.0.1/", **kwargs)


class TestCredentialsNeverLeak:
    """Passwords in a URI appear in no repr and no error message."""

    def test_repr(self) -> None:
        store = MongoDBDataStore(f"mongodb://user:{SECRET}@127.0.0.1:1/")
        text = repr(store)
        assert SECRET not in text
        assert "127.0.0.1:1" in text

    def test_repr_srv(self) -> None:
        store = MongoDBDataStore(f"mongodb+srv://user:{SECRET}@cluster.example.com/")
        text = repr(store)
        assert SECRET not in text
        assert "cluster.example.com" in text

    @pytest.mark.parametrize(
        "uri",
        [
            pytest.param(f"mongodb://user:{SECRET}@host:notaport/", id="bad-port"),
            pytest.param(f"mongodb://user:{SECRET}@/", id="no-host"),
            pytest.param(
                f"mongodb://user:{SECRET}@host/?authMechanism=BOGUS", id="bad-option"
            ),
            pytest.param(f"mongodb+srv://user:{SECRET}@a,b/", id="srv-two-hosts"),
            pytest.param(f" mongodb://user:{SECRET}@host/", id="leading-space"),
            pytest.param(f"mongo://user:{SECRET}@host/", id="misspelt-scheme"),
            pytest.param(f"MONGODB://user:{SECRET}@host/", id="upper-case-scheme"),
            pytest.param(f"mongodb:/user:{SECRET}@host/", id="one-slash"),
        ],
    )
    def test_malformed_uri_message(self, uri: str) -> None:
        with pytest.raises(ValueError) as exc_info:
            MongoDBDataStore(uri)

        assert SECRET not in str(exc_info.value)
        assert exc_info.value.__cause__ is None or SECRET not in str(
            exc_info.value.__cause__
        )


class TestUnreachableServer:
    """A server nobody answers at makes start() fail after the retries, not hang."""

    async def test_start_fails_after_retries(
        self,
        local_broker: EventBroker,
        logger: logging.Logger,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        uri = (
            f"mongodb://user:{SECRET}@127.0.0.1:{free_port()}/"
            "?serverSelectionTimeoutMS=200&connectTimeoutMS=200"
        )
        store = MongoDBDataStore(
            uri,
            retry_settings=RetrySettings(
                stop=stop_after_attempt(3), wait=wait_fixed(0.05)
            ),
        )
        async with AsyncExitStack() as exit_stack:
            await local_broker.start(exit_stack, logger)
            started = time.monotonic()
            with anyio.fail_after(20), pytest.raises(ServerSelectionTimeoutError):
                await store.start(exit_stack, local_broker, logger)

            # Three attempts of 200 ms each, and two waits of 50 ms
            assert time.monotonic() - started < 10

        messages = _retry_messages(caplog)
        assert [
            message[: len("Temporary MongoDB error (attempt 1")] for message in messages
        ] == [f"Temporary MongoDB error (attempt {n}" for n in (1, 2, 3)]
        assert SECRET not in caplog.text


def _auth_server() -> AbstractContextManager[int]:
    """Start a mongoeco server that requires authentication; yield its port."""
    return mongoeco_process(auth=(AUTH_USER, AUTH_PASSWORD))


@pytest.fixture(scope="module")
def auth_server_port() -> Iterator[int]:
    with _auth_server() as port:
        yield port


def _auth_uri(port: int, password: str) -> str:
    # mongoeco does not announce its mechanisms in "hello", so name the one it has
    return (
        f"mongodb://{AUTH_USER}:{password}@127.0.0.1:{port}/?directConnection=true"
        "&authMechanism=SCRAM-SHA-256&serverSelectionTimeoutMS=2000"
    )


def _wrong_password_store(port: int, database_name: str) -> MongoDBDataStore:
    return MongoDBDataStore(
        _auth_uri(port, SECRET),
        database=database_name,
        retry_settings=RetrySettings(stop=stop_after_attempt(3), wait=wait_fixed(0.05)),
    )


@pytest.mark.wire
@needs_mongoeco
class TestAuthenticationFailure:
    """Wrong credentials fail start() at once, with no retry and no password shown."""

    async def test_right_credentials_work(
        self,
        auth_server_port: int,
        local_broker: EventBroker,
        logger: logging.Logger,
        database_name: str,
    ) -> None:
        store = MongoDBDataStore(
            _auth_uri(auth_server_port, AUTH_PASSWORD), database=database_name
        )
        with anyio.fail_after(20):
            async with AsyncExitStack() as exit_stack:
                await local_broker.start(exit_stack, logger)
                await store.start(exit_stack, local_broker, logger)
                await store.add_task(
                    Task(id="task", func="math:floor", job_executor="async")
                )
                assert [task.id for task in await store.get_tasks()] == ["task"]

    async def test_wrong_password_fails_at_once(
        self,
        auth_server_port: int,
        local_broker: EventBroker,
        logger: logging.Logger,
        database_name: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        store = _wrong_password_store(auth_server_port, database_name)
        async with AsyncExitStack() as exit_stack:
            await local_broker.start(exit_stack, logger)
            with (
                anyio.fail_after(20),
                pytest.raises((OperationFailure, RuntimeError)) as exc_info,
            ):
                await store.start(exit_stack, local_broker, logger)

        assert "Authentication failed" in str(exc_info.value)
        assert _retry_messages(caplog) == []
        assert SECRET not in str(exc_info.value)
        assert SECRET not in caplog.text

    async def test_wrong_password_raises_operation_failure(
        self,
        auth_server_port: int,
        local_broker: EventBroker,
        logger: logging.Logger,
        database_name: str,
    ) -> None:
        store = _wrong_password_store(auth_server_port, database_name)
        async with AsyncExitStack() as exit_stack:
            await local_broker.start(exit_stack, logger)
            with anyio.fail_after(20), pytest.raises(OperationFailure) as exc_info:
                await store.start(exit_stack, local_broker, logger)

        assert "Authentication failed" in str(exc_info.value)
        assert SECRET not in str(exc_info.value)
        assert SECRET not in repr(exc_info.value.details)


class TestTrio:
    """Under Trio, start() refuses to run before it creates any client."""

    @pytest.mark.parametrize("anyio_backend", ["trio"])
    async def test_start_under_trio(
        self, local_broker: EventBroker, logger: logging.Logger
    ) -> None:
        store = MongoDBDataStore("mongodb://127.0.0.1:1/")
        async with AsyncExitStack() as exit_stack:
            await local_broker.start(exit_stack, logger)
            with pytest.raises(RuntimeError, match="asyncio") as exc_info:
                await store.start(exit_stack, local_broker, logger)

        assert "trio" in str(exc_info.value)
        assert not hasattr(store, "_adapter")  # no client was made


# Corrupted documents


async def _add_task(store: MongoDBDataStore, task_id: str = "task") -> None:
    await store.add_task(Task(id=task_id, func="math:floor", job_executor="async"))


async def _add_schedule(
    store: MongoDBDataStore, schedule_id: str, next_fire_time: datetime
) -> Schedule:
    schedule = Schedule(
        id=schedule_id,
        task_id="task",
        trigger=DateTrigger(next_fire_time),
        job_executor="async",
        next_fire_time=next_fire_time,
    )
    await store.add_schedule(schedule, ConflictPolicy.exception)
    return schedule


async def _add_job(store: MongoDBDataStore, task_id: str = "task") -> Job:
    job = Job(
        task_id=task_id,
        executor="async",
        result_expiration_time=timedelta(minutes=5),
    )
    await store.add_job(job)
    return job


class TestCorruptedSchedules:
    """An unreadable schedule is skipped and set aside, never deleted."""

    async def test_get_schedules_skips_it(
        self,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        now = datetime.now(timezone.utc)
        await _add_task(store)
        await _add_schedule(store, "good", now + timedelta(hours=1))
        await _add_schedule(store, "bad", now + timedelta(hours=1))
        collection = client[database_name]["schedules"]
        await collection.update_one({"_id": "bad"}, {"$set": {"trigger": GARBAGE}})

        with anyio.fail_after(10):
            schedules = await store.get_schedules()

        assert [schedule.id for schedule in schedules] == ["good"]
        assert any("'bad'" in message for message in _warnings(caplog))
        assert await collection.count_documents({"_id": "bad"}) == 1

    async def test_acquire_schedules_quarantines_it(
        self,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        past = datetime.now(timezone.utc) - timedelta(minutes=1)
        await _add_task(store)
        await _add_schedule(store, "good", past)
        await _add_schedule(store, "bad", past)
        collection = client[database_name]["schedules"]
        await collection.update_one({"_id": "bad"}, {"$set": {"trigger": GARBAGE}})

        with anyio.fail_after(10):
            acquired = await store.acquire_schedules("scheduler-1", LEASE, 10)

        assert [schedule.id for schedule in acquired] == ["good"]
        assert any("'bad'" in message for message in _warnings(caplog))
        document = await collection.find_one({"_id": "bad"})
        assert document is not None
        assert document["trigger"] == GARBAGE
        assert document["quarantine"]["reason"]
        assert document["acquired_by"] is None

        with anyio.fail_after(10):
            again = await store.acquire_schedules("scheduler-1", LEASE, 10)
            other = await store.acquire_schedules("scheduler-2", LEASE, 10)

        assert "bad" not in [schedule.id for schedule in again]
        assert other == []
        assert await collection.count_documents({"_id": "bad"}) == 1

    async def test_next_run_time_ignores_quarantined(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        now = datetime.now(timezone.utc)
        await _add_task(store)
        bad = await _add_schedule(store, "bad", now - timedelta(minutes=1))
        later = await _add_schedule(store, "later", now + timedelta(hours=1))
        collection = client[database_name]["schedules"]
        await collection.update_one({"_id": "bad"}, {"$set": {"trigger": GARBAGE}})

        with anyio.fail_after(10):
            assert await store.get_next_schedule_run_time() == bad.next_fire_time
            assert await store.acquire_schedules("scheduler-1", LEASE, 10) == []
            assert await store.get_next_schedule_run_time() == later.next_fire_time

        assert await collection.count_documents({"quarantine": {"$exists": True}}) == 1


class TestCorruptedJobs:
    """An unusable job is finished with a result instead of being handed out."""

    @pytest.mark.parametrize(
        "damage",
        [
            pytest.param({"$set": {"args": GARBAGE}}, id="garbage-args"),
            pytest.param({"$set": {"kwargs": GARBAGE}}, id="garbage-kwargs"),
            pytest.param({"$unset": {"executor": ""}}, id="no-executor"),
            pytest.param({"$unset": {"task_id": ""}}, id="no-task-id"),
            pytest.param({"$set": {"created_at": "yesterday"}}, id="bad-created-at"),
        ],
    )
    async def test_unreadable_job(
        self,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
        caplog: pytest.LogCaptureFixture,
        damage: dict[str, Any],
    ) -> None:
        await _add_task(store)
        first = await _add_job(store)
        bad = await _add_job(store)
        last = await _add_job(store)
        collection = client[database_name]["jobs"]
        bad_id = Binary.from_uuid(bad.id)
        assert (await collection.update_one({"_id": bad_id}, damage)).matched_count

        with anyio.fail_after(10):
            acquired = await store.acquire_jobs("scheduler-1", LEASE)

        assert {job.id for job in acquired} == {first.id, last.id}
        assert any("Cannot read job" in message for message in _warnings(caplog))
        document = await collection.find_one({"_id": bad_id})
        assert document is not None
        assert document["state"] == "finished"
        assert document["result"]["outcome"] == JobOutcome.deserialization_failed.name

        with anyio.fail_after(10):
            assert await store.acquire_jobs("scheduler-2", LEASE) == []

        assert await collection.count_documents({}) == 3
        with anyio.fail_after(10):
            result = await store.get_job_result(bad.id)

        assert result is not None
        assert result.outcome is JobOutcome.deserialization_failed

    async def test_unreadable_job_is_named_in_the_log(
        self,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        await _add_task(store)
        bad = await _add_job(store)
        collection = client[database_name]["jobs"]
        await collection.update_one(
            {"_id": Binary.from_uuid(bad.id)}, {"$set": {"args": GARBAGE}}
        )

        with anyio.fail_after(10):
            assert await store.acquire_jobs("scheduler-1", LEASE) == []

        assert any(str(bad.id) in message for message in _warnings(caplog))

    async def test_unknown_task(
        self,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        await _add_task(store)
        good = await _add_job(store)
        orphan = await _add_job(store, task_id="no-such-task")

        with anyio.fail_after(10):
            acquired = await store.acquire_jobs("scheduler-1", LEASE)

        assert [job.id for job in acquired] == [good.id]
        assert any(
            str(orphan.id) in message and "no-such-task" in message
            for message in _warnings(caplog)
        )
        collection = client[database_name]["jobs"]
        document = await collection.find_one({"_id": Binary.from_uuid(orphan.id)})
        assert document is not None
        assert document["state"] == "finished"
        assert document["result"]["outcome"] == JobOutcome.error.name

        with anyio.fail_after(10):
            assert await store.acquire_jobs("scheduler-2", LEASE) == []

        assert await collection.count_documents({}) == 2
        with anyio.fail_after(10):
            result = await store.get_job_result(orphan.id)

        assert result is not None
        assert result.outcome is JobOutcome.error
        assert isinstance(result.exception, TaskLookupError)


class TestCorruptedTasks:
    """A task document missing required fields is skipped, never deleted."""

    @pytest.mark.parametrize(
        "damage",
        [
            pytest.param({"$unset": {"job_executor": ""}}, id="no-job-executor"),
            pytest.param(
                {"$set": {"misfire_grace_time": "soon"}}, id="bad-misfire-grace-time"
            ),
        ],
    )
    async def test_get_tasks_skips_it(
        self,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
        caplog: pytest.LogCaptureFixture,
        damage: dict[str, Any],
    ) -> None:
        await _add_task(store, "bad")
        await _add_task(store, "good")
        collection = client[database_name]["tasks"]
        await collection.update_one({"_id": "bad"}, damage)

        with anyio.fail_after(10):
            tasks = await store.get_tasks()

        assert [task.id for task in tasks] == ["good"]
        assert any("'bad'" in message for message in _warnings(caplog))
        assert await collection.count_documents({"_id": "bad"}) == 1
