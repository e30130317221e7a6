"""An outage beyond the retry budget: the scheduler fails clearly, then recovers."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from anyio import to_thread
from apscheduler import RetrySettings
from pymongo import MongoClient
from tenacity import stop_after_delay, wait_fixed

from .support.broker_workers import SPAWN, Workers, run_supervised_scheduler
from .support.proxy import FaultyProxy, proxied
from .support.runs import INTERVAL, SCHEDULES, RecordingSchedules
from .support.tiers import MULTI_PROCESS

pytestmark = [pytest.mark.anyio, *MULTI_PROCESS]

WORKERS = 2
#: The retry budget of the schedulers' store and broker ...
BUDGET = RetrySettings(stop=stop_after_delay(2), wait=wait_fixed(0.2))
#: ... and an outage well beyond it (new connections are refused all along)
OUTAGE = 8.0
#: How long the schedulers run before the outage
BEFORE = 3.0
#: How long to wait, at most, for the schedulers to catch up after the outage
CATCH_UP = 30.0
TIMEOUT = 90.0
#: Names of the errors a lost server may surface as (pymongo's ConnectionFailure)
NETWORK_ERRORS = {"ServerSelectionTimeoutError", "AutoReconnect", "NetworkTimeout"}


def run_through_outage(
    proxy: FaultyProxy, uri: str, recording: RecordingSchedules
) -> tuple[list[dict[str, Any]], float]:
    """
    Run supervised schedulers, take the server away for OUTAGE seconds, bring it back.

    Return the workers' reports and when the outage ended.
    """
    database = recording.database.name
    stop = SPAWN.Event()
    readies = [SPAWN.Event() for _ in range(WORKERS)]
    workers = Workers()
    for n, ready in enumerate(readies):
        name = f"scheduler{n}"
        workers.spawn(
            run_supervised_scheduler, uri, database, name, ready, stop, BUDGET
        )

    with workers.running(stop):
        for ready in readies:
            assert ready.wait(TIMEOUT), "a scheduler did not start"

        time.sleep(BEFORE)
        proxy.refuse_for(OUTAGE)
        time.sleep(OUTAGE)
        outage_ended = time.time()
        wait_for_catch_up(recording.uri, database, outage_ended)
        stop.set()
        reports = workers.reports(TIMEOUT)

    return reports, outage_ended


def wait_for_catch_up(runs_uri: str, database: str, outage_ended: float) -> None:
    """Wait until every schedule ran a fire time due a second after the outage."""
    client: MongoClient[dict[str, Any]] = MongoClient(
        runs_uri, serverSelectionTimeoutMS=5000
    )
    with client:
        runs = client[database]["runs"]
        deadline = time.time() + CATCH_UP
        target = datetime.fromtimestamp(outage_ended + 1, timezone.utc).isoformat()
        while time.time() < deadline:
            caught_up = [
                runs.count_documents({"schedule_id": s, "fire_time": {"$gte": target}})
                for s in SCHEDULES
            ]
            if min(caught_up) > 0:
                time.sleep(1)  # let the last jobs finish
                return

            time.sleep(0.25)


class TestOutageBeyondRetryBudget:
    """
    The schedulers stop with the network error (logged, and carried by
    SchedulerStopped), fail to restart while the server is away, then run again and
    catch up: every fire time runs exactly once.
    """

    async def test_fails_clearly_and_recovers(
        self, recording: RecordingSchedules, figures: Callable[[str], None]
    ) -> None:
        with proxied(recording.uri) as (proxy, uri):
            reports, outage_ended = await to_thread.run_sync(
                run_through_outage, proxy, uri, recording
            )

        runs = await recording.checked_runs(reports)
        for report in reports:
            # The outage stopped the scheduler, with the network error in the
            # SchedulerStopped event and "Scheduler crashed" logged with it
            assert report["crashes"], report
            assert {crash["error_type"] for crash in report["crashes"]} <= (
                NETWORK_ERRORS
            ), report["crashes"]
            assert "Scheduler crashed" in report["crash_logs"], report["crash_logs"]
            assert report["retried_operations"] > 0, report
            # ... it ran again after the outage
            assert report["runs"] >= 2, report

        after = [
            run
            for run in runs
            if datetime.fromisoformat(run["ran_at"]).timestamp() > outage_ended
        ]
        assert after, "nothing ran after the outage"
        late_fire_times = {
            run["fire_time"]
            for run in after
            if datetime.fromisoformat(run["fire_time"]).timestamp()
            < outage_ended - INTERVAL.total_seconds()
        }
        # Fire times that fell due during the outage ran after it (CoalescePolicy.all)
        assert late_fire_times, "no fire time missed during the outage was caught up"
        figures(
            f"outage {OUTAGE} s, {len(runs)} runs (0 doubled, 0 missing), "
            f"{sum(len(r['crashes']) for r in reports)} crashes, "
            f"{sum(len(r['failed_starts']) for r in reports)} failed restarts, "
            f"{len(late_fire_times)} fire times caught up after the outage"
        )
