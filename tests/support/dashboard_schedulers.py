"""
A scheduler process for the dashboard's browser test: it runs jobs that succeed and
jobs that fail, and keeps the store's history every second, until stopped.

Usage: ``python -m tests.support.dashboard_schedulers URI DATABASE`` (from the
repository root). Prints ``READY`` once its scheduler runs; stops on SIGTERM.
"""

from __future__ import annotations

import signal
import sys
from datetime import timedelta

import anyio
from apscheduler import AsyncScheduler, ConflictPolicy
from apscheduler.triggers.interval import IntervalTrigger

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker

#: The schedule only run-now starts (paused): its results are kept an hour
ON_DEMAND = "on-demand-report"


def report() -> str:
    """A task that succeeds."""
    return "report sent"


def flaky_sync() -> None:
    """A task that fails, with a message that must be shown escaped."""
    raise ValueError("mirror <b>unreachable</b>")


async def _run(uri: str, database: str) -> None:
    store = MongoDBDataStore(uri, database=database, history_interval=1.0)
    broker = MongoDBEventBroker(uri, database=database, mode="polling")
    async with AsyncScheduler(store, broker) as scheduler:
        await scheduler.configure_task("report", func=report)
        await scheduler.configure_task("flaky-sync", func=flaky_sync)
        await scheduler.add_schedule(
            "report",
            IntervalTrigger(seconds=1),
            id="every-second-report",
            conflict_policy=ConflictPolicy.replace,
        )
        await scheduler.add_schedule(
            "flaky-sync",
            IntervalTrigger(seconds=2),
            id="flaky-sync",
            conflict_policy=ConflictPolicy.replace,
        )
        await scheduler.add_schedule(
            "report",
            IntervalTrigger(days=1),
            id=ON_DEMAND,
            paused=True,
            job_result_expiration_time=timedelta(hours=1),
            conflict_policy=ConflictPolicy.replace,
        )
        await scheduler.start_in_background()
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break


if __name__ == "__main__":
    anyio.run(_run, sys.argv[1], sys.argv[2])
