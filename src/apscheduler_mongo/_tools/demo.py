"""The demo: a scheduler on this store runs a few schedules and says what ran."""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone

import anyio
from apscheduler import AsyncScheduler, Event, JobReleased
from apscheduler.triggers.interval import IntervalTrigger

from .. import _layout as layout
from .._adapters import Adapter, adapter_for
from .._client import open_client
from .._datastore import MongoDBDataStore
from .._eventbroker import MongoDBEventBroker
from .._names import validate_database_name

_started = datetime.now(timezone.utc)


def _say(line: str) -> None:
    elapsed = (datetime.now(timezone.utc) - _started).total_seconds()
    sys.stdout.write(f"[{elapsed:6.2f}s] {line}\n")
    sys.stdout.flush()


def greet(name: str) -> str:
    """Task run by the demo's schedules."""
    return f"hello, {name}"


class DatabaseInUseError(ValueError):
    """Raised when the demo's database holds a store that the demo would empty."""


async def _refuse_a_store(adapter: Adapter, database: str) -> None:
    """
    Refuse a database whose tasks, schedules or jobs are not empty (reading only).

    :raises DatabaseInUseError: if it holds any
    """
    held = [
        name
        for name in (layout.TASKS, layout.SCHEDULES, layout.JOBS)
        if await adapter.collection(database, name).find({}, {"_id": 1}, limit=1)
    ]
    if held:
        raise DatabaseInUseError(
            f"database {database!r} holds a store (its {', '.join(held)} are not "
            f"empty), which the demo would empty: choose another --database, or "
            f"pass --overwrite to empty it"
        )


async def run_demo(
    uri: str | None, database: str, seconds: float, overwrite: bool = False
) -> int:
    """
    Run the demo for ``seconds``; return the number of jobs that ran.

    :param overwrite: empty the database even if it holds a store
    :raises DatabaseInUseError: if the database holds a store and ``overwrite`` is
        false
    """
    database = validate_database_name(database)
    async with AsyncExitStack() as exit_stack:
        if uri is None:
            try:
                from mongomock_motor import AsyncMongoMockClient
            except ImportError:
                sys.stderr.write(
                    "No MONGODB_URI given and mongomock-motor is not installed: "
                    "install the demo extra (pip install 'apscheduler-mongo"
                    "[mongomock]') or pass --uri\n"
                )
                return -1

            adapter = adapter_for(AsyncMongoMockClient())
            _say("no MongoDB URI given: using an in-process mongomock-motor database")
        else:
            adapter = await open_client(uri, exit_stack)

        if not overwrite:
            await _refuse_a_store(adapter, database)

        return await _run(adapter.client, database, seconds)


async def _run(client: object, database: str, seconds: float) -> int:
    store = MongoDBDataStore(client, database=database, start_from_scratch=True)
    broker = MongoDBEventBroker(client, database=database)
    _say(f"store: {store!r}")
    _say(f"event broker: {broker!r}")
    ran = 0

    def report(event: Event) -> None:
        nonlocal ran
        assert isinstance(event, JobReleased)
        ran += 1
        due, started = event.scheduled_start, event.started_at
        lateness = (
            f", started {(started - due).total_seconds() * 1000:.1f} ms after"
            if due and started
            else ""
        )
        _say(
            f"{event.outcome.name}: job from schedule {event.schedule_id!r} due at "
            f"{due:%H:%M:%S.%f}{lateness}"
            if due
            else f"{event.outcome.name}: job {event.job_id}"
        )

    async with AsyncScheduler(data_store=store, event_broker=broker) as scheduler:
        scheduler.subscribe(report, {JobReleased})
        start = datetime.now(timezone.utc) + timedelta(seconds=0.5)
        await scheduler.add_schedule(
            greet,
            IntervalTrigger(seconds=1, start_time=start),
            id="every-second",
            args=["world"],
        )
        await scheduler.add_schedule(
            greet,
            IntervalTrigger(seconds=2, start_time=start),
            id="every-two-seconds",
            args=["again"],
        )
        await scheduler.start_in_background()
        _say(f"scheduler started; running schedules for {seconds:g} seconds")
        await anyio.sleep(seconds)
        for schedule in await scheduler.get_schedules():
            _say(f"schedule {schedule.id!r}: next fire time {schedule.next_fire_time}")

        await scheduler.stop()

    _say(f"done: {ran} jobs ran")
    return ran
