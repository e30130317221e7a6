"""
Schedules whose jobs record their runs, for the tests of schedulers in several
processes, and the check that each of their fire times ran once.

Each job records its schedule, fire time, process and time in the ``runs`` collection
(:func:`~tests.support.broker_workers.record_run`), straight to the wire tier's server
(never through a proxy), so that what ran can be checked afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from copy import deepcopy
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
from apscheduler import CoalescePolicy, ConflictPolicy, Schedule, Task
from apscheduler.triggers.interval import IntervalTrigger

from apscheduler_mongo import MongoDBDataStore

SCHEDULES = ("every-half-second-1", "every-half-second-2")
INTERVAL = timedelta(seconds=0.5)
#: The first fire time, counted from when the schedules are added
START_DELAY = timedelta(seconds=2)
#: Each schedule must have run at least this many times
MIN_RUNS = 8


async def add_recording_schedules(
    store: MongoDBDataStore,
    func: str,
    args: tuple[Any, ...],
    schedule_ids: Sequence[str],
    trigger: IntervalTrigger,
) -> None:
    """
    Add task ``record`` running ``func`` and a schedule of ``trigger`` for each of
    ``schedule_ids``, passing ``args``; every fire time runs, however late.
    """
    await store.add_task(Task(id="record", func=func, job_executor="async"))
    for schedule_id in schedule_ids:
        # Passed as Any: APScheduler's converters confuse mypy about these types
        options: dict[str, Any] = {"args": args, "misfire_grace_time": None}
        schedule = Schedule(
            id=schedule_id,
            task_id="record",
            trigger=deepcopy(trigger),
            coalesce=CoalescePolicy.all,
            job_executor="async",
            **options,
        )
        schedule.next_fire_time = schedule.trigger.next()
        await store.add_schedule(schedule, ConflictPolicy.exception)


@attrs.frozen
class RecordingSchedules:
    """The recording schedules of the test's database, and what they ran."""

    #: Where the jobs record their runs: the wire tier's server, directly
    uri: str
    #: The test's database, through the tier's client
    database: Any
    #: The first fire time of every schedule
    start: datetime

    @classmethod
    async def add(
        cls, store: MongoDBDataStore, uri: str, database: Any
    ) -> RecordingSchedules:
        """Add the recording task and the interval schedules to ``store``."""
        now = datetime.now(timezone.utc) + START_DELAY
        start = now.replace(microsecond=now.microsecond // 1000 * 1000)
        await add_recording_schedules(
            store,
            "tests.support.broker_workers:record_run",
            (uri, database.name),
            SCHEDULES,
            IntervalTrigger(seconds=INTERVAL.total_seconds(), start_time=start),
        )
        return cls(uri, database, start)

    async def checked_runs(
        self, reports: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Return the runs recorded, once :func:`check_runs` found nothing amiss."""
        cursor = self.database["runs"].find({}, {"_id": False})
        runs = list(await cursor.to_list(None))
        check_runs(runs, self.start, reports)
        return runs


def check_runs(
    runs: list[dict[str, Any]], start: datetime, reports: Sequence[dict[str, Any]]
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
