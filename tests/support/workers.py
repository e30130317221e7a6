"""
Worker processes for the concurrency tests.

Each function here runs in a separate process (multiprocessing's "spawn" context),
opens its own store on the given URI and reports what it owned through a queue.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from datetime import timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from apscheduler import JobOutcome, JobResult
from apscheduler.eventbrokers.local import LocalEventBroker

from apscheduler_mongo import MongoDBDataStore

from .items import next_job, processed

LEASE = timedelta(minutes=5)


async def _started_store(
    uri: str, database: str, exit_stack: AsyncExitStack, **options: Any
) -> Any:
    logger = logging.getLogger("worker")
    broker = LocalEventBroker()
    await broker.start(exit_stack, logger)
    store = MongoDBDataStore(uri, database=database, **options)
    await store.start(exit_stack, broker, logger)
    return store


async def _drain(
    uri: str, database: str, name: str, barrier: Barrier
) -> dict[str, Any]:
    owned_jobs: list[str] = []
    owned_schedules: list[str] = []
    async with AsyncExitStack() as exit_stack:
        store = await _started_store(uri, database, exit_stack)
        await asyncio.to_thread(barrier.wait)  # every worker starts claiming at once
        idle_rounds = 0
        while idle_rounds < 3:
            schedules = await store.acquire_schedules(name, LEASE, 20)
            jobs = await store.acquire_jobs(name, LEASE, 50)
            owned_schedules.extend(schedule.id for schedule in schedules)
            owned_jobs.extend(str(job.id) for job in jobs)
            if schedules:
                await store.release_schedules(
                    name, [processed(schedule, None) for schedule in schedules]
                )
            for job in jobs:
                result = JobResult.from_job(job, JobOutcome.success, return_value=name)
                await store.release_job(name, job, result)

            idle_rounds = 0 if schedules or jobs else idle_rounds + 1

    return {"worker": name, "jobs": owned_jobs, "schedules": owned_schedules}


def drain_worker(
    uri: str, database: str, name: str, barrier: Barrier, results: Queue[Any]
) -> None:
    """Claim jobs and due schedules until none are left; report what was owned."""
    results.put(asyncio.run(_drain(uri, database, name, barrier)))


async def _hold(
    uri: str, database: str, name: str, barrier: Barrier, rounds: int
) -> list[int]:
    held_per_round: list[int] = []
    async with AsyncExitStack() as exit_stack:
        store = await _started_store(uri, database, exit_stack)
        for _ in range(rounds):
            await asyncio.to_thread(barrier.wait)  # all claim together ...
            jobs = await store.acquire_jobs(name, LEASE, 10)
            held_per_round.append(len(jobs))
            # ... and nobody releases before everyone has claimed
            await asyncio.to_thread(barrier.wait)
            for job in jobs:
                result = JobResult.from_job(job, JobOutcome.success)
                await store.release_job(name, job, result)

    return held_per_round


def hold_worker(
    uri: str,
    database: str,
    name: str,
    barrier: Barrier,
    rounds: int,
    results: Queue[Any],
) -> None:
    """In each round, claim jobs together with the other workers, then release."""
    held = asyncio.run(_hold(uri, database, name, barrier, rounds))
    results.put({"worker": name, "held": held})


async def _hold_then_hang(uri: str, database: str, ready: Any) -> None:
    async with AsyncExitStack() as exit_stack:
        store = await _started_store(uri, database, exit_stack)
        lease = timedelta(seconds=1)
        [schedule] = await store.acquire_schedules("doomed", lease, 10)
        await store.add_job(
            next_job(schedule, result_expiration_time=timedelta(minutes=5))
        )
        await store.acquire_jobs("doomed", lease, 10)
        ready.set()
        await asyncio.sleep(3600)  # killed with SIGKILL before this ends


def doomed_worker(uri: str, database: str, ready: Any) -> None:
    """Claim a schedule, add its job, claim the job, then wait to be killed."""
    asyncio.run(_hold_then_hang(uri, database, ready))


async def _beat_then_hang(
    uri: str, database: str, interval: float, lease: float, ready: Any
) -> None:
    async with AsyncExitStack() as exit_stack:
        store = await _started_store(
            uri, database, exit_stack, heartbeat_interval=interval
        )
        await store.acquire_jobs("beating", timedelta(seconds=lease), 10)
        await asyncio.sleep(3 * interval)  # a heartbeat says what it holds
        ready.set()
        await asyncio.sleep(3600)  # killed with SIGKILL before this ends


def beating_worker(
    uri: str, database: str, interval: float, lease: float, ready: Any
) -> None:
    """Claim the queued jobs, send heartbeats every ``interval``, wait to be killed."""
    asyncio.run(_beat_then_hang(uri, database, interval, lease, ready))
