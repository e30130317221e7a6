"""
A database whose ``jobs`` collection holds APScheduler 3's jobs is refused at start.

APScheduler 3's ``MongoDBJobStore`` and this store both default to database
``apscheduler`` and to a collection named ``jobs``. The store cannot read the 3.x
documents, so it refuses to start there, before it creates or changes anything.

(A store on a database whose ``jobs`` collection holds its own documents starts as
usual: ``tests/test_handover.py``'s ``TestCleanStop`` starts store after store on
the queued, running and finished jobs of the ones before.)
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import Any

import anyio.to_thread
import pytest
from apscheduler import AsyncScheduler, Job, Task
from apscheduler.abc import EventBroker
from bson import Binary
from pymongo import AsyncMongoClient

from apscheduler_mongo import (
    MongoDBDataStore,
    StoreNotRunningError,
    SyncMongoDBDataStore,
)

from .support.commands import CommandLog
from .support.index_rules import queries_of, served
from .support.tiers import WIRE_ONLY

pytestmark = pytest.mark.anyio

#: Documents shaped as APScheduler 3's MongoDBJobStore writes them: a job due at a
#: time (a float of seconds), and a paused one. The pickles are never read here
V3_JOBS = [
    {
        "_id": "myjob0",
        "next_run_time": 1893456000.0,
        "job_state": Binary(b"\x80\x05\x95 not read by these tests"),
    },
    {
        "_id": "myjob1",
        "next_run_time": None,
        "job_state": Binary(b"\x80\x05\x95 nor this one"),
    },
]


async def snapshot(database: Any) -> tuple[list[str], list[Any], dict[str, Any]]:
    """Return the database's collections, its ``jobs`` and their indexes."""
    names = sorted(await database.list_collection_names())
    jobs = await database["jobs"].find({}, sort=[("_id", 1)]).to_list(None)
    indexes = await database["jobs"].index_information()
    return names, jobs, indexes


async def start(
    client: Any,
    database_name: str,
    broker: EventBroker,
    logger: logging.Logger,
    **options: Any,
) -> None:
    """Start a store on ``client`` and stop it again."""
    async with AsyncExitStack() as exit_stack:
        await broker.start(exit_stack, logger)
        store = MongoDBDataStore(client, database=database_name, **options)
        await store.start(exit_stack, broker, logger)


async def refusal(
    client: Any,
    database_name: str,
    broker: EventBroker,
    logger: logging.Logger,
    **options: Any,
) -> str:
    """Return the message of the error that starting a store on ``client`` raises."""
    async with AsyncExitStack() as exit_stack:
        await broker.start(exit_stack, logger)
        store = MongoDBDataStore(client, database=database_name, **options)
        with pytest.raises(RuntimeError, match="import-v3") as exc_info:
            await store.start(exit_stack, broker, logger)

    return str(exc_info.value)


class TestV3Collision:
    """
    On a database whose ``jobs`` collection holds APScheduler 3's jobs, the store
    refuses to start, says what to do, and leaves the database as it found it.
    """

    @pytest.mark.parametrize(
        "start_from_scratch", [False, True], ids=["kept", "from-scratch"]
    )
    async def test_refused_and_nothing_changed(
        self,
        database: Any,
        client: Any,
        database_name: str,
        local_broker: EventBroker,
        logger: logging.Logger,
        start_from_scratch: bool,
    ) -> None:
        """Refused, with ``start_from_scratch`` too: it would drop the 3.x jobs."""
        await database["jobs"].insert_many([dict(job) for job in V3_JOBS])
        before = await snapshot(database)
        assert before[0] == ["jobs"]

        message = await refusal(
            client,
            database_name,
            local_broker,
            logger,
            start_from_scratch=start_from_scratch,
        )
        assert message.startswith(
            f"collection 'jobs' of database {database_name!r} holds APScheduler 3's "
            f"MongoDBJobStore jobs"
        )
        assert "'apscheduler-mongo import-v3'" in message
        assert "another database" in message
        assert "nothing was changed" in message
        assert await snapshot(database) == before

    async def test_among_the_stores_own_jobs(
        self,
        database: Any,
        client: Any,
        database_name: str,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        """
        3.x jobs that come later, beside the store's own (a 3.x scheduler still
        writing there), are refused at the next start, with the indexes in place.
        """
        async with AsyncExitStack() as exit_stack:
            await local_broker.start(exit_stack, logger)
            store = MongoDBDataStore(client, database=database_name)
            await store.start(exit_stack, local_broker, logger)
            await store.add_task(
                Task(id="task", func="builtins:len", job_executor="async")
            )
            await store.add_job(Job(task_id="task", executor="async"))

        await database["jobs"].insert_one(dict(V3_JOBS[0]))
        before = await snapshot(database)
        await refusal(client, database_name, local_broker, logger)

        assert await snapshot(database) == before

    async def test_refused_by_the_scheduler(
        self, database: Any, client: Any, database_name: str, logger: logging.Logger
    ) -> None:
        """A scheduler starting on it gets the error (in a group, as it starts the
        store in a task group)."""
        await database["jobs"].insert_many([dict(job) for job in V3_JOBS])
        store = MongoDBDataStore(client, database=database_name)
        with pytest.RaisesGroup(
            pytest.RaisesExc(RuntimeError, match="import-v3"), flatten_subgroups=True
        ):
            async with AsyncScheduler(data_store=store, logger=logger):
                pass

    async def test_refused_to_a_sync_user(
        self,
        database: Any,
        client: Any,
        database_name: str,
        tier: str,
        request: pytest.FixtureRequest,
    ) -> None:
        """
        The blocking wrapper's ``start()`` raises the same error (in a group, as
        the store starts beside the wrapper's event broker, in its task group).
        """
        await database["jobs"].insert_many([dict(job) for job in V3_JOBS])
        before = await snapshot(database)
        # The wrapper runs the store in a loop of its own: over the wire, it makes
        # its own client from the URI (a wire client belongs to the test's loop)
        target = client if tier == "mongomock" else request.getfixturevalue("wire_uri")
        sync_store = SyncMongoDBDataStore(target, database=database_name)
        with pytest.RaisesGroup(
            pytest.RaisesExc(RuntimeError, match="import-v3"), flatten_subgroups=True
        ):
            await anyio.to_thread.run_sync(sync_store.start)

        with pytest.raises(StoreNotRunningError):
            sync_store.get_tasks()

        assert await snapshot(database) == before


@WIRE_ONLY
class TestV3CheckCost:
    """The check is one read served by an index, once the store's indexes exist."""

    async def test_served_by_an_index(
        self,
        logged_client: AsyncMongoClient[Any],
        command_log: CommandLog,
        database_name: str,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        await start(logged_client, database_name, local_broker, logger)
        command_log.commands.clear()
        await start(logged_client, database_name, local_broker, logger)

        checks = [
            (name, command)
            for name, command in command_log.commands
            if name == "find" and "job_state" in command.get("filter", {})
        ]
        assert len(checks) == 1, checks
        [(name, command)] = checks
        assert command["projection"] == {"_id": 1}
        assert command.get("limit") == 1
        jobs = logged_client[database_name]["jobs"]
        indexes = await (await jobs.list_indexes()).to_list(None)
        keys = [list(index["key"].items()) for index in indexes]
        [query] = queries_of(name, command)
        assert served(query, keys)
