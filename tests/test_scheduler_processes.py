"""Schedulers in several processes share schedules: each fire time runs once."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from anyio import to_thread
from apscheduler import CoalescePolicy, ConflictPolicy, RetrySettings, Schedule, Task
from apscheduler.triggers.interval import IntervalTrigger
from pymongo import MongoClient

from apscheduler_mongo import MongoDBDataStore

from .support.broker_workers import join_or_kill, scheduler_worker
from .support.proxy import (
    FAST_FAILURE,
    FAULT_RETRIES,
    FaultyProxy,
    cutting,
    proxy_in_front_of,
)
from .support.tiers import WIRE_ONLY

# Separate processes need a server they can all reach
pytestmark = [pytest.mark.anyio, *WIRE_ONLY, pytest.mark.slow]

WORKERS = 3
SCHEDULES = ("every-half-second-1", "every-half-second-2")
INTERVAL = timedelta(seconds=0.5)
#: The first fire time, counted from when the schedules are added
START_DELAY = timedelta(seconds=2)
#: How long the schedulers run, at least, once all of them are up
RUN_FOR = 6.0
#: ... and at most this much longer, if the schedules fall behind (the test then fails)
MAX_EXTRA = 14.0
#: Stop once each schedule ran this many times (and RUN_FOR has passed)
TARGET_RUNS = 10
MIN_RUNS = 8
#: How long the schedulers run without faults before they stop
SETTLE = 2.5
#: Under faults: cut every connection this often, then refuse new ones for a while
CUT_EVERY = 2.0
REFUSE_FOR = 1.0
#: ... for at least this long (several cuts)
RUN_FOR_UNDER_FAULTS = 9.0
REPORT_TIMEOUT = 90


async def add_schedules(
    store: MongoDBDataStore, runs_uri: str, database: str
) -> datetime:
    """Add the recording task and the interval schedules; return the first fire time."""
    await store.add_task(
        Task(
            id="record",
            func="tests.support.broker_workers:record_run",
            job_executor="async",
        )
    )
    now = datetime.now(timezone.utc) + START_DELAY
    start = now.replace(microsecond=now.microsecond // 1000 * 1000)
    for schedule_id in SCHEDULES:
        trigger = IntervalTrigger(seconds=INTERVAL.total_seconds(), start_time=start)
        # Passed as Any: APScheduler's converters confuse mypy about these types
        options: dict[str, Any] = {
            "args": (runs_uri, database),
            "misfire_grace_time": None,  # every fire time runs, however late
        }
        schedule = Schedule(
            id=schedule_id,
            task_id="record",
            trigger=trigger,
            coalesce=CoalescePolicy.all,
            job_executor="async",
            **options,
        )
        schedule.next_fire_time = trigger.next()
        await store.add_schedule(schedule, ConflictPolicy.exception)

    return start


def run_schedulers(
    uri: str,
    runs_uri: str,
    database: str,
    retry_settings: RetrySettings,
    proxy: FaultyProxy | None = None,
) -> tuple[list[dict[str, Any]], list[float]]:
    """
    Run a scheduler in each of WORKERS processes until the schedules are well under way.

    The schedulers run for RUN_FOR seconds, and longer (up to MAX_EXTRA more) until each
    schedule has run TARGET_RUNS times. With a ``proxy``, cut its connections every
    CUT_EVERY seconds while the schedulers run for RUN_FOR_UNDER_FAULTS (and refuse
    new ones for REFUSE_FOR after each cut), then let them run SETTLE seconds more
    without faults. Return the workers' reports and the times of the cuts.
    """
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS + 1)
    stop = context.Event()
    results = context.Queue()
    processes = [
        context.Process(
            target=scheduler_worker,
            args=(
                uri,
                database,
                f"scheduler{n}",
                barrier,
                stop,
                retry_settings,
                results,
            ),
        )
        for n in range(WORKERS)
    ]
    for process in processes:
        process.start()

    cut_times: list[float] = []
    try:
        barrier.wait(REPORT_TIMEOUT)
        run_for = RUN_FOR
        with ExitStack() as faults:
            if proxy is not None:
                run_for = RUN_FOR_UNDER_FAULTS
                cut_times = faults.enter_context(
                    cutting(proxy, CUT_EVERY, refuse_for=REFUSE_FOR)
                )

            wait_for_runs(runs_uri, database, time.time(), run_for)

        if proxy is not None:
            # Let the retries under way finish: a job whose claim is still being
            # retried when its scheduler stops stays claimed (until its lease runs
            # out), and would look like a gap though nothing was lost
            time.sleep(SETTLE)

        stop.set()
        reports = [results.get(timeout=REPORT_TIMEOUT) for _ in processes]
    finally:
        stop.set()
        join_or_kill(processes)

    for report in reports:
        assert "crash" not in report, report["crash"]
        assert not report["stopped_early"], f"{report['worker']} crashed"
        assert not report["errors"], report["errors"]

    assert [process.exitcode for process in processes] == [0] * WORKERS
    return reports, cut_times


def wait_for_runs(runs_uri: str, database: str, started: float, run_for: float) -> None:
    """Wait ``run_for`` seconds, and on until each schedule ran TARGET_RUNS times."""
    client: MongoClient[dict[str, Any]] = MongoClient(
        runs_uri, serverSelectionTimeoutMS=5000
    )
    with client:
        runs = client[database]["runs"]
        time.sleep(run_for)
        while time.time() < started + run_for + MAX_EXTRA:
            counts = [runs.count_documents({"schedule_id": s}) for s in SCHEDULES]
            if min(counts) >= TARGET_RUNS:
                return

            time.sleep(0.25)


async def recorded_runs(client: Any, database: str) -> list[dict[str, Any]]:
    cursor = client[database]["runs"].find({}, {"_id": False})
    return list(await cursor.to_list(None))


def check_runs(
    runs: list[dict[str, Any]],
    start: datetime,
    reports: Sequence[dict[str, Any]] = (),
) -> None:
    """
    Assert each schedule's fire times ran once each, without gaps, from the first.

    Also assert the runs were shared out between processes. A fire time that never
    ran is explained with what the workers' journals (in ``reports``) say of it.
    """
    per_schedule: dict[str, list[datetime]] = {schedule: [] for schedule in SCHEDULES}
    for run in runs:
        per_schedule[run["schedule_id"]].append(
            datetime.fromisoformat(run["fire_time"])
        )

    for schedule_id, fire_times in per_schedule.items():
        summary = f"{schedule_id}: {describe(runs, schedule_id, start)}"
        duplicates = [t for t, n in Counter(fire_times).items() if n > 1]
        assert not duplicates, f"ran {duplicates} more than once; {summary}"
        assert len(fire_times) >= MIN_RUNS, f"too few runs; {summary}"
        expected = [start + INTERVAL * n for n in range(len(fire_times))]
        missing = sorted(set(expected) - set(fire_times))
        assert sorted(fire_times) == expected, (
            f"never ran {missing}; {summary}; what the schedulers saw of them: "
            f"{journal_of(reports, schedule_id, missing)}"
        )

    assert len({run["pid"] for run in runs}) > 1, "one process ran every job"


def journal_of(
    reports: Sequence[dict[str, Any]], schedule_id: str, fire_times: list[datetime]
) -> list[dict[str, Any]]:
    """Return the journal entries of the workers about these fire times' jobs."""
    entries = [entry for report in reports for entry in report.get("journal", [])]
    wanted = {fire_time.isoformat() for fire_time in fire_times}
    job_ids = {
        entry["job_id"]
        for entry in entries
        if entry.get("schedule_id") == schedule_id and entry.get("fire_time") in wanted
    }
    return sorted(
        (entry for entry in entries if entry.get("job_id") in job_ids),
        key=lambda entry: float(entry["at"]),
    )


def describe(runs: list[dict[str, Any]], schedule_id: str, start: datetime) -> str:
    """Describe a schedule's runs as (fire time offset, lateness, pid) triples."""
    described = []
    for run in runs:
        if run["schedule_id"] == schedule_id:
            fire_time = datetime.fromisoformat(run["fire_time"])
            late = datetime.fromisoformat(run["ran_at"]) - fire_time
            offset = (fire_time - start).total_seconds()
            described.append((offset, round(late.total_seconds(), 2), run["pid"]))

    return repr(sorted(described))


class TestSchedulers:
    """Schedulers in several processes run each fire time once, without gaps."""

    async def test_each_fire_time_runs_once(
        self,
        store: MongoDBDataStore,
        client: Any,
        wire_uri: str,
        database_name: str,
        figures: Callable[[str], None],
    ) -> None:
        start = await add_schedules(store, wire_uri, database_name)

        reports, _ = await to_thread.run_sync(
            run_schedulers, wire_uri, wire_uri, database_name, RetrySettings()
        )

        runs = await recorded_runs(client, database_name)
        check_runs(runs, start, reports)
        figures(f"{len(runs)} fire times ran once each, 0 doubled, 0 missing")


class TestSchedulersThroughCuts:
    """Connections cut under the schedulers neither lose nor repeat a fire time."""

    async def test_each_fire_time_runs_once(
        self,
        store: MongoDBDataStore,
        client: Any,
        wire_uri: str,
        database_name: str,
        figures: Callable[[str], None],
    ) -> None:
        # The jobs record their runs directly, not through the proxy
        start = await add_schedules(store, wire_uri, database_name)
        with proxy_in_front_of(wire_uri) as proxy:
            uri = proxy.uri_for(wire_uri, **FAST_FAILURE)
            reports, cut_times = await to_thread.run_sync(
                run_schedulers, uri, wire_uri, database_name, FAULT_RETRIES, proxy
            )

        runs = await recorded_runs(client, database_name)
        check_runs(runs, start, reports)
        assert len(cut_times) >= 3
        assert proxy.connections_cut > 0, "the cuts closed no connection"
        # The cuts reached every scheduler, whose store and broker retried
        for report in reports:
            assert report["failed_commands"] > 0, report
            assert report["retried_operations"] > 0, report
            assert report["retried_polls"] > 0, report

        figures(
            f"{len(runs)} fire times ran once each (0 doubled, 0 missing) through "
            f"{len(cut_times)} cuts ({proxy.connections_cut} connections cut, "
            f"{proxy.refused} refused); retried operations per scheduler: "
            f"{[report['retried_operations'] for report in reports]}"
        )
