"""
Cost independent of history (guarantee 11): every query is served by an index, and
cleanup goes through any amount of history in bounded batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from apscheduler import (
    AsyncScheduler,
    CoalescePolicy,
    ConflictPolicy,
    Job,
    Schedule,
    Task,
)
from apscheduler.triggers.interval import IntervalTrigger
from pymongo import AsyncMongoClient

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker
from apscheduler_mongo import _cleanup as cleanup
from apscheduler_mongo._job_claims import LIMITS_REFRESH
from apscheduler_mongo._layout import FINISHED, fire_key
from apscheduler_mongo._marshalling import job_to_document, to_micros
from apscheduler_mongo._signing import Codec

from .support.commands import Command, CommandLog
from .support.index_rules import Query, queries_of, served
from .support.tiers import WIRE_ONLY

pytestmark = pytest.mark.anyio


async def index_keys(
    client: Any, database: str
) -> dict[str, list[list[tuple[str, Any]]]]:
    keys: dict[str, list[list[tuple[str, Any]]]] = {}
    for name in await client[database].list_collection_names():
        indexes = await (await client[database][name].list_indexes()).to_list(None)
        keys[name] = [list(index["key"].items()) for index in indexes]

    return keys


def unserved(
    commands: list[Command],
    keys: dict[str, list[list[tuple[str, Any]]]],
    database: str,
) -> list[Query]:
    """Return the queries no index serves, of the commands sent to ``database``."""
    queries = [
        query
        for name, command in commands
        if command.get("$db") == database
        for query in queries_of(name, command)
    ]
    return [
        query
        for query in queries
        # A whole collection read in index order (get_tasks, get_schedules) is
        # what it asks for
        if not (not query.filter and query.sort in ([], [("_id", 1)]))
        and not served(query, keys.get(query.collection, []))
    ]


@WIRE_ONLY
@pytest.mark.slow
class TestIndexCoverage:
    """
    Every query of two busy schedulers (claims and their re-reads, releases, lease
    extensions, reaping, wake-ups, results, cleanup, the broker's polls) is served
    by an index, by the prefix and sort rules of ``tests/support/index_rules.py``.
    """

    async def test_busy_schedulers(
        self,
        logged_client: AsyncMongoClient[Any],
        command_log: CommandLog,
        database_name: str,
        logger: logging.Logger,
        figures: Any,
    ) -> None:
        async with AsyncExitStack() as exit_stack:
            schedulers = []
            for n in range(2):
                store = MongoDBDataStore(logged_client, database=database_name)
                broker = MongoDBEventBroker(
                    logged_client,
                    database=database_name,
                    mode="polling",
                    poll_interval=0.05,
                )
                scheduler = AsyncScheduler(
                    store,
                    broker,
                    identity=f"busy{n}",
                    logger=logger,
                    lease_duration=timedelta(seconds=2),
                    cleanup_interval=timedelta(seconds=0.5),
                )
                await exit_stack.enter_async_context(scheduler)
                schedulers.append(scheduler)

            first = schedulers[0]
            await first.data_store.add_task(
                Task(
                    id="capped",
                    func="builtins:len",
                    job_executor="async",
                    max_running_jobs=1,
                )
            )
            await first.add_schedule(
                len,
                IntervalTrigger(seconds=0.2),
                args=["x"],
                id="often",
                coalesce=CoalescePolicy.all,
            )
            started = time.monotonic()
            for scheduler in schedulers:
                await scheduler.start_in_background()

            with anyio.fail_after(30):
                for _ in range(5):
                    job_id = await first.add_job(
                        len, args=["abc"], result_expiration_time=60
                    )
                    result = await first.get_job_result(job_id)
                    assert result is not None
                    assert result.return_value == 3

                    await first.data_store.add_job(
                        Job(task_id="capped", executor="async")
                    )

                await anyio.sleep(2.5)  # leases extended, cleanups, wake-ups

        elapsed = time.monotonic() - started
        keys = await index_keys(logged_client, database_name)
        missing = unserved(command_log.commands, keys, database_name)
        # The one read no index serves, by design: every task's limit, beside a
        # claim, at most every LIMITS_REFRESH seconds per store (bounded by the
        # number of tasks, not by history)
        limits = [
            query
            for query in missing
            if query.collection == "tasks" and query.origin == "union without $match"
        ]
        missing = [query for query in missing if query not in limits]
        assert len(limits) <= len(schedulers) * (elapsed / LIMITS_REFRESH + 1)
        queries = sum(
            len(queries_of(name, command))
            for name, command in command_log.commands
            if command.get("$db") == database_name
        )
        assert queries > 200  # the workload did run
        assert not missing, "\n".join(map(str, missing))
        figures(
            f"{queries} queries from {len(command_log.commands)} commands, all indexed"
        )


def fire_record(schedule_id: str, n: int, finished: datetime) -> dict[str, Any]:
    """A finished schedule job with no result left: a used fire time's record."""
    job = Job(
        task_id="task",
        executor="async",
        schedule_id=schedule_id,
        scheduled_fire_time=finished - timedelta(minutes=n),
    )
    document = job_to_document(job, Codec(pickle_serializer()))
    for field in ("args", "kwargs"):
        del document[field]

    document.update(state=FINISHED, finished_time=to_micros(finished))
    document["fire_key"] = fire_key(schedule_id, document["fire_time"])
    return document


def pickle_serializer() -> Any:
    from apscheduler.serializers.pickle import PickleSerializer

    return PickleSerializer()


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(cleanup, "BATCH", 3)
    yield 3


class TestCleanupInBatches:
    """Cleanup reads and names a bounded number of documents per command, and still
    goes through all of them."""

    @pytest.mark.usefixtures("small_batches")
    async def test_more_records_than_a_batch(self, store: MongoDBDataStore) -> None:
        long_ago = datetime.now(timezone.utc) - cleanup.FIRE_TIME_RETENTION * 2
        # Ten used fire times of a schedule that is gone, and seven finished
        # schedules without jobs
        await store._jobs.raw.insert_many(
            [fire_record("gone", n, long_ago) for n in range(10)]
        )
        for n in range(7):
            trigger = IntervalTrigger(minutes=1)
            schedule = Schedule(
                id=f"done{n}", task_id="task", trigger=trigger, job_executor="async"
            )
            await store.add_schedule(schedule, ConflictPolicy.exception)

        assert len(await store.get_schedules()) == 7
        await store.cleanup()

        assert await store._jobs.count_documents({}) == 0
        assert await store.get_schedules() == []


@WIRE_ONLY
class TestBatchesOnTheWire:
    """No cleanup command names more documents than a batch holds."""

    @pytest.mark.usefixtures("small_batches")
    async def test_bounded_commands(
        self,
        logged_client: AsyncMongoClient[Any],
        command_log: CommandLog,
        database_name: str,
        logger: logging.Logger,
    ) -> None:
        long_ago = datetime.now(timezone.utc) - cleanup.FIRE_TIME_RETENTION * 2
        await logged_client[database_name]["jobs"].insert_many(
            [fire_record("gone", n, long_ago) for n in range(10)]
        )
        async with AsyncExitStack() as exit_stack:
            events = MongoDBEventBroker(logged_client, database=database_name)
            await events.start(exit_stack, logger)
            store = MongoDBDataStore(logged_client, database=database_name)
            await store.start(exit_stack, events, logger)
            command_log.commands.clear()
            await store.cleanup()

        assert await logged_client[database_name]["jobs"].count_documents({}) == 0
        named = [
            len(statement["q"]["_id"]["$in"])
            for name, command in command_log.commands
            if name == "delete" and command["delete"] == "jobs"
            for statement in command["deletes"]
            if "$in" in (statement["q"].get("_id") or {})
        ]
        assert named == [3, 3, 3, 1], named
