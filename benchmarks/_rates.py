"""
Time the schedule loop, and job acquisition with many finished and leased jobs.

Both run in this process, one store at a time, each on a database of its own.
"""

from __future__ import annotations

import statistics
import time
from contextlib import AsyncExitStack
from datetime import datetime, timezone
from typing import Any

from apscheduler import JobOutcome, JobResult, Task
from apscheduler._structures import ScheduleResult

from _common import CommandCounter, StoreKind, start_store, summarize
from _counts import LEASE, SCHEDULER, add_due_schedules, job_for
from _seed import drop_database, seed_jobs

SCHEDULE_BATCH = 100  # what APScheduler's scheduler asks for
ACQUIRE_LIMIT = 100


async def measure_schedules(
    kind: StoreKind, uri: str, count: int, *, with_jobs: bool
) -> dict[str, Any]:
    """
    Process ``count`` due schedules as the scheduler's schedule loop does.

    Acquire up to 100, compute each one's next fire time, add its job (if
    ``with_jobs``), release them; until none is due.
    """
    database = f"apscheduler_bench_schedules_{kind}"
    await drop_database(uri, database)
    counter = CommandCounter()
    async with AsyncExitStack() as exit_stack:
        store = await start_store(
            kind, uri, database, exit_stack, listener=counter, fresh=True
        )
        await store.add_task(Task(id="work", func="builtins:len", job_executor="bench"))
        await add_due_schedules(store, "work", "due", count)
        counter.take()
        processed = 0
        started = time.perf_counter()
        while schedules := await store.acquire_schedules(
            SCHEDULER, LEASE, SCHEDULE_BATCH
        ):
            now = datetime.now(timezone.utc)
            results = []
            for schedule in schedules:
                fire_time = schedule.next_fire_time
                assert fire_time is not None
                next_fire_time = schedule.trigger.next()
                while next_fire_time is not None and next_fire_time <= now:
                    fire_time, next_fire_time = next_fire_time, schedule.trigger.next()

                if with_jobs:
                    await store.add_job(job_for(schedule, fire_time))

                results.append(
                    ScheduleResult(
                        schedule_id=schedule.id,
                        task_id=schedule.task_id,
                        trigger=schedule.trigger,
                        last_fire_time=fire_time,
                        next_fire_time=next_fire_time,
                    )
                )

            await store.release_schedules(SCHEDULER, results)
            processed += len(schedules)

        seconds = time.perf_counter() - started
        commands = counter.take()

    await drop_database(uri, database)
    return {
        "store": kind,
        "with_jobs": with_jobs,
        "schedules": count,
        "processed": processed,
        "seconds": seconds,
        "per_second": processed / seconds,
        "commands_per_schedule": len(commands) / max(processed, 1),
    }


async def measure_acquisition(
    kind: StoreKind, uri: str, queued: int, extra: int, rounds: int
) -> dict[str, Any]:
    """
    Time ``acquire_jobs(limit=100)`` with and without ``extra`` other jobs present.

    The other jobs are half finished (results kept for an hour) and half leased by
    another scheduler for a day; ``queued`` jobs wait to be acquired in both cases.
    After one untimed call (limit 1), each round acquires 100 jobs (timed and
    counted) and releases them (not timed).
    """
    cases: dict[str, Any] = {}
    for label, others in (("empty", 0), ("loaded", extra)):
        database = f"apscheduler_bench_acquire_{kind}_{label}"
        await drop_database(uri, database)
        counter = CommandCounter()
        async with AsyncExitStack() as exit_stack:
            store = await start_store(
                kind, uri, database, exit_stack, listener=counter, fresh=True
            )
            task = Task(id="work", func="builtins:len", job_executor="bench")
            await store.add_task(task)
            seed_started = time.monotonic()
            finished = others // 2
            await seed_jobs(store, kind, uri, database, finished, "finished")
            await seed_jobs(store, kind, uri, database, others - finished, "leased")
            await seed_jobs(store, kind, uri, database, queued, "queued")
            seed_seconds = time.monotonic() - seed_started
            # One untimed call first, so that no measured call pays for warming up
            for job in await store.acquire_jobs(SCHEDULER, LEASE, 1):
                result = JobResult.from_job(job, JobOutcome.success)
                await store.release_job(SCHEDULER, job, result)

            times: list[float] = []
            counts: list[int] = []
            detail = ""
            for _ in range(rounds):
                counter.take()
                started = time.perf_counter()
                jobs = await store.acquire_jobs(SCHEDULER, LEASE, ACQUIRE_LIMIT)
                times.append(time.perf_counter() - started)
                commands = counter.take()
                counts.append(len(commands))
                detail = summarize(commands)
                if len(jobs) != ACQUIRE_LIMIT:
                    raise RuntimeError(f"acquired {len(jobs)} of {ACQUIRE_LIMIT} jobs")

                for job in jobs:
                    result = JobResult.from_job(job, JobOutcome.success)
                    await store.release_job(SCHEDULER, job, result)

        await drop_database(uri, database)
        cases[label] = {
            "finished": finished,
            "leased": others - finished,
            "queued": queued,
            "rounds": rounds,
            "median_ms": statistics.median(times) * 1000,
            "commands_per_call": statistics.mean(counts),
            "detail": detail,
            "seed_seconds": seed_seconds,
        }

    cases["time_ratio"] = cases["loaded"]["median_ms"] / cases["empty"]["median_ms"]
    return {"store": kind, **cases}


def acquisition_rounds(queued: int) -> int:
    """Return how many rounds of 100 the queue allows after the first job (max. 5)."""
    return max(1, min(5, (queued - 1) // ACQUIRE_LIMIT))
