"""A blocking, thread-safe face of the data store for threaded applications."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, AsyncExitStack
from datetime import datetime, timedelta
from logging import Logger
from types import TracebackType
from typing import Any, TypeVar
from uuid import UUID

import anyio
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal
from apscheduler import ConflictPolicy, Job, JobResult, Schedule, Task
from apscheduler._structures import ScheduleResult
from apscheduler.abc import EventBroker
from apscheduler.eventbrokers.local import LocalEventBroker

from ._datastore import MongoDBDataStore

T = TypeVar("T")


class StoreNotRunningError(RuntimeError):
    """Raised when the synchronous store is used before start() or after stop()."""


class SyncMongoDBDataStore:
    """
    Use :class:`MongoDBDataStore` from threads, with blocking calls.

    The asynchronous store runs in an event loop on one background thread that this
    object owns (an AnyIO blocking portal). Every :class:`~apscheduler.abc.DataStore`
    method has a blocking twin with the same name, arguments, return value and
    exceptions, and any number of threads may call them at once.

    :param client_or_uri: a MongoDB URI (recommended: the client is then created in
        the background loop), a :class:`MongoDBDataStore` to wrap (not started), or a
        client for :class:`MongoDBDataStore` that no other event loop has used
    :param event_broker: the event broker the store publishes to (started and
        stopped with the store); by default a local one, private to this object
    :param logger: the logger the store logs to (default: ``apscheduler_mongo``)
    :param options: keyword arguments for :class:`MongoDBDataStore`

    .. note:: Use it as a context manager, or call :meth:`start` and :meth:`stop`.
        :meth:`stop` waits for calls in progress; calls made before :meth:`start` or
        after :meth:`stop` raise :exc:`StoreNotRunningError` at once.
    """

    def __init__(
        self,
        client_or_uri: object,
        *,
        event_broker: EventBroker | None = None,
        logger: Logger | None = None,
        **options: Any,
    ) -> None:
        if isinstance(client_or_uri, MongoDBDataStore):
            if options:
                raise TypeError(
                    "options cannot be given with an existing MongoDBDataStore: "
                    + ", ".join(sorted(options))
                )

            self.store = client_or_uri
        else:
            self.store = MongoDBDataStore(client_or_uri, **options)

        self.event_broker = event_broker or LocalEventBroker()
        self._logger = logger or logging.getLogger("apscheduler_mongo")
        self._lock = threading.Condition()
        self._portal: BlockingPortal | None = None
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._runner: Future[None] | None = None
        self._stop_event: anyio.Event | None = None
        self._in_flight = 0
        self._stopping = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.store!r})"

    # Life cycle

    def start(self) -> None:
        """
        Start the background event loop and the store in it.

        :raises RuntimeError: if it is already started
        """
        with self._lock:
            if self._portal is not None or self._stopping:
                raise RuntimeError(f"{type(self).__name__} is already started")

            portal_cm = start_blocking_portal("asyncio")
            portal = portal_cm.__enter__()
            try:
                self._runner, self._stop_event = portal.start_task(self._run)
            except BaseException as exc:
                portal_cm.__exit__(type(exc), exc, exc.__traceback__)
                raise

            self._portal_cm, self._portal = portal_cm, portal

    async def _run(self, *, task_status: TaskStatus[anyio.Event]) -> None:
        """Own the store (and broker) in the background loop until told to stop."""
        async with AsyncExitStack() as exit_stack:
            await self.event_broker.start(exit_stack, self._logger)
            await self.store.start(exit_stack, self.event_broker, self._logger)
            stop_event = anyio.Event()
            task_status.started(stop_event)
            await stop_event.wait()

    def stop(self) -> None:
        """Refuse new calls, wait for the calls in progress, then stop everything."""
        with self._lock:
            if self._portal is None or self._stopping:
                return

            self._stopping = True
            while self._in_flight:
                self._lock.wait()

            portal, portal_cm = self._portal, self._portal_cm
            runner, stop_event = self._runner, self._stop_event

        try:
            assert runner is not None and stop_event is not None
            portal.call(stop_event.set)
            runner.result()  # the store and broker have stopped
        finally:
            assert portal_cm is not None
            portal_cm.__exit__(None, None, None)
            with self._lock:
                self._portal = self._portal_cm = None
                self._runner = self._stop_event = None
                self._stopping = False

    def __enter__(self) -> SyncMongoDBDataStore:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, func: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        with self._lock:
            if self._portal is None or self._stopping:
                raise StoreNotRunningError(
                    f"{type(self).__name__} is not running: call start() first, or "
                    f"use it as a context manager"
                )

            portal = self._portal
            self._in_flight += 1

        try:
            result: T = portal.call(func, *args)
            return result
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()

    # The data store's methods, blocking

    def add_task(self, task: Task) -> None:
        """Add or replace a task (see :meth:`MongoDBDataStore.add_task`)."""
        self._call(self.store.add_task, task)

    def remove_task(self, task_id: str) -> None:
        """Remove a task; raise :exc:`~apscheduler.TaskLookupError` if unknown."""
        self._call(self.store.remove_task, task_id)

    def get_task(self, task_id: str) -> Task:
        """Return a task; raise :exc:`~apscheduler.TaskLookupError` if unknown."""
        return self._call(self.store.get_task, task_id)

    def get_tasks(self) -> list[Task]:
        """Return all tasks, sorted by id."""
        return self._call(self.store.get_tasks)

    def get_schedules(self, ids: set[str] | None = None) -> list[Schedule]:
        """Return the schedules with the given ids, or all of them."""
        return self._call(self.store.get_schedules, ids)

    def add_schedule(self, schedule: Schedule, conflict_policy: ConflictPolicy) -> None:
        """Add a schedule, or handle an existing one as ``conflict_policy`` says."""
        self._call(self.store.add_schedule, schedule, conflict_policy)

    def remove_schedules(self, ids: Iterable[str]) -> None:
        """Remove the schedules with the given ids."""
        self._call(self.store.remove_schedules, list(ids))

    def acquire_schedules(
        self, scheduler_id: str, lease_duration: timedelta, limit: int
    ) -> list[Schedule]:
        """Claim up to ``limit`` due schedules."""
        return self._call(
            self.store.acquire_schedules, scheduler_id, lease_duration, limit
        )

    def release_schedules(
        self, scheduler_id: str, results: Sequence[ScheduleResult]
    ) -> None:
        """Release claimed schedules with their new fire times."""
        self._call(self.store.release_schedules, scheduler_id, results)

    def get_next_schedule_run_time(self) -> datetime | None:
        """Return when the next schedule can be processed, if any."""
        return self._call(self.store.get_next_schedule_run_time)

    def add_job(self, job: Job) -> None:
        """Queue a job."""
        self._call(self.store.add_job, job)

    def get_jobs(self, ids: Iterable[UUID] | None = None) -> list[Job]:
        """Return the queued and running jobs (with the given ids), in queue order."""
        return self._call(self.store.get_jobs, None if ids is None else list(ids))

    def acquire_jobs(
        self, scheduler_id: str, lease_duration: timedelta, limit: int | None = None
    ) -> list[Job]:
        """Claim up to ``limit`` jobs."""
        return self._call(self.store.acquire_jobs, scheduler_id, lease_duration, limit)

    def release_job(self, scheduler_id: str, job: Job, result: JobResult) -> None:
        """Release a claimed job with its result."""
        self._call(self.store.release_job, scheduler_id, job, result)

    def get_job_result(self, job_id: UUID) -> JobResult | None:
        """Return a job's result once, or ``None``."""
        return self._call(self.store.get_job_result, job_id)

    def extend_acquired_schedule_leases(
        self, scheduler_id: str, schedule_ids: set[str], duration: timedelta
    ) -> None:
        """Extend the leases of schedules the scheduler holds."""
        self._call(
            self.store.extend_acquired_schedule_leases,
            scheduler_id,
            schedule_ids,
            duration,
        )

    def extend_acquired_job_leases(
        self, scheduler_id: str, job_ids: set[UUID], duration: timedelta
    ) -> None:
        """Extend the leases of jobs the scheduler holds."""
        self._call(
            self.store.extend_acquired_job_leases, scheduler_id, job_ids, duration
        )

    def reap_abandoned_jobs(self, scheduler_id: str) -> None:
        """Finish the jobs the scheduler held before it restarted, as abandoned."""
        self._call(self.store.reap_abandoned_jobs, scheduler_id)

    def cleanup(self) -> None:
        """Purge expired results, lapsed jobs and finished schedules."""
        self._call(self.store.cleanup)
