"""
A job claim reads about what it hands out (counted, not timed).

Each workload claims and releases as a scheduler does: it claims up to the places
it has free (``MAX_JOBS`` less the jobs it runs), claims again at once (the
scheduler's loop does, while jobs run), and releases its oldest job; until every
job ran. The replies' documents are counted by command monitoring, and the jobs the
store decodes by wrapping the function that decodes them.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import attrs
import pytest
from apscheduler import Job, JobOutcome, JobResult
from apscheduler.abc import EventBroker
from pymongo import AsyncMongoClient

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._marshalling import job_from_document

from .support.commands import CommandLog
from .support.items import add_task

pytestmark = [pytest.mark.anyio, pytest.mark.wire]

LEASE = timedelta(minutes=5)
#: The places of the scheduler (APScheduler's default ``max_concurrent_jobs``)
MAX_JOBS = 100
#: The documents the server may return per job handed out (the issue's target)
BUDGET = 3


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count the job documents the claims decode into ``Job`` objects."""
    counts: Counter[str] = Counter()

    def counted(*args: Any, **kwargs: Any) -> Job:
        counts["jobs"] += 1
        return job_from_document(*args, **kwargs)

    monkeypatch.setattr("apscheduler_mongo._planner.job_from_document", counted)
    return counts


@attrs.define
class Drained:
    jobs: int = 0
    claims: int = 0
    documents: int = 0
    #: The most jobs of each task that ran at once
    most_running: Counter[str] = attrs.field(factory=Counter)

    def per_job(self) -> float:
        return self.documents / self.jobs


async def drain(store: MongoDBDataStore, log: CommandLog, queued: list[Job]) -> Drained:
    """Claim and release as a scheduler does, until every queued job ran once."""
    drained = Drained()
    running: list[Job] = []
    seen: set[Any] = set()
    start = len(log.replies)
    while drained.jobs < len(queued):
        for _ in range(2):  # a claim, and another at once while the jobs run
            if places := MAX_JOBS - len(running):
                acquired = await store.acquire_jobs("me", LEASE, places)
                drained.claims += 1
                running += acquired
                drained.jobs += len(acquired)
                seen.update(job.id for job in acquired)
                for task_id, count in Counter(j.task_id for j in running).items():
                    most = max(drained.most_running[task_id], count)
                    drained.most_running[task_id] = most

        assert running, f"nothing handed out after {drained.jobs} jobs"
        job = running.pop(0)
        await store.release_job("me", job, JobResult.from_job(job, JobOutcome.success))

    assert seen == {job.id for job in queued}  # each once, none lost
    drained.documents = log.returned(start)
    return drained


async def queue(
    store: MongoDBDataStore, caps: dict[str, int | None], length: int
) -> list[Job]:
    """
    Add the tasks (``caps`` maps task id to ``max_running_jobs``) and queue
    ``length`` jobs of each, interleaved.
    """
    for task_id, cap in caps.items():
        await add_task(store, cap, task_id)

    return await queue_jobs(store, dict.fromkeys(caps, length))


async def queue_jobs(store: MongoDBDataStore, tasks: dict[str, int]) -> list[Job]:
    """Queue jobs of several tasks, interleaved: ``tasks`` maps task id to count."""
    jobs: list[Job] = []
    left = dict(tasks)
    while any(left.values()):
        for task_id in tasks:
            if left[task_id]:
                left[task_id] -= 1
                job = Job(task_id=task_id, executor="async")
                await store.add_job(job)
                jobs.append(job)

    return jobs


def check(drained: Drained, decoded: Counter[str], caps: dict[str, Any]) -> None:
    figures = (
        f"{drained.documents} documents returned for {drained.jobs} jobs in "
        f"{drained.claims} claims ({drained.per_job():.2f} per job); "
        f"{decoded['jobs']} jobs decoded"
    )
    assert drained.per_job() <= BUDGET, figures
    # Nothing is decoded that is not handed out
    assert decoded["jobs"] == drained.jobs, figures
    for task_id, cap in caps.items():
        if cap is not None:
            assert drained.most_running[task_id] == cap, figures  # its limit held


class TestDocumentsPerJob:
    @pytest.mark.parametrize("length", [20, 200], ids=["short", "long"])
    async def test_capped_at_one(
        self,
        counted_store: MongoDBDataStore,
        command_log: CommandLog,
        decoded: Counter[str],
        length: int,
    ) -> None:
        """APScheduler's default limit, with a short and a long queue."""
        jobs = await queue(counted_store, {"t": 1}, length)

        drained = await drain(counted_store, command_log, jobs)

        check(drained, decoded, {"t": 1})

    async def test_several_capped_tasks(
        self,
        counted_store: MongoDBDataStore,
        command_log: CommandLog,
        decoded: Counter[str],
    ) -> None:
        caps: dict[str, int | None] = {"a": 1, "b": 1, "c": 1, "d": 3, "e": 2}
        jobs = await queue(counted_store, caps, 40)

        drained = await drain(counted_store, command_log, jobs)

        check(drained, decoded, caps)

    @pytest.mark.parametrize("length", [50, 250], ids=["short", "long"])
    async def test_uncapped(
        self,
        counted_store: MongoDBDataStore,
        command_log: CommandLog,
        decoded: Counter[str],
        length: int,
    ) -> None:
        jobs = await queue(counted_store, {"u": None}, length)

        drained = await drain(counted_store, command_log, jobs)

        check(drained, decoded, {"u": None})

    async def test_capped_and_uncapped(
        self,
        counted_store: MongoDBDataStore,
        command_log: CommandLog,
        decoded: Counter[str],
    ) -> None:
        caps = {"capped": 1, "free": None}
        jobs = await queue(counted_store, caps, 100)

        drained = await drain(counted_store, command_log, jobs)

        check(drained, decoded, caps)

    async def test_tasks_added_elsewhere(
        self,
        counted_store: MongoDBDataStore,
        command_log: CommandLog,
        decoded: Counter[str],
        logged_client: AsyncMongoClient[Any],
        database_name: str,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        """The store learns the limits of tasks that another scheduler added."""
        async with AsyncExitStack() as exit_stack:
            other = MongoDBDataStore(logged_client, database=database_name)
            await other.start(exit_stack, local_broker, logger)
            await add_task(other, 1, "t")
            await add_task(other, None, "u")
            jobs = await queue_jobs(other, {"t": 150, "u": 50})

        drained = await drain(counted_store, command_log, jobs)

        check(drained, decoded, {"t": 1, "u": None})
