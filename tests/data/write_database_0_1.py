"""
Write a database with the store of version 0.1.0.dev0 and print it as JSON.

Run it with that version's package first on the path, from a checkout of this
repository (for the test server)::

    git worktree add --detach ../old c5f789e
    PYTHONPATH=../old/src python tests/data/write_database_0_1.py > out.json

tests/data/database-0.1.0.dev0.json is its output, with an "_about" key added.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))  # for tests.servers
from apscheduler import (
    CoalescePolicy,
    ConflictPolicy,
    Job,
    JobOutcome,
    JobResult,
    Schedule,
    Task,
)
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.interval import IntervalTrigger
from bson import json_util
from pymongo import AsyncMongoClient
from tests.support.servers import mongoeco_server

from apscheduler_mongo import MongoDBDataStore

T0 = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
LEASE = timedelta(days=3650)  # leases that do not lapse while the test reads them


async def main(uri):
    logger = logging.getLogger("old")
    client = AsyncMongoClient(uri, tz_aware=True)
    async with AsyncExitStack() as stack:
        broker = LocalEventBroker()
        await broker.start(stack, logger)
        store = MongoDBDataStore(client, database="old_store", start_from_scratch=True)
        await store.start(stack, broker, logger)
        await store.add_task(
            Task(id="plain", func="builtins:len", job_executor="async")
        )
        await store.add_task(
            Task(
                id="capped",
                func="builtins:repr",
                job_executor="threadpool",
                max_running_jobs=2,
                misfire_grace_time=timedelta(seconds=30),
                metadata={"team": "ops"},
            )
        )
        # a due schedule (next fire time in the past), a paused one, one held
        for sid, paused in (("due", False), ("paused", True), ("held", False)):
            trigger = IntervalTrigger(minutes=5, start_time=T0)
            s = Schedule(
                id=sid,
                task_id="plain",
                trigger=trigger,
                job_executor="async",
                args=(1, "a"),
                kwargs={"k": [1, 2]},
                paused=paused,
                coalesce=CoalescePolicy.all,
                misfire_grace_time=timedelta(seconds=10),
                metadata={"kind": sid},
            )
            s.next_fire_time = trigger.next()
            await store.add_schedule(s, ConflictPolicy.exception)
        [held] = [
            s
            for s in await store.acquire_schedules("old-scheduler", LEASE, 10)
            if s.id == "held"
        ] or [None]
        # jobs: a queued plain job, a job for the held schedule's fire time, capped jobs
        queued = Job(
            task_id="plain",
            executor="async",
            args=(3,),
            kwargs={"x": 1},
            result_expiration_time=timedelta(days=3650),
            metadata={"n": 1},
        )
        await store.add_job(queued)
        fire = Job(
            task_id="plain",
            executor="async",
            schedule_id="held",
            scheduled_fire_time=held.next_fire_time,
            result_expiration_time=timedelta(days=3650),
        )
        await store.add_job(fire)
        for n in range(3):
            await store.add_job(Job(task_id="capped", executor="threadpool", args=(n,)))
        acquired = await store.acquire_jobs("old-scheduler", LEASE, 10)
        # finish the schedule job with a result (kept 10 years) and the plain job
        for job in acquired:
            if job.id in (fire.id, queued.id):
                await store.release_job(
                    "old-scheduler",
                    job,
                    JobResult.from_job(
                        job,
                        JobOutcome.success,
                        return_value={"answer": 42},
                        started_at=T0,
                        finished_at=T0 + timedelta(seconds=1),
                    ),
                )
        await store.add_job(Job(task_id="plain", executor="async", args=("later",)))
    out = {}
    db = client["old_store"]
    for name in ("tasks", "schedules", "jobs"):
        out[name] = await db[name].find({}).sort("_id", 1).to_list(None)
        out[name + ".indexes"] = [i async for i in await db[name].list_indexes()]
    await client.drop_database("old_store")
    await client.close()
    text = json_util.dumps(out, json_options=json_util.CANONICAL_JSON_OPTIONS, indent=1)
    sys.stdout.write(text + "\n")


with mongoeco_server() as uri:
    asyncio.run(main(uri))
