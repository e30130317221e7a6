"""Stores as the tests start them beside the one under test."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from apscheduler.abc import EventBroker

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker


@asynccontextmanager
async def another_store(
    client: Any, first: MongoDBDataStore, logger: logging.Logger
) -> AsyncIterator[MongoDBDataStore]:
    """
    Start a second store on ``client``: another scheduler's view of ``first``'s data.

    It uses ``first``'s database and event broker; ``first`` must have started.
    """
    async with AsyncExitStack() as exit_stack:
        other = MongoDBDataStore(client, database=first.database)
        await other.start(exit_stack, first._event_broker, logger)
        yield other


@asynccontextmanager
async def announcing_store(
    uri: str, database: str, logger: logging.Logger
) -> AsyncIterator[MongoDBDataStore]:
    """
    Start a store whose changes are announced through a :class:`MongoDBEventBroker`
    on ``database``: what a scheduler in another process learns of at once (one with
    nothing to do sleeps until an event wakes it).
    """
    async with AsyncExitStack() as exit_stack:
        broker = MongoDBEventBroker(uri, database=database, mode="polling")
        await broker.start(exit_stack, logger)
        store = MongoDBDataStore(uri, database=database)
        await store.start(exit_stack, broker, logger)
        yield store


@asynccontextmanager
async def started_store(
    client: Any,
    database: str,
    broker: EventBroker,
    logger: logging.Logger,
    **options: Any,
) -> AsyncIterator[MongoDBDataStore]:
    """Start ``broker`` and a store on ``client`` with ``options``; stop both after."""
    async with AsyncExitStack() as exit_stack:
        await broker.start(exit_stack, logger)
        store = MongoDBDataStore(client, database=database, **options)
        await store.start(exit_stack, broker, logger)
        yield store
