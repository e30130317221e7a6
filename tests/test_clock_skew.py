"""
Schedulers whose hosts' clocks are off run every fire time once, none early
(guarantee 10: one clock, the server's).

Three scheduler processes share one database: one on the true time, one with its
wall clock 20 s ahead and one 20 s behind (libfaketime). Before the store judged
leases and due times by each host's clock, the one ahead ran jobs up to 20 s early and
took over the others' running jobs, which then ran twice.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from anyio import from_thread, to_thread
from apscheduler import (
    ConflictPolicy,
    Job,
    RetrySettings,
    Schedule,
    Task,
)
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.interval import IntervalTrigger

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._adapters import adapter_for
from apscheduler_mongo._marshalling import from_micros
from apscheduler_mongo._tools.status import Reader, gather_status, render_text

from .support.clock_workers import scheduler_worker
from .support.faults import FaultPlan
from .support.proxy import FAST_FAILURE, proxy_in_front_of
from .support.runs import add_recording_schedules
from .support.stores import announcing_store
from .support.tiers import WIRE_ONLY

pytestmark = [pytest.mark.anyio, *WIRE_ONLY]
LEASE = timedelta(minutes=1)

#: Where Debian's faketime package puts libfaketime
LIBFAKETIME = [
    Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/faketime/libfaketime.so.1"),
]
#: The schedulers, with how far each host's wall clock is off
HOSTS = {"on-time": None, "ahead": "+20s", "behind": "-20s"}
SCHEDULES = [f"every-second-{n}" for n in range(5)]
INTERVAL = timedelta(seconds=1)
#: The first fire time, counted from when the schedules are added (once every
#: scheduler runs)
START_DELAY = timedelta(seconds=2)
#: How long the schedules run
RUN_FOR = 30.0
#: Fire times this close to the end may not have run yet
SETTLE = timedelta(seconds=3)
TIMEOUT = 120


def libfaketime() -> Path | None:
    return next((path for path in LIBFAKETIME if path.exists()), None)


@contextmanager
def clock_shifted(shift: str | None) -> Iterator[None]:
    """Start processes in the block with their wall clock shifted by ``shift``."""
    library = libfaketime()
    if shift is None or library is None:
        yield
        return

    saved = {key: os.environ.get(key) for key in ("LD_PRELOAD", "FAKETIME")}
    os.environ["LD_PRELOAD"] = str(library)
    os.environ["FAKETIME"] = shift
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_skewed_schedulers(
    uri: str, database: str, started: Callable[[], None]
) -> tuple[list[dict[str, Any]], datetime]:
    """
    Run the schedulers; call ``started`` once they all run, then let them run
    RUN_FOR seconds. Return their reports, and when they were told to stop.
    """
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    results = context.Queue()
    readies = {name: context.Event() for name in HOSTS}
    processes = []
    for name, shift in HOSTS.items():
        with clock_shifted(shift):
            process = context.Process(
                target=scheduler_worker,
                args=(uri, database, name, readies[name], stop, results),
            )
            process.start()

        processes.append(process)

    try:
        for ready in readies.values():
            assert ready.wait(TIMEOUT), "a scheduler did not start"

        started()
        time.sleep(RUN_FOR)
        stopped = datetime.now(timezone.utc)
        stop.set()
        reports = [results.get(timeout=TIMEOUT) for _ in processes]
    finally:
        stop.set()
        for process in processes:
            process.join(30)
            if process.exitcode is None:  # pragma: no cover (a hung worker)
                process.kill()

    for report in reports:
        assert "crash" not in report, report["crash"]
        assert not report["stopped_early"], report

    return reports, stopped


async def add_schedules(store: MongoDBDataStore, uri: str, database: str) -> datetime:
    first = datetime.now(timezone.utc) + START_DELAY
    first = first.replace(microsecond=0)
    await add_recording_schedules(
        store,
        "tests.support.clock_workers:record_run",
        (uri, database),
        SCHEDULES,
        IntervalTrigger(seconds=INTERVAL.total_seconds(), start_time=first),
    )
    return first


@asynccontextmanager
async def store_behind_a_clock(
    wire_uri: str, database_name: str, logger: logging.Logger, server_ahead: float
) -> AsyncIterator[MongoDBDataStore]:
    """
    Yield a started store whose server's clock is ``server_ahead`` seconds ahead of
    this host's (a proxy shifts the time in the server's replies).
    """
    plan = FaultPlan()
    plan.shift_clock(server_ahead)
    with proxy_in_front_of(wire_uri, plan) as proxy:
        async with AsyncExitStack() as exit_stack:
            events = LocalEventBroker()
            await events.start(exit_stack, logger)
            uri = proxy.uri_for(wire_uri, **FAST_FAILURE)
            store = MongoDBDataStore(uri, database=database_name)
            await store.start(exit_stack, events, logger)
            yield store


@pytest.mark.slow
@pytest.mark.skipif(
    libfaketime() is None,
    reason="needs libfaketime (Debian package faketime) to shift a process's clock",
)
class TestSkewedHosts:
    """No fire time runs before it is due by the server's clock, none twice, none
    is lost, whichever host's clock is off."""

    async def test_every_fire_time_once_and_on_time(
        self,
        client: Any,
        wire_uri: str,
        database_name: str,
        logger: logging.Logger,
        figures: Callable[[str], None],
    ) -> None:
        firsts: list[datetime] = []
        # The schedules are added once every scheduler sleeps with nothing to do:
        # their addition must be announced to wake them
        async with announcing_store(wire_uri, database_name, logger) as store:

            def add() -> None:  # once every scheduler runs
                firsts.append(
                    from_thread.run(add_schedules, store, wire_uri, database_name)
                )

            reports, stopped = await to_thread.run_sync(
                run_skewed_schedulers, wire_uri, database_name, add
            )

        [first] = firsts

        runs = await client[database_name]["runs"].find().to_list(None)
        for run in runs:
            for field in ("fire_time", "ran_at"):
                run[field] = run[field].replace(tzinfo=timezone.utc)
        fire_times = Counter((run["schedule_id"], run["fire_time"]) for run in runs)
        doubled = {key: n for key, n in fire_times.items() if n > 1}
        # The server stamps ran_at in milliseconds
        early = [
            run
            for run in runs
            if run["ran_at"] < run["fire_time"].replace(microsecond=0)
        ]
        # A fire time is handled once its schedule's stored next fire time is past
        # it; those still ahead at the stop are not lost, only not yet processed
        # (the scheduler ahead holds a schedule for seconds while it adds 20 s of
        # jobs on this slow stand-in)
        cursor = client[database_name]["schedules"].find({}, {"next_fire_time": 1})
        next_times = {
            document["_id"]: from_micros(document["next_fire_time"])
            for document in await cursor.to_list(None)
        }
        expected = {
            (schedule_id, first + INTERVAL * n)
            for schedule_id in SCHEDULES
            for n in range(int(RUN_FOR))
            if first + INTERVAL * n < min(next_times[schedule_id], stopped - SETTLE)
        }
        progress = {s: (next_times[s] - first) / INTERVAL for s in SCHEDULES}
        assert all(steps >= 10 for steps in progress.values()), progress
        lost = sorted(expected - set(fire_times))
        by_host = Counter(run["pid"] for run in runs)
        lateness = sorted(
            (run["ran_at"] - run["fire_time"]).total_seconds() for run in runs
        )
        figures(
            f"{len(runs)} runs of {len(expected)} fire times due: {len(early)} early, "
            f"{len(doubled)} run twice, {len(lost)} lost; runs per process "
            f"{sorted(by_host.values())}; late by {lateness[len(lateness) // 2]:.2f} s "
            f"at the median, {lateness[-1]:.2f} s at most"
        )
        assert not early, early[:5]
        assert not doubled, doubled
        assert not lost, lost[:10]
        assert len(by_host) >= 2, "one process ran everything"
        warned = {
            report["worker"]
            for report in reports
            if any("clock is" in warning for warning in report["warnings"])
        }
        assert warned == {"ahead", "behind"}, reports


@pytest.mark.usefixtures("client")
class TestServerClockAhead:
    """A store whose server's clock is ahead goes by it: leases, due times, the wait
    it tells the scheduler (on this host's clock), and ``status`` says so."""

    async def test_leases_and_wake_ups(
        self,
        wire_uri: str,
        database_name: str,
        logger: logging.Logger,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        async with store_behind_a_clock(wire_uri, database_name, logger, 20) as store:
            await store.add_task(
                Task(id="t", func="builtins:len", job_executor="async")
            )
            # Due in 10 s by this host's clock: already by the server's
            soon = datetime.now(timezone.utc) + timedelta(seconds=10)
            trigger = IntervalTrigger(minutes=1, start_time=soon)
            schedule = Schedule(
                id="s", task_id="t", trigger=trigger, job_executor="async"
            )
            schedule.next_fire_time = soon
            await store.add_schedule(schedule, ConflictPolicy.exception)
            wake = await store.get_next_schedule_run_time()
            [taken] = await store.acquire_schedules("me", LEASE, 10)
            await store.add_job(Job(task_id="t", executor="async"))
            [job] = await store.acquire_jobs("me", LEASE, 10)

        assert taken.id == "s"
        # It can be taken now (by the server's clock): the scheduler need not wait
        assert wake is not None
        assert abs((wake - (soon - timedelta(seconds=20))).total_seconds()) < 0.5
        assert job.acquired_until is not None
        ahead = job.acquired_until - datetime.now(timezone.utc) - LEASE
        assert 19 < ahead.total_seconds() < 21
        assert "20.0 s behind the MongoDB server's" in caplog.text

    async def test_status_says_so(
        self, wire_uri: str, database_name: str, logger: logging.Logger
    ) -> None:
        async with store_behind_a_clock(wire_uri, database_name, logger, -7.5) as store:
            client = adapter_for(store._adapter.client)
            reader = Reader(client, database_name, RetrySettings(), logger)
            status = await gather_status(reader, 0)

        assert status.host_offset == pytest.approx(-7.5, abs=0.1)
        assert "this host's is 7.5 s ahead of it" in render_text(status)
