"""The asynchronous MongoDB data store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from logging import Logger
from typing import Any, TypeVar
from uuid import UUID

import attrs
from apscheduler import (
    ConflictingIdError,
    ConflictPolicy,
    DeserializationError,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobResult,
    RetrySettings,
    Schedule,
    ScheduleAdded,
    ScheduleRemoved,
    ScheduleUpdated,
    SerializationError,
    Task,
    TaskAdded,
    TaskLookupError,
    TaskRemoved,
    TaskUpdated,
)
from apscheduler._structures import ScheduleResult
from apscheduler.abc import EventBroker, Serializer
from apscheduler.datastores.base import BaseExternalDataStore
from apscheduler.serializers.pickle import PickleSerializer
from attrs.validators import instance_of
from bson import ObjectId
from pymongo import ASCENDING, IndexModel, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from ._client import (
    bulk_write,
    check_server,
    close_client,
    create_client,
    describe_hosts,
    is_mongomock,
    redact,
    validate_client_or_uri,
)
from ._jobs import (
    describe_id,
    explain,
    finish_update,
    free_job_filter,
    plan_claims,
    result_for_document,
    scheduled_fire_time,
)
from ._marshalling import (
    ACQUIRED,
    FINISHED,
    QUEUED,
    MalformedDocumentError,
    from_micros,
    get_datetime,
    job_from_document,
    job_to_document,
    now_micros,
    put_datetime,
    result_from_document,
    schedule_from_document,
    schedule_to_document,
    slot_number,
    task_from_document,
    task_to_document,
    uuid_to_bson,
)
from ._names import validate_database_name
from ._retry import is_temporary_failure

T = TypeVar("T")

_DUPLICATE_KEY = 11000
_LIVE_STATES = [QUEUED, ACQUIRED]
#: A job is free to take when it is queued, or acquired with an expired lease
_SORT_QUEUE = [("created_at", ASCENDING), ("_id", ASCENDING)]

_SCHEDULE_INDEXES = [
    IndexModel([("next_fire_time", ASCENDING)], name="next_fire_time"),
    IndexModel([("task_id", ASCENDING)], name="task_id"),
]
_JOB_INDEXES = [
    IndexModel(
        [("state", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)],
        name="queue",
    ),
    IndexModel([("state", ASCENDING), ("acquired_until", ASCENDING)], name="leases"),
    IndexModel([("acquired_by", ASCENDING)], name="acquired_by", sparse=True),
    IndexModel([("task_id", ASCENDING), ("state", ASCENDING)], name="task_state"),
    IndexModel(
        [("schedule_id", ASCENDING), ("state", ASCENDING)], name="schedule_state"
    ),
    IndexModel([("fire_key", ASCENDING)], name="fire_key", unique=True, sparse=True),
    IndexModel([("slot_key", ASCENDING)], name="slot_key", unique=True, sparse=True),
    IndexModel([("purge_at", ASCENDING)], name="purge_at", expireAfterSeconds=0),
]


def _validate_database(instance: object, attribute: object, value: object) -> None:
    validate_database_name(value)


def _validate_client_or_uri(instance: object, attribute: object, value: object) -> None:
    validate_client_or_uri(value)


def _utc(micros: int) -> datetime:
    return from_micros(micros)


@attrs.define(eq=False, repr=False)
class MongoDBDataStore(BaseExternalDataStore):
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
        :meth:`start` raises :exc:`RuntimeError` under Trio.

    .. note:: Times are kept as integer microseconds with their UTC offset, so they
        round-trip exactly; leases are judged by each scheduler's own clock, so keep
        the hosts' clocks synchronized (NTP).
    """

    client_or_uri: Any = attrs.field(validator=_validate_client_or_uri)
    database: str = attrs.field(
        default="apscheduler", kw_only=True, validator=_validate_database
    )
    serializer: Serializer = attrs.field(
        factory=PickleSerializer,
        kw_only=True,
        validator=instance_of(Serializer),  # type: ignore[type-abstract]
    )
    start_from_scratch: bool = attrs.field(
        default=False, kw_only=True, validator=instance_of(bool)
    )
    retry_settings: RetrySettings = attrs.field(
        factory=RetrySettings, kw_only=True, validator=instance_of(RetrySettings)
    )

    _client: Any = attrs.field(init=False, default=None)
    _tasks: Any = attrs.field(init=False, default=None)
    _schedules: Any = attrs.field(init=False, default=None)
    _jobs: Any = attrs.field(init=False, default=None)
    _one_by_one: bool = attrs.field(init=False, default=False)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(hosts={describe_hosts(self.client_or_uri)!r}, "
            f"database={self.database!r})"
        )

    # Plumbing

    def _retry(self) -> AsyncRetrying:
        def log_attempt(retry_state: RetryCallState) -> None:
            assert retry_state.outcome is not None
            self._logger.warning(
                "Temporary MongoDB error (attempt %d): %s",
                retry_state.attempt_number,
                redact(str(retry_state.outcome.exception())),
            )

        return AsyncRetrying(
            stop=self.retry_settings.stop,
            wait=self.retry_settings.wait,
            retry=retry_if_exception(is_temporary_failure),
            after=log_attempt,
            reraise=True,
        )

    async def _run(self, operation: Callable[[int], Awaitable[T]]) -> T:
        """Run ``operation(attempt_number)``, retrying it on temporary failures."""
        async for attempt in self._retry():
            with attempt:
                return await operation(attempt.retry_state.attempt_number)

        raise AssertionError("unreachable")  # pragma: no cover

    async def _bulk_write(self, collection: Any, requests: Sequence[Any]) -> int:
        """Run an unordered bulk write; return how many documents it matched."""
        if not requests:
            return 0

        try:
            result = await bulk_write(collection, requests, one_by_one=self._one_by_one)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != _DUPLICATE_KEY for error in errors):
                raise

            return int(exc.details.get("nMatched", 0))

        return result.matched_count

    async def _publish_all(self, events: Iterable[Any]) -> None:
        for event in events:
            await self._event_broker.publish(event)

    # Life cycle

    async def start(
        self, exit_stack: AsyncExitStack, event_broker: EventBroker, logger: Logger
    ) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"{type(self).__name__} needs asyncio (pymongo's asynchronous API "
                f"runs on asyncio only), not trio or any other event loop; start "
                f"it under anyio's asyncio backend"
            ) from None

        await super().start(exit_stack, event_broker, logger)
        if isinstance(self.client_or_uri, str):
            self._client = create_client(self.client_or_uri)
            exit_stack.push_async_callback(close_client, self._client)
        else:
            self._client = self.client_or_uri

        self._one_by_one = is_mongomock(self._client)
        database = self._client[self.database]
        self._tasks = database["tasks"]
        self._schedules = database["schedules"]
        self._jobs = database["jobs"]

        async def initialize(attempt: int) -> None:
            if not self._one_by_one:  # mongomock-motor does not know "hello"
                await check_server(database)

            if self.start_from_scratch:
                for collection in (self._tasks, self._schedules, self._jobs):
                    await collection.drop()

            try:
                await self._schedules.create_indexes(_SCHEDULE_INDEXES)
                await self._jobs.create_indexes(_JOB_INDEXES)
            except OperationFailure as exc:
                if is_temporary_failure(exc):
                    raise

                raise RuntimeError(
                    f"cannot create the indexes the store needs in database "
                    f"{self.database!r}: {exc} (an index of the same name but "
                    f"different options may already exist)"
                ) from exc

        await self._run(initialize)

    # Tasks

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
        return task_from_document(document, running[task_id])

    async def get_tasks(self) -> list[Task]:
        async def fetch(attempt: int) -> list[Any]:
            cursor = self._tasks.find({}, sort=[("_id", ASCENDING)])
            return list(await cursor.to_list(None))

        documents = await self._run(fetch)
        running = await self._running_jobs([document["_id"] for document in documents])
        tasks = [self._build_task(doc, running[doc["_id"]]) for doc in documents]
        return [task for task in tasks if task is not None]

    def _build_task(self, document: Mapping[str, Any], running: int) -> Task | None:
        try:
            return task_from_document(document, running)
        except MalformedDocumentError as exc:
            self._logger.warning("Cannot read task %r: %s", document["_id"], exc)
            return None

    # Schedules

    def _build_schedule(self, document: Mapping[str, Any]) -> Schedule | None:
        """Build a schedule, or log why it cannot be built and return ``None``."""
        try:
            return schedule_from_document(document, self.serializer)
        except (DeserializationError, MalformedDocumentError) as exc:
            self._logger.warning(
                "Cannot read schedule %r: %s", document.get("_id"), explain(exc)
            )
            return None

    async def get_schedules(self, ids: set[str] | None = None) -> list[Schedule]:
        query = {} if ids is None else {"_id": {"$in": list(ids)}}

        async def fetch(attempt: int) -> list[Any]:
            cursor = self._schedules.find(query, sort=[("_id", ASCENDING)])
            return list(await cursor.to_list(None))

        schedules = [self._build_schedule(doc) for doc in await self._run(fetch)]
        return [schedule for schedule in schedules if schedule is not None]

    async def add_schedule(
        self, schedule: Schedule, conflict_policy: ConflictPolicy
    ) -> None:
        document = schedule_to_document(schedule, self.serializer)
        document["v"] = token = ObjectId()

        async def insert(attempt: int) -> bool | None:
            """Return True if added, False if replaced, None if left alone."""
            if conflict_policy is ConflictPolicy.replace:
                previous = await self._schedules.find_one_and_replace(
                    {"_id": schedule.id}, document, upsert=True
                )
                return previous is None or previous.get("v") == token

            try:
                await self._schedules.insert_one(document)
            except DuplicateKeyError:
                existing = await self._schedules.find_one(
                    {"_id": schedule.id}, {"v": 1}
                )
                if existing is not None and existing.get("v") == token:
                    return True  # our own insert, retried after a lost reply

                if conflict_policy is ConflictPolicy.exception:
                    raise ConflictingIdError(schedule.id) from None  # type: ignore[no-untyped-call]

                return None

            return True

        added = await self._run(insert)
        if added is None:
            return

        event_class = ScheduleAdded if added else ScheduleUpdated
        await self._event_broker.publish(
            event_class(
                schedule_id=schedule.id,
                task_id=schedule.task_id,
                next_fire_time=schedule.next_fire_time,
            )
        )

    async def remove_schedules(self, ids: Iterable[str]) -> None:
        id_list = list(ids)

        async def delete(attempt: int) -> list[Any]:
            cursor = self._schedules.find({"_id": {"$in": id_list}}, {"task_id": 1})
            documents = list(await cursor.to_list(None))
            await self._schedules.delete_many({"_id": {"$in": id_list}})
            return documents

        documents = await self._run(delete)
        await self._publish_all(
            ScheduleRemoved(
                schedule_id=doc["_id"], task_id=doc.get("task_id", ""), finished=False
            )
            for doc in documents
        )

    def _due_schedules_filter(self, scheduler_id: str, now: int) -> dict[str, Any]:
        return {
            # "$ne: None" keeps servers without type bracketing from matching nulls
            "next_fire_time": {"$lte": now, "$ne": None},
            "paused": {"$ne": True},
            "quarantine": {"$exists": False},
            "$or": [
                {"acquired_by": None},
                {"acquired_until": {"$lt": now, "$ne": None}},
                {"acquired_by": scheduler_id},
            ],
        }

    async def _quarantine(
        self, collection: Any, document_id: Any, token: ObjectId | None, reason: str
    ) -> None:
        """Set a document aside so that no scheduler picks it up again."""
        query: dict[str, Any] = {"_id": document_id}
        if token is not None:
            query["v"] = token

        update = {
            "$set": {
                "quarantine": {
                    "reason": reason,
                    "at": datetime.now(timezone.utc),
                },
                "acquired_by": None,
                "acquired_until": None,
                "v": ObjectId(),
            }
        }

        async def write(attempt: int) -> None:
            await collection.update_one(query, update)

        await self._run(write)

    async def acquire_schedules(
        self, scheduler_id: str, lease_duration: timedelta, limit: int
    ) -> list[Schedule]:
        token = ObjectId()

        async def claim(attempt: int) -> list[Any]:
            now = now_micros()
            eligible = self._due_schedules_filter(scheduler_id, now)
            cursor = self._schedules.find(
                eligible, sort=[("next_fire_time", ASCENDING), ("_id", ASCENDING)]
            ).limit(limit)
            documents = list(await cursor.to_list(None))
            if documents:
                unchanged = [
                    {"_id": doc["_id"], "v": doc.get("v")} for doc in documents
                ]
                acquired_until = now + lease_duration // timedelta(microseconds=1)
                result = await self._schedules.update_many(
                    {"$and": [eligible, {"$or": unchanged}]},
                    {
                        "$set": {
                            "acquired_by": scheduler_id,
                            "acquired_until": acquired_until,
                            "v": token,
                        }
                    },
                )
                if result.matched_count == len(documents) and attempt == 1:
                    for doc in documents:
                        doc.update(
                            acquired_by=scheduler_id,
                            acquired_until=acquired_until,
                            v=token,
                        )
                    return documents
            elif attempt == 1:
                return []

            # Lost a race for some of them, or retrying after a lost reply: ask
            cursor = self._schedules.find({"v": token}, sort=[("next_fire_time", 1)])
            return list(await cursor.to_list(None))

        schedules: list[Schedule] = []
        for document in await self._run(claim):
            if (schedule := self._build_schedule(document)) is not None:
                schedules.append(schedule)
            else:
                await self._quarantine(
                    self._schedules,
                    document["_id"],
                    token,
                    "the schedule could not be deserialized",
                )

        return schedules

    async def release_schedules(
        self, scheduler_id: str, results: Sequence[ScheduleResult]
    ) -> None:
        requests: list[UpdateOne] = []
        tokens: dict[str, ObjectId] = {}
        events: dict[str, ScheduleUpdated] = {}
        for result in results:
            tokens[result.schedule_id] = token = ObjectId()
            query = {"_id": result.schedule_id, "acquired_by": scheduler_id}
            changes: dict[str, Any] = {
                "acquired_by": None,
                "acquired_until": None,
                "v": token,
            }
            try:
                changes["trigger"] = self.serializer.serialize(result.trigger)
            except SerializationError as exc:
                self._logger.exception(
                    "Cannot serialize the trigger of schedule %r; setting it aside",
                    result.schedule_id,
                )
                changes["quarantine"] = {
                    "reason": f"the trigger could not be serialized: {exc}",
                    "at": datetime.now(timezone.utc),
                }
            else:
                put_datetime(changes, "last_fire_time", result.last_fire_time)
                put_datetime(changes, "next_fire_time", result.next_fire_time)
                events[result.schedule_id] = ScheduleUpdated(
                    schedule_id=result.schedule_id,
                    task_id=result.task_id,
                    next_fire_time=result.next_fire_time,
                )

            requests.append(UpdateOne(query, {"$set": changes}))

        async def write(attempt: int) -> int:
            return await self._bulk_write(self._schedules, requests)

        if await self._run(write) != len(requests):
            # Some leases were lost (or a retry found its own work done): see which
            async def check(attempt: int) -> list[Any]:
                cursor = self._schedules.find({"_id": {"$in": list(tokens)}}, {"v": 1})
                return list(await cursor.to_list(None))

            applied = {
                doc["_id"]
                for doc in await self._run(check)
                if doc.get("v") == tokens[doc["_id"]]
            }
            for schedule_id in tokens.keys() - applied:
                self._logger.warning(
                    "Not releasing schedule %r: scheduler %r no longer holds its lease",
                    schedule_id,
                    scheduler_id,
                )
                events.pop(schedule_id, None)

        await self._publish_all(events.values())

    async def get_next_schedule_run_time(self) -> datetime | None:
        base = {
            "next_fire_time": {"$ne": None},
            "paused": {"$ne": True},
            "quarantine": {"$exists": False},
        }

        async def fetch(attempt: int) -> tuple[Any, Any]:
            free = await self._schedules.find_one(
                {**base, "acquired_by": None},
                {"next_fire_time": 1, "next_fire_time_offset": 1},
                sort=[("next_fire_time", ASCENDING)],
            )
            # A leased schedule can next be taken when its lease runs out
            leased = await self._schedules.find_one(
                {**base, "acquired_by": {"$ne": None}},
                {"next_fire_time": 1, "acquired_until": 1},
                sort=[("acquired_until", ASCENDING)],
            )
            return free, leased

        free, leased = await self._run(fetch)
        candidates: list[datetime] = []
        if free is not None and (time := get_datetime(free, "next_fire_time")):
            candidates.append(time)

        if leased is not None:
            micros = max(leased["next_fire_time"], leased.get("acquired_until") or 0)
            candidates.append(_utc(micros))

        return min(candidates) if candidates else None

    async def extend_acquired_schedule_leases(
        self, scheduler_id: str, schedule_ids: set[str], duration: timedelta
    ) -> None:
        await self._extend_leases(
            self._schedules, scheduler_id, list(schedule_ids), duration
        )

    async def _extend_leases(
        self, collection: Any, scheduler_id: str, ids: list[Any], duration: timedelta
    ) -> None:
        async def write(attempt: int) -> None:
            until = now_micros() + duration // timedelta(microseconds=1)
            await collection.update_many(
                {"_id": {"$in": ids}, "acquired_by": scheduler_id},
                {"$set": {"acquired_until": until, "v": ObjectId()}},
            )

        await self._run(write)

    # Jobs

    async def add_job(self, job: Job) -> None:
        document = job_to_document(job, self.serializer)
        document["v"] = token = ObjectId()

        async def insert(attempt: int) -> bool:
            try:
                await self._jobs.insert_one(document)
            except DuplicateKeyError as exc:
                existing = await self._jobs.find_one({"_id": document["_id"]}, {"v": 1})
                if existing is not None and existing.get("v") == token:
                    return True  # our own insert, retried after a lost reply

                if "fire_key" in ((exc.details or {}).get("keyPattern") or {}):
                    self._logger.debug(
                        "Not adding job %s: schedule %r already has a job for %s",
                        job.id,
                        job.schedule_id,
                        job.original_scheduled_time,
                    )
                    return False

                raise ConflictingIdError(str(job.id)) from None  # type: ignore[no-untyped-call]

            return True

        if await self._run(insert):
            await self._event_broker.publish(
                JobAdded(
                    job_id=job.id, task_id=job.task_id, schedule_id=job.schedule_id
                )
            )

    def _build_job(self, document: Mapping[str, Any]) -> Job | None:
        try:
            return job_from_document(document, self.serializer)
        except (DeserializationError, MalformedDocumentError) as exc:
            self._logger.warning(
                "Cannot read job %s: %s", describe_id(document.get("_id")), explain(exc)
            )
            return None

    async def get_jobs(self, ids: Iterable[UUID] | None = None) -> list[Job]:
        query: dict[str, Any] = {"state": {"$in": _LIVE_STATES}}
        if ids is not None:
            query["_id"] = {"$in": [uuid_to_bson(job_id) for job_id in ids]}

        async def fetch(attempt: int) -> list[Any]:
            return list(await self._jobs.find(query, sort=_SORT_QUEUE).to_list(None))

        jobs = [self._build_job(document) for document in await self._run(fetch)]
        return [job for job in jobs if job is not None]

    async def acquire_jobs(
        self, scheduler_id: str, lease_duration: timedelta, limit: int | None = None
    ) -> list[Job]:
        token = ObjectId()
        lease_micros = lease_duration // timedelta(microseconds=1)
        jobs: dict[Any, Job] = {}
        finished: dict[Any, JobResult] = {}

        async def claim(attempt: int) -> list[Any]:
            now = now_micros()
            cursor = self._jobs.find(free_job_filter(now), sort=_SORT_QUEUE)
            if limit is not None:
                cursor = cursor.limit(limit)

            documents = list(await cursor.to_list(None))
            if not documents and attempt == 1:
                return []

            task_ids = list({doc.get("task_id") for doc in documents})
            tasks = await self._tasks.find(
                {"_id": {"$in": task_ids}}, {"max_running_jobs": 1}
            ).to_list(None)
            caps = {task["_id"]: task.get("max_running_jobs") for task in tasks}
            held: dict[str, set[int]] = {}
            running: dict[str, int] = {}
            if capped := [task_id for task_id, cap in caps.items() if cap is not None]:
                holders = await self._jobs.find(
                    {"task_id": {"$in": capped}, "state": ACQUIRED},
                    {"task_id": 1, "slot_key": 1},
                ).to_list(None)
                for holder in holders:
                    task_id = holder["task_id"]
                    running[task_id] = running.get(task_id, 0) + 1
                    if "slot_key" in holder:
                        held.setdefault(task_id, set()).add(
                            slot_number(holder["slot_key"])
                        )

            acquired_until = now + lease_micros
            plan = plan_claims(
                documents,
                caps=caps,
                held_slots=held,
                running=running,
                scheduler_id=scheduler_id,
                now=now,
                acquired_until=acquired_until,
                token=token,
                serializer=self.serializer,
                logger=self._logger,
            )
            jobs.update(plan.jobs)
            finished.update(plan.finished)
            matched = await self._bulk_write(self._jobs, plan.requests)
            if matched == len(plan.requests) and attempt == 1:
                planned = plan.jobs.keys() | plan.finished.keys()
                for doc in documents:
                    doc["acquired_until"] = acquired_until
                return [doc for doc in documents if doc["_id"] in planned]

            # Lost a race for some, or retrying after a lost reply: ask what we hold
            cursor = self._jobs.find({"v": token}, sort=_SORT_QUEUE)
            return list(await cursor.to_list(None))

        acquired: list[Job] = []
        events: list[Any] = []
        for document in await self._run(claim):
            if (result := finished.get(document["_id"])) is not None:
                events.append(self._released_event(result, scheduler_id, document))
            elif job := jobs.get(document["_id"]) or self._build_job(document):
                job.acquired_by = scheduler_id
                job.acquired_until = from_micros(document["acquired_until"])
                acquired.append(job)
                events.append(JobAcquired.from_job(job, scheduler_id=scheduler_id))

        await self._publish_all(events)
        return acquired

    @staticmethod
    def _released_event(
        result: JobResult, scheduler_id: str, document: Mapping[str, Any]
    ) -> JobReleased:
        return JobReleased.from_result(
            result,
            scheduler_id,
            document.get("task_id", ""),
            document.get("schedule_id"),
            scheduled_fire_time(document),
        )

    async def release_job(self, scheduler_id: str, job: Job, result: JobResult) -> None:
        token = ObjectId()
        update = finish_update(
            result,
            self.serializer,
            self._logger,
            from_schedule=job.schedule_id is not None
            and job.original_scheduled_time is not None,
            token=token,
        )
        query = {
            "_id": uuid_to_bson(job.id),
            "state": ACQUIRED,
            "acquired_by": scheduler_id,
        }

        async def write(attempt: int) -> bool:
            if (await self._jobs.update_one(query, update)).matched_count:
                return True

            # A retry after a lost reply finds the document already finished by us
            mine = {"_id": query["_id"], "v": token}
            return (
                attempt > 1 and await self._jobs.find_one(mine, {"_id": 1}) is not None
            )

        if not await self._run(write):
            self._logger.warning(
                "Discarding the result of job %s: scheduler %r no longer holds its "
                "lease (another scheduler took it over or released it)",
                job.id,
                scheduler_id,
            )
            return

        await self._event_broker.publish(
            JobReleased.from_result(
                result,
                scheduler_id,
                job.task_id,
                job.schedule_id,
                job.scheduled_fire_time,
            )
        )

    async def get_job_result(self, job_id: UUID) -> JobResult | None:
        document_id = uuid_to_bson(job_id)

        async def fetch(attempt: int) -> Any:
            return await self._jobs.find_one(
                {"_id": document_id, "state": FINISHED, "result": {"$exists": True}},
                {"result": 1, "v": 1, "fire_key": 1},
            )

        document = await self._run(fetch)
        if document is None:
            return None

        result = result_from_document(job_id, document["result"], self.serializer)
        if result.expires_at <= datetime.now(timezone.utc):
            return None

        token = ObjectId()
        changes: dict[str, Any] = {"v": token}
        if "fire_key" not in document:
            changes["purge_at"] = datetime.now(timezone.utc)

        async def take(attempt: int) -> bool:
            # Only one caller gets the result: the write re-checks the version
            query = {"_id": document_id, "v": document["v"]}
            update = {"$set": changes, "$unset": {"result": ""}}
            if (await self._jobs.update_one(query, update)).matched_count:
                return True

            mine = {"_id": document_id, "v": token}
            return (
                attempt > 1 and await self._jobs.find_one(mine, {"_id": 1}) is not None
            )

        return result if await self._run(take) else None

    async def extend_acquired_job_leases(
        self, scheduler_id: str, job_ids: set[UUID], duration: timedelta
    ) -> None:
        ids = [uuid_to_bson(job_id) for job_id in job_ids]
        await self._extend_leases(self._jobs, scheduler_id, ids, duration)

    async def _abandon(
        self, documents: Sequence[Mapping[str, Any]]
    ) -> list[JobReleased]:
        """Finish acquired jobs whose scheduler is gone; return the events to send."""
        now = datetime.now(timezone.utc)
        requests: list[UpdateOne] = []
        results: dict[Any, JobResult] = {}
        tokens: dict[Any, ObjectId] = {}
        for document in documents:
            result = result_for_document(document, JobOutcome.abandoned, now)
            tokens[document["_id"]] = token = ObjectId()
            update = finish_update(
                result,
                self.serializer,
                self._logger,
                from_schedule="fire_key" in document,
                token=token,
            )
            query = {"_id": document["_id"], "v": document.get("v"), "state": ACQUIRED}
            requests.append(UpdateOne(query, update))
            results[document["_id"]] = result

        async def write(attempt: int) -> set[Any]:
            if (
                await self._bulk_write(self._jobs, requests) == len(requests)
                and attempt == 1
            ):
                return set(tokens)

            cursor = self._jobs.find({"_id": {"$in": list(tokens)}}, {"v": 1})
            return {
                doc["_id"]
                for doc in await cursor.to_list(None)
                if doc.get("v") == tokens[doc["_id"]]
            }

        applied = await self._run(write) if requests else set()
        return [
            self._released_event(results[doc["_id"]], doc.get("acquired_by", ""), doc)
            for doc in documents
            if doc["_id"] in applied
        ]

    async def reap_abandoned_jobs(self, scheduler_id: str) -> None:
        async def fetch(attempt: int) -> list[Any]:
            query = {"state": ACQUIRED, "acquired_by": scheduler_id}
            cursor = self._jobs.find(query, {"args": 0, "kwargs": 0}, sort=_SORT_QUEUE)
            return list(await cursor.to_list(None))

        await self._publish_all(await self._abandon(await self._run(fetch)))

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
            cursor = self._jobs.find(query, {"args": 0, "kwargs": 0}, sort=_SORT_QUEUE)
            return list(await cursor.to_list(None))

        events.extend(await self._abandon(await self._run(lapsed)))

        # 3. Remove finished schedules that have no queued or running jobs left
        events.extend(await self._remove_finished_schedules())

        # 4. Forget the fire times that their schedules have moved past
        await self._forget_used_fire_times()
        await self._publish_all(events)

    async def _remove_finished_schedules(self) -> list[ScheduleRemoved]:
        async def remove(attempt: int) -> list[ScheduleRemoved]:
            cursor = self._schedules.find(
                {"next_fire_time": None, "acquired_by": None}, {"task_id": 1, "v": 1}
            )
            finished = {doc["_id"]: doc for doc in await cursor.to_list(None)}
            if not finished:
                return []

            busy = await self._jobs.distinct(
                "schedule_id",
                {
                    "schedule_id": {"$in": list(finished)},
                    "state": {"$in": _LIVE_STATES},
                },
            )
            for schedule_id in busy:
                finished.pop(schedule_id, None)

            if not finished:
                return []

            unchanged = [
                {"_id": doc["_id"], "v": doc.get("v")} for doc in finished.values()
            ]
            result = await self._schedules.delete_many(
                {"next_fire_time": None, "acquired_by": None, "$or": unchanged}
            )
            if result.deleted_count != len(finished):
                left = await self._schedules.distinct(
                    "_id", {"_id": {"$in": list(finished)}}
                )
                for schedule_id in left:
                    finished.pop(schedule_id, None)

            return [
                ScheduleRemoved(
                    schedule_id=doc["_id"],
                    task_id=doc.get("task_id", ""),
                    finished=True,
                )
                for doc in finished.values()
            ]

        return await self._run(remove)

    async def _forget_used_fire_times(self) -> None:
        """
        Delete finished schedule jobs whose fire time their schedule has moved past.

        Such a document is what makes a second job for the same fire time impossible
        (the unique ``fire_key`` index); it may go once its schedule has been released
        with a later next fire time, or is finished or gone, and its result (if any)
        has been fetched or has expired.
        """

        async def forget(attempt: int) -> None:
            cursor = self._jobs.find(
                {
                    "state": FINISHED,
                    "fire_key": {"$exists": True},
                    "result": {"$exists": False},
                },
                {"schedule_id": 1, "fire_time": 1},
            )
            used = list(await cursor.to_list(None))
            if not used:
                return

            schedule_ids = list({doc.get("schedule_id") for doc in used})
            cursor = self._schedules.find(
                {"_id": {"$in": schedule_ids}}, {"next_fire_time": 1}
            )
            next_times = {
                doc["_id"]: doc.get("next_fire_time")
                for doc in await cursor.to_list(None)
            }
            done = [
                doc["_id"]
                for doc in used
                if doc.get("schedule_id") not in next_times
                or next_times[doc.get("schedule_id")] is None
                or next_times[doc.get("schedule_id")] > doc.get("fire_time", 0)
            ]
            if done:
                await self._jobs.delete_many(
                    {
                        "_id": {"$in": done},
                        "state": FINISHED,
                        "result": {"$exists": False},
                    }
                )

        await self._run(forget)
