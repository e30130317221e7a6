"""The asynchronous MongoDB data store."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from functools import partial
from logging import Logger
from typing import Any, TypeVar
from uuid import UUID

import anyio
import attrs
from anyio.abc import TaskGroup
from apscheduler import (
    ConflictingIdError,
    ConflictPolicy,
    DeserializationError,
    Event,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobResult,
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
from pymongo.errors import DuplicateKeyError
from tenacity import AsyncRetrying

from . import _layout as layout
from ._adapters import Adapter, Collection, Update, abandoned_calls_ended
from ._cleanup import Cleanup
from ._client import (
    describe_hosts,
    explaining_unreachable_servers,
    open_client,
    require_asyncio,
)
from ._clock import ServerClock, Timekeeper, timed_hello
from ._history import Recorder
from ._indexes import ensure_indexes
from ._job_claims import (
    ClaimedTasks,
    JobAlarm,
    JobClaim,
    TaskLimits,
    running_count,
)
from ._layout import ACQUIRED, Document
from ._leases import Choice, Claim, Leases, write_tagged
from ._marshalling import (
    MalformedDocumentError,
    describe_id,
    explain,
    finish_update,
    from_micros,
    get_datetime,
    is_from_schedule,
    job_from_document,
    job_to_document,
    put_datetime,
    quarantine_record,
    released_event,
    released_trigger,
    result_for_document,
    result_from_document,
    schedule_from_document,
    schedule_to_document,
    task_from_document,
    task_to_document,
    text_of,
    uuid_to_bson,
)
from ._metrics import Metrics
from ._names import require_ids
from ._options import ConnectionOptions, SigningOptions
from ._planner import limit_of
from ._registry import Registry
from ._retry import Attempts, retrying
from ._signing import (
    AllowedCallables,
    Codec,
    DisallowedCallableError,
    UnverifiedDataError,
)

#: How long a stopping store tries to give back what it holds (seconds)
HAND_BACK_TIMEOUT = 5.0


def _to_allowed(value: Iterable[str] | None) -> AllowedCallables | None:
    return None if value is None else AllowedCallables.of(value)


def _positive_seconds(
    _instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{attribute.name} must be a number of seconds, not {type(value).__name__}"
        )

    if not 0 < value < float("inf"):
        raise ValueError(
            f"{attribute.name} must be a positive number of seconds, not {value!r}"
        )


def _history_seconds(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if value is None:
        return

    _positive_seconds(instance, attribute, value)
    if isinstance(value, int | float) and value < 1:
        raise ValueError(
            f"{attribute.name} must be at least 1 second (or None), not {value!r}"
        )


_Item = TypeVar("_Item", Schedule, Job)


@attrs.define(eq=False, repr=False)
class MongoDBDataStore(ConnectionOptions, SigningOptions, BaseExternalDataStore):
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
    :param signing_key: a key (``bytes`` or ``str``, at least 16 bytes), or a
        sequence of keys of which the first signs and all verify: everything stored
        that a scheduler would deserialize or import is signed with it, and nothing
        that fails the check is deserialized or imported (see :doc:`security`)
    :param accept_unsigned: while rolling signing out, also accept documents that
        carry no signature at all (a wrong signature is never accepted)
    :param allowed_callables: ``"module:qualname"`` or ``"module:*"`` patterns: a
        task whose callable falls outside is never handed to a scheduler (its jobs
        finish with an error, its schedules are quarantined), checked before
        anything is imported
    :param heartbeat_interval: seconds between the writes that keep this store's
        record among the live schedulers fresh (see :ref:`live-schedulers`)
    :param history_interval: seconds (at least 1) between the writes of the job
        history that the dashboard charts: what this store counted in memory per
        minute (jobs released by outcome, how late they started, the queue depth
        sampled once a minute), at most one small upsert per minute per write, and
        none when nothing is new. ``None`` records no history. A clean stop writes
        what is pending; a crash loses what was counted since the last write (see
        :ref:`job-history`)
    :param meter_provider: the OpenTelemetry ``MeterProvider`` the store counts
        with (default: the global one, which counts nothing until the application
        configures an SDK; see :doc:`operations`)

    .. note:: The store runs on asyncio only (pymongo's asynchronous API does);
        starting it under Trio raises :exc:`RuntimeError`.

    .. note:: Times are kept as integer microseconds with their UTC offset, so they
        round-trip exactly. Leases, due times and expiry are judged by the server's
        clock, which the store estimates from its replies, not by this host's (see
        :doc:`design`).
    """

    serializer: Serializer = attrs.field(
        factory=PickleSerializer,
        kw_only=True,
        validator=instance_of(Serializer),  # type: ignore[type-abstract]
    )
    start_from_scratch: bool = attrs.field(
        default=False, kw_only=True, validator=instance_of(bool)
    )
    allowed_callables: AllowedCallables | None = attrs.field(
        default=None, kw_only=True, converter=_to_allowed
    )
    heartbeat_interval: float = attrs.field(
        default=10.0, kw_only=True, validator=_positive_seconds
    )
    history_interval: float | None = attrs.field(
        default=5.0, kw_only=True, validator=_history_seconds
    )
    meter_provider: Any = attrs.field(default=None, kw_only=True)

    _adapter: Adapter = attrs.field(init=False)
    _tasks: Collection = attrs.field(init=False)
    _schedules: Collection = attrs.field(init=False)
    _jobs: Collection = attrs.field(init=False)
    _leases: Leases = attrs.field(init=False)
    #: Claims never delivered, kept across restarts of this store (see ``Leases``)
    _unconfirmed_claims: set[Claim] = attrs.field(init=False, factory=set)
    _claimed_tasks: ClaimedTasks = attrs.field(init=False, factory=ClaimedTasks)
    #: Which tasks are capped, and their free slots, as far as this store knows
    _limits: TaskLimits = attrs.field(init=False, factory=TaskLimits)
    #: The schedulers that claimed jobs through this store
    _claimants: set[str] = attrs.field(init=False, factory=set)
    #: The server's clock, which judges leases, due times and expiry
    _clock: ServerClock = attrs.field(init=False, factory=ServerClock)
    _timekeeper: Timekeeper = attrs.field(init=False)
    _task_group: TaskGroup = attrs.field(init=False)
    _alarm: JobAlarm = attrs.field(init=False)
    _registry: Registry = attrs.field(init=False)
    #: The job history this store records, unless ``history_interval`` is None
    _history: Recorder | None = attrs.field(init=False, default=None)
    #: Whether the store has started and not stopped
    _running: bool = attrs.field(init=False, default=False)
    _metrics: Metrics = attrs.field(init=False)

    @property
    def _codec(self) -> Codec:
        """How this store writes and reads: serializer, signer, allowed callables."""
        return Codec(
            self.serializer,
            self.signing_key,
            self.accept_unsigned,
            self.allowed_callables,
            self.database,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(hosts={describe_hosts(self.client_or_uri)!r}, "
            f"database={self.database!r})"
        )

    def _live_adapter(self) -> Adapter | None:
        """Return the store's client (adapted) while it runs, else ``None``."""
        return self._adapter if self._running else None

    def _retry(self) -> AsyncRetrying:
        """Return the loop that retries this store's temporary failures."""
        return retrying(
            self.retry_settings,
            self._logger,
            on_failure=self._timekeeper.soon,
            metrics=self._metrics,
        )

    def _attempts(self, *, shielded: bool = False) -> Attempts:
        """Return the attempts of :meth:`_retry`'s loop (each tells if it retries;
        ``shielded``: each runs to its end, even if its caller is cancelled)."""
        return Attempts(self._retry(), self._metrics.recovered, shielded=shielded)

    async def start(
        self, exit_stack: AsyncExitStack, event_broker: EventBroker, logger: Logger
    ) -> None:
        require_asyncio(self)
        await super().start(exit_stack, event_broker, logger)
        self._metrics = Metrics(self.meter_provider)
        self._adapter = adapter = await open_client(
            self.client_or_uri, exit_stack, logger
        )
        self._tasks = adapter.collection(self.database, layout.TASKS)
        self._schedules = adapter.collection(self.database, layout.SCHEDULES)
        self._jobs = adapter.collection(self.database, layout.JOBS)
        self._timekeeper = Timekeeper(
            adapter,
            self.database,
            self._clock,
            logger,
            on_measured=self._metrics.clock_offset,
        )
        self._leases = Leases(
            self._schedules,
            self._jobs,
            self._attempts,
            logger,
            self._clock,
            self._metrics,
            unconfirmed=self._unconfirmed_claims,
        )
        self._registry = Registry(
            adapter.collection(self.database, layout.SCHEDULERS),
            self._clock,
            self._leases,
            self._claimants,
            logger,
            self.heartbeat_interval,
        )
        with explaining_unreachable_servers(adapter):
            async for attempt in self._attempts():
                with attempt:
                    await timed_hello(adapter, self.database, self._clock)
                    await self._refuse_foreign_store(adapter)
                    await self._refuse_v3_jobs()
                    await self._refuse_signed_store_without_key()
                    if self.start_from_scratch:
                        for collection in (self._tasks, self._schedules, self._jobs):
                            await collection.drop()

                        await self._history_collection().drop()

                    await ensure_indexes(
                        self._schedules,
                        layout.SCHEDULE_INDEXES,
                        layout.RETIRED_SCHEDULE_INDEXES,
                    )
                    await ensure_indexes(
                        self._jobs, layout.JOB_INDEXES, layout.RETIRED_JOB_INDEXES
                    )
                    await ensure_indexes(
                        self._registry.collection, layout.SCHEDULER_INDEXES
                    )
                    await ensure_indexes(
                        self._history_collection(), layout.HISTORY_INDEXES
                    )
                    await self._registry.beat()

        self._clock.warn_if_off(logger)
        self._timekeeper.measured()
        self._warn_if_unsigned_accepted(logger, "The data store")
        self._task_group = await exit_stack.enter_async_context(
            anyio.create_task_group()
        )
        exit_stack.callback(self._task_group.cancel_scope.cancel)
        self._task_group.start_soon(self._timekeeper.run)
        self._task_group.start_soon(self._registry.run)
        if self.history_interval is not None:
            self._history = Recorder(
                self._history_collection(),
                self._jobs,
                self._clock,
                self._attempts,
                logger,
                self.history_interval,
            )
            self._task_group.start_soon(self._history.run)
            exit_stack.push_async_callback(self._history.close)
        announce = getattr(event_broker, "publish_local", event_broker.publish)
        self._alarm = JobAlarm(self._clock, announce)
        self._task_group.start_soon(self._alarm.run)
        exit_stack.enter_context(
            event_broker.subscribe(self._released_elsewhere, {JobReleased})
        )
        exit_stack.push_async_callback(self._hand_back)
        self._running = True
        exit_stack.callback(setattr, self, "_running", False)

    async def _hand_back(self) -> None:
        """
        As the store stops, give back what it holds (see ``Leases.hand_back``) and
        announce it, so that the schedulers still running take it over at once;
        then delete its record among the live schedulers.

        Shielded from the cancellation that may be stopping the scheduler, and
        bounded by :data:`HAND_BACK_TIMEOUT`: with the server out of reach, the
        leases lapse as after a crash.
        """
        with anyio.CancelScope(shield=True), anyio.move_on_after(HAND_BACK_TIMEOUT):
            try:
                # A claim cut off on Python 3.10 and 3.11 may still be under way
                # (see ``insulated``): what it takes must be there to give back
                await abandoned_calls_ended()
                jobs, schedules = await self._leases.hand_back()
                if jobs or schedules:
                    self._logger.info(
                        "Stopping: gave back %d job(s) never started and %d "
                        "schedule(s)",
                        len(jobs),
                        len(schedules),
                    )

                events: list[Event] = [
                    JobAdded(
                        job_id=job.id, task_id=job.task_id, schedule_id=job.schedule_id
                    )
                    for job in jobs
                ]
                events += _schedules_let_go(schedules)

                await self._publish_all(events)
            except Exception as exc:
                self._logger.warning(
                    "Could not give back what this store holds (%s): it is taken "
                    "over when its leases lapse",
                    explain(exc),
                )

            # Last: once its record is gone, the store holds nothing
            try:
                async for attempt in self._attempts():
                    with attempt:
                        await self._registry.deregister()
            except Exception as exc:
                self._logger.warning(
                    "Could not remove this scheduler's record (%s): it shows as "
                    "gone quiet until the record expires",
                    explain(exc),
                )

    def _released_elsewhere(self, event: Event) -> None:
        """Note that another scheduler released a job: its task may have a slot."""
        if isinstance(event, JobReleased) and event.scheduler_id not in self._claimants:
            self._limits.released(event.task_id)

    async def _refuse_foreign_store(self, adapter: Adapter) -> None:
        """
        Refuse a database that APScheduler's built-in MongoDB store uses.

        Its documents look like ours to the server but not to this store, which
        would skip them all as unreadable (and its schedulers would meet ours).

        :raises RuntimeError: if the database holds the built-in store's
            ``job_results`` collection
        """
        names = await adapter.collection_names(self.database)
        if layout.BUILTIN_MARKER in names:
            raise RuntimeError(
                f"database {self.database!r} holds the collections of APScheduler's "
                f"built-in MongoDB store ({layout.BUILTIN_MARKER!r} among them), "
                f"whose documents this store cannot read; use a new database (see "
                f"the migration guide), or drop those collections"
            )

    async def _refuse_v3_jobs(self) -> None:
        """
        Refuse a database whose ``jobs`` collection holds APScheduler 3's jobs.

        APScheduler 3's ``MongoDBJobStore`` keeps them, by default, in database
        ``apscheduler``, collection ``jobs``: this store's defaults. This store
        cannot read them (it would leave each alone, as in no state it knows, and
        run none). Refused with ``start_from_scratch`` too: that drops the
        ``jobs`` collection, and the 3.x jobs with it, which nobody asked for;
        refusing loses nothing. One read of at most one ``_id``, served by an
        index once the store's exist (see :data:`._layout.V3_JOBS`).

        :raises RuntimeError: if the ``jobs`` collection holds a 3.x job
        """
        if await self._jobs.find_one(layout.V3_JOBS, layout.ID_ONLY) is not None:
            raise RuntimeError(
                f"collection {layout.JOBS!r} of database {self.database!r} holds "
                f"APScheduler 3's MongoDBJobStore jobs (3.x uses the same default "
                f"database and collection names), which this store cannot read; "
                f"nothing was changed. Import them into a store on another database "
                f"with 'apscheduler-mongo import-v3' (see its --help), or use "
                f"another database for this store"
            )

    async def _refuse_signed_store_without_key(self) -> None:
        """
        Refuse to start without a key on a database whose tasks are signed.

        Such a store would read what others signed without checking it, and write
        back unsigned what they will refuse (quarantining schedules that a change
        from the command line only meant to pause). One read, of the first
        task by id (served by the ``_id`` index): the tasks of a signed store all
        carry signatures, once ``sign`` has run.

        :raises RuntimeError: if no key is set and a task carries a signature
        """
        if self.signing_key is not None or self.start_from_scratch:
            return

        first = await self._tasks.find_one({}, layout.TASK_SIGNATURE, sort=layout.BY_ID)
        if first is not None and layout.is_signed(first, "task"):
            raise RuntimeError(
                f"the tasks in database {self.database!r} are signed, and this store "
                f"has no signing key: give it the key the schedulers use (the "
                f"signing_key option, or APSCHEDULER_MONGO_SIGNING_KEY for the "
                f"command line; see the security guide)"
            )

    async def _publish_all(self, events: Iterable[Event]) -> None:
        for event in events:
            await self._event_broker.publish(event)

    # Tasks

    async def add_task(self, task: Task) -> None:
        self._claimed_tasks.forget(task.id)
        self._limits.learn(task.id, limit_of(task.max_running_jobs))
        document = task_to_document(task, self._codec)
        async for attempt in self._attempts():
            with attempt:
                previous = await self._tasks.find_one_and_replace(
                    layout.by_id(task.id), document
                )

        if previous is None:
            await self._event_broker.publish(TaskAdded(task_id=task.id))
        else:
            await self._event_broker.publish(TaskUpdated(task_id=task.id))

    async def remove_task(self, task_id: str) -> None:
        [task_id] = require_ids([task_id], "task_id")
        self._claimed_tasks.forget(task_id)
        self._limits.forget(task_id)
        async for attempt in self._attempts():
            with attempt:
                result = await self._tasks.delete_one(layout.by_id(task_id))
                # A retry after a lost reply finds nothing left to delete: ours
                deleted = bool(result.deleted_count) or attempt.retry

        if not deleted:
            raise TaskLookupError(task_id)

        await self._event_broker.publish(TaskRemoved(task_id=task_id))

    async def _running_jobs(self, task_ids: list[str]) -> dict[str, int]:
        """Count the acquired jobs of each task (the truth, never a stored counter)."""
        async for attempt in self._attempts():
            with attempt:
                holders = await self._jobs.find(
                    layout.jobs_of(task_ids, ACQUIRED), layout.RUNNING_TASK_IDS
                )

        counts: dict[str, int] = dict.fromkeys(task_ids, 0)
        for holder in holders:
            counts[holder["task_id"]] = counts.get(holder["task_id"], 0) + 1

        return counts

    async def get_task(self, task_id: str) -> Task:
        """
        Return a task, with the number of its jobs running now.

        For a task this store read within the last second (a claim that just handed
        out its job, which the scheduler asks for before running it, or
        ``get_task``, which it calls for each job it adds), the answer comes from
        what it read, without a round trip (see ``_job_claims.ClaimedTasks``);
        otherwise the task and the count of its running jobs are read in one.
        """
        [task_id] = require_ids([task_id], "task_id")
        if (task := self._claimed_tasks.recall(task_id, self._codec)) is not None:
            return task

        async for attempt in self._attempts():
            with attempt:
                documents, summaries = await self._tasks.aggregate_with(
                    layout.task_pipeline(task_id),
                    (self._jobs, layout.running_jobs_of(task_id)),
                )

        if not documents:
            raise TaskLookupError(task_id)

        running = running_count(summaries)
        try:
            task = task_from_document(documents[0], running, self._codec)
        except (
            MalformedDocumentError,
            UnverifiedDataError,
            DisallowedCallableError,
        ) as exc:
            raise type(exc)(f"cannot read task {task_id!r}: {explain(exc)}") from exc

        self._claimed_tasks.read(documents[0], running)
        return task

    async def get_tasks(self) -> list[Task]:
        async for attempt in self._attempts():
            with attempt:
                documents = await self._tasks.find({}, sort=layout.BY_ID)

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

            return task_from_document(document, running[task_id], self._codec)
        except (
            MalformedDocumentError,
            UnverifiedDataError,
            DisallowedCallableError,
        ) as exc:
            self._logger.warning("Cannot read task %r: %s", task_id, exc)
            return None

    # Schedules

    async def get_schedules(self, ids: set[str] | None = None) -> list[Schedule]:
        query = {} if ids is None else layout.by_ids(require_ids(ids, "ids"))
        async for attempt in self._attempts():
            with attempt:
                documents = await self._schedules.find(query, sort=layout.BY_ID)

        return self._read_each("schedule", schedule_from_document, documents)

    def _read(
        self,
        kind: str,
        build: Callable[[Mapping[str, Any], Codec], _Item],
        document: Mapping[str, Any],
    ) -> _Item | None:
        """Build a schedule or job, or log why it cannot and return ``None``."""
        return self._read_or_explain(kind, build, document)[0]

    def _read_or_explain(
        self,
        kind: str,
        build: Callable[[Mapping[str, Any], Codec], _Item],
        document: Mapping[str, Any],
    ) -> tuple[_Item | None, str]:
        """Build a schedule or job; or log, and return, why it cannot."""
        try:
            return build(document, self._codec), ""
        except (DeserializationError, MalformedDocumentError) as exc:
            reason = explain(exc)
            self._logger.warning(
                "Cannot read %s %s: %s", kind, describe_id(document.get("_id")), reason
            )
            return None, reason

    def _read_each(
        self,
        kind: str,
        build: Callable[[Mapping[str, Any], Codec], _Item],
        documents: Iterable[Mapping[str, Any]],
    ) -> list[_Item]:
        """Build what can be built of ``documents``, logging each that cannot."""
        items = (self._read(kind, build, document) for document in documents)
        return [item for item in items if item is not None]

    async def add_schedule(
        self, schedule: Schedule, conflict_policy: ConflictPolicy
    ) -> None:
        document = schedule_to_document(schedule, self._codec)
        document.update((tag := layout.Tag(layout.INSERT_TOKEN)).fields())
        async for attempt in self._attempts():
            with attempt:
                added = await self._insert_schedule(document, tag, conflict_policy)

        if added is not None:
            event_class = ScheduleAdded if added else ScheduleUpdated
            await self._event_broker.publish(
                event_class(
                    schedule_id=schedule.id,
                    task_id=schedule.task_id,
                    next_fire_time=schedule.next_fire_time,
                )
            )

    async def _insert_schedule(
        self, document: Document, tag: layout.Tag, conflict_policy: ConflictPolicy
    ) -> bool | None:
        """Return True if added, False if replaced, None if left alone."""
        query = layout.by_id(document["_id"])
        if conflict_policy is ConflictPolicy.replace:
            previous = await self._schedules.find_one_and_replace(query, document)
            return previous is None or tag.on(previous)

        try:
            await self._schedules.insert_one(document)
        except DuplicateKeyError:
            existing = await self._schedules.find_one(query, tag.projection())
            if tag.on(existing):
                return True  # our own insert, retried after a lost reply

            if conflict_policy is ConflictPolicy.exception:
                raise ConflictingIdError(document["_id"]) from None  # type: ignore[no-untyped-call]

            return None

        return True

    async def remove_schedules(self, ids: Iterable[str]) -> None:
        query = layout.by_ids(require_ids(ids, "ids"))
        async for attempt in self._attempts():
            with attempt:
                removed = await self._schedules.find(query, layout.TASK_ID_ONLY)
                await self._schedules.delete_many(query)

        await self._publish_all(
            ScheduleRemoved(
                schedule_id=doc["_id"],
                task_id=text_of(doc, "task_id") or "",
                finished=False,
            )
            for doc in removed
        )

    async def _claim(
        self,
        collection: Collection,
        token: ObjectId,
        order: Sequence[tuple[str, int]],
        choose: Choice,
    ) -> list[Document]:
        """Claim what ``choose`` picks, retrying temporary failures (see Leases)."""
        async for attempt in self._attempts():
            with attempt:
                documents = await self._leases.claim(
                    collection, token, attempt.retry, order, choose
                )

        return documents

    async def acquire_schedules(
        self, scheduler_id: str, lease_duration: timedelta, limit: int
    ) -> list[Schedule]:
        token = layout.new_token()
        #: Who held each schedule read (another scheduler, if its lease lapsed)
        owners: dict[Any, object] = {}

        async def choose() -> list[tuple[Document | None, Update]]:
            now, until = self._leases.term(lease_duration)
            eligible = layout.due_schedules(scheduler_id, now)
            due = await self._schedules.find(
                eligible, sort=layout.DUE_ORDER, limit=limit
            )
            owners.update((doc["_id"], doc.get("acquired_by")) for doc in due)
            claimed = layout.lease(scheduler_id, until, token)
            return [
                (
                    {**doc, **claimed},
                    Update({**layout.unchanged(doc), **eligible}, {"$set": claimed}),
                )
                for doc in due
            ]

        async with self._leases.claiming(jobs=False, owner=scheduler_id, token=token):
            documents = await self._claim(
                self._schedules, token, layout.DUE_ORDER, choose
            )

            self._metrics.taken_over(
                "schedule",
                sum(
                    owners.get(doc["_id"]) not in (None, scheduler_id)
                    for doc in documents
                ),
            )
            refused = await self._refused_tasks(documents)
            schedules: list[Schedule] = []
            for document in documents:
                task_id = document.get("task_id")
                schedule, reason = None, refused.get(str(task_id), "")
                if not reason:
                    schedule, reason = self._read_or_explain(
                        "schedule", schedule_from_document, document
                    )

                if schedule is not None:
                    schedules.append(schedule)
                    until = document["acquired_until"]
                    self._leases.hold(schedule.id, scheduler_id, until)
                else:
                    await self._quarantine(document["_id"], token, reason)

        return schedules

    async def _refused_tasks(self, schedules: Sequence[Document]) -> dict[str, str]:
        """
        Return why the tasks of claimed schedules are refused, by task id.

        Only with ``allowed_callables`` set (a round trip per claim that took
        schedules): a schedule of a task this store will not hand out is
        quarantined rather than left to make jobs that fail. A missing task is not
        refused here: its jobs fail as APScheduler's stores do.
        """
        task_ids = {
            key for doc in schedules if isinstance(key := doc.get("task_id"), str)
        }
        if self.allowed_callables is None or not task_ids:
            return {}

        query = layout.by_ids(sorted(task_ids))
        async for attempt in self._attempts():
            with attempt:
                tasks = await self._tasks.find(query)

        reasons = {task["_id"]: self._refusal(task) for task in tasks}
        return {task_id: reason for task_id, reason in reasons.items() if reason}

    def _refusal(self, task: Document) -> str:
        """Return why this store refuses a task, or ``""`` if it does not."""
        try:
            task_from_document(task, 0, self._codec)
        except (UnverifiedDataError, DisallowedCallableError) as exc:
            return f"its task is refused: {explain(exc)}"
        except MalformedDocumentError:
            pass  # its jobs stay queued, as the claim of jobs says

        return ""

    async def _quarantine(
        self, schedule_id: object, token: object, reason: str
    ) -> None:
        """Quarantine a schedule, so that no scheduler picks it up again."""
        query = layout.quarantined_schedule(schedule_id, token)
        record = quarantine_record(reason, self._clock.now_datetime())
        update = layout.quarantine_update(record)
        async for attempt in self._attempts():
            with attempt:
                await self._schedules.update_one(query, update)

    async def release_schedules(
        self, scheduler_id: str, results: Sequence[ScheduleResult]
    ) -> None:
        updates: list[Update] = []
        tags: dict[str, layout.Tag] = {}
        events: dict[str, ScheduleUpdated] = {}
        for result in results:
            self._leases.let_go(result.schedule_id)
            tags[result.schedule_id] = tag = layout.Tag(layout.RELEASE_TOKEN)
            changes = self._released_schedule(result, tag)
            if layout.QUARANTINE not in changes:
                events[result.schedule_id] = ScheduleUpdated(
                    schedule_id=result.schedule_id,
                    task_id=result.task_id,
                    next_fire_time=result.next_fire_time,
                )

            query = layout.released_schedule(scheduler_id, result.schedule_id)
            updates.append(Update(query, {"$set": changes}))

        released = await write_tagged(self._schedules, updates, tags, self._attempts)
        if len(released) != len(updates):
            for schedule_id in set(tags) - released:
                self._logger.warning(
                    "Not releasing schedule %r: scheduler %r no longer holds its lease",
                    schedule_id,
                    scheduler_id,
                )
                events.pop(schedule_id, None)

        await self._publish_all(events.values())

    def _released_schedule(self, result: ScheduleResult, tag: layout.Tag) -> Document:
        """Return the fields of a schedule as its release leaves it."""
        changes: Document = {**layout.NO_LEASE, **tag.fields()}
        try:
            trigger = released_trigger(result.schedule_id, result.trigger, self._codec)
        except SerializationError as exc:
            self._logger.exception(
                "Cannot serialize the trigger of schedule %r; quarantining it",
                result.schedule_id,
            )
            reason = f"the trigger could not be serialized: {exc}"
            now = self._clock.now_datetime()
            changes[layout.QUARANTINE] = quarantine_record(reason, now)
        else:
            changes.update(trigger)
            put_datetime(changes, "last_fire_time", result.last_fire_time)
            put_datetime(changes, "next_fire_time", result.next_fire_time)

        return changes

    async def get_next_schedule_run_time(self) -> datetime | None:
        # A free schedule can be taken at its next fire time, a leased one when its
        # lease runs out (or earlier, when its owner releases it: an event says so)
        free = await self._earliest(layout.WAITING_FREE, "next_fire_time")
        held = await self._earliest(layout.WAITING_HELD, "acquired_until")
        candidates = [time for time in (free, held) if time is not None]
        # Both are the server's times; the scheduler waits by this host's clock
        return self._clock.on_host_clock(min(candidates)) if candidates else None

    async def _earliest(self, query: Document, field: str) -> datetime | None:
        """
        Return the time in ``field`` of the first schedule by that field.

        A held schedule can be taken at its lease's end, but not before its next
        fire time. A schedule whose time is not an integer (edited by hand, say) is
        quarantined and the next one is tried, so that bad data cannot stop the
        scheduler.
        """
        projection = {"next_fire_time": 1, "next_fire_time_offset": 1, field: 1}
        while True:
            async for attempt in self._attempts():
                with attempt:
                    document = await self._schedules.find_one(
                        query, projection, sort=[(field, 1)]
                    )

            if document is None:
                return None

            try:
                return _time_to_take(document, field)
            except (MalformedDocumentError, TypeError, OverflowError) as exc:
                self._logger.warning(
                    "Quarantining schedule %r: %s", document["_id"], exc
                )
                await self._quarantine(document["_id"], None, f"malformed: {exc}")

    async def extend_acquired_schedule_leases(
        self, scheduler_id: str, schedule_ids: set[str], duration: timedelta
    ) -> None:
        await self._leases.extend(
            self._schedules, scheduler_id, list(schedule_ids), duration
        )

    # Jobs

    async def add_job(self, job: Job) -> None:
        document = job_to_document(job, self._codec)
        document.update((tag := layout.Tag(layout.INSERT_TOKEN)).fields())
        async for attempt in self._attempts():
            with attempt:
                added = await self._insert_job(job, document, tag)

        if added:
            self._metrics.added(job.task_id)
            event = JobAdded(
                job_id=job.id, task_id=job.task_id, schedule_id=job.schedule_id
            )
            await self._event_broker.publish(event)

    async def _insert_job(self, job: Job, document: Document, tag: layout.Tag) -> bool:
        if (
            "fire_time" in document
            and not self._leases.holds(job.schedule_id)
            and not await self._fire_time_current(
                job.schedule_id, document["fire_time"]
            )
        ):
            self._logger.warning(
                "Not adding job %s: schedule %r has moved past %s "
                "(its lease probably passed to another scheduler)",
                job.id,
                job.schedule_id,
                job.original_scheduled_time,
            )
            return False

        try:
            await self._jobs.insert_one(document)
        except DuplicateKeyError as exc:
            existing = await self._jobs.find_one(
                layout.by_id(document["_id"]), tag.projection()
            )
            if tag.on(existing):
                return True  # our own insert, retried after a lost reply

            if layout.duplicated_key(exc) == "fire_key":
                self._logger.debug(
                    "Not adding job %s: schedule %r already has a job for %s",
                    job.id,
                    job.schedule_id,
                    job.original_scheduled_time,
                )
                return False

            raise ConflictingIdError(str(job.id)) from None  # type: ignore[no-untyped-call]

        return True

    async def _fire_time_current(self, schedule_id: object, fire_time: int) -> bool:
        """
        Tell whether a job for ``fire_time`` may still be added to the schedule.

        Whoever processes a schedule adds jobs for its stored next fire time and
        later ones; a scheduler that lost its lease while stalled, and comes back
        after the schedule moved on, must not add a job for a fire time that has
        been dealt with (its record may already have been forgotten). While this
        store holds the schedule's lease, nobody else can have processed it, and
        the read (a round trip per job) is skipped.
        """
        schedule = await self._schedules.find_one(
            layout.by_id(schedule_id), layout.NEXT_FIRE_TIME_ONLY
        )
        if schedule is None:
            return True  # if it was just removed, the fire time record still holds

        next_fire_time = schedule.get("next_fire_time")
        return isinstance(next_fire_time, int) and next_fire_time <= fire_time

    async def get_jobs(self, ids: Iterable[UUID] | None = None) -> list[Job]:
        bson_ids = None if ids is None else [uuid_to_bson(job_id) for job_id in ids]
        async for attempt in self._attempts():
            with attempt:
                documents = await self._jobs.find(
                    layout.live_jobs(bson_ids), sort=layout.QUEUE_ORDER
                )

        return self._read_each("job", job_from_document, documents)

    def _build_job(self, document: Mapping[str, Any]) -> Job | None:
        return self._read("job", job_from_document, document)

    async def read_job(self, job_id: UUID) -> Job | None:
        """
        Return a job, in any state, with its arguments, as the store reads jobs.

        Its signature is checked before its arguments are deserialized, with the
        store's serializer. A finished job keeps its arguments only if it did not
        succeed (so that it can be retried), until its record goes.

        :return: the job, or ``None`` if there is no such job, it has no arguments
            stored, or it cannot be read (logged as a warning, saying why)
        """
        async for attempt in self._attempts():
            with attempt:
                document = await self._jobs.find_one(layout.by_id(uuid_to_bson(job_id)))

        return None if document is None else self._build_job(document)

    async def cancel_job(self, scheduler_id: str, job_id: UUID) -> bool:
        """
        Finish a queued job with the outcome ``cancelled``, so that it never runs.

        One conditional write, whose filter re-checks that the job is still queued:
        a job that a scheduler claimed meanwhile is not cancelled (it runs), and a
        claim that comes after the write finds the job finished. Either way the job
        runs once or never. The job keeps its arguments (it can be retried), its
        fire-time record if a schedule created it (no second job for that fire
        time), and no slot (a queued job holds none); ``JobReleased`` announces it,
        with ``scheduler_id`` as the scheduler that released it.

        :return: ``True`` if this call cancelled the job, ``False`` if it is not
            queued (anymore), or does not exist
        """
        document_id = uuid_to_bson(job_id)
        query = layout.queued_job(document_id)
        async for attempt in self._attempts():
            with attempt:
                document = await self._jobs.find_one(query, layout.WITHOUT_ARGUMENTS)

        if document is None:
            return False

        now = self._clock.now_datetime()
        try:
            result = result_for_document(document, JobOutcome.cancelled, now)
        except MalformedDocumentError:  # pragma: no cover (the id matched a UUID)
            return False

        tag = layout.Tag(layout.RELEASE_TOKEN)
        update = finish_update(
            result,
            self._codec,
            self._logger,
            from_schedule=is_from_schedule(document),
            tag=tag,
        )
        written = await write_tagged(
            self._jobs,
            [Update(query, update)],
            {document_id: tag},
            self._attempts,
            # A job gone after a lost reply may have run and been purged since:
            # never say "cancelled" unless the token shows it
            gone_counts=False,
        )
        if not written:
            return False

        event = released_event(result, scheduler_id, document)
        self._released(event.task_id, result.outcome.name, None, None)
        await self._event_broker.publish(event)
        return True

    async def acquire_jobs(
        self, scheduler_id: str, lease_duration: timedelta, limit: int | None = None
    ) -> list[Job]:
        self._claimants.add(scheduler_id)
        token = layout.new_token()
        claim = JobClaim(
            self._jobs,
            self._tasks,
            self._limits,
            limit,
            lambda: self._leases.term(lease_duration),
            scheduler_id,
            token,
            self._codec,
            self._logger,
        )
        async with self._leases.claiming(jobs=True, owner=scheduler_id, token=token):
            documents = await self._claim(
                self._jobs, token, layout.QUEUE_ORDER, claim.choose
            )

            acquired, events = self._handed_out(scheduler_id, documents, claim)
            self._leases.handed_out(scheduler_id, acquired)
            self._metrics.acquired([job.task_id for job in acquired])
            if claim.read is not None:
                taken_over = len(acquired) - claim.read.taken(acquired).total()
                self._metrics.taken_over("job", taken_over)
                self._limits.settle(claim.read, acquired)
                self._claimed_tasks.remember(claim.read, acquired)
                if (waiting := claim.read.next_waiting) is not None:
                    self._alarm.set(waiting)

            await self._publish_all(events)

        return acquired

    def _handed_out(
        self, scheduler_id: str, documents: Sequence[Document], claim: JobClaim
    ) -> tuple[list[Job], list[Event]]:
        """Return the jobs a claim holds and the events to announce it with."""
        acquired: list[Job] = []
        events: list[Event] = []
        for document in documents:
            if (result := claim.finished.get(document["_id"])) is not None:
                # Finished by the claim (start deadline passed, refused task)
                event = released_event(result, scheduler_id, document)
                self._released(event.task_id, result.outcome.name, None, None)
                events.append(event)
            elif job := claim.jobs.get(document["_id"]) or self._build_job(document):
                job = self._on_host_clock(job)
                job.acquired_by = scheduler_id
                job.acquired_until = from_micros(document["acquired_until"])
                acquired.append(job)
                events.append(JobAcquired.from_job(job, scheduler_id=scheduler_id))

        return acquired, events

    def _on_host_clock(self, job: Job) -> Job:
        """
        Return the job with its start deadline on this host's clock.

        The scheduler checks the deadline by this host's clock, just before it runs
        the job; given in that clock, it is judged as if by the server's.
        """
        if job.start_deadline is None:
            return job

        deadline = self._clock.on_host_clock(job.start_deadline)
        if deadline == job.start_deadline:
            return job

        return attrs.evolve(job, start_deadline=deadline)

    async def release_job(self, scheduler_id: str, job: Job, result: JobResult) -> None:
        self._claimed_tasks.forget(job.task_id)
        self._leases.released(job.id)
        tag = layout.Tag(layout.RELEASE_TOKEN)
        from_schedule = (
            job.schedule_id is not None and job.original_scheduled_time is not None
        )
        update = finish_update(
            result,
            self._codec,
            self._logger,
            from_schedule=from_schedule,
            tag=tag,
        )
        query = layout.acquired_job(scheduler_id, uuid_to_bson(job.id))
        # APScheduler releases a job that ran from a task that a stop cancels: cut
        # off, its result would be lost and its lease left to lapse, holding its
        # task's slot. So each attempt of the release runs to its end; the waits
        # between attempts do not (a stop during an outage ends the retries: the
        # lease lapses, as after a crash), and neither does the announcement
        written = bool(
            await write_tagged(
                self._jobs,
                [Update(query, update)],
                {query["_id"]: tag},
                partial(self._attempts, shielded=True),
                gone_counts=True,
            )
        )
        # Once the slot is free in the database: a claim begun before this
        # reads the job as running, and counts this release as a slot freed
        self._limits.released(job.task_id)
        if not written:
            self._logger.warning(
                "Discarding the result of job %s: scheduler %r no longer holds "
                "its lease (another scheduler took it over or released it)",
                job.id,
                scheduler_id,
            )
            return

        self._released(
            job.task_id,
            result.outcome.name,
            _seconds_between(result.started_at, result.finished_at),
            _seconds_between(job.scheduled_fire_time, result.started_at),
        )
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
        async for attempt in self._attempts():
            with attempt:
                document = await self._jobs.find_one(
                    layout.stored_result(document_id), layout.RESULT_FIELDS
                )

        if document is None:
            return None

        result = self._read_result(job_id, document)
        if result.expires_at <= self._clock.now_datetime():
            return None

        tag = layout.Tag(layout.TAKE_TOKEN)
        purge_at = None if is_from_schedule(document) else self._clock.now_datetime()
        # Only one caller gets the result: the write re-checks the version
        query = layout.unchanged(document)
        update = layout.taken_result(tag.fields(), purge_at)
        taken = await write_tagged(
            self._jobs,
            [Update(query, update)],
            {document_id: tag},
            self._attempts,
            gone_counts=True,
        )
        return result if taken else None

    def _read_result(self, job_id: UUID, document: Document) -> JobResult:
        try:
            return result_from_document(job_id, document, self._codec)
        except (DeserializationError, MalformedDocumentError) as exc:
            # The result stays stored: APScheduler's stores raise here too
            raise type(exc)(
                f"cannot read the result of job {job_id}: {explain(exc)}"
            ) from exc

    async def extend_acquired_job_leases(
        self, scheduler_id: str, job_ids: set[UUID], duration: timedelta
    ) -> None:
        ids = [uuid_to_bson(job_id) for job_id in job_ids]
        await self._leases.extend(self._jobs, scheduler_id, ids, duration)

    async def reap_abandoned_jobs(self, scheduler_id: str) -> None:
        self._claimed_tasks.forget()
        self._limits.unsure()
        await self._leases.give_back()  # those never reached the scheduler
        async for attempt in self._attempts():
            with attempt:
                documents = await self._jobs.find(
                    layout.acquired_jobs(scheduler_id),
                    layout.WITHOUT_ARGUMENTS,
                    sort=layout.QUEUE_ORDER,
                )

        await self._publish_reaped(await self._cleanup().abandon(documents))

    async def cleanup(self) -> None:
        self._claimed_tasks.forget()
        self._limits.unsure()
        await self._publish_reaped(await self._cleanup().run())

    async def _publish_reaped(self, events: Sequence[Event]) -> None:
        """Count the jobs that cleanup finished as abandoned; announce all it did."""
        reaped = [
            event.task_id
            for event in events
            if isinstance(event, JobReleased) and event.outcome is JobOutcome.abandoned
        ]
        self._metrics.reaped(reaped)
        if self._history is not None:
            self._history.reaped(len(reaped))

        await self._publish_all(events)

    def _released(
        self,
        task_id: str,
        outcome: str,
        run_time: float | None,
        lateness: float | None,
    ) -> None:
        """Count a job this store released (or finished for its scheduler), in
        memory: in the metrics and in the job history."""
        self._metrics.released(task_id, outcome, run_time, lateness)
        if self._history is not None:
            self._history.released(outcome, lateness)

    def _history_collection(self) -> Collection:
        return self._adapter.collection(self.database, layout.HISTORY)

    def _cleanup(self) -> Cleanup:
        return Cleanup(
            self._schedules,
            self._jobs,
            self._codec,
            self._attempts,
            self._logger,
            self._clock,
        )


def _time_to_take(document: Mapping[str, Any], field: str) -> datetime:
    """Return when a schedule can be taken, from its ``field`` (microseconds)."""
    micros = document.get(field)
    if not isinstance(micros, int) or isinstance(micros, bool):
        raise MalformedDocumentError(f"{field} is not an integer")

    if field == "next_fire_time":
        time = get_datetime(document, field)
        assert time is not None
        return time

    return from_micros(max(micros, document["next_fire_time"]))


def _schedules_let_go(documents: Sequence[Document]) -> list[Event]:
    """Return the events that announce schedules given back (nothing decoded)."""
    events: list[Event] = []
    for document in documents:
        try:
            next_fire_time = get_datetime(document, "next_fire_time")
        except MalformedDocumentError:
            continue  # the scheduler that takes it says what is wrong

        events.append(
            ScheduleUpdated(
                schedule_id=str(document["_id"]),
                task_id=text_of(document, "task_id") or "",
                next_fire_time=next_fire_time,
            )
        )

    return events


def _seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    """Return the seconds from ``start`` to ``end``, or ``None`` if one is unknown."""
    if start is None or end is None:
        return None

    return (end - start).total_seconds()
