"""Bad input: wrong arguments, and unreachable or refusing servers."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, AsyncExitStack
from typing import Any

import anyio
import pytest
from apscheduler import RetrySettings, Task
from apscheduler.abc import EventBroker
from apscheduler.serializers.json import JSONSerializer
from pymongo import MongoClient
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError
from tenacity import stop_after_attempt, wait_fixed

from apscheduler_mongo import MongoDBDataStore

from .support.fake_servers import free_port
from .support.logs import retry_messages
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

        messages = retry_messages(caplog)
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
        assert retry_messages(caplog) == []
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
