"""Who owns the client, and how the store starts and stops."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import anyio
import pytest
from apscheduler import AsyncScheduler, Event, RetrySettings, SchedulerStopped
from apscheduler.abc import EventBroker
from apscheduler.triggers.interval import IntervalTrigger
from pymongo.errors import InvalidOperation
from tenacity import stop_after_delay, wait_fixed

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker

from .support.proxy import proxied
from .support.tiers import WIRE_ONLY

pytestmark = pytest.mark.anyio


async def assert_closed(client: Any) -> None:
    with pytest.raises(InvalidOperation, match="after close"):
        await client.admin.command("ping")


@pytest.mark.wire
class TestOwnedClient:
    """A client the store made from a URI is closed however the store stops."""

    async def test_closed_on_stop(
        self,
        wire_uri: str,
        database_name: str,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        store = MongoDBDataStore(wire_uri, database=database_name)
        async with AsyncExitStack() as exit_stack:
            await local_broker.start(exit_stack, logger)
            await store.start(exit_stack, local_broker, logger)
            assert await store.get_tasks() == []

        await assert_closed(store._adapter.client)

    @pytest.mark.parametrize("cancel_before_start", [True, False])
    async def test_closed_when_cancelled(
        self,
        wire_uri: str,
        database_name: str,
        local_broker: EventBroker,
        logger: logging.Logger,
        cancel_before_start: bool,
    ) -> None:
        store = MongoDBDataStore(wire_uri, database=database_name)
        with anyio.CancelScope() as scope:
            if cancel_before_start:
                scope.cancel()

            async with AsyncExitStack() as exit_stack:
                await local_broker.start(exit_stack, logger)
                await store.start(exit_stack, local_broker, logger)
                scope.cancel()

        await assert_closed(store._adapter.client)


@pytest.mark.wire
class TestGivenClient:
    """A client passed in belongs to the caller and stays open."""

    async def test_not_closed(
        self,
        wire_uri: str,
        database_name: str,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        from pymongo import AsyncMongoClient

        client: AsyncMongoClient[Any] = AsyncMongoClient(wire_uri)
        try:
            async with AsyncExitStack() as exit_stack:
                await local_broker.start(exit_stack, logger)
                store = MongoDBDataStore(client, database=database_name)
                await store.start(exit_stack, local_broker, logger)

            assert (await client.admin.command("ping"))["ok"] == 1
            await client.drop_database(database_name)
        finally:
            await client.close()


class TestRestart:
    """Starting again on the same database keeps the data and the indexes."""

    @pytest.mark.parametrize(
        "tier", ["mongomock", pytest.param("wire", marks=pytest.mark.wire)]
    )
    async def test_second_start_keeps_data(
        self,
        client: Any,
        database_name: str,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        from apscheduler import Task

        for run in range(2):
            async with AsyncExitStack() as exit_stack:
                await local_broker.start(exit_stack, logger)
                store = MongoDBDataStore(client, database=database_name)
                await store.start(exit_stack, local_broker, logger)
                if run == 0:
                    await store.add_task(
                        Task(id="kept", func="builtins:len", job_executor="async")
                    )
                    indexes = await store._jobs.list_indexes()
                else:
                    assert [task.id for task in await store.get_tasks()] == ["kept"]
                    assert await store._jobs.list_indexes() == indexes


@WIRE_ONLY
@pytest.mark.usefixtures("client")  # drops the test's database afterwards
class TestStopDuringOutage:
    """A scheduler stopped while the server cannot be reached stops cleanly: no
    crash, no error, whatever its store and broker were waiting for."""

    @pytest.mark.parametrize(
        "rounds", [pytest.param(n, id=f"round{n}") for n in range(3)]
    )
    async def test_stops_without_crashing(
        self,
        wire_uri: str,
        database_name: str,
        caplog: pytest.LogCaptureFixture,
        rounds: int,
    ) -> None:
        logger = logging.getLogger(f"apscheduler_mongo.tests.outage{rounds}")
        with proxied(wire_uri) as (proxy, uri):
            settings = RetrySettings(stop=stop_after_delay(60), wait=wait_fixed(0.1))
            store = MongoDBDataStore(
                uri, database=database_name, retry_settings=settings
            )
            broker = MongoDBEventBroker(
                uri,
                database=database_name,
                mode="polling",
                poll_interval=0.05,
                retry_settings=settings,
            )
            stopped: list[Event] = []
            async with AsyncScheduler(
                store, broker, logger=logger, cleanup_interval=timedelta(seconds=0.2)
            ) as scheduler:
                scheduler.subscribe(stopped.append, {SchedulerStopped})
                await scheduler.add_schedule(
                    len, IntervalTrigger(seconds=0.1), args=["x"], id="busy"
                )
                await scheduler.start_in_background()
                await anyio.sleep(0.5)
                proxy.refuse_for(120)
                # Every loop of the scheduler is now waiting for a server: in server
                # selection, or between retries
                await anyio.sleep(1.0 + rounds * 0.7)
                with anyio.fail_after(30):
                    await scheduler.stop()
                    await scheduler.wait_until_stopped()

        crashed = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not crashed, [r.getMessage() for r in crashed]
        assert [getattr(event, "exception", 0) for event in stopped] == [None]
