"""
Count the server commands the store sends per job and per schedule firing.

Usage: ``python benchmarks/count_commands.py [URI]`` (default: ``MONGODB_URI``, or a
mongoeco wire server started for the run on Python >= 3.13). Counts come from
pymongo's command monitoring, so they are exact, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import Counter
from contextlib import AsyncExitStack, ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from apscheduler import ConflictPolicy, Job, JobOutcome, JobResult, Schedule, Task
from apscheduler._structures import ScheduleResult
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.interval import IntervalTrigger
from pymongo import AsyncMongoClient, monitoring

from apscheduler_mongo import MongoDBDataStore

LEASE = timedelta(minutes=1)


class CommandCounter(monitoring.CommandListener):
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in ("hello", "isMaster", "endSessions"):
            self.counts[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def take(self) -> tuple[int, str]:
        total = sum(self.counts.values())
        detail = ", ".join(f"{name} {n}" for name, n in sorted(self.counts.items()))
        self.counts.clear()
        return total, detail


async def job_lifecycle(
    store: MongoDBDataStore, counter: CommandCounter, batch: int, label: str
) -> tuple[str, float, str]:
    """Add ``batch`` jobs, acquire them (``batch`` at a time) and release each."""
    counter.take()
    for _ in range(batch):
        await store.add_job(Job(task_id="t", executor="a"))

    added = counter.take()[0]
    acquired = released = 0
    remaining = batch
    while remaining:
        jobs = await store.acquire_jobs("s", LEASE, batch)
        acquired += counter.take()[0]
        for job in jobs:
            await store.release_job(
                "s", job, JobResult.from_job(job, JobOutcome.success)
            )

        released += counter.take()[0]
        remaining -= len(jobs)

    total = added + acquired + released
    detail = f"add {added}, acquire {acquired}, release {released}"
    return f"job, {label}, batch {batch}", total / batch, detail


async def measure(uri: str) -> None:
    counter = CommandCounter()
    client: AsyncMongoClient[Any] = AsyncMongoClient(uri, event_listeners=[counter])
    logger = logging.getLogger("count")
    async with AsyncExitStack() as stack:
        stack.push_async_callback(client.close)
        broker = LocalEventBroker()
        await broker.start(stack, logger)
        store = MongoDBDataStore(
            client, database="apscheduler_mongo_count", start_from_scratch=True
        )
        await store.start(stack, broker, logger)
        rows = []
        for cap in (None, 100):
            task = Task(
                id="t", func="builtins:len", job_executor="a", max_running_jobs=cap
            )
            await store.add_task(task)
            label = "uncapped" if cap is None else f"max_running_jobs={cap}"
            rows.extend(
                [await job_lifecycle(store, counter, n, label) for n in (1, 100)]
            )

        now = datetime.now(timezone.utc)
        for batch in (1, 100):
            for n in range(batch):
                start = now - timedelta(seconds=5)
                trigger = IntervalTrigger(minutes=1, start_time=start)
                schedule = Schedule(
                    id=f"s{batch}-{n}", task_id="t", trigger=trigger, job_executor="a"
                )
                schedule.next_fire_time = trigger.next()
                await store.add_schedule(schedule, ConflictPolicy.replace)
            counter.take()
            schedules = await store.acquire_schedules("s", LEASE, batch)
            results = [
                ScheduleResult(
                    schedule_id=s.id,
                    task_id=s.task_id,
                    trigger=s.trigger,
                    last_fire_time=s.next_fire_time,  # type: ignore[arg-type]
                    next_fire_time=s.trigger.next(),
                )
                for s in schedules
            ]
            await store.release_schedules("s", results)
            total, detail = counter.take()
            rows.append((f"schedule firing, batch {batch}", total / batch, detail))

        await client.drop_database("apscheduler_mongo_count")

    width = max(len(row[0]) for row in rows)
    lines = [f"{'operation':<{width}}  commands per item  (detail)"]
    lines += [f"{n:<{width}}  {per:17.2f}  ({detail})" for n, per, detail in rows]
    sys.stdout.write("\n".join(lines) + "\n")


def main() -> None:
    uri = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MONGODB_URI")
    with ExitStack() as stack:
        if uri is None:
            sys.path.insert(0, str(Path(__file__).parents[1]))
            from tests.servers import mongoeco_server

            uri = stack.enter_context(mongoeco_server())

        asyncio.run(measure(uri))


if __name__ == "__main__":
    main()
