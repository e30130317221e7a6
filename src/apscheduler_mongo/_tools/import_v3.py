"""The ``import-v3`` command: APScheduler 3's MongoDBJobStore jobs into a store."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from apscheduler import Schedule, Task
from apscheduler.abc import DataStore

from .._v3 import DEFAULT_EXECUTORS
from ..migration import V3ImportReport, import_v3

DESCRIPTION = (
    "Read the jobs of an APScheduler 3 MongoDBJobStore collection and add the "
    "equal tasks and schedules to the store: triggers (cron, interval, date, "
    "calendar interval and their combinations, with their time zones), arguments, "
    "misfire grace times, coalescing, max_instances (as the task's "
    "max_running_jobs), executors, jitter, paused jobs and next run times. The 3.x "
    "pickles are read without APScheduler 3, running nothing they name: a class in "
    "the arguments needs --allow-type. The 3.x collection is only read; schedules "
    "keep their jobs' ids, and those the store has are left as they are, so running "
    "it again adds nothing twice. Exit status 1 when a job could not be converted "
    "(each is listed, with why)."
)


def declare(parser: argparse.ArgumentParser) -> None:
    """Add the command's own options to ``parser``."""
    parser.add_argument(
        "--from-uri",
        metavar="URI",
        help="MongoDB URI of the 3.x job store (default: that of the store; the "
        "APSCHEDULER3_MONGODB_URI environment variable is the place for a URI "
        "with a password)",
    )
    parser.add_argument(
        "--from-database",
        default="apscheduler",
        metavar="NAME",
        help="database of the 3.x job store (default: %(default)s)",
    )
    parser.add_argument(
        "--from-collection",
        default="jobs",
        metavar="NAME",
        help="collection of the 3.x job store (default: %(default)s)",
    )
    parser.add_argument(
        "--executor",
        action="append",
        default=[],
        metavar="NAME=EXECUTOR",
        help="the APScheduler 4 executor (async, threadpool, processpool) of a 3.x "
        "executor; repeat it for more (default: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_EXECUTORS.items())
        + "; an AsyncIOScheduler's coroutine functions need default=async)",
    )
    parser.add_argument(
        "--allow",
        action="append",
        default=None,
        metavar="PATTERN",
        help="a function the jobs may run ('module:qualname' or 'module:*'); repeat "
        "it for more. A job whose function falls outside is not converted. Needed "
        "with a signing key: the store signs what is imported, vouching for the "
        "functions the 3.x documents name",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="read the 3.x jobs and say what would be added, writing nothing (and "
        "not opening the store)",
    )
    parser.add_argument(
        "--events-collection",
        default="events",
        metavar="NAME",
        help="collection of the MongoDBEventBroker that the schedulers use, through "
        "which the import is announced to them (default: %(default)s)",
    )


def executors_of(items: Sequence[str]) -> dict[str, str]:
    """
    Return :data:`DEFAULT_EXECUTORS` updated with ``NAME=EXECUTOR`` items.

    :raises ValueError: if an item is not of that form
    """
    executors = dict(DEFAULT_EXECUTORS)
    for item in items:
        name, equals, executor = item.partition("=")
        if not equals or not name or not executor:
            raise ValueError(f"--executor {item!r}: expected NAME=EXECUTOR")

        executors[name] = executor

    return executors


async def run(
    args: argparse.Namespace,
    source: object,
    store: DataStore | None,
    allowed_types: Sequence[type],
    say: Callable[[str], None],
    *,
    same_server: bool,
) -> int:
    """
    Import, and say what was (or would be) done; return the exit status.

    :param same_server: whether the 3.x job store is on the store's server (its
        database and collection must then not be the store's own)
    """
    report = await import_v3(
        source,
        store,
        executors=executors_of(args.executor),
        allowed_types=allowed_types,
        allowed_callables=args.allow,
        check_source=same_server,
    )
    render(report, f"{args.from_database}.{args.from_collection}", say)
    return 1 if report.refused else 0


def render(report: V3ImportReport, where: str, say: Callable[[str], None]) -> None:
    """Say what an import did, one line per schedule and per job not converted."""
    added = "would add" if report.dry_run else "added"
    say(f"read {report.read} APScheduler 3 job(s) from {where}")
    for schedule in report.schedules:
        new = schedule.id in report.schedules_added
        say(_describe(schedule, report.tasks[schedule.task_id], added if new else ""))

    for job_id, reason in report.refused.items():
        say(f"not converted: job {job_id!r}: {reason}")

    say(
        f"{added} {len(report.tasks_added)} task(s) and "
        f"{len(report.schedules_added)} schedule(s); already in the store, left as "
        f"they are: {len(report.tasks_present)} task(s) and "
        f"{len(report.schedules_present)} schedule(s); not converted: "
        f"{len(report.refused)} job(s)"
    )


def _describe(schedule: Schedule, task: Task, added: str) -> str:
    state = "paused, " if schedule.paused else ""
    when = schedule.next_fire_time.isoformat() if schedule.next_fire_time else "-"
    verb = added or "already present"
    return (
        f"{verb}: schedule {schedule.id!r} of task {task.id!r} "
        f"({task.job_executor}, max_running_jobs={task.max_running_jobs}): "
        f"{schedule.trigger!r}, {state}next fire time {when}"
    )
