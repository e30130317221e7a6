"""Who owns the client, and how the store starts and stops."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from apscheduler.abc import EventBroker
from pymongo.errors import InvalidOperation

from apscheduler_mongo import MongoDBDataStore

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

        await assert_closed(store._client)

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

        await assert_closed(store._client)


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
                    indexes = await store._jobs.index_information()
                else:
                    assert [task.id for task in await store.get_tasks()] == ["kept"]
                    assert await store._jobs.index_information() == indexes
