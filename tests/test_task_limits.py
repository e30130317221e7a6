"""
What a store believes of its tasks' limits costs at most a read, never a job.

A claim reads no more of a capped task than the free slots the store believes it
has (``_job_claims.TaskLimits``). A belief too high costs a read; one too low would
keep a job queued while a slot is free, so each way a slot frees must reach it: this
store's release, another scheduler's (announced on the broker), a release that lands
while a claim reads, and, for what no event told, the periodic read of every limit.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import anyio
import pytest
from apscheduler import Job, JobOutcome, JobReleased, JobResult
from apscheduler.eventbrokers.local import LocalEventBroker

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo import _job_claims as job_claims
from apscheduler_mongo._leases import Leases

from .support.items import add_task

pytestmark = pytest.mark.anyio

LEASE = timedelta(minutes=5)


def success(job: Job) -> JobResult:
    return JobResult.from_job(job, JobOutcome.success)


async def queue(store: MongoDBDataStore, count: int, task_id: str = "t") -> list[Job]:
    jobs = [Job(task_id=task_id, executor="async") for _ in range(count)]
    for job in jobs:
        await store.add_job(job)

    return jobs


class TestFreedSlots:
    async def test_by_this_store(self, store: MongoDBDataStore) -> None:
        await add_task(store, 1, "t")
        first, second = await queue(store, 2)
        assert [job.id for job in await store.acquire_jobs("me", LEASE, 10)] == [
            first.id
        ]
        assert await store.acquire_jobs("me", LEASE, 10) == []  # at its cap

        await store.release_job("me", first, success(first))

        acquired = await store.acquire_jobs("me", LEASE, 10)
        assert [job.id for job in acquired] == [second.id]

    async def test_by_another_scheduler(
        self, store: MongoDBDataStore, other_store: MongoDBDataStore
    ) -> None:
        """The other scheduler's release is announced on the broker they share."""
        await add_task(store, 1, "t")
        _, second = await queue(store, 2)
        [held] = await other_store.acquire_jobs("other", LEASE, 10)
        assert await store.acquire_jobs("me", LEASE, 10) == []  # learns: at its cap
        # Delivered after the store's own subscription (the scheduler's too)
        heard = anyio.Event()
        store._event_broker.subscribe(lambda _: heard.set(), {JobReleased})

        await other_store.release_job("other", held, success(held))
        await heard.wait()

        acquired = await store.acquire_jobs("me", LEASE, 10)
        assert [job.id for job in acquired] == [second.id]

    async def test_unannounced(
        self,
        store: MongoDBDataStore,
        client: Any,
        logger: logging.Logger,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """
        A release nobody announced to this store is learned by the next claim that
        reads every limit (at most ``LIMITS_REFRESH`` seconds after the last).
        """
        await add_task(store, 1, "t")
        _, second = await queue(store, 2)
        async with AsyncExitStack() as exit_stack:
            # Another scheduler, whose events this store does not hear
            broker = LocalEventBroker()
            await broker.start(exit_stack, logger)
            other = MongoDBDataStore(client, database=store.database)
            await other.start(exit_stack, broker, logger)
            [held] = await other.acquire_jobs("other", LEASE, 10)
            assert await store.acquire_jobs("me", LEASE, 10) == []
            await other.release_job("other", held, success(held))

        # Still believed at its cap, until the limits are read again
        assert await store.acquire_jobs("me", LEASE, 10) == []
        monkeypatch.setattr(job_claims, "LIMITS_REFRESH", 0.0)
        acquired = await store.acquire_jobs("me", LEASE, 10)
        assert [job.id for job in acquired] == [second.id]

    async def test_released_while_a_claim_runs(
        self, store: MongoDBDataStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        A claim reads the job as running; the job's release lands after that read,
        before the claim ends. The claim must not conclude that the task is still
        at its cap.
        """
        await add_task(store, 1, "t")
        _, second = await queue(store, 2)
        [held] = await store.acquire_jobs("me", LEASE, 10)
        claim = Leases.claim

        async def claim_then_release(*args: Any) -> Any:
            taken = await claim(*args)
            await store.release_job("me", held, success(held))
            return taken

        monkeypatch.setattr(Leases, "claim", claim_then_release)
        await store.cleanup()  # the store forgets the free slots: the claim reads
        assert await store.acquire_jobs("me", LEASE, 10) == []  # read it running
        monkeypatch.setattr(Leases, "claim", claim)

        acquired = await store.acquire_jobs("me", LEASE, 10)
        assert [job.id for job in acquired] == [second.id]

    async def test_limit_raised_elsewhere(
        self, store: MongoDBDataStore, other_store: MongoDBDataStore
    ) -> None:
        """Another scheduler raises the limit: the claim reads past the old one."""
        await add_task(store, 1, "t")
        jobs = await queue(store, 3)
        assert len(await store.acquire_jobs("me", LEASE, 10)) == 1
        await add_task(other_store, 3, "t")

        # This store learns the new limit from the task document its claim reads
        # when a slot frees, or from the periodic read of every limit
        await store.cleanup()  # forgets the free slots (as a lapsed lease would)
        acquired = await store.acquire_jobs("me", LEASE, 10)
        assert [job.id for job in acquired] == [job.id for job in jobs[1:]]
