from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
from apscheduler import RetrySettings
from apscheduler.abc import EventBroker, Serializer
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.serializers.cbor import CBORSerializer
from apscheduler.serializers.json import JSONSerializer
from apscheduler.serializers.pickle import PickleSerializer
from pymongo import AsyncMongoClient

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._clock import ServerClock

from .support.commands import CommandLog
from .support.faults import FaultPlan
from .support.proxy import FAST_FAILURE, FAULT_RETRIES, FaultyProxy, proxy_in_front_of
from .support.runs import RecordingSchedules
from .support.servers import (
    describe_wire_server,
    wire_server_uri,
    wire_unavailable_reason,
)
from .support.sockets import DRIVER_LEAK_FILTERS, close_cancelled_connects
from .support.stores import another_store
from .support.tier_report import TierReport
from .support.tiers import TIERS


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = wire_unavailable_reason()
    if reason is None:
        return

    if os.environ.get("CI"):
        raise pytest.UsageError(f"the wire tier must run in CI: {reason}")

    for item in items:
        if "wire" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_configure(config: pytest.Config) -> None:
    # pymongo's socket leaks, not ours: see the module
    close_cancelled_connects()
    for line in DRIVER_LEAK_FILTERS:
        config.addinivalue_line("filterwarnings", line)

    config.pluginmanager.register(TierReport(describe_wire_server()), "tier_report")


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    lines = config.stash.get(_FIGURES, [])
    if lines:
        terminalreporter.section("figures measured")
        for line in lines:
            terminalreporter.write_line(line)


#: Figures the fault and concurrency tests measured, printed at the end of the run
_FIGURES = pytest.StashKey[list[str]]()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Return a function that records a line of figures for the run's summary."""
    lines = request.config.stash.setdefault(_FIGURES, [])

    def record(line: str) -> None:
        lines.append(f"{request.node.nodeid}: {line}")

    return record


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _observe_nothing(*_args: object, **_kwargs: object) -> None:
    """Stand in for ServerClock.observe: keep no sample."""


@pytest.fixture(autouse=True)
def host_clock_under_time_machine(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    In a test that moves this host's clock (time_machine), stores go by that clock.

    Such a test stands for time passing everywhere; a store would otherwise go by
    its estimate of the server's clock, which time_machine does not move.
    """
    if "time_machine" in request.fixturenames:
        monkeypatch.setattr(ServerClock, "observe", _observe_nothing)


@pytest.fixture(scope="session")
def logger() -> logging.Logger:
    return logging.getLogger("apscheduler_mongo.tests")


@pytest.fixture(scope="session")
def wire_uri() -> Iterator[str]:
    """URI of the wire-tier server: ``MONGODB_URI`` or a mongoeco server we start."""
    with wire_server_uri() as uri:
        yield uri


@pytest.fixture
def database_name() -> str:
    return f"apscheduler_mongo_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def client(
    tier: str, request: pytest.FixtureRequest, database_name: str
) -> AsyncIterator[Any]:
    """A client of the tier's server; the test's database is dropped afterwards."""
    if tier == "mongomock":
        from mongomock_motor import AsyncMongoMockClient

        yield AsyncMongoMockClient()
        return

    uri = request.getfixturevalue("wire_uri")
    if tier == "motor":
        from motor.motor_asyncio import AsyncIOMotorClient

        motor_client: Any = AsyncIOMotorClient(uri, serverSelectionTimeoutMS=5000)
        try:
            yield motor_client
            await motor_client.drop_database(database_name)
        finally:
            motor_client.close()

        return

    from pymongo import AsyncMongoClient

    mongo_client: AsyncMongoClient[Any] = AsyncMongoClient(
        uri, serverSelectionTimeoutMS=5000
    )
    try:
        yield mongo_client
        await mongo_client.drop_database(database_name)
    finally:
        await mongo_client.close()


@pytest.fixture
def database(client: Any, database_name: str) -> Any:
    """The test's database, through the tier's client: to read and damage directly."""
    return client[database_name]


@pytest.fixture(
    params=[
        pytest.param(PickleSerializer, id="pickle"),
        pytest.param(CBORSerializer, id="cbor"),
        pytest.param(JSONSerializer, id="json"),
    ]
)
def serializer(request: pytest.FixtureRequest) -> Serializer:
    serializer_class: type[Serializer] = request.param
    return serializer_class()


@pytest.fixture
def local_broker() -> EventBroker:
    return LocalEventBroker()


@pytest.fixture
async def local_events(logger: logging.Logger) -> AsyncIterator[LocalEventBroker]:
    """A started local event broker, for the stores a test starts itself."""
    async with AsyncExitStack() as exit_stack:
        broker = LocalEventBroker()
        await broker.start(exit_stack, logger)
        yield broker


@pytest.fixture
def command_log() -> CommandLog:
    """The commands the ``logged_client`` sends."""
    return CommandLog()


@pytest.fixture
async def logged_client(
    wire_uri: str, command_log: CommandLog, database_name: str
) -> AsyncIterator[AsyncMongoClient[Any]]:
    """A client of the wire tier's server recording its commands in ``command_log``."""
    client: AsyncMongoClient[Any] = AsyncMongoClient(
        wire_uri,
        event_listeners=[command_log],
        tz_aware=True,
        serverSelectionTimeoutMS=5000,
    )
    try:
        yield client
    finally:
        await client.drop_database(database_name)
        await client.close()


@pytest.fixture
def meter_provider() -> Any:
    """The meter provider of the ``counted_store`` (``None``: the global one)."""
    return None


@pytest.fixture
async def counted_store(
    logged_client: AsyncMongoClient[Any],
    database_name: str,
    local_broker: EventBroker,
    logger: logging.Logger,
    meter_provider: Any,
) -> AsyncIterator[MongoDBDataStore]:
    """A started store whose commands ``command_log`` records."""
    async with AsyncExitStack() as exit_stack:
        await local_broker.start(exit_stack, logger)
        # No job history: its writes come every few seconds, off the hot path,
        # and would fall into the windows these counts take by chance
        # (tests/test_history.py counts them)
        store = MongoDBDataStore(
            logged_client,
            database=database_name,
            meter_provider=meter_provider,
            history_interval=None,
        )
        await store.start(exit_stack, local_broker, logger)
        yield store


@pytest.fixture
def plan() -> FaultPlan:
    """What the ``proxy`` answers or changes itself, and the commands it saw."""
    return FaultPlan()


@pytest.fixture
def proxy(wire_uri: str, plan: FaultPlan) -> Iterator[FaultyProxy]:
    """A proxy in front of the wire tier's server, following the fault ``plan``."""
    with proxy_in_front_of(wire_uri, plan) as proxy:
        yield proxy


@pytest.fixture
def through(proxy: FaultyProxy, wire_uri: str) -> Callable[..., str]:
    """Return a function giving the URI through the ``proxy``, with extra options."""

    def uri(**options: str | int) -> str:
        return proxy.uri_for(wire_uri, **FAST_FAILURE, **options)

    return uri


@pytest.fixture
def proxy_retries() -> RetrySettings:
    """The retry settings of the ``proxied_store``."""
    return FAULT_RETRIES


@pytest.fixture
async def proxied_store(
    through: Callable[..., str],
    database_name: str,
    local_events: LocalEventBroker,
    logger: logging.Logger,
    proxy_retries: RetrySettings,
) -> AsyncIterator[MongoDBDataStore]:
    """A started store that owns a client connected through the ``proxy``."""
    async with AsyncExitStack() as exit_stack:
        store = MongoDBDataStore(
            through(), database=database_name, retry_settings=proxy_retries
        )
        await store.start(exit_stack, local_events, logger)
        yield store


@pytest.fixture
def raw_store(client: Any, database_name: str) -> MongoDBDataStore:
    return MongoDBDataStore(client, database=database_name, start_from_scratch=True)


@pytest.fixture
async def store(
    raw_store: MongoDBDataStore, local_broker: EventBroker, logger: logging.Logger
) -> AsyncIterator[MongoDBDataStore]:
    """A started store (on a local event broker) of the tier under test."""
    async with AsyncExitStack() as exit_stack:
        await local_broker.start(exit_stack, logger)
        await raw_store.start(exit_stack, local_broker, logger)
        yield raw_store


@pytest.fixture
async def other_store(
    client: Any, store: MongoDBDataStore, logger: logging.Logger
) -> AsyncIterator[MongoDBDataStore]:
    """A second store on the ``store``'s database: another scheduler's view of it."""
    async with another_store(client, store, logger) as other:
        yield other


@pytest.fixture
async def recording(
    store: MongoDBDataStore, wire_uri: str, database: Any
) -> RecordingSchedules:
    """Schedules whose jobs record their runs, for schedulers in other processes."""
    return await RecordingSchedules.add(store, wire_uri, database)
