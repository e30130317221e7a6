"""
A scheduler process for the clock tests, which the test may start with its wall clock
shifted (libfaketime). It records each run with the server's time, which is the one
clock the test trusts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import traceback
from datetime import datetime, timedelta, timezone
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from apscheduler import AsyncScheduler, current_job
from bson import ObjectId

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker

from .broker_workers import close_runs_clients, run_until, runs_collection


async def record_run(uri: str, database: str) -> None:
    """Record the job's schedule and fire time, stamped with the server's clock."""
    job = current_job.get()
    assert job.scheduled_fire_time is not None
    await runs_collection(uri, database).update_one(
        {"_id": ObjectId()},
        {
            "$setOnInsert": {
                "schedule_id": job.schedule_id,
                "fire_time": job.scheduled_fire_time,
                "job_id": str(job.id),
                "pid": os.getpid(),
                "host_clock": datetime.now(timezone.utc),
            },
            "$currentDate": {"ran_at": True},
        },
        upsert=True,
    )


async def _schedule(
    uri: str, database: str, name: str, ready: Event, stop: Event
) -> dict[str, Any]:
    logger = logging.getLogger(f"apscheduler_mongo.tests.{name}")
    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logger.addHandler(Keep())
    logger.propagate = False
    store = MongoDBDataStore(uri, database=database)
    broker = MongoDBEventBroker(
        uri, database=database, mode="polling", poll_interval=0.05
    )
    try:
        async with AsyncScheduler(
            store,
            broker,
            identity=name,
            logger=logger,
            cleanup_interval=timedelta(seconds=5),
        ) as scheduler:
            await scheduler.start_in_background()
            ready.set()
            stopped_early = await run_until(scheduler, stop, 120)
    finally:
        await close_runs_clients()

    return {
        "worker": name,
        "pid": os.getpid(),
        "host_clock": datetime.now(timezone.utc).isoformat(),
        "stopped_early": stopped_early,
        "warnings": warnings,
    }


def scheduler_worker(
    uri: str, database: str, name: str, ready: Event, stop: Event, results: Queue[Any]
) -> None:
    """Run a scheduler until ``stop``; report its warnings (and any crash)."""
    try:
        report = asyncio.run(_schedule(uri, database, name, ready, stop))
    except BaseException:
        results.put({"worker": name, "crash": traceback.format_exc()})
        raise

    results.put(report)
