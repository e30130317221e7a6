"""
Make ``documents.json`` and ``expected.json`` with APScheduler 3 itself.

APScheduler 3 cannot be installed beside APScheduler 4 (they share a package name),
so this runs in an environment of its own, never the project's::

    python3 -m venv /tmp/v3 && /tmp/v3/bin/pip install 'apscheduler>=3.11,<4' \
        pytz tzlocal mongomock pymongo
    /tmp/v3/bin/python tests/data/v3/make_documents.py

It adds jobs to 3.x's own ``MongoDBJobStore`` (on mongomock: the documents are
those 3.x writes to MongoDB, made by its code) through a paused
``BackgroundScheduler``, and writes the raw documents as MongoDB Extended JSON
(canonical: the pickles survive byte for byte), and, for each job, the next 5 fire
times as 3.x's triggers compute them. Triggers without a start date start "now",
which the documents record; everything else is fixed (jitter too: 3.x draws it from
``random``, which is seeded).
"""

from __future__ import annotations

import json
import platform
import random
import sys
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path
from zoneinfo import ZoneInfo

import apscheduler
import mongomock
import pytz
from apscheduler.executors.pool import ProcessPoolExecutor, ThreadPoolExecutor
from apscheduler.jobstores.mongodb import MongoDBJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.combining import AndTrigger, OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from bson import json_util

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from v3_user_types import EveryOtherDay, Point  # noqa: E402

HELSINKI = pytz.timezone("Europe/Helsinki")
NEW_YORK = pytz.timezone("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")
KOLKATA = ZoneInfo("Asia/Kolkata")
TICK, TOCK = "v3_user_types:tick", "v3_user_types:tock"


def jobs() -> list[tuple[str, str, object, dict[str, object]]]:
    """Return (id, function, trigger, other add_job() options) of each job."""
    return [
        ("cron-simple", TICK, CronTrigger(hour=3, minute=30, timezone=BERLIN), {}),
        (
            "cron-every-field",
            TICK,
            CronTrigger(
                year="2027-2030",
                month="jan-mar",
                day="*",
                week="*",
                day_of_week="mon-fri",
                hour="8-18/2",
                minute="5,35",
                second="15",
                timezone=HELSINKI,
                start_date=HELSINKI.localize(datetime(2027, 1, 4, 9)),
            ),
            {},
        ),
        (
            "cron-last-day",
            TICK,
            CronTrigger(day="last", hour=23, timezone=NEW_YORK),
            {},
        ),
        (
            "cron-positions",
            TOCK,
            CronTrigger(day="1st mon,last fri", hour=12, timezone=KOLKATA),
            {},
        ),
        (
            "cron-steps",
            TICK,
            CronTrigger(minute="*/15", hour="*/6", timezone=timezone.utc),
            {},
        ),
        (
            "cron-week",
            TICK,
            CronTrigger(week="*/2", day_of_week="sun", hour=6, timezone=pytz.utc),
            {},
        ),
        (
            "cron-crontab",
            TICK,
            CronTrigger.from_crontab("0 9 * * 1-5", timezone=NEW_YORK),
            {},
        ),
        (
            "cron-bounded",
            TICK,
            CronTrigger(
                hour=7,
                start_date=datetime(2027, 2, 1, tzinfo=BERLIN),
                end_date=datetime(2027, 2, 4, 12, tzinfo=BERLIN),
                timezone=BERLIN,
            ),
            {},
        ),
        (
            "cron-dst-berlin",
            TICK,
            CronTrigger(
                hour=2,
                minute=30,
                start_date=datetime(2027, 3, 26, tzinfo=BERLIN),
                timezone=BERLIN,
            ),
            {},
        ),
        (
            "cron-dst-helsinki",
            TICK,
            CronTrigger(
                hour="1-4",
                start_date=HELSINKI.localize(datetime(2027, 10, 31, 2)),
                timezone=HELSINKI,
            ),
            {},
        ),
        (
            # From the first 03:00 after DST ends (the second one): wall times repeat
            "cron-fold-helsinki",
            TICK,
            CronTrigger(
                minute="*/30",
                start_date=datetime(2027, 10, 31, 1, tzinfo=timezone.utc),
                timezone=ZoneInfo("Europe/Helsinki"),
            ),
            {},
        ),
        (
            # 3.x reads "3/2" as Thursday to Sunday, every other day
            "cron-weekday-step",
            TICK,
            CronTrigger(day_of_week="3/2", hour=8, timezone=BERLIN),
            {},
        ),
        (
            "cron-jitter",
            TICK,
            CronTrigger(hour=4, jitter=30, timezone=BERLIN),
            {},
        ),
        (
            "interval-hours",
            TICK,
            IntervalTrigger(
                hours=2,
                minutes=30,
                start_date=datetime(2027, 1, 1, 0, 0, 10, tzinfo=BERLIN),
                timezone=BERLIN,
            ),
            {},
        ),
        (
            # A jitter longer than the interval
            "interval-wide-jitter",
            TICK,
            IntervalTrigger(seconds=10, jitter=60, timezone=timezone.utc),
            {},
        ),
        (
            "interval-dst",
            TICK,
            IntervalTrigger(
                hours=12,
                start_date=NEW_YORK.localize(datetime(2027, 3, 13, 8)),
                timezone=NEW_YORK,
            ),
            {},
        ),
        (
            "interval-weeks-bounded",
            TOCK,
            IntervalTrigger(
                weeks=1,
                days=1,
                seconds=30,
                start_date=datetime(2027, 5, 1, 12, tzinfo=timezone.utc),
                end_date=datetime(2027, 6, 20, tzinfo=timezone.utc),
                timezone=timezone.utc,
            ),
            {},
        ),
        (
            "interval-now",
            TICK,
            IntervalTrigger(minutes=10, timezone=pytz.utc),
            {},
        ),
        (
            "interval-jitter",
            TICK,
            IntervalTrigger(minutes=5, jitter=20, timezone=BERLIN),
            {},
        ),
        (
            "date-future",
            TOCK,
            DateTrigger(run_date=HELSINKI.localize(datetime(2027, 7, 1, 12, 0, 5))),
            {},
        ),
        (
            # Overdue since before the fixtures were made: a scheduler runs it at once
            "date-past",
            TICK,
            DateTrigger(run_date=datetime(2026, 1, 1, 12, tzinfo=BERLIN)),
            {"misfire_grace_time": None},
        ),
        (
            "date-fixed-offset",
            TOCK,
            DateTrigger(run_date=datetime(2027, 8, 1, 9, tzinfo=pytz.FixedOffset(330))),
            {},
        ),
        (
            "calendar-monthly",
            TICK,
            CalendarIntervalTrigger(
                months=1,
                hour=6,
                minute=15,
                start_date="2027-01-31",
                timezone=BERLIN,
            ),
            {},
        ),
        (
            "and-two-crons",
            TICK,
            # 3.x's AndTrigger never ends with an interval trigger in it: it asks
            # each trigger for its time after the previous fire time, and an
            # interval trigger always answers the same
            AndTrigger(
                [
                    CronTrigger(hour="*/3", timezone=BERLIN),
                    CronTrigger(day_of_week="mon-fri", hour="9-17", timezone=BERLIN),
                ]
            ),
            {},
        ),
        (
            "or-two-crons",
            TOCK,
            OrTrigger(
                [
                    CronTrigger(day_of_week="mon", hour=9, timezone=NEW_YORK),
                    CronTrigger(day_of_week="thu", hour=15, timezone=NEW_YORK),
                ]
            ),
            {},
        ),
        (
            "or-nesting-and",
            TOCK,
            OrTrigger(
                [
                    AndTrigger(
                        [
                            CronTrigger(day_of_week="sat", hour="*/2", timezone=BERLIN),
                            CronTrigger(hour="9-11", timezone=BERLIN),
                        ]
                    ),
                    DateTrigger(
                        run_date=datetime(2027, 4, 2, 8, 45, tzinfo=timezone.utc)
                    ),
                ]
            ),
            {},
        ),
        (
            # Not converted: 3.x computes the interval's times from the combination's
            "or-interval",
            TOCK,
            OrTrigger(
                [
                    IntervalTrigger(
                        minutes=10, start_date=datetime(2027, 1, 1, tzinfo=BERLIN)
                    ),
                    CronTrigger(minute=5, timezone=BERLIN),
                ]
            ),
            {},
        ),
        (
            "or-past-date",
            TOCK,
            OrTrigger(
                [
                    CronTrigger(hour=6, timezone=BERLIN),
                    DateTrigger(run_date=datetime(2026, 1, 1, tzinfo=BERLIN)),
                ]
            ),
            {},
        ),
        (
            "paused",
            TICK,
            CronTrigger(hour=5, timezone=BERLIN),
            {"next_run_time": None},
        ),
        (
            "with-options",
            TOCK,
            IntervalTrigger(
                minutes=30, start_date=datetime(2027, 1, 1, tzinfo=timezone.utc)
            ),
            {
                "args": (Point(1, 2), "text", 3),
                "kwargs": {"when": datetime(2027, 1, 1, tzinfo=timezone.utc)},
                "name": "Nightly report",
                "misfire_grace_time": 30,
                "coalesce": False,
                "max_instances": 3,
                "executor": "processpool",
            },
        ),
        (
            "no-grace",
            TICK,
            CronTrigger(minute=0, timezone=KOLKATA),
            {"misfire_grace_time": None, "coalesce": True},
        ),
        ("custom-trigger", TICK, EveryOtherDay(), {}),
    ]


def has_and(trigger: object) -> bool:
    return isinstance(trigger, AndTrigger) or any(
        has_and(child) for child in getattr(trigger, "triggers", ())
    )


def following(trigger: object, fire_time: datetime) -> datetime | None:
    """
    Return the fire time after ``fire_time``, as 3.x's scheduler asks for it.

    Except with an AndTrigger inside: given the previous fire time, 3.x's AndTrigger
    loops for ever when its triggers' next times differ (each of them answers from
    the previous fire time, whatever "now" the loop moves on), so its scheduler
    would hang there. It is asked what it answers without a previous fire time, one
    microsecond after it, which is how it computes a job's first run time.
    """
    if has_and(trigger):
        return trigger.get_next_fire_time(None, fire_time + timedelta(microseconds=1))

    return trigger.get_next_fire_time(fire_time, fire_time)


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def main() -> None:
    random.seed(3)  # 3.x's jitter is random.uniform(0, jitter)
    client = mongomock.MongoClient()
    store = MongoDBJobStore(client=client)
    scheduler = BackgroundScheduler(
        jobstores={"default": store},
        executors={
            "default": ThreadPoolExecutor(),
            "processpool": ProcessPoolExecutor(1),
        },
    )
    scheduler.start(paused=True)
    expected = {}
    try:
        for job_id, func, trigger, options in jobs():
            job = scheduler.add_job(func, trigger, id=job_id, **options)
            times = []
            fire_time = job.next_run_time
            while fire_time is not None and len(times) < 5:
                times.append(fire_time)
                fire_time = following(job.trigger, fire_time)

            expected[job_id] = {
                "trigger": str(job.trigger),
                "next_run_time": iso(job.next_run_time),
                "next_fire_times": [iso(t) for t in times],
                "jitter": bool(getattr(job.trigger, "jitter", None)),
            }
        # Read before the shutdown, which wakes the scheduler's loop: that would
        # run (and drop) the overdue job
        documents = list(client["apscheduler"]["jobs"].find({}, sort=[("_id", 1)]))
    finally:
        scheduler.shutdown(wait=False)

    options = json_util.CANONICAL_JSON_OPTIONS
    (HERE / "documents.json").write_text(
        json_util.dumps(documents, json_options=options, indent=1) + "\n"
    )
    (HERE / "expected.json").write_text(
        json.dumps(
            {
                "generated_with": {
                    "apscheduler": apscheduler.__version__,
                    "python": platform.python_version(),
                    "pytz": pytz.__version__,
                    "tzlocal": version("tzlocal"),
                    "pickle_protocol": store.pickle_protocol,
                },
                "jobs": expected,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
