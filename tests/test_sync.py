"""The synchronous wrapper: blocking twins, threads, and its life cycle."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from apscheduler import (
    ConflictingIdError,
    ConflictPolicy,
    Job,
    JobOutcome,
    JobResult,
    Schedule,
    Scheduler,
    Task,
    TaskLookupError,
)
from apscheduler.triggers.interval import IntervalTrigger

from apscheduler_mongo import (
    MongoDBDataStore,
    StoreNotRunningError,
    SyncMongoDBDataStore,
)

from .support.items import processed

LEASE = timedelta(minutes=1)
SYNC_TIERS = [
    pytest.param("mongomock", id="mongomock"),
    pytest.param("wire", id="wire", marks=pytest.mark.wire),
]


@pytest.fixture(params=SYNC_TIERS)
def target(request: pytest.FixtureRequest) -> Any:
    """What to build a synchronous store from: a mongomock client or a wire URI."""
    if request.param == "mongomock":
        from mongomock_motor import AsyncMongoMockClient

        return AsyncMongoMockClient()

    return request.getfixturevalue("wire_uri")


@pytest.fixture
def database() -> str:
    return f"apscheduler_mongo_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def sync_store(target: Any, database: str) -> Iterator[SyncMongoDBDataStore]:
    with SyncMongoDBDataStore(
        target, database=database, start_from_scratch=True
    ) as store:
        yield store


def task(task_id: str = "task", cap: int | None = None) -> Task:
    return Task(
        id=task_id, func="builtins:len", job_executor="async", max_running_jobs=cap
    )


class TestBlockingTwins:
    """Every DataStore method works through the wrapper and returns the same."""

    def test_tasks(self, sync_store: SyncMongoDBDataStore) -> None:
        sync_store.add_task(task("b"))
        sync_store.add_task(task("a"))
        assert [t.id for t in sync_store.get_tasks()] == ["a", "b"]
        assert sync_store.get_task("a").id == "a"
        sync_store.remove_task("a")
        with pytest.raises(TaskLookupError):
            sync_store.get_task("a")

        with pytest.raises(TaskLookupError):
            sync_store.remove_task("a")

    def test_schedules(self, sync_store: SyncMongoDBDataStore) -> None:
        sync_store.add_task(task())
        start = datetime.now(timezone.utc) - timedelta(seconds=1)
        trigger = IntervalTrigger(minutes=1, start_time=start)
        schedule = Schedule(
            id="s", task_id="task", trigger=trigger, job_executor="async"
        )
        schedule.next_fire_time = trigger.next()
        sync_store.add_schedule(schedule, ConflictPolicy.exception)
        with pytest.raises(ConflictingIdError):
            sync_store.add_schedule(schedule, ConflictPolicy.exception)

        assert sync_store.get_next_schedule_run_time() == schedule.next_fire_time
        [acquired] = sync_store.acquire_schedules("me", LEASE, 10)
        sync_store.extend_acquired_schedule_leases("me", {"s"}, LEASE)
        assert acquired.next_fire_time is not None
        later = acquired.next_fire_time + timedelta(minutes=1)
        sync_store.release_schedules("me", [processed(acquired, later)])
        [stored] = sync_store.get_schedules({"s"})
        assert stored.next_fire_time == later
        sync_store.remove_schedules(["s"])
        assert sync_store.get_schedules() == []

    def test_jobs(self, sync_store: SyncMongoDBDataStore) -> None:
        sync_store.add_task(task())
        job = Job(task_id="task", executor="async", result_expiration_time=60)
        sync_store.add_job(job)
        assert [j.id for j in sync_store.get_jobs([job.id])] == [job.id]
        [acquired] = sync_store.acquire_jobs("me", LEASE)
        sync_store.extend_acquired_job_leases("me", {job.id}, LEASE)
        sync_store.release_job(
            "me",
            acquired,
            JobResult.from_job(acquired, JobOutcome.success, return_value=3),
        )
        result = sync_store.get_job_result(job.id)
        assert result is not None
        assert result.return_value == 3
        assert sync_store.get_job_result(job.id) is None

        other = Job(task_id="task", executor="async", result_expiration_time=60)
        sync_store.add_job(other)
        sync_store.acquire_jobs("me", LEASE)
        sync_store.reap_abandoned_jobs("me")
        abandoned = sync_store.get_job_result(other.id)
        assert abandoned is not None
        assert abandoned.outcome is JobOutcome.abandoned
        sync_store.cleanup()
        assert sync_store.get_task("task").running_jobs == 0


class TestThreads:
    """Many threads share one wrapper: every job is owned once, nothing hangs."""

    @pytest.mark.parametrize("cap", [None, 4])
    def test_sixteen_threads(
        self, sync_store: SyncMongoDBDataStore, cap: int | None
    ) -> None:
        sync_store.add_task(task(cap=cap))
        acquired: list[uuid.UUID] = []
        errors: list[BaseException] = []
        added: list[uuid.UUID] = []
        lock = threading.Lock()

        def worker(name: str) -> None:
            try:
                for _ in range(10):
                    job = Job(
                        task_id="task", executor="async", result_expiration_time=60
                    )
                    sync_store.add_job(job)
                    with lock:
                        added.append(job.id)

                idle = 0
                while idle < 3:
                    jobs = sync_store.acquire_jobs(name, LEASE, 5)
                    idle = 0 if jobs else idle + 1
                    for job in jobs:
                        with lock:
                            acquired.append(job.id)

                        result = JobResult.from_job(
                            job, JobOutcome.success, return_value=name
                        )
                        sync_store.release_job(name, job, result)
                    if not jobs:
                        time.sleep(0.02)
            except BaseException as exc:  # reported by the test below
                errors.append(exc)

        threads = [
            threading.Thread(target=worker, args=(f"thread{n}",)) for n in range(16)
        ]
        for thread in threads:
            thread.start()

        for thread in threads:
            thread.join(120)
            assert not thread.is_alive(), "deadlock: a thread did not finish"

        assert errors == []
        assert len(acquired) == len(set(acquired)) == 160
        assert set(acquired) == set(added)
        for job_id in added:
            result = sync_store.get_job_result(job_id)
            assert result is not None
            assert result.return_value.startswith("thread")

        assert sync_store.get_task("task").running_jobs == 0


class TestLifecycle:
    """Starting, stopping and calling at the wrong time."""

    def test_double_start(self, target: Any, database: str) -> None:
        with SyncMongoDBDataStore(target, database=database) as store:
            with pytest.raises(RuntimeError, match="already started"):
                store.start()

    def test_call_before_start_and_after_stop(self, target: Any, database: str) -> None:
        store = SyncMongoDBDataStore(target, database=database)
        with pytest.raises(StoreNotRunningError):
            store.get_tasks()

        store.start()
        assert store.get_tasks() == []
        store.stop()
        store.stop()  # stopping twice is harmless
        with pytest.raises(StoreNotRunningError, match="not running"):
            store.get_tasks()

    def test_stop_waits_for_calls_in_progress(self, target: Any, database: str) -> None:
        store = SyncMongoDBDataStore(target, database=database)
        store.start()
        store.add_task(task())
        real_get_task = store.store.get_task
        entered = threading.Event()

        async def slow_get_task(task_id: str) -> Task:
            entered.set()
            await anyio.sleep(0.5)
            return await real_get_task(task_id)

        store.store.get_task = slow_get_task  # type: ignore[method-assign]
        outcome: list[Any] = []
        caller = threading.Thread(target=lambda: outcome.append(store.get_task("task")))
        caller.start()
        assert entered.wait(5)
        started = time.monotonic()
        store.stop()
        assert time.monotonic() - started >= 0.3  # it waited for the call
        caller.join(5)
        assert [t.id for t in outcome] == ["task"]

    def test_wraps_an_existing_store(self, target: Any, database: str) -> None:
        inner = MongoDBDataStore(target, database=database)
        with SyncMongoDBDataStore(inner) as store:
            assert store.store is inner
            store.add_task(task())
            assert [t.id for t in store.get_tasks()] == ["task"]

        with pytest.raises(TypeError, match="options"):
            SyncMongoDBDataStore(inner, database="other")


def tick() -> None:
    """Task of the threaded-app test."""


@pytest.mark.wire
class TestBesideScheduler:
    """The wrapper works next to APScheduler's own Scheduler in one process."""

    def test_list_and_pause(self, wire_uri: str, database: str) -> None:
        scheduler_store = MongoDBDataStore(wire_uri, database=database)
        with Scheduler(data_store=scheduler_store) as scheduler:
            scheduler.add_schedule(tick, IntervalTrigger(seconds=1), id="tick")
            scheduler.start_in_background()
            with SyncMongoDBDataStore(wire_uri, database=database) as admin:
                [schedule] = admin.get_schedules()
                assert schedule.id == "tick"
                schedule.paused = True
                admin.add_schedule(schedule, ConflictPolicy.replace)
                assert scheduler.get_schedule("tick").paused
