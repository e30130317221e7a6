"""Wrong servers: too old, or not MongoDB at all, fail start() clearly and promptly."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import anyio
import pytest
from apscheduler import RetrySettings
from apscheduler.abc import EventBroker
from pymongo import common
from pymongo.errors import ConfigurationError, ServerSelectionTimeoutError
from tenacity import stop_after_attempt, wait_fixed

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker

from .support.fake_servers import (
    FakeServer,
    Handler,
    free_port,
    hang_up,
    http_server,
    noise,
    old_mongodb,
)
from .support.logs import retry_messages

pytestmark = pytest.mark.anyio

SECRET = "wrong-server-s3cret"
RETRIES = RetrySettings(stop=stop_after_attempt(3), wait=wait_fixed(0.05))
#: Server selection gives up after this many milliseconds in each attempt
SELECTION_MS = 300
#: start() must fail well within this (three attempts of SELECTION_MS, two waits)
DEADLINE = 10

Starter = Callable[[str, AsyncExitStack], Awaitable[None]]


def _uri(address: str, *, selection_ms: int = SELECTION_MS, user: bool = True) -> str:
    userinfo = f"scheduler:{SECRET}@" if user else ""
    return (
        f"mongodb://{userinfo}{address}/?serverSelectionTimeoutMS={selection_ms}"
        f"&connectTimeoutMS={selection_ms}"
    )


@pytest.fixture(
    params=[pytest.param("store", id="store"), pytest.param("broker", id="broker")]
)
def start(
    request: pytest.FixtureRequest, local_broker: EventBroker, logger: logging.Logger
) -> Starter:
    """Return a function starting the store or the broker on a URI."""

    async def start_store(uri: str, exit_stack: AsyncExitStack) -> None:
        await local_broker.start(exit_stack, logger)
        store = MongoDBDataStore(uri, retry_settings=RETRIES)
        await store.start(exit_stack, local_broker, logger)

    async def start_broker(uri: str, exit_stack: AsyncExitStack) -> None:
        broker = MongoDBEventBroker(uri, retry_settings=RETRIES)
        await broker.start(exit_stack, logger)

    return start_store if request.param == "store" else start_broker


async def _failure(
    start: Starter, uri: str, expected: type[BaseException]
) -> tuple[BaseException, float]:
    """Start on ``uri``; return the error it must raise and how long that took."""
    with anyio.fail_after(DEADLINE * 3):
        async with AsyncExitStack() as exit_stack:
            started = time.monotonic()
            with pytest.raises(expected) as exc_info:
                await start(uri, exit_stack)

            elapsed = time.monotonic() - started

    return exc_info.value, elapsed


async def failure_at(
    start: Starter, handler: Handler, caplog: pytest.LogCaptureFixture
) -> tuple[str, FakeServer]:
    """
    Start on a server answering with ``handler``; return the error and the server.

    Check that start() gave up after three attempts, in time, showing no secret.
    """
    async with FakeServer(handler) as server:
        error, elapsed = await _failure(
            start, _uri(server.address), ServerSelectionTimeoutError
        )

    assert isinstance(error.__cause__, ServerSelectionTimeoutError)
    assert elapsed < DEADLINE
    assert len(retry_messages(caplog)) == 3
    assert SECRET not in str(error)
    assert SECRET not in caplog.text
    return str(error), server


class TestOldServer:
    """A server older than pymongo or we support fails start() at once, no retries."""

    @pytest.mark.parametrize(
        "wire_version",
        [
            pytest.param(6, id="mongodb-3.6"),
            pytest.param(common.MIN_SUPPORTED_WIRE_VERSION - 1, id="just-too-old"),
        ],
    )
    async def test_older_than_pymongo_supports(
        self, start: Starter, wire_version: int, caplog: pytest.LogCaptureFixture
    ) -> None:
        async with FakeServer(old_mongodb(wire_version)) as server:
            # A long selection timeout: the failure must not wait for it
            uri = _uri(server.address, selection_ms=20_000, user=False)
            error, elapsed = await _failure(start, uri, ConfigurationError)

        message = str(error)
        assert f"reports wire version {wire_version}" in message
        assert f"MongoDB {common.MIN_SUPPORTED_SERVER_VERSION}" in message
        assert server.address in message
        assert elapsed < 5
        assert retry_messages(caplog) == []

    async def test_older_than_we_support(
        self,
        start: Starter,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # pymongo 4.13 (our oldest) still talks to MongoDB 4.0; we need 4.2
        monkeypatch.setattr(common, "MIN_SUPPORTED_WIRE_VERSION", 7)
        monkeypatch.setattr(common, "MIN_SUPPORTED_SERVER_VERSION", "4.0")
        async with FakeServer(old_mongodb(7)) as server:
            uri = _uri(server.address, selection_ms=20_000, user=False)
            error, elapsed = await _failure(start, uri, RuntimeError)

        assert str(error) == (
            "MongoDB 4.2 or later is required (the server reports wire version 7)"
        )
        assert elapsed < 5
        assert retry_messages(caplog) == []


class TestNotMongoDB:
    """
    Something else at the address fails start() after the retries, naming it.

    The error stays a :exc:`~pymongo.errors.ServerSelectionTimeoutError` (chained to
    the driver's own) and shows no credentials.
    """

    @pytest.mark.parametrize(
        "handler",
        [pytest.param(http_server, id="http"), pytest.param(noise, id="noise")],
    )
    async def test_other_protocol(
        self, start: Starter, handler: Handler, caplog: pytest.LogCaptureFixture
    ) -> None:
        message, server = await failure_at(start, handler, caplog)
        assert message.startswith(
            f"the server at {server.address} does not speak the MongoDB wire protocol"
        )
        assert "is it really a MongoDB server, and is the port right?" in message

    async def test_hangs_up(
        self, start: Starter, caplog: pytest.LogCaptureFixture
    ) -> None:
        message, server = await failure_at(start, hang_up, caplog)
        assert server.connections > 0
        assert message.startswith(
            f"could not connect to a MongoDB server at {server.address} ("
        )
        assert "are the host, port and TLS options right?" in message

    async def test_nothing_listens(
        self, start: Starter, caplog: pytest.LogCaptureFixture
    ) -> None:
        address = f"127.0.0.1:{free_port()}"
        error, elapsed = await _failure(
            start, _uri(address), ServerSelectionTimeoutError
        )

        message = str(error)
        assert message.startswith(f"could not connect to a MongoDB server at {address}")
        assert f"[Errno {errno.ECONNREFUSED}]" in message
        assert elapsed < DEADLINE
        assert SECRET not in message
        assert SECRET not in caplog.text
