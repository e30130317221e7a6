"""The store's foundation: its options, client, retries and shared helpers."""

from __future__ import annotations

from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from logging import Logger
from typing import Any, TypeVar

import attrs
from apscheduler import (
    DeserializationError,
    Job,
    JobReleased,
    JobResult,
    RetrySettings,
    Schedule,
)
from apscheduler.abc import EventBroker, Serializer
from apscheduler.datastores.base import BaseExternalDataStore
from apscheduler.serializers.pickle import PickleSerializer
from attrs.validators import instance_of
from bson import ObjectId
from pymongo import ASCENDING, IndexModel
from pymongo.errors import BulkWriteError

from ._client import (
    bulk_write,
    check_server,
    client_or_uri_validator,
    describe_hosts,
    durable_collection,
    explaining_unreachable_servers,
    is_mongomock,
    open_client,
    require_asyncio,
)
from ._indexes import ensure_indexes
from ._jobs import (
    describe_id,
    explain,
    scheduled_fire_time,
)
from ._marshalling import (
    ACQUIRED,
    QUEUED,
    MalformedDocumentError,
    job_from_document,
    now_micros,
    quarantine_record,
    schedule_from_document,
)
from ._names import database_validator
from ._retry import DUPLICATE_KEY, call_retrying

T = TypeVar("T")

LIVE_STATES = [QUEUED, ACQUIRED]
#: The order in which jobs are handed out
QUEUE_ORDER = [("created_at", ASCENDING), ("_id", ASCENDING)]

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


@attrs.define(eq=False, repr=False)
class StoreCore(BaseExternalDataStore):
    """Options, life cycle and plumbing shared by the store's operations."""

    client_or_uri: Any = attrs.field(validator=client_or_uri_validator)
    database: str = attrs.field(
        default="apscheduler", kw_only=True, validator=database_validator
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
    #: Lease expiry (our clock, microseconds) of the schedules this store acquired
    #: and has not released yet
    _leases: dict[str, int] = attrs.field(init=False, factory=dict)
    #: Claims whose outcome never reached the scheduler: (collection, owner, token)
    _unconfirmed: set[tuple[str, str, ObjectId]] = attrs.field(init=False, factory=set)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(hosts={describe_hosts(self.client_or_uri)!r}, "
            f"database={self.database!r})"
        )

    @asynccontextmanager
    async def _claiming(
        self, collection: str, scheduler_id: str, token: ObjectId
    ) -> AsyncIterator[None]:
        """
        Remember a claim that failed, so that what it took can be given back.

        A claim that fails or is cancelled after its write may have been applied (a
        lost reply, then the retries ran out) took items the scheduler never saw.
        The next claim or reaping of this store returns them to the queue, instead
        of leaving them leased until the lease lapses (and a job then reported
        abandoned, though it never ran).
        """
        await self._return_unconfirmed()
        try:
            yield
        except BaseException:
            self._unconfirmed.add((collection, scheduler_id, token))
            raise

    async def _return_unconfirmed(self) -> None:
        """Give back what earlier claims took if their outcome was never delivered."""
        if not self._unconfirmed:
            return

        claims = list(self._unconfirmed)
        released = {"acquired_by": None, "acquired_until": None}

        async def give_back(attempt: int) -> int:
            returned = 0
            for collection, scheduler_id, token in claims:
                query: dict[str, Any] = {"v": token, "acquired_by": scheduler_id}
                if collection == "jobs":
                    query["state"] = ACQUIRED
                    result = await self._jobs.update_many(
                        query,
                        {
                            "$set": {"state": QUEUED, "v": ObjectId(), **released},
                            "$unset": {"slot_key": ""},
                        },
                    )
                else:
                    result = await self._schedules.update_many(
                        query, {"$set": {"v": ObjectId(), **released}}
                    )
                returned += result.modified_count

            return returned

        returned = await self._run(give_back)
        self._unconfirmed.difference_update(claims)

        if returned:
            self._logger.warning(
                "Returned %d claimed item(s) whose claim never reached the scheduler",
                returned,
            )

    async def _run(self, operation: Callable[[int], Awaitable[T]]) -> T:
        """Run ``operation(attempt_number)``, retrying it on temporary failures."""
        return await call_retrying(self.retry_settings, self._logger, operation)

    async def _bulk_write(self, collection: Any, requests: Sequence[Any]) -> int:
        """Run an unordered bulk write; return how many documents it matched."""
        if not requests:
            return 0

        try:
            result = await bulk_write(collection, requests, one_by_one=self._one_by_one)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != DUPLICATE_KEY for error in errors):
                raise

            if exc.details.get("writeConcernErrors"):
                raise  # applied, maybe not durably: a retry settles it (or fails)

            return int(exc.details.get("nMatched", 0))

        return result.matched_count

    async def _publish_all(self, events: Iterable[Any]) -> None:
        for event in events:
            await self._event_broker.publish(event)

    async def start(
        self, exit_stack: AsyncExitStack, event_broker: EventBroker, logger: Logger
    ) -> None:
        require_asyncio(self)

        await super().start(exit_stack, event_broker, logger)
        self._client = await open_client(self.client_or_uri, exit_stack, logger)

        self._one_by_one = is_mongomock(self._client)
        database = self._client[self.database]
        self._tasks = durable_collection(database, "tasks")
        self._schedules = durable_collection(database, "schedules")
        self._jobs = durable_collection(database, "jobs")

        async def initialize(attempt: int) -> None:
            if not self._one_by_one:  # mongomock-motor does not know "hello"
                await check_server(database)

            if self.start_from_scratch:
                for collection in (self._tasks, self._schedules, self._jobs):
                    await collection.drop()

            await ensure_indexes(self._schedules, _SCHEDULE_INDEXES)
            await ensure_indexes(self._jobs, _JOB_INDEXES)

        with explaining_unreachable_servers(self._client):
            await self._run(initialize)

    async def _quarantine(
        self, schedule_id: Any, token: ObjectId | None, reason: str
    ) -> None:
        """Set a schedule aside so that no scheduler picks it up again."""
        query: dict[str, Any] = {"_id": schedule_id}
        if token is not None:
            query["v"] = token

        update = {
            "$set": {
                "quarantine": quarantine_record(reason),
                "acquired_by": None,
                "acquired_until": None,
                "v": ObjectId(),
            }
        }

        async def write(attempt: int) -> None:
            await self._schedules.update_one(query, update)

        await self._run(write)

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

    def _build_schedule(self, document: Mapping[str, Any]) -> Schedule | None:
        """Build a schedule, or log why it cannot be built and return ``None``."""
        try:
            return schedule_from_document(document, self.serializer)
        except (DeserializationError, MalformedDocumentError) as exc:
            self._logger.warning(
                "Cannot read schedule %r: %s", document.get("_id"), explain(exc)
            )
            return None

    def _build_job(self, document: Mapping[str, Any]) -> Job | None:
        try:
            return job_from_document(document, self.serializer)
        except (DeserializationError, MalformedDocumentError) as exc:
            self._logger.warning(
                "Cannot read job %s: %s", describe_id(document.get("_id")), explain(exc)
            )
            return None

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
