"""Several processes, one database: every item has exactly one owner."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from apscheduler import ConflictPolicy, Job, Schedule, Task
from apscheduler.triggers.date import DateTrigger

from apscheduler_mongo import MongoDBDataStore

from .support.tiers import MULTI_PROCESS
from .support.workers import drain_worker, hold_worker

pytestmark = [pytest.mark.anyio, *MULTI_PROCESS]

WORKERS = 4


def run_workers(target: Callable[..., None], *args: Any) -> list[dict[str, Any]]:
    """Run ``target`` in WORKERS spawned processes; return what each reported."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS)
    results = context.Queue()
    processes = [
        context.Process(
            target=target, args=(*args[:2], f"worker{n}", barrier, *args[2:], results)
        )
        for n in range(WORKERS)
    ]
    for process in processes:
        process.start()

    reports = [results.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0

    return reports


class TestDrain:
    """Workers racing for the same jobs and schedules each own distinct ones."""

    async def test_jobs_and_schedules_owned_once(
        self, store: MongoDBDataStore, wire_uri: str, database_name: str
    ) -> None:
        await store.add_task(Task(id="work", func="builtins:len", job_executor="async"))
        job_ids = set()
        for _ in range(2000):
            job = Job(task_id="work", executor="async", result_expiration_time=3600)
            await store.add_job(job)
            job_ids.add(str(job.id))

        past = datetime.now(timezone.utc) - timedelta(minutes=1)
        schedule_ids = {f"s{n}" for n in range(200)}
        for schedule_id in schedule_ids:
            trigger = DateTrigger(past)
            schedule = Schedule(
                id=schedule_id, task_id="work", trigger=trigger, job_executor="async"
            )
            schedule.next_fire_time = trigger.next()
            await store.add_schedule(schedule, ConflictPolicy.exception)

        reports = run_workers(drain_worker, wire_uri, database_name)

        owned_jobs = [job_id for report in reports for job_id in report["jobs"]]
        assert len(owned_jobs) == len(set(owned_jobs)), "a job had two owners"
        assert set(owned_jobs) == job_ids, "a job was lost"
        owned_schedules = [sid for report in reports for sid in report["schedules"]]
        assert len(owned_schedules) == len(set(owned_schedules))
        assert set(owned_schedules) == schedule_ids
        # The race was real: the work was spread over several processes
        assert sum(1 for report in reports if report["jobs"]) >= 2

        # Each result was written by the worker that owned the job
        owner = {job_id: r["worker"] for r in reports for job_id in r["jobs"]}
        for job_id in job_ids:
            result = await store.get_job_result(_uuid(job_id))
            assert result is not None
            assert result.return_value == owner[job_id]

        assert (await store.get_task("work")).running_jobs == 0
        assert await store.get_jobs() == []


class TestConcurrencyCap:
    """A task's max_running_jobs holds across processes claiming at once."""

    async def test_cap_never_exceeded(
        self, store: MongoDBDataStore, wire_uri: str, database_name: str
    ) -> None:
        cap, rounds = 3, 5
        await store.add_task(
            Task(
                id="capped",
                func="builtins:len",
                job_executor="async",
                max_running_jobs=cap,
            )
        )
        for _ in range(cap * rounds + 5):
            await store.add_job(Job(task_id="capped", executor="async"))

        reports = run_workers(hold_worker, wire_uri, database_name, rounds)

        for round_number in range(rounds):
            held = sum(report["held"][round_number] for report in reports)
            assert held == cap, f"round {round_number}: {held} jobs held at once"

        assert (await store.get_task("capped")).running_jobs == 0


def _uuid(value: str) -> Any:
    from uuid import UUID

    return UUID(value)
