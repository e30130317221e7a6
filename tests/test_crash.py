"""A scheduler killed with SIGKILL while holding leases (guarantees 3 and 4)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from datetime import timedelta

import anyio
import pytest
from apscheduler import ConflictPolicy, JobOutcome

from apscheduler_mongo import MongoDBDataStore

from .support.items import add_task, due_schedule, processed, scheduled_job
from .support.tiers import MULTI_PROCESS
from .support.workers import doomed_worker

pytestmark = [pytest.mark.anyio, *MULTI_PROCESS]


class TestKilledScheduler:
    """Another scheduler takes over; no fire time gets a second job; counts heal."""

    async def test_takeover_after_sigkill(
        self, store: MongoDBDataStore, wire_uri: str, database_name: str
    ) -> None:
        await add_task(store, max_running_jobs=1)
        schedule = due_schedule()
        fire_time = schedule.next_fire_time
        assert fire_time is not None
        await store.add_schedule(schedule, ConflictPolicy.exception)

        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        process = context.Process(
            target=doomed_worker, args=(wire_uri, database_name, ready)
        )
        process.start()
        try:
            assert await anyio.to_thread.run_sync(ready.wait, 60)
            assert (await store.get_task("task")).running_jobs == 1
        finally:
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            process.join(10)

        assert process.exitcode == -signal.SIGKILL
        await anyio.sleep(1.2)  # the dead scheduler's leases lapse

        # Another scheduler takes the schedule over and reprocesses the same
        # fire time: no second job appears
        [taken] = await store.acquire_schedules("survivor", timedelta(minutes=1), 10)
        assert taken.next_fire_time == fire_time
        await store.add_job(scheduled_job("s", fire_time))
        [held] = await store.get_jobs()
        assert held.acquired_by == "doomed"

        # Cleanup reports the dead scheduler's job abandoned; the count heals
        await store.cleanup()
        assert await store.get_jobs() == []
        result = await store.get_job_result(held.id)
        assert result is not None
        assert result.outcome is JobOutcome.abandoned
        assert (await store.get_task("task")).running_jobs == 0

        # Still no second job for that fire time
        await store.add_job(scheduled_job("s", fire_time))
        assert await store.get_jobs() == []
        next_fire_time = fire_time + timedelta(minutes=1)
        await store.release_schedules("survivor", [processed(taken, next_fire_time)])
        # Nothing is queued until the next fire time is processed
        assert await store.acquire_jobs("survivor", timedelta(minutes=1), 10) == []
