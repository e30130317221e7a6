"""
Copy the tasks and schedules of APScheduler's built-in MongoDB store into this one.

APScheduler's own ``apscheduler.datastores.mongodb.MongoDBDataStore`` and
``apscheduler_mongo.MongoDBDataStore`` lay their documents out differently, so they
cannot share a database. This script reads every task and schedule through the
built-in store's API and adds them, unchanged (trigger, arguments, paused state, next
fire time ...), to an ``apscheduler_mongo`` store in another database::

    python examples/migrate_from_builtin.py \\
        --from-uri mongodb://127.0.0.1:27017/ --from-database apscheduler \\
        --to-database apscheduler_v2

(``--to-uri`` defaults to ``--from-uri``). Stop every scheduler that uses the old
database first, and start the new ones on the new database afterwards. Running it
again replaces the copied schedules with the old database's versions. Jobs are not
copied: the script reports how many the old database still holds; let the old
schedulers finish them before the switch. Job results are not copied either.

The task functions must be importable here, as they are in the schedulers: the old
store unpickles triggers and arguments when it reads them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack

import anyio
import attrs
from apscheduler import ConflictPolicy
from apscheduler.abc import DataStore
from apscheduler.datastores.mongodb import MongoDBDataStore as BuiltinMongoDBDataStore
from apscheduler.eventbrokers.local import LocalEventBroker

from apscheduler_mongo import MongoDBDataStore

logger = logging.getLogger("migrate_from_builtin")


@attrs.frozen
class Report:
    """What a migration did."""

    tasks: int
    schedules: int
    #: Jobs still in the old database, which were not copied
    jobs_left: int


async def copy_store(source: DataStore, target: DataStore) -> Report:
    """Add every task and schedule of ``source`` to ``target`` (both started)."""
    tasks = await source.get_tasks()
    for task in tasks:
        await target.add_task(task)

    schedules = await source.get_schedules()
    for schedule in schedules:
        await target.add_schedule(schedule, ConflictPolicy.replace)

    jobs = await source.get_jobs()
    return Report(tasks=len(tasks), schedules=len(schedules), jobs_left=len(jobs))


async def migrate(
    from_uri: str, from_database: str, to_uri: str, to_database: str
) -> Report:
    """Copy the built-in store in ``from_database`` to this store in ``to_database``."""
    if (from_uri, from_database) == (to_uri, to_database):
        raise ValueError(
            "the two stores' documents differ, so they cannot share a database: "
            "migrate to another database"
        )

    async with AsyncExitStack() as exit_stack:
        broker = LocalEventBroker()
        await broker.start(exit_stack, logger)
        source = BuiltinMongoDBDataStore(from_uri, database=from_database)
        await source.start(exit_stack, broker, logger)
        target = MongoDBDataStore(to_uri, database=to_database)
        await target.start(exit_stack, broker, logger)
        return await copy_store(source, target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Copy tasks and schedules from APScheduler's built-in MongoDB "
        "store to apscheduler-mongo's."
    )
    parser.add_argument("--from-uri", required=True)
    parser.add_argument("--from-database", default="apscheduler")
    parser.add_argument("--to-uri", help="default: the same as --from-uri")
    parser.add_argument("--to-database", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = anyio.run(
        migrate,
        args.from_uri,
        args.from_database,
        args.to_uri or args.from_uri,
        args.to_database,
    )
    sys.stdout.write(
        f"copied {report.tasks} task(s) and {report.schedules} schedule(s) from "
        f"{args.from_database!r} to {args.to_database!r}\n"
    )
    if report.jobs_left:
        sys.stdout.write(
            f"{report.jobs_left} job(s) are still in {args.from_database!r} and were "
            f"not copied: let the old schedulers run them first\n"
        )

    return 0


if __name__ == "__main__":
    sys.exit(main())
