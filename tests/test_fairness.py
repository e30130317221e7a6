"""A task at its limit keeps no free places from other tasks' jobs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from apscheduler import Job, JobOutcome, JobResult

from apscheduler_mongo import MongoDBDataStore

from .support.items import add_task

pytestmark = pytest.mark.anyio

LEASE = timedelta(minutes=5)


async def add_jobs(store: MongoDBDataStore, task_id: str, count: int) -> list[Job]:
    jobs = [Job(task_id=task_id, executor="async") for _ in range(count)]
    for job in jobs:
        await store.add_job(job)

    return jobs


class TestHeadOfLine:
    """Jobs of a capped task waiting at the head of the queue are passed over once
    it runs all it may; the places go to the next jobs, in queue order."""

    async def test_other_tasks_fill_the_places(self, store: MongoDBDataStore) -> None:
        await add_task(store, max_running_jobs=1, task_id="capped")
        await add_task(store, task_id="free")
        capped = await add_jobs(store, "capped", 100)
        free = await add_jobs(store, "free", 20)

        acquired = await store.acquire_jobs("me", LEASE, 10)

        assert [job.id for job in acquired] == [capped[0].id] + [j.id for j in free[:9]]
        tasks = {task.id: task.running_jobs for task in await store.get_tasks()}
        assert tasks == {"capped": 1, "free": 9}

    async def test_limit_still_holds_across_claims(
        self, store: MongoDBDataStore
    ) -> None:
        await add_task(store, max_running_jobs=2, task_id="capped")
        await add_task(store, task_id="free")
        await add_jobs(store, "capped", 30)
        await add_jobs(store, "free", 5)

        first = await store.acquire_jobs("one", LEASE, 4)
        second = await store.acquire_jobs("two", LEASE, 4)
        third = await store.acquire_jobs("three", LEASE, 4)

        held = [job.task_id for job in first + second + third]
        assert held.count("capped") == 2  # never more than its limit
        assert held.count("free") == 5
        # A slot freed is taken by the capped task's next job
        [done] = [job for job in first if job.task_id == "capped"][:1]
        await store.release_job(
            "one", done, JobResult.from_job(done, JobOutcome.success)
        )
        [again] = await store.acquire_jobs("four", LEASE, 4)
        assert again.task_id == "capped"
