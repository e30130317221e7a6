"""
A worker process for the stalled-owner test (guarantee 2, no stale writes).

It runs in a separate process (multiprocessing's "spawn" context), takes a schedule and
a job with a short lease, and is then stopped with SIGSTOP by the test. When it is
resumed, long after its leases lapsed, it carries on as if nothing had happened and
reports what each of its writes returned or raised, what its store logged and which
events its store published.

The test tells it to go on through a pipe, not a :class:`multiprocessing.Event`: the
worker may be stopped while waiting, and a process stopped inside ``Event.wait()`` can
hold the event's lock, so that ``Event.set()`` would block the test forever. Reading a
pipe takes no lock that the test needs.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable
from contextlib import AsyncExitStack
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from typing import Any

from apscheduler import Event, JobOutcome, JobResult, TaskUpdated
from apscheduler.eventbrokers.local import LocalEventBroker

from apscheduler_mongo import MongoDBDataStore

from .items import next_job, processed

#: The scheduler id of the worker
STALE_OWNER = "stale-owner"
#: How long the worker's leases last: the test stalls it for longer
STALE_LEASE = timedelta(seconds=1)
#: How far the stale owner tries to extend leases it no longer holds
STALE_EXTENSION = timedelta(hours=1)
#: How long the worker waits for the test at most (never forever)
WAIT_SECONDS = 60


class _Recorder(logging.Handler):
    """Keep every message the worker's store logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname}: {record.getMessage()}")


async def _outcome(call: Awaitable[Any]) -> str:
    """Run ``call``; describe what it returned or raised."""
    try:
        value = await call
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"

    return f"returned {value!r}"


async def _stall(
    uri: str, database: str, ready: Any, go: Connection, results: Queue[Any]
) -> dict[str, Any]:
    logger = logging.getLogger("stalled-owner")
    logger.setLevel(logging.DEBUG)
    recorder = _Recorder()
    logger.addHandler(recorder)
    events: list[str] = []
    marker_seen = asyncio.Event()

    def record(event: Event) -> None:
        if isinstance(event, TaskUpdated) and event.task_id == "marker":
            marker_seen.set()
        else:
            events.append(type(event).__name__)

    async with AsyncExitStack() as exit_stack:
        broker = LocalEventBroker()
        await broker.start(exit_stack, logger)
        store = MongoDBDataStore(uri, database=database)
        await store.start(exit_stack, broker, logger)

        schedules = await store.acquire_schedules(STALE_OWNER, STALE_LEASE, 10)
        jobs = await store.acquire_jobs(STALE_OWNER, STALE_LEASE, 10)
        results.put(
            {
                "schedules": [schedule.id for schedule in schedules],
                "jobs": [str(job.id) for job in jobs],
            }
        )
        ready.set()
        if not await asyncio.to_thread(go.poll, WAIT_SECONDS):
            return {"error": "the test never said go"}

        # Resumed long after the leases lapsed: carry on as the owner
        [schedule] = schedules
        [job] = jobs
        assert schedule.next_fire_time is not None
        broker.subscribe(record)
        calls = {
            "extend_acquired_schedule_leases": await _outcome(
                store.extend_acquired_schedule_leases(
                    STALE_OWNER, {schedule.id}, STALE_EXTENSION
                )
            ),
            "extend_acquired_job_leases": await _outcome(
                store.extend_acquired_job_leases(STALE_OWNER, {job.id}, STALE_EXTENSION)
            ),
            "release_schedules": await _outcome(
                store.release_schedules(
                    STALE_OWNER,
                    [processed(schedule, schedule.next_fire_time + timedelta(days=1))],
                )
            ),
            "release_job": await _outcome(
                store.release_job(
                    STALE_OWNER,
                    job,
                    JobResult.from_job(
                        job, JobOutcome.success, return_value=STALE_OWNER
                    ),
                )
            ),
            "add_job": await _outcome(
                store.add_job(
                    next_job(schedule, result_expiration_time=timedelta(minutes=5))
                )
            ),
        }

        # Every event published so far is delivered before the marker
        await broker.publish(TaskUpdated(task_id="marker"))
        await asyncio.wait_for(marker_seen.wait(), WAIT_SECONDS)

    return {"calls": calls, "logged": recorder.messages, "events": events}


def stalled_worker(
    uri: str, database: str, ready: Any, go: Connection, results: Queue[Any]
) -> None:
    """
    Take a schedule and a job, say ``ready``, wait for word on ``go``, then write.

    Puts two reports on ``results``: what was taken, then what the stale writes did
    (or ``{"error": ...}`` if the worker failed).
    """
    try:
        report = asyncio.run(_stall(uri, database, ready, go, results))
    except BaseException:
        report = {"error": traceback.format_exc()}
        raise
    finally:
        results.put(report)
