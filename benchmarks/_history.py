"""
Cost versus history: what one job and one schedule firing cost beside many finished
records.

For each history size, a fresh database gets that many finished jobs (with their
results kept), then one job goes through its life (add, acquire, ``get_task``,
release), one due schedule fires (acquire, add its job, release), and the store
cleans up. Counted, for each: the commands sent and the documents the server
returned (from pymongo's command monitoring), which do not depend on the server's
speed. Times are taken only on a real server (``MONGODB_URI``): the mongoeco stand-in
uses no index at all, so there every query scans its collection and time grows with
history whatever the store does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

from apscheduler import Job, JobOutcome, JobResult, Task
from apscheduler._structures import ScheduleResult
from apscheduler.abc import DataStore
from pymongo import monitoring

from _common import CommandCounter, StoreKind, start_store
from _counts import LEASE, SCHEDULER, add_due_schedules, job_for
from _seed import drop_database, seed_jobs

#: History sizes: on a real server, and on mongoeco (whose inserts compare each new
#: document with every stored one, so 100,000 would take hours to build)
SIZES_REAL = (0, 10_000, 100_000)
SIZES_MONGOECO = (0, 1_000, 5_000)
SIZES_QUICK = (0, 500)


class Traffic(CommandCounter):
    """Count the commands a client sends, and the documents the server returns."""

    def __init__(self) -> None:
        super().__init__()
        self.documents = 0

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        reply = event.reply
        cursor = reply.get("cursor")
        if isinstance(cursor, dict):
            batch = cursor.get("firstBatch", cursor.get("nextBatch")) or []
            self.documents += len(batch)
        elif event.command_name == "findAndModify" and reply.get("value"):
            self.documents += 1

    def counts(self) -> tuple[int, int]:
        """Return the commands and documents since the last call, and forget them."""
        taken = len(self.take()), self.documents
        self.documents = 0
        return taken


async def _one_job(store: DataStore) -> None:
    await store.add_job(Job(task_id="work", executor="bench"))
    [job] = await store.acquire_jobs(SCHEDULER, LEASE, 10)
    await store.get_task(job.task_id)
    result = JobResult.from_job(job, JobOutcome.success)
    await store.release_job(SCHEDULER, job, result)


async def _one_firing(store: DataStore) -> None:
    [schedule] = await store.acquire_schedules(SCHEDULER, LEASE, 10)
    assert schedule.next_fire_time is not None
    await store.add_job(job_for(schedule, schedule.next_fire_time))
    next_fire_time = schedule.trigger.next()
    await store.release_schedules(
        SCHEDULER,
        [
            ScheduleResult(
                schedule_id=schedule.id,
                task_id=schedule.task_id,
                trigger=schedule.trigger,
                last_fire_time=schedule.next_fire_time,
                next_fire_time=next_fire_time,
            )
        ],
    )


async def _measured(
    operation: Callable[[], Awaitable[None]], traffic: Traffic, timed: bool
) -> dict[str, Any]:
    traffic.counts()
    started = time.perf_counter()
    await operation()
    seconds = time.perf_counter() - started
    commands, documents = traffic.counts()
    return {
        "commands": commands,
        "documents": documents,
        "ms": round(seconds * 1000, 2) if timed else None,
    }


async def measure_history(
    kind: StoreKind, uri: str, sizes: Sequence[int]
) -> list[dict[str, Any]]:
    """Measure one store at each history size; return a row per size."""
    timed = bool(os.environ.get("MONGODB_URI"))
    rows = []
    for size in sizes:
        database = f"apscheduler_bench_history_{kind}"
        await drop_database(uri, database)
        traffic = Traffic()
        async with AsyncExitStack() as exit_stack:
            store = await start_store(
                kind, uri, database, exit_stack, listener=traffic, fresh=True
            )
            task = Task(id="work", func="builtins:len", job_executor="bench")
            await store.add_task(task)
            await seed_jobs(store, kind, uri, database, size, state="finished")
            await add_due_schedules(store, "work", "history", 1)
            rows.append(
                {
                    "store": kind,
                    "history": size,
                    "job": await _measured(partial(_one_job, store), traffic, timed),
                    "firing": await _measured(
                        partial(_one_firing, store), traffic, timed
                    ),
                    "cleanup": await _measured(store.cleanup, traffic, timed),
                }
            )

        await drop_database(uri, database)

    return rows


def history_sizes(quick: bool) -> tuple[int, ...]:
    if quick:
        return SIZES_QUICK

    return SIZES_REAL if os.environ.get("MONGODB_URI") else SIZES_MONGOECO
