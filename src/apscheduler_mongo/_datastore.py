"""The asynchronous MongoDB data store."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import attrs
from apscheduler import (
    Task,
    TaskAdded,
    TaskLookupError,
    TaskRemoved,
    TaskUpdated,
)
from pymongo import ASCENDING

from ._core import QUEUE_ORDER
from ._job_ops import JobOperations
from ._jobs import describe_id, explain
from ._marshalling import (
    ACQUIRED,
    FINISHED,
    QUEUED,
    MalformedDocumentError,
    now_micros,
    task_from_document,
    task_to_document,
)
from ._schedule_ops import ScheduleOperations


@attrs.define(eq=False, repr=False)
class MongoDBDataStore(ScheduleOperations, JobOperations):
    """
    Keep APScheduler's tasks, schedules and jobs in MongoDB, shared by many schedulers.

    Schedules and jobs are claimed with conditional writes that re-check, document by
    document, that nobody changed them since they were read, so two schedulers never
    own the same item; see :doc:`design` for the document layout and the lease
    protocol.

    Temporary failures (network errors, timeouts, failovers) are retried as
    ``retry_settings`` says; every other error is raised at once.

    :param client_or_uri: a MongoDB URI (the store then creates its client when it
        starts, in the event loop that starts it, and closes it when it stops), or a
        :class:`pymongo.AsyncMongoClient` or Motor ``AsyncIOMotorClient`` (which the
        store never closes)
    :param database: name of the database to keep the ``tasks``, ``schedules`` and
        ``jobs`` collections in
    :param serializer: the serializer used for triggers, job arguments and results
    :param start_from_scratch: drop the store's collections when starting (useful in
        test suites)
    :param retry_settings: how to retry operations after a temporary failure

    .. note:: The store runs on asyncio only (pymongo's asynchronous API does);
        starting it under Trio raises :exc:`RuntimeError`.

    .. note:: Times are kept as integer microseconds with their UTC offset, so they
        round-trip exactly; leases are judged by each scheduler's own clock, so keep
        the hosts' clocks synchronized (NTP).
    """

    async def add_task(self, task: Task) -> None:
        document = task_to_document(task)

        async def upsert(attempt: int) -> Any:
            return await self._tasks.find_one_and_replace(
                {"_id": task.id}, document, upsert=True
            )

        previous = await self._run(upsert)
        if previous is None:
            await self._event_broker.publish(TaskAdded(task_id=task.id))
        else:
            await self._event_broker.publish(TaskUpdated(task_id=task.id))

    async def remove_task(self, task_id: str) -> None:
        async def delete(attempt: int) -> bool:
            result = await self._tasks.delete_one({"_id": task_id})
            # A retry after a lost reply finds nothing left to delete: that is ours
            return bool(result.deleted_count) or attempt > 1

        if not await self._run(delete):
            raise TaskLookupError(task_id)

        await self._event_broker.publish(TaskRemoved(task_id=task_id))

    async def _running_jobs(self, task_ids: list[str]) -> dict[str, int]:
        """Count the acquired jobs of each task (the truth, never a stored counter)."""

        async def count(attempt: int) -> list[Any]:
            query = {"task_id": {"$in": task_ids}, "state": ACQUIRED}
            cursor = self._jobs.find(query, {"task_id": True, "_id": False})
            return list(await cursor.to_list(None))

        counts: dict[str, int] = dict.fromkeys(task_ids, 0)
        for document in await self._run(count):
            counts[document["task_id"]] = counts.get(document["task_id"], 0) + 1

        return counts

    async def get_task(self, task_id: str) -> Task:
        async def fetch(attempt: int) -> Any:
            return await self._tasks.find_one({"_id": task_id})

        document = await self._run(fetch)
        if document is None:
            raise TaskLookupError(task_id)

        running = await self._running_jobs([task_id])
        try:
            return task_from_document(document, running[task_id])
        except MalformedDocumentError as exc:
            raise MalformedDocumentError(
                f"cannot read task {task_id!r}: {explain(exc)}"
            ) from exc

    async def get_tasks(self) -> list[Task]:
        async def fetch(attempt: int) -> list[Any]:
            cursor = self._tasks.find({}, sort=[("_id", ASCENDING)])
            return list(await cursor.to_list(None))

        documents = await self._run(fetch)
        running = await self._running_jobs(
            [doc["_id"] for doc in documents if isinstance(doc["_id"], str)]
        )
        tasks = [self._build_task(doc, running) for doc in documents]
        return [task for task in tasks if task is not None]

    def _build_task(
        self, document: Mapping[str, Any], running: Mapping[str, int]
    ) -> Task | None:
        task_id = document["_id"]
        try:
            if not isinstance(task_id, str):  # nor hashable, if it is a document
                raise MalformedDocumentError("_id is not a string")

            return task_from_document(document, running[task_id])
        except MalformedDocumentError as exc:
            self._logger.warning("Cannot read task %r: %s", task_id, exc)
            return None

    async def cleanup(self) -> None:
        events: list[Any] = []

        # 1. Purge expired results (the TTL index does the same, but only every
        #    minute or so, and not at all on some test servers)
        async def purge(attempt: int) -> None:
            now = datetime.now(timezone.utc)
            await self._jobs.delete_many(
                {"state": FINISHED, "purge_at": {"$lte": now, "$type": "date"}}
            )
            await self._jobs.update_many(
                {"state": FINISHED, "result.expires_at": {"$lte": now_micros()}},
                {"$unset": {"result": ""}},
            )

        await self._run(purge)

        # 2. Finish the jobs whose leases lapsed (their schedulers are presumed dead)
        async def lapsed(attempt: int) -> list[Any]:
            query = {"state": ACQUIRED, "acquired_until": {"$lt": now_micros()}}
            cursor = self._jobs.find(query, {"args": 0, "kwargs": 0}, sort=QUEUE_ORDER)
            return list(await cursor.to_list(None))

        events.extend(await self._abandon(await self._run(lapsed)))

        # 3. Remove finished schedules that have no queued or running jobs left
        events.extend(await self._remove_finished_schedules())

        # 4. Forget the fire times that their schedules have moved past
        await self._forget_used_fire_times()

        # 5. Name the jobs in no known state: no query of the store ever meets them
        async def strays(attempt: int) -> list[Any]:
            query = {"state": {"$nin": [QUEUED, ACQUIRED, FINISHED]}}
            return list(await self._jobs.find(query, {"state": 1}).to_list(None))

        for document in await self._run(strays):
            self._logger.warning(
                "Leaving job %s alone: its state %r is none the store knows",
                describe_id(document["_id"]),
                document.get("state"),
            )

        await self._publish_all(events)
