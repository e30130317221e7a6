"""
Worker processes for the multi-process event broker and scheduler tests.

Each process (multiprocessing's "spawn" context) runs :func:`reporting_worker` with
one of the coroutine functions here, which starts its own broker (or scheduler) on the
given URI; the report comes back through a queue.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import anyio
from apscheduler import (
    AsyncScheduler,
    JobAcquired,
    JobReleased,
    RetrySettings,
    RunState,
    SchedulerStopped,
    TaskAdded,
    current_job,
)
from apscheduler import Event as SchedulerEvent
from pymongo import AsyncMongoClient, errors, monitoring
from pymongo.asynchronous.collection import AsyncCollection

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker

#: The multiprocessing context of the workers, and of what they share with the test
SPAWN = multiprocessing.get_context("spawn")
#: How long a worker waits for the others at the barrier, or for the stop signal
SYNC_TIMEOUT = 60.0
#: The warning logged when a store or broker operation is retried
RETRIED_OPERATION = "Temporary MongoDB error"
#: The warning logged when the broker's polling reader failed and will poll again
RETRIED_POLL = "poll failed, retrying"


class RetryCounter(logging.Handler):
    """Count the warnings that report a retried temporary failure; keep errors."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.retried_operations = 0
        self.retried_polls = 0
        self.errors: list[str] = []
        #: The latest retried operations' warnings, with their times
        self.latest: deque[tuple[float, str]] = deque(maxlen=50)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if RETRIED_OPERATION in message:
            self.retried_operations += 1
            self.latest.append((record.created, message))
        elif RETRIED_POLL in message:
            self.retried_polls += 1
        elif record.levelno >= logging.ERROR:
            self.errors.append(message)

    def report(self) -> dict[str, Any]:
        return {
            "retried_operations": self.retried_operations,
            "retried_polls": self.retried_polls,
            "errors": self.errors,
        }


class _FailureCount:
    """A monitoring listener that counts failures, and ignores the rest."""

    def __init__(self) -> None:
        self.count = 0

    def started(self, _event: Any) -> None:
        pass

    def succeeded(self, _event: Any) -> None:
        pass


class _FailedCommands(_FailureCount, monitoring.CommandListener):
    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        error = getattr(errors, str(event.failure.get("errtype")), None)
        if isinstance(error, type) and issubclass(error, errors.ConnectionFailure):
            self.count += 1  # a network error, not an error reply from the server


class _FailedHeartbeats(_FailureCount, monitoring.ServerHeartbeatListener):
    def failed(self, _event: monitoring.ServerHeartbeatFailedEvent) -> None:
        self.count += 1


class NetworkFailures:
    """Count, through pymongo's monitoring, the network failures a process saw."""

    def __init__(self) -> None:
        self._commands = _FailedCommands()
        self._heartbeats = _FailedHeartbeats()
        # Applies to every client the process creates from now on
        monitoring.register(self._commands)
        monitoring.register(self._heartbeats)

    def report(self) -> dict[str, int]:
        return {
            "failed_commands": self._commands.count,
            "failed_heartbeats": self._heartbeats.count,
        }


class PublishTimes:
    """
    How long each publish took: the slowest ones, and the time spent in all.

    :param retries: the worker's retry counter, whose warnings a slow publish lists
    :param slow: how many seconds make a publish slow
    """

    def __init__(self, retries: RetryCounter, slow: float = 1.0) -> None:
        self.total = 0.0
        self._slow = slow
        #: (number, began, seconds, the retries' warnings meanwhile)
        self.slow: list[tuple[int, float, float, list[str]]] = []
        self._retries = retries

    @contextmanager
    def timed(self, number: int) -> Iterator[None]:
        began = time.time()
        start = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - start
            self.total += seconds
            if seconds > self._slow:
                retries = [
                    f"+{at - began:.2f} s: {message}"
                    for at, message in self._retries.latest
                    if at >= began
                ]
                self.slow.append((number, began, round(seconds, 2), retries))

    def report(self) -> dict[str, Any]:
        return {"seconds": round(self.total, 2), "slow": self.slow}


def counting_logger(name: str) -> tuple[logging.Logger, RetryCounter]:
    """Return a logger for a worker and the handler counting its retries."""
    logger = logging.getLogger(f"apscheduler_mongo.tests.{name}")
    counter = RetryCounter()
    logger.addHandler(counter)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, counter


def _polling_broker(
    uri: str, database: str, retry_settings: RetrySettings
) -> MongoDBEventBroker:
    """Return a broker that polls often: it takes no change streams for granted."""
    return MongoDBEventBroker(
        uri,
        database=database,
        mode="polling",
        poll_interval=0.05,
        retry_settings=retry_settings,
    )


def _task_id(event: SchedulerEvent) -> str:
    assert isinstance(event, TaskAdded)
    return event.task_id


async def exchange_events(
    uri: str,
    database: str,
    name: str,
    barrier: Barrier,
    published: Barrier,
    count: int,
    expected: int,
    pace: float,
    retry_settings: RetrySettings,
) -> dict[str, Any]:
    """
    Subscribe, publish ``count`` events, and listen until ``expected`` arrived.

    ``published`` is passed by every worker once it has published: each listens up to
    ``SYNC_TIMEOUT`` from then (a publisher slowed by the network may finish long
    after the others). Reports the task ids received, in order of delivery.
    """
    logger, counter = counting_logger(name)
    network = NetworkFailures()
    received: list[str] = []
    distinct: set[str] = set()
    all_received = anyio.Event()
    last_from: dict[str, tuple[str, float]] = {}

    def on_event(event: SchedulerEvent) -> None:
        task_id = _task_id(event)
        received.append(task_id)
        distinct.add(task_id)
        last_from[task_id.partition(":")[0]] = (task_id, time.time())
        if len(distinct) >= expected:
            all_received.set()

    async with AsyncExitStack() as exit_stack:
        broker = _polling_broker(uri, database, retry_settings)
        await broker.start(exit_stack, logger)
        broker.subscribe(on_event, {TaskAdded})
        # Everyone is subscribed before anyone publishes
        await asyncio.to_thread(barrier.wait, SYNC_TIMEOUT)
        published_from = time.time()
        publishing = PublishTimes(counter)
        for n in range(count):
            with publishing.timed(n):
                await broker.publish(TaskAdded(task_id=f"{name}:{n}"))

            if pace:
                await anyio.sleep(pace)

        published_until = time.time()
        try:
            await asyncio.to_thread(published.wait, SYNC_TIMEOUT)
        except threading.BrokenBarrierError:
            # Another publisher took too long: report what this one saw, and say so
            others_published = False
        else:
            others_published = True
            with anyio.move_on_after(SYNC_TIMEOUT):
                await all_received.wait()

        # Keep listening a little longer: a late duplicate would show up here
        await anyio.sleep(0.5)

    return {
        "worker": name,
        "received": received,
        # What a failure report shows: the last event from each publisher, and when
        "last_from": last_from,
        "stopped_listening": time.time(),
        "published_from": published_from,
        "published_until": published_until,
        "others_published": others_published,
        "publishing": publishing.report(),
        **counter.report(),
        **network.report(),
    }


#: The work of a worker process: given a URI, a database and its name (and what else
#: it needs), it returns its report
Work = Callable[..., Coroutine[Any, Any, dict[str, Any]]]


def reporting_worker(
    results: Queue[Any], work: Work, uri: str, database: str, name: str, *args: Any
) -> None:
    """
    Run ``work(uri, database, name, *args)``: the target of a worker process.

    Puts its report, or the traceback of its crash, on ``results``.
    """
    try:
        report = asyncio.run(work(uri, database, name, *args))
    except BaseException:
        results.put({"worker": name, "crash": traceback.format_exc()})
        raise

    results.put(report)


def join_or_kill(processes: Iterable[BaseProcess]) -> None:
    """Wait for worker processes to end (30 s each at most); kill any that hang."""
    for process in processes:
        process.join(30)
        if process.exitcode is None:  # pragma: no cover (a hung worker)
            process.kill()


class Workers:
    """Worker processes that run :func:`reporting_worker`, reporting on one queue."""

    def __init__(self) -> None:
        self.results: Queue[Any] = SPAWN.Queue()
        self.processes: list[BaseProcess] = []

    def spawn(self, work: Work, *args: Any) -> None:
        """Add a worker running ``work`` with these arguments (URI, database, name)."""
        self.processes.append(
            SPAWN.Process(target=reporting_worker, args=(self.results, work, *args))
        )

    @contextmanager
    def running(self, stop: Event | None = None) -> Iterator[None]:
        """
        Start the workers; on the way out, set ``stop`` (if any) and join them.

        Any that hangs is killed.
        """
        for process in self.processes:
            process.start()

        try:
            yield
        finally:
            if stop is not None:
                stop.set()

            join_or_kill(self.processes)

    def reports(self, timeout: float) -> list[dict[str, Any]]:
        """Take each worker's report (``timeout`` seconds each); assert none crashed."""
        reports = [self.results.get(timeout=timeout) for _ in self.processes]
        for report in reports:
            assert "crash" not in report, report["crash"]

        return reports


# Scheduler workers

_runs_clients: dict[str, AsyncMongoClient[Any]] = {}


def runs_collection(uri: str, database: str) -> AsyncCollection[Any]:
    """Return the ``runs`` collection at ``uri``, through one client per process."""
    client = _runs_clients.get(uri)
    if client is None:
        client = _runs_clients[uri] = AsyncMongoClient(uri, tz_aware=True)

    return client[database]["runs"]


async def close_runs_clients() -> None:
    """Close the clients :func:`runs_collection` opened."""
    while _runs_clients:
        _, client = _runs_clients.popitem()
        await client.close()


async def run_until(scheduler: AsyncScheduler, stop: Event, at_most: float) -> bool:
    """
    Let a started scheduler run until ``stop`` is set (``at_most`` seconds),
    then stop it; return whether it had stopped early (crashed) meanwhile.
    """
    await asyncio.to_thread(stop.wait, at_most)
    stopped_early = scheduler.state is not RunState.started
    await scheduler.stop()
    await scheduler.wait_until_stopped()
    return stopped_early


async def record_run(uri: str, database: str) -> None:
    """Record this job's schedule, fire time and process in the ``runs`` collection."""
    job = current_job.get()
    assert job.scheduled_fire_time is not None
    await runs_collection(uri, database).insert_one(
        {
            "schedule_id": job.schedule_id,
            "fire_time": job.scheduled_fire_time.isoformat(),
            "pid": os.getpid(),
            "job_id": str(job.id),
            "ran_at": datetime.now(timezone.utc).isoformat(),
        }
    )


def _store_and_broker(
    uri: str, database: str, retry_settings: RetrySettings
) -> tuple[MongoDBDataStore, MongoDBEventBroker]:
    """Return a scheduler's store and (fast polling) broker on ``database``."""
    store = MongoDBDataStore(uri, database=database, retry_settings=retry_settings)
    return store, _polling_broker(uri, database, retry_settings)


async def run_scheduler(
    uri: str,
    database: str,
    name: str,
    barrier: Barrier,
    stop: Event,
    retry_settings: RetrySettings,
) -> dict[str, Any]:
    """Run a scheduler with the MongoDB store and broker until ``stop`` is set."""
    logger, counter = counting_logger(name)
    network = NetworkFailures()
    store, broker = _store_and_broker(uri, database, retry_settings)
    stopped_early = False
    journal = JobJournal(name)
    try:
        async with AsyncScheduler(
            data_store=store, event_broker=broker, identity=name, logger=logger
        ) as scheduler:
            journal.watch(scheduler)
            await asyncio.to_thread(barrier.wait, SYNC_TIMEOUT)
            await scheduler.start_in_background()
            stopped_early = await run_until(scheduler, stop, SYNC_TIMEOUT)
    finally:
        await close_runs_clients()

    return {
        "worker": name,
        "pid": os.getpid(),
        "stopped_early": stopped_early,
        "journal": journal.entries,
        **counter.report(),
        **network.report(),
    }


class JobJournal:
    """Record what happened to each job a scheduler acquired, to explain a gap."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: list[dict[str, Any]] = []

    def __call__(self, event: SchedulerEvent) -> None:
        entry: dict[str, Any] = {"worker": self.name, "at": time.time()}
        if isinstance(event, JobAcquired):
            fire_time = event.scheduled_start
            entry |= {
                "job_id": str(event.job_id),
                "event": "acquired",
                "fire_time": fire_time.isoformat() if fire_time else None,
                "schedule_id": event.schedule_id,
            }
        elif isinstance(event, JobReleased):
            fire_time = event.scheduled_start
            entry |= {
                "job_id": str(event.job_id),
                "event": f"released: {event.outcome.name}",
                "fire_time": fire_time.isoformat() if fire_time else None,
                "schedule_id": event.schedule_id,
            }
        self.entries.append(entry)

    def watch(self, scheduler: AsyncScheduler) -> None:
        scheduler.subscribe(self, {JobAcquired, JobReleased})


#: How often a supervised scheduler cleans up. A scheduler that holds no lease waits
#: for events or for its peer's leases to lapse, sending nothing that an outage could
#: fail; cleaning up this often makes every scheduler use the store during one
CLEANUP_INTERVAL = timedelta(seconds=1)


async def run_supervised_scheduler(
    uri: str,
    database: str,
    name: str,
    ready: Event,
    stop: Event,
    retry_settings: RetrySettings,
) -> dict[str, Any]:
    """
    Run a scheduler as a supervisor would, until ``stop`` is set: restart it whenever
    it stops on an error.

    The same store and broker objects serve every run. Reports each crash (the
    exception carried by ``SchedulerStopped``) and each failed start.
    """
    logger, counter = counting_logger(name)
    crash_logs = CrashLogs()
    logger.addHandler(crash_logs)
    store, broker = _store_and_broker(uri, database, retry_settings)
    crashes: list[dict[str, Any]] = []
    failed_starts: list[dict[str, Any]] = []
    journal = JobJournal(name)
    runs = 0

    def stopped(event: SchedulerEvent) -> None:
        exception = getattr(event, "exception", None)
        if exception is not None:
            crashes.append(
                {"type": type(exception).__name__, "at": time.time()}
                | _describe_error(exception)
            )

    async def stop_when_told(scheduler: AsyncScheduler) -> None:
        await asyncio.to_thread(stop.wait, SYNC_TIMEOUT * 3)
        await scheduler.stop()

    try:
        while not stop.is_set():
            try:
                async with AsyncScheduler(
                    data_store=store,
                    event_broker=broker,
                    identity=name,
                    logger=logger,
                    cleanup_interval=CLEANUP_INTERVAL,
                ) as scheduler:
                    scheduler.subscribe(stopped, {SchedulerStopped})
                    journal.watch(scheduler)
                    runs += 1
                    ready.set()
                    async with anyio.create_task_group() as group:
                        group.start_soon(stop_when_told, scheduler)
                        try:
                            await scheduler.run_until_stopped()
                        except Exception:
                            pass  # reported through SchedulerStopped and the log
                        finally:
                            group.cancel_scope.cancel()
            except Exception as exc:  # the store or broker could not start
                failed_starts.append({"at": time.time()} | _describe_error(exc))

            if not stop.is_set():
                await asyncio.sleep(0.5)  # a supervisor's restart delay
    finally:
        await close_runs_clients()

    return {
        "worker": name,
        "runs": runs,
        "crashes": crashes,
        "failed_starts": failed_starts,
        "crash_logs": crash_logs.messages,
        "journal": journal.entries,
        **counter.report(),
    }


def _describe_error(exception: BaseException) -> dict[str, Any]:
    """Describe an exception (or the first one in a group) for a report."""
    while isinstance(group := getattr(exception, "exceptions", None), tuple) and group:
        exception = group[0]

    return {"error_type": type(exception).__name__, "message": str(exception)}


class CrashLogs(logging.Handler):
    """Keep the messages of records logged with a traceback at ERROR or above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.messages.append(record.getMessage())
