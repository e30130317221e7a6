"""
Measure the event broker's publish-to-delivery latency across processes.

Usage: ``python benchmarks/broker_latency.py [URI]`` (default: ``MONGODB_URI``, or a
mongoeco wire server started for the run on Python >= 3.13). A child process
publishes events at a steady rate; this process receives them through its own broker
and prints the p50, p99 and maximum delay for each polling interval (and for change
streams, when the server has them). Both processes share this host's clock.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import statistics
import sys
from contextlib import AsyncExitStack, ExitStack
from datetime import datetime, timezone
from typing import Any

import anyio
from apscheduler import Event, TaskAdded

from _common import percentile, server_uri
from apscheduler_mongo import MongoDBEventBroker
from apscheduler_mongo._eventbroker import Mode

EVENTS = 300
RATE = 100  # events per second


async def _publish(
    uri: str, database: str, mode: Mode, interval: float, events: int, rate: float
) -> None:
    async with AsyncExitStack() as stack:
        broker = MongoDBEventBroker(
            uri, database=database, mode=mode, poll_interval=interval
        )
        await broker.start(stack, logging.getLogger("publisher"))
        await anyio.sleep(1)  # let the receiver settle
        for n in range(events):
            await broker.publish(TaskAdded(task_id=str(n)))
            await anyio.sleep(1 / rate)


def publisher(
    uri: str, database: str, mode: Mode, interval: float, events: int, rate: float
) -> None:
    asyncio.run(_publish(uri, database, mode, interval, events, rate))


async def receive(
    uri: str, database: str, mode: Mode, interval: float, events: int, rate: float
) -> list[float]:
    delays: list[float] = []
    done = anyio.Event()

    def record(event: Event) -> None:
        delays.append((datetime.now(timezone.utc) - event.timestamp).total_seconds())
        if len(delays) == events:
            done.set()

    async with AsyncExitStack() as stack:
        broker = MongoDBEventBroker(
            uri, database=database, mode=mode, poll_interval=interval
        )
        await broker.start(stack, logging.getLogger("receiver"))
        broker.subscribe(record, {TaskAdded})
        context = multiprocessing.get_context("spawn")
        process = context.Process(
            target=publisher, args=(uri, database, mode, interval, events, rate)
        )
        process.start()
        with anyio.fail_after(120):
            await done.wait()

        process.join()

    return delays


async def measure(
    uri: str, events: int = EVENTS, rate: float = RATE
) -> list[dict[str, Any]]:
    """
    Measure each broker mode the server supports; return one row per run.

    Polling runs at two intervals everywhere; change streams only on a replica set
    or sharded cluster.
    """
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[Any] = AsyncMongoClient(uri)
    hello = await client.admin.command("hello")
    await client.close()
    runs: list[tuple[Mode, float]] = [("polling", 0.05), ("polling", 0.2)]
    if "setName" in hello or hello.get("msg") == "isdbgrid":
        runs.append(("change_stream", 0.2))

    rows: list[dict[str, Any]] = []
    for number, (mode, interval) in enumerate(runs):
        database = f"apscheduler_mongo_latency_{number}"
        delays = await receive(uri, database, mode, interval, events, rate)
        rows.append(
            {
                "mode": mode,
                "poll_interval": interval if mode == "polling" else None,
                "events": events,
                "rate": rate,
                "p50_ms": statistics.median(delays) * 1000,
                "p99_ms": percentile(delays, 0.99) * 1000,
                "max_ms": max(delays) * 1000,
            }
        )

    return rows


def format_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Format the rows of :func:`measure` as a plain table."""
    first = rows[0]
    lines = [
        f"{first['events']} events at {first['rate']:g}/s, publisher and receiver "
        f"in separate processes",
        f"{'mode':<15} {'interval':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    for row in rows:
        interval = row["poll_interval"]
        shown = float("nan") if interval is None else interval
        lines.append(
            f"{row['mode']:<15} {shown:>8.2f} {row['p50_ms']:>8.1f} "
            f"{row['p99_ms']:>8.1f} {row['max_ms']:>8.1f}"
        )

    return lines


def main() -> None:
    uri = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MONGODB_URI")
    with ExitStack() as stack:
        if uri is None:
            uri = stack.enter_context(server_uri())

        rows = asyncio.run(measure(uri))
        sys.stdout.write("\n".join(format_lines(rows)) + "\n")


if __name__ == "__main__":
    main()
