"""A scheduler stopped with SIGSTOP past its leases writes nothing (guarantee 2)."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
from datetime import timedelta
from typing import Any

import anyio
import pytest
from apscheduler import ConflictPolicy, JobOutcome, JobResult

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._marshalling import uuid_to_bson

from .support.items import add_task, due_schedule, processed, scheduled_job
from .support.stall_workers import (
    STALE_LEASE,
    STALE_OWNER,
    WAIT_SECONDS,
    stalled_worker,
)
from .support.tiers import MULTI_PROCESS

pytestmark = [pytest.mark.anyio, *MULTI_PROCESS]

NEW_OWNER = "new-owner"
LONG_LEASE = timedelta(minutes=5)


def process_state(pid: int) -> str:
    """Return the state letter of a Linux process ("T" when stopped)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


async def wait_until_stopped(pid: int) -> None:
    for _ in range(500):  # 5 s at most
        if process_state(pid) == "T":
            return

        await anyio.sleep(0.01)

    pytest.fail(f"process {pid} did not stop")


async def next_report(results: Any) -> dict[str, Any]:
    try:
        report: dict[str, Any] = await anyio.to_thread.run_sync(
            results.get, True, WAIT_SECONDS
        )
    except queue.Empty:
        pytest.fail("the worker reported nothing")

    assert "error" not in report, report["error"]
    return report


class TestStalledOwner:
    """
    A scheduler frozen past its leases cannot touch what a new owner took over.

    The stale owner's extensions, releases and job additions, made when it resumes,
    are ignored without an error (as for any scheduler that lost a lease); the new
    owner's schedule, job, running count and result stay as the new owner left them.
    """

    @pytest.mark.skipif(
        not os.path.exists("/proc/self/stat"), reason="reads process states in /proc"
    )
    @pytest.mark.parametrize(
        "max_running_jobs",
        [pytest.param(None, id="unlimited"), pytest.param(1, id="one-at-a-time")],
    )
    async def test_resumed_owner_writes_nothing(
        self,
        store: MongoDBDataStore,
        client: Any,
        wire_uri: str,
        database_name: str,
        max_running_jobs: int | None,
    ) -> None:
        await add_task(store, max_running_jobs)
        schedule = due_schedule()
        fire_time = schedule.next_fire_time
        assert fire_time is not None
        await store.add_schedule(schedule, ConflictPolicy.exception)
        job = scheduled_job("s", fire_time, result_expiration_time=timedelta(minutes=5))
        await store.add_job(job)
        schedules = client[database_name]["schedules"]
        jobs = client[database_name]["jobs"]
        job_key = {"_id": uuid_to_bson(job.id)}

        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        go, say_go = context.Pipe(duplex=False)
        results = context.Queue()
        process = context.Process(
            target=stalled_worker,
            args=(wire_uri, database_name, ready, go, results),
        )
        process.start()
        try:
            assert process.pid is not None
            taken = await next_report(results)
            assert taken == {"schedules": ["s"], "jobs": [str(job.id)]}
            assert await anyio.to_thread.run_sync(ready.wait, WAIT_SECONDS)

            # Freeze the owner, and let its leases lapse
            os.kill(process.pid, signal.SIGSTOP)
            await wait_until_stopped(process.pid)
            stale_schedule = await schedules.find_one({"_id": "s"})
            assert stale_schedule["acquired_by"] == STALE_OWNER
            assert (await jobs.find_one(job_key))["acquired_by"] == STALE_OWNER
            await anyio.sleep(STALE_LEASE.total_seconds() + 0.5)

            # A new owner takes both over, and keeps them
            [new_schedule] = await store.acquire_schedules(NEW_OWNER, LONG_LEASE, 10)
            assert new_schedule.id == "s"
            assert new_schedule.next_fire_time == fire_time
            [new_job] = await store.acquire_jobs(NEW_OWNER, LONG_LEASE, 10)
            assert new_job.id == job.id
            schedule_before = await schedules.find_one({"_id": "s"})
            job_before = await jobs.find_one(job_key)
            assert schedule_before["acquired_by"] == NEW_OWNER
            assert job_before["acquired_by"] == NEW_OWNER
            assert process_state(process.pid) == "T"  # frozen all along

            # The stale owner wakes up and carries on as the owner
            say_go.send(True)  # never blocks, unlike Event.set() (see stall_workers)
            os.kill(process.pid, signal.SIGCONT)
            report = await next_report(results)
            with anyio.fail_after(WAIT_SECONDS):
                await anyio.to_thread.run_sync(process.join, WAIT_SECONDS)

            assert process.exitcode == 0
        finally:
            if process.exitcode is None:
                assert process.pid is not None
                os.kill(process.pid, signal.SIGKILL)
                process.join(10)

            go.close()
            say_go.close()
            results.close()
            results.join_thread()

        # The schedule: still the new owner's, with the same lease and fire time
        schedule_after = await schedules.find_one({"_id": "s"})
        assert schedule_after["acquired_by"] == NEW_OWNER
        assert schedule_after["acquired_until"] == schedule_before["acquired_until"]
        assert schedule_after["v"] == schedule_before["v"]
        [current] = await store.get_schedules()
        assert current.acquired_by == NEW_OWNER
        assert current.next_fire_time == fire_time
        assert current.last_fire_time is None

        # The job: still running for the new owner, with no result
        job_after = await jobs.find_one(job_key)
        assert job_after["state"] == job_before["state"]
        assert job_after["acquired_by"] == NEW_OWNER
        assert job_after["acquired_until"] == job_before["acquired_until"]
        assert job_after["v"] == job_before["v"]
        assert "result" not in job_after
        assert await store.get_job_result(job.id) is None
        assert job_after.get("slot_key") == job_before.get("slot_key")
        [held] = await store.get_jobs()
        assert held.id == job.id
        assert held.acquired_by == NEW_OWNER
        assert (await store.get_task("task")).running_jobs == 1
        assert await jobs.count_documents({"schedule_id": "s"}) == 1

        # Each stale call returned normally: losing a lease is not an error ...
        assert report["calls"] == {
            "extend_acquired_schedule_leases": "returned None",
            "extend_acquired_job_leases": "returned None",
            "release_schedules": "returned None",
            "release_job": "returned None",
            "add_job": "returned None",
        }
        # ... but the store noticed, said so, and announced no change
        logged = "\n".join(report["logged"])
        assert f"Not releasing schedule 's': scheduler {STALE_OWNER!r}" in logged
        assert f"Discarding the result of job {job.id}" in logged
        assert "already has a job for" in logged
        assert report["events"] == []

        # The new owner finishes normally
        await store.release_job(
            NEW_OWNER,
            new_job,
            JobResult.from_job(new_job, JobOutcome.success, return_value=NEW_OWNER),
        )
        result = await store.get_job_result(job.id)
        assert result is not None
        assert result.outcome is JobOutcome.success
        assert result.return_value == NEW_OWNER
        assert (await store.get_task("task")).running_jobs == 0
        assert await store.get_jobs() == []

        next_fire_time = fire_time + timedelta(minutes=1)
        await store.release_schedules(
            NEW_OWNER, [processed(new_schedule, next_fire_time)]
        )
        [released] = await store.get_schedules()
        assert released.acquired_by is None
        assert released.acquired_until is None
        assert released.last_fire_time == fire_time
        assert released.next_fire_time == next_fire_time
