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
from pathlib import Path
from typing import Any

import anyio
from apscheduler import Event, TaskAdded

from apscheduler_mongo import MongoDBEventBroker
from apscheduler_mongo._eventbroker import Mode

EVENTS = 300
RATE = 100  # events per second


async def _publish(uri: str, database: str, mode: Mode, interval: float) -> None:
    async with AsyncExitStack() as stack:
        broker = MongoDBEventBroker(
            uri, database=database, mode=mode, poll_interval=interval
        )
        await broker.start(stack, logging.getLogger("publisher"))
        await anyio.sleep(1)  # let the receiver settle
        for n in range(EVENTS):
            await broker.publish(TaskAdded(task_id=str(n)))
            await anyio.sleep(1 / RATE)


def publisher(uri: str, database: str, mode: Mode, interval: float) -> None:
    asyncio.run(_publish(uri, database, mode, interval))


async def receive(uri: str, database: str, mode: Mode, interval: float) -> list[float]:
    delays: list[float] = []
    done = anyio.Event()

    def record(event: Event) -> None:
        delays.append((datetime.now(timezone.utc) - event.timestamp).total_seconds())
        if len(delays) == EVENTS:
            done.set()

    async with AsyncExitStack() as stack:
        broker = MongoDBEventBroker(
            uri, database=database, mode=mode, poll_interval=interval
        )
        await broker.start(stack, logging.getLogger("receiver"))
        broker.subscribe(record, {TaskAdded})
        context = multiprocessing.get_context("spawn")
        process = context.Process(
            target=publisher, args=(uri, database, mode, interval)
        )
        process.start()
        with anyio.fail_after(120):
            await done.wait()

        process.join()

    return delays


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def measure(uri: str) -> list[str]:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[Any] = AsyncMongoClient(uri)
    hello = await client.admin.command("hello")
    await client.close()
    runs: list[tuple[Mode, float]] = [("polling", 0.05), ("polling", 0.2)]
    if "setName" in hello or hello.get("msg") == "isdbgrid":
        runs.append(("change_stream", 0.2))

    lines = [
        f"{EVENTS} events at {RATE}/s, publisher and receiver in separate processes",
        f"{'mode':<15} {'interval':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    for number, (mode, interval) in enumerate(runs):
        database = f"apscheduler_mongo_latency_{number}"
        delays = await receive(uri, database, mode, interval)
        shown = interval if mode == "polling" else float("nan")
        lines.append(
            f"{mode:<15} {shown:>8.2f} {statistics.median(delays) * 1000:>8.1f} "
            f"{percentile(delays, 0.99) * 1000:>8.1f} {max(delays) * 1000:>8.1f}"
        )

    return lines


def main() -> None:
    uri = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MONGODB_URI")
    with ExitStack() as stack:
        if uri is None:
            sys.path.insert(0, str(Path(__file__).parents[1]))
            from tests.servers import mongoeco_server

            uri = stack.enter_context(mongoeco_server())

        sys.stdout.write("\n".join(asyncio.run(measure(uri))) + "\n")


if __name__ == "__main__":
    main()
