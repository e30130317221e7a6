"""A database written by an earlier version is read and run by this one."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from apscheduler import JobOutcome, JobResult
from apscheduler._structures import ScheduleResult
from apscheduler.abc import EventBroker
from bson import json_util

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._layout import JOB_INDEXES, SCHEDULE_INDEXES

pytestmark = pytest.mark.anyio

#: Written by version 0.1.0.dev0 (see its "_about")
DATABASE = Path(__file__).with_name("data") / "database-0.1.0.dev0.json"
#: What that version's writer used (tests/data/write_database_0_1.py)
T0 = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
OWNER = "old-scheduler"


def _index_options(info: dict[str, Any]) -> dict[str, Any]:
    return {
        option: info[option]
        for option in ("unique", "sparse", "expireAfterSeconds")
        if option in info
    }


@pytest.fixture
async def old_store(
    client: Any,
    database_name: str,
    local_broker: EventBroker,
    logger: logging.Logger,
) -> AsyncIterator[MongoDBDataStore]:
    """This version's store, started on the documents and indexes of the old one."""
    dump = json_util.loads(DATABASE.read_text(encoding="utf-8"))
    database = client[database_name]
    for name in ("tasks", "schedules", "jobs"):
        await database[name].insert_many(dump[name])
        for info in dump[f"{name}.indexes"]:
            if info["name"] != "_id_":
                await database[name].create_index(
                    list(info["key"].items()), name=info["name"], **_index_options(info)
                )

    async with AsyncExitStack() as exit_stack:
        await local_broker.start(exit_stack, logger)
        store = MongoDBDataStore(client, database=database_name)
        await store.start(exit_stack, local_broker, logger)
        yield store


class TestDatabaseOfVersion01:
    """Every kind of document version 0.1.0.dev0 stored reads back the same here,
    leases and results included, and the store goes on working on them."""

    async def test_tasks(self, old_store: MongoDBDataStore) -> None:
        capped, plain = await old_store.get_tasks()
        assert (capped.id, capped.func, capped.job_executor) == (
            "capped",
            "builtins:repr",
            "threadpool",
        )
        assert capped.max_running_jobs == 2
        assert capped.misfire_grace_time == timedelta(seconds=30)
        assert capped.metadata == {"team": "ops"}
        assert capped.running_jobs == 2
        assert (plain.id, plain.running_jobs) == ("plain", 0)

    async def test_schedules(self, old_store: MongoDBDataStore) -> None:
        schedules = {s.id: s for s in await old_store.get_schedules()}
        assert set(schedules) == {"due", "held", "paused"}
        first = T0 + timedelta(minutes=0)
        for schedule in schedules.values():
            assert schedule.next_fire_time == first
            assert schedule.next_fire_time.utcoffset() == timedelta(hours=1)
            assert schedule.args == (1, "a")
            assert schedule.kwargs == {"k": [1, 2]}
            assert schedule.misfire_grace_time == timedelta(seconds=10)
            assert schedule.metadata == {"kind": schedule.id}

        assert schedules["paused"].paused
        assert schedules["held"].acquired_by == OWNER
        assert schedules["paused"].acquired_by is None

    async def test_jobs_and_results(self, old_store: MongoDBDataStore) -> None:
        jobs = await old_store.get_jobs()
        assert [(job.task_id, job.acquired_by) for job in jobs] == [
            ("capped", OWNER),
            ("capped", OWNER),
            ("capped", None),
            ("plain", None),
        ]
        assert [job.args for job in jobs] == [(0,), (1,), (2,), ("later",)]
        finished = await old_store._jobs.find({"state": "finished"})
        results = [
            await old_store.get_job_result(doc["_id"].as_uuid()) for doc in finished
        ]
        for result in results:
            assert result is not None
            assert result.outcome is JobOutcome.success
            assert result.return_value == {"answer": 42}
            assert result.started_at == T0

    async def test_store_goes_on(self, old_store: MongoDBDataStore) -> None:
        # The capped task holds both its slots: only the plain job is handed out
        [job] = await old_store.acquire_jobs("new-scheduler", timedelta(minutes=1))
        assert job.args == ("later",)
        await old_store.release_job(
            "new-scheduler", job, JobResult.from_job(job, JobOutcome.success)
        )
        # The old owner still releases what it holds
        [held] = await old_store.get_schedules({"held"})
        await old_store.release_schedules(
            OWNER,
            [
                ScheduleResult(
                    schedule_id="held",
                    task_id="plain",
                    trigger=held.trigger,
                    last_fire_time=T0,
                    next_fire_time=T0 + timedelta(minutes=5),
                )
            ],
        )
        [released] = await old_store.get_schedules({"held"})
        assert released.acquired_by is None
        assert released.next_fire_time == T0 + timedelta(minutes=5)
        await old_store.cleanup()
        assert len(await old_store.get_jobs()) == 3

    async def test_indexes_brought_up_to_date(
        self, old_store: MongoDBDataStore
    ) -> None:
        wanted = {"_id_"} | {model.document["name"] for model in JOB_INDEXES}
        assert {i["name"] for i in await old_store._jobs.list_indexes()} == wanted
        wanted = {"_id_"} | {model.document["name"] for model in SCHEDULE_INDEXES}
        assert {i["name"] for i in await old_store._schedules.list_indexes()} == wanted
