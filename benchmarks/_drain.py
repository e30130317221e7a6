"""
Drain a queue of jobs with several worker processes, as schedulers would.

Each worker is a separate process (multiprocessing's "spawn" context) with its own
store and client. After a common start signal it loops like APScheduler's job loop:
``acquire_jobs(limit=N)``, then ``release_job`` for each job acquired (the job itself
does nothing). A worker that gets no job (it lost the race for the oldest jobs) waits
a few milliseconds, as a scheduler waits for its next wake-up, and tries again,
until all the jobs are released. Each worker reports every job it owned, so that a
job owned twice shows up as a duplicate.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import timedelta
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier
from typing import Any

from apscheduler import JobOutcome, JobResult, Task

from _common import StoreKind, start_store
from _seed import drop_database, seed_jobs

LEASE = timedelta(minutes=5)
IDLE_WAIT = 0.005  # seconds between tries when no job was acquired
TIMEOUT = 600.0  # seconds a worker may take before giving up


async def _drain(
    kind: StoreKind,
    uri: str,
    database: str,
    name: str,
    limit: int,
    total: int,
    released: Synchronized[int],
    barrier: Barrier,
) -> dict[str, Any]:
    owned: list[str] = []
    acquires = empty = 0
    async with AsyncExitStack() as exit_stack:
        store = await start_store(kind, uri, database, exit_stack)
        await asyncio.to_thread(barrier.wait)  # everyone starts at once
        started = last = time.time()
        deadline = time.monotonic() + TIMEOUT
        while released.value < total and time.monotonic() < deadline:
            jobs = await store.acquire_jobs(name, LEASE, limit)
            acquires += 1
            if not jobs:
                empty += 1
                await asyncio.sleep(IDLE_WAIT)
                continue

            for job in jobs:
                owned.append(str(job.id))
                result = JobResult.from_job(job, JobOutcome.success)
                await store.release_job(name, job, result)

            with released.get_lock():
                released.value += len(jobs)

            last = time.time()

    return {
        "worker": name,
        "jobs": owned,
        "started": started,
        "finished": last,
        "acquires": acquires,
        "empty_acquires": empty,
    }


def drain_worker(
    kind: StoreKind,
    uri: str,
    database: str,
    name: str,
    limit: int,
    total: int,
    released: Synchronized[int],
    barrier: Barrier,
    results: Queue[Any],
) -> None:
    """Acquire and release jobs until ``total`` are released; report what was owned."""
    report = asyncio.run(
        _drain(kind, uri, database, name, limit, total, released, barrier)
    )
    results.put(report)


def _collect(
    results: Queue[Any], processes: Sequence[multiprocessing.process.BaseProcess]
) -> list[dict[str, Any]]:
    """Wait for every worker's report; fail early if a worker died without one."""
    reports: list[dict[str, Any]] = []
    deadline = time.monotonic() + TIMEOUT + 60
    while len(reports) < len(processes):
        if not results.empty():
            reports.append(results.get(timeout=30))
            continue

        crashed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
        if crashed or time.monotonic() > deadline:
            for process in processes:
                process.kill()
            raise RuntimeError(f"a drain worker failed (exit codes {crashed})")

        time.sleep(0.1)

    for process in processes:
        process.join(30)

    return reports


async def measure_drain(
    kind: StoreKind, uri: str, jobs: int, workers: int, limit: int
) -> dict[str, Any]:
    """
    Queue ``jobs`` jobs, drain them with ``workers`` processes and return the figures.

    :return: jobs per second (from the common start to the last release), the
        duplicates (ownerships beyond one per job), the jobs never owned, and each
        worker's share
    """
    database = f"apscheduler_bench_drain_{kind}_{workers}"
    await drop_database(uri, database)
    async with AsyncExitStack() as exit_stack:
        store = await start_store(kind, uri, database, exit_stack, fresh=True)
        await store.add_task(Task(id="work", func="builtins:len", job_executor="bench"))
        seed_started = time.monotonic()
        expected = {
            str(job_id) for job_id in await seed_jobs(store, kind, uri, database, jobs)
        }
        seed_seconds = time.monotonic() - seed_started

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers)
    released = context.Value("q", 0)
    results = context.Queue()
    processes = [
        context.Process(
            target=drain_worker,
            args=(kind, uri, database, f"worker{n}", limit, jobs, released, barrier),
            kwargs={"results": results},
        )
        for n in range(workers)
    ]
    for process in processes:
        process.start()

    reports = await asyncio.to_thread(_collect, results, processes)

    await drop_database(uri, database)
    owners = Counter(job_id for report in reports for job_id in report["jobs"])
    seconds = max(r["finished"] for r in reports) - min(r["started"] for r in reports)
    done = len(owners.keys() & expected)
    return {
        "store": kind,
        "workers": workers,
        "jobs": jobs,
        "limit": limit,
        "seconds": seconds,
        "jobs_per_second": done / seconds if seconds > 0 else 0.0,
        "duplicates": sum(n - 1 for n in owners.values()),
        "lost": len(expected - owners.keys()),
        "per_worker": [len(report["jobs"]) for report in reports],
        "empty_acquires": sum(report["empty_acquires"] for report in reports),
        "exit_codes": [process.exitcode for process in processes],
        "seed_seconds": seed_seconds,
    }
