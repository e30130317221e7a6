"""The indexes of an existing database are brought to what this version needs."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from apscheduler.eventbrokers.local import LocalEventBroker
from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.errors import OperationFailure

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker
from apscheduler_mongo._adapters import INDEX_NOT_FOUND, adapter_for
from apscheduler_mongo._indexes import ensure_indexes

from .support.faults import FaultPlan
from .support.tiers import WIRE_ONLY

pytestmark = pytest.mark.anyio


async def indexes_of(collection: Any) -> dict[str, dict[str, Any]]:
    """Return a collection's indexes by name (any client's collection)."""
    client = collection.database.client
    ours = adapter_for(client).collection(collection.database.name, collection.name)
    return {info["name"]: info for info in await ours.list_indexes()}


async def start_store(client: Any, database: str, logger: logging.Logger) -> None:
    async with AsyncExitStack() as exit_stack:
        # Starting publishes nothing: the broker need not run
        store = MongoDBDataStore(client, database=database)
        await store.start(exit_stack, LocalEventBroker(), logger)


async def start_broker(
    client: Any, database: str, logger: logging.Logger, event_ttl: float
) -> None:
    async with AsyncExitStack() as exit_stack:
        broker = MongoDBEventBroker(
            client, database=database, mode="polling", event_ttl=event_ttl
        )
        await broker.start(exit_stack, logger)


class TestChangedIndexes:
    """Options that changed since the last start are applied, not refused."""

    async def test_index_dropped_by_another_store(
        self, client: Any, database_name: str, logger: logging.Logger
    ) -> None:
        """Dropping an index that another store dropped first says so with the
        server's code, on every tier: two stores that start at once may both
        build one again (the in-process stand-in lists no partialFilterExpression,
        so it finds the partial indexes changed at every start)."""
        await start_store(client, database_name, logger)
        jobs = adapter_for(client).collection(database_name, "jobs")
        await jobs.drop_index("outcomes")
        with pytest.raises(OperationFailure) as raised:
            await jobs.drop_index("outcomes")

        assert raised.value.code == INDEX_NOT_FOUND
        await start_store(client, database_name, logger)  # built again
        assert "outcomes" in await indexes_of(client[database_name]["jobs"])

    async def test_broker_restarts_with_another_event_ttl(
        self, client: Any, database_name: str, logger: logging.Logger
    ) -> None:
        await start_broker(client, database_name, logger, event_ttl=600)
        await start_broker(client, database_name, logger, event_ttl=120)
        indexes = await indexes_of(client[database_name]["events"])
        assert indexes["at"]["expireAfterSeconds"] == 120
        await start_broker(client, database_name, logger, event_ttl=900)
        indexes = await indexes_of(client[database_name]["events"])
        assert indexes["at"]["expireAfterSeconds"] == 900

    async def test_other_index_rebuilt(
        self, client: Any, database_name: str, logger: logging.Logger
    ) -> None:
        schedules = client[database_name]["schedules"]
        await schedules.create_index([("acquired_by", DESCENDING)], name="free")
        await start_store(client, database_name, logger)

        indexes = await indexes_of(schedules)
        assert list(indexes["free"]["key"].items()) == [
            ("acquired_by", ASCENDING),
            ("next_fire_time", ASCENDING),
        ]

    async def test_differing_unique_index_refused(
        self, client: Any, database_name: str, logger: logging.Logger
    ) -> None:
        jobs = client[database_name]["jobs"]
        # Unique but not sparse: rebuilding it would leave a moment without it
        await jobs.create_index([("fire_key", ASCENDING)], name="fire_key", unique=True)
        with pytest.raises(RuntimeError, match=r"unique index 'fire_key'.*sparse"):
            await start_store(client, database_name, logger)

        indexes = await indexes_of(jobs)
        assert not indexes["fire_key"].get("sparse")  # left as it was

    async def test_retired_index_dropped_and_idempotent(
        self, client: Any, database_name: str
    ) -> None:
        collection = client[database_name]["things"]
        await collection.create_index([("old", ASCENDING)], name="old")
        ours = adapter_for(client).collection(database_name, "things")
        wanted = [IndexModel([("new", ASCENDING)], name="new")]
        for _ in range(2):
            await ensure_indexes(ours, wanted, retired={"old"})

        assert set(await indexes_of(collection)) == {"_id_", "new"}


#: Starts (and stops) a broker with this event TTL, through the proxy
BrokerStart = Callable[[float], Awaitable[None]]


@WIRE_ONLY
@pytest.mark.usefixtures("client")  # drops the test's database afterwards
class TestOnTheWire:
    """What the store and broker send to bring indexes up to date."""

    @pytest.fixture
    def start_through_proxy(
        self, through: Callable[..., str], database_name: str, logger: logging.Logger
    ) -> BrokerStart:
        async def start(event_ttl: float) -> None:
            await start_broker(through(), database_name, logger, event_ttl=event_ttl)

        return start

    async def test_ttl_changed_in_place(
        self, plan: FaultPlan, start_through_proxy: BrokerStart
    ) -> None:
        await start_through_proxy(600)
        # The stand-in has no collMod; answer it as MongoDB does
        plan.answer("collMod", reply={"ok": 1.0, "expireAfterSeconds_old": 600})
        await start_through_proxy(120)
        [change] = plan.seen("collMod")
        assert change.body["collMod"] == "events"
        assert change.body["index"] == {"name": "at", "expireAfterSeconds": 120}
        assert not plan.seen("dropIndexes")

    async def test_unchanged_indexes_cost_one_listing(
        self, plan: FaultPlan, start_through_proxy: BrokerStart
    ) -> None:
        await start_through_proxy(600)
        created = len(plan.seen("createIndexes"))
        listed = len(plan.seen("listIndexes"))
        await start_through_proxy(600)
        assert len(plan.seen("createIndexes")) == created == 1
        assert len(plan.seen("listIndexes")) == listed + 1
