"""Schedulers in several processes share schedules: each fire time runs once."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pytest
from anyio import to_thread
from apscheduler import RetrySettings
from pymongo import MongoClient

from .support.broker_workers import SPAWN, Workers, run_scheduler
from .support.proxy import FAULT_RETRIES, FaultyProxy, cutting, proxied
from .support.runs import SCHEDULES, RecordingSchedules
from .support.tiers import MULTI_PROCESS

pytestmark = [pytest.mark.anyio, *MULTI_PROCESS]

WORKERS = 3
#: How long the schedulers run, at least, once all of them are up
RUN_FOR = 6.0
#: ... and at most this much longer, if the schedules fall behind (the test then fails)
MAX_EXTRA = 14.0
#: Stop once each schedule ran this many times (and RUN_FOR has passed)
TARGET_RUNS = 10
#: How long the schedulers run without faults before they stop
SETTLE = 2.5
#: Under faults: cut every connection this often, then refuse new ones for a while
CUT_EVERY = 2.0
REFUSE_FOR = 1.0
#: ... for at least this long (several cuts)
RUN_FOR_UNDER_FAULTS = 9.0
REPORT_TIMEOUT = 90


def run_schedulers(
    uri: str,
    recording: RecordingSchedules,
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
    barrier = SPAWN.Barrier(WORKERS + 1)
    stop = SPAWN.Event()
    workers = Workers()
    for n in range(WORKERS):
        name = f"scheduler{n}"
        args = (barrier, stop, retry_settings)
        workers.spawn(run_scheduler, uri, recording.database.name, name, *args)

    cut_times: list[float] = []
    with workers.running(stop):
        barrier.wait(REPORT_TIMEOUT)
        run_for = RUN_FOR
        with ExitStack() as faults:
            if proxy is not None:
                run_for = RUN_FOR_UNDER_FAULTS
                cut_times = faults.enter_context(
                    cutting(proxy, CUT_EVERY, refuse_for=REFUSE_FOR)
                )

            wait_for_runs(recording, time.time(), run_for)

        if proxy is not None:
            # Let the retries under way finish: a job whose claim is still being
            # retried when its scheduler stops stays claimed (until its lease runs
            # out), and would look like a gap though nothing was lost
            time.sleep(SETTLE)

        stop.set()
        reports = workers.reports(REPORT_TIMEOUT)

    for report in reports:
        assert not report["stopped_early"], f"{report['worker']} crashed"
        assert not report["errors"], report["errors"]

    assert [process.exitcode for process in workers.processes] == [0] * WORKERS
    return reports, cut_times


def wait_for_runs(
    recording: RecordingSchedules, started: float, run_for: float
) -> None:
    """Wait ``run_for`` seconds, and on until each schedule ran TARGET_RUNS times."""
    client: MongoClient[dict[str, Any]] = MongoClient(
        recording.uri, serverSelectionTimeoutMS=5000
    )
    with client:
        runs = client[recording.database.name]["runs"]
        time.sleep(run_for)
        while time.time() < started + run_for + MAX_EXTRA:
            counts = [runs.count_documents({"schedule_id": s}) for s in SCHEDULES]
            if min(counts) >= TARGET_RUNS:
                return

            time.sleep(0.25)


class TestSchedulers:
    """Schedulers in several processes run each fire time once, without gaps."""

    async def test_each_fire_time_runs_once(
        self, recording: RecordingSchedules, figures: Callable[[str], None]
    ) -> None:
        reports, _ = await to_thread.run_sync(
            run_schedulers, recording.uri, recording, RetrySettings()
        )

        runs = await recording.checked_runs(reports)
        figures(f"{len(runs)} fire times ran once each, 0 doubled, 0 missing")


class TestSchedulersThroughCuts:
    """Connections cut under the schedulers neither lose nor repeat a fire time."""

    async def test_each_fire_time_runs_once(
        self, recording: RecordingSchedules, figures: Callable[[str], None]
    ) -> None:
        with proxied(recording.uri) as (proxy, uri):
            reports, cut_times = await to_thread.run_sync(
                run_schedulers, uri, recording, FAULT_RETRIES, proxy
            )

        runs = await recording.checked_runs(reports)
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
