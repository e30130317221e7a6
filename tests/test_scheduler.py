"""End to end: APScheduler's own schedulers running on the store."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from apscheduler import AsyncScheduler, JobOutcome, JobReleased, Scheduler
from apscheduler.triggers.interval import IntervalTrigger

from apscheduler_mongo import MongoDBDataStore

pytestmark = pytest.mark.anyio


def double(value: int) -> int:
    return value * 2


def whoami() -> str:
    return threading.current_thread().name


class TestAsyncScheduler:
    """An AsyncScheduler on the store runs jobs and schedules."""

    async def test_run_job(self, client: Any, database_name: str) -> None:
        store = MongoDBDataStore(client, database=database_name)
        async with AsyncScheduler(data_store=store) as scheduler:
            await scheduler.start_in_background()
            with anyio.fail_after(10):
                assert await scheduler.run_job(double, args=[21]) == 42

    async def test_interval_schedule_fires_once_per_fire_time(
        self, client: Any, database_name: str
    ) -> None:
        released: list[JobReleased] = []
        enough = anyio.Event()

        def record(event: Any) -> None:
            released.append(event)
            if len(released) == 4:
                enough.set()

        store = MongoDBDataStore(client, database=database_name)
        async with AsyncScheduler(data_store=store) as scheduler:
            scheduler.subscribe(record, {JobReleased})
            start = datetime.now(timezone.utc) + timedelta(seconds=0.3)
            await scheduler.add_schedule(
                double,
                IntervalTrigger(seconds=0.25, start_time=start),
                id="interval",
                args=[1],
            )
            await scheduler.start_in_background()
            with anyio.fail_after(10):
                await enough.wait()

        fire_times = [event.scheduled_start for event in released]
        assert len(fire_times) == len(set(fire_times))
        assert all(event.outcome is JobOutcome.success for event in released)
        assert all(event.schedule_id == "interval" for event in released)


class TestSyncScheduler:
    """APScheduler's threaded Scheduler works with a store built from a URI."""

    @pytest.mark.wire
    def test_uri_store_in_scheduler_thread(
        self, wire_uri: str, database_name: str
    ) -> None:
        store = MongoDBDataStore(wire_uri, database=database_name)
        with Scheduler(data_store=store) as scheduler:
            scheduler.start_in_background()
            assert scheduler.run_job(double, args=[4]) == 8
            # The store's client lives in the scheduler's event loop thread
            assert scheduler.run_job(whoami) != threading.current_thread().name
