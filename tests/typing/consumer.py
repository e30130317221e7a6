"""
A user's program, type-checked with ``mypy --strict`` against the installed wheel.

``nox -s package`` installs the built wheel and checks this file from outside the
source tree: it fails if the wheel lost ``py.typed`` or the public API its types.
"""

from __future__ import annotations

from datetime import timedelta
from typing import assert_type

from apscheduler import AsyncScheduler, Job, Scheduler, Task
from apscheduler.abc import DataStore, EventBroker

from apscheduler_mongo import (
    MongoDBDataStore,
    MongoDBEventBroker,
    StoreNotRunningError,
    SyncMongoDBDataStore,
    __version__,
)


def tick() -> None:
    pass


async def run(uri: str) -> None:
    store = MongoDBDataStore(uri, database="apscheduler")
    broker = MongoDBEventBroker(uri, database="apscheduler", mode="polling")
    data_store: DataStore = store
    event_broker: EventBroker = broker
    async with AsyncScheduler(data_store=data_store, event_broker=event_broker) as s:
        await s.add_job(tick)

    jobs = await store.acquire_jobs("me", timedelta(seconds=30), 10)
    assert_type(jobs, list[Job])


def run_sync(uri: str) -> None:
    with SyncMongoDBDataStore(uri) as store:
        tasks = store.get_tasks()
        assert_type(tasks, list[Task])
        try:
            store.get_jobs()
        except StoreNotRunningError:
            pass

    with Scheduler(data_store=MongoDBDataStore(uri)) as scheduler:
        scheduler.add_job(tick)


assert_type(__version__, str)
