from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
from apscheduler.abc import EventBroker, Serializer
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.serializers.cbor import CBORSerializer
from apscheduler.serializers.json import JSONSerializer
from apscheduler.serializers.pickle import PickleSerializer

from apscheduler_mongo import MongoDBDataStore

from .support.servers import (
    describe_wire_server,
    wire_server_uri,
    wire_unavailable_reason,
)
from .support.tier_report import TierReport

TIERS = [
    pytest.param("mongomock", id="mongomock"),
    pytest.param("wire", id="wire", marks=pytest.mark.wire),
    pytest.param("motor", id="motor", marks=pytest.mark.wire),
]


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    reason = wire_unavailable_reason()
    if reason is None:
        return

    if os.environ.get("CI"):
        raise pytest.UsageError(f"the wire tier must run in CI: {reason}")

    for item in items:
        if "wire" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_configure(config: pytest.Config) -> None:
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


@asynccontextmanager
async def another_store(
    client: Any, database: str, broker: EventBroker, logger: logging.Logger
) -> AsyncIterator[MongoDBDataStore]:
    """Start a second store on ``database``: another scheduler's view of it."""
    async with AsyncExitStack() as exit_stack:
        other = MongoDBDataStore(client, database=database)
        await other.start(exit_stack, broker, logger)
        yield other
