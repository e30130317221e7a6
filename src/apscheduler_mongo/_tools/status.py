"""What ``apscheduler-mongo status`` reports: gathering it, and printing it.

Everything shown is read from the documents as stored and rendered by
:mod:`.._viewing`: nothing stored is deserialized, imported or called, so looking at
a store runs no code from it (the database is untrusted input).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from logging import Logger
from typing import Any
from uuid import UUID

import attrs
from apscheduler import RetrySettings

from .. import _layout as layout
from .._adapters import Adapter, Collection
from .._clock import ServerClock, timed_hello
from .._layout import ACQUIRED, FINISHED, QUEUED, Document
from .._marshalling import (
    TRACEBACK_CUT,
    MalformedDocumentError,
    describe_id,
    get_datetime,
    uuid_to_bson,
)
from .._registry import MAX_SCHEDULER_IDS, quiet_after
from .._retry import retrying
from .._viewing import (
    UNREADABLE,
    describe,
    describe_arguments,
    describe_error,
    shorten,
    shown,
    stored_text,
    unreadable,
)


class NotFoundError(LookupError):
    """Raised when a command names a schedule or a store that it cannot act on."""


@attrs.define
class Reader:
    """Read the store's documents directly (never writing), retrying like the store."""

    adapter: Adapter
    database_name: str
    retry_settings: RetrySettings
    logger: Logger

    def _collection(self, name: str) -> Collection:
        return self.adapter.collection(self.database_name, name)

    async def collection_names(self) -> list[str]:
        async for attempt in retrying(self.retry_settings, self.logger):
            with attempt:
                names = await self.adapter.collection_names(self.database_name)

        return names

    async def find(
        self,
        collection: str,
        query: Mapping[str, Any],
        projection: Mapping[str, Any],
        *,
        sort: Sequence[tuple[str, int]] | None = None,
        limit: int = 0,
    ) -> list[Document]:
        async for attempt in retrying(self.retry_settings, self.logger):
            with attempt:
                documents = await self._collection(collection).find(
                    query, projection, sort=sort, limit=limit
                )

        return documents

    async def aggregate(
        self, collection: str, pipeline: Sequence[Mapping[str, Any]]
    ) -> list[Document]:
        async for attempt in retrying(self.retry_settings, self.logger):
            with attempt:
                documents = await self._collection(collection).aggregate(pipeline)

        return documents

    async def server_clock(self) -> ServerClock:
        """Return the server's clock, estimated from one round trip."""
        clock = ServerClock()
        async for attempt in retrying(self.retry_settings, self.logger):
            with attempt:
                await timed_hello(self.adapter, self.database_name, clock)

        return clock

    async def estimated_count(self, collection: str) -> int:
        async for attempt in retrying(self.retry_settings, self.logger):
            with attempt:
                count = await self._collection(collection).estimated_document_count()

        return count

    async def count(self, collection: str, query: Mapping[str, Any]) -> int:
        async for attempt in retrying(self.retry_settings, self.logger):
            with attempt:
                count = await self._collection(collection).count_documents(query)

        return count


@attrs.frozen
class TaskRow:
    id: str
    func: str | None
    executor: str | None
    #: An integer, or the stored value shown as text when it is none
    max_running_jobs: int | str | None
    running_jobs: int


@attrs.frozen
class ScheduleRow:
    id: str
    task_id: str | None
    #: ``False`` when its stored trigger or arguments cannot be decoded for showing
    readable: bool
    next_fire_time: datetime | None = None
    #: ``None`` when the stored value is no boolean (see ``paused_note``)
    paused: bool | None = None
    acquired_by: str | None = None
    acquired_until: datetime | None = None
    #: Why the schedule is quarantined, if it is
    quarantine: str | None = None
    #: The positional and keyword arguments, as text (shortened)
    arguments: str | None = None
    #: The trigger, as text (shortened)
    trigger: str | None = None
    #: What ``paused`` holds when it is no boolean, and how schedulers take it
    paused_note: str | None = None


@attrs.frozen
class RunningJobRow:
    id: str
    task_id: str | None
    schedule_id: str | None
    acquired_by: str | None
    acquired_until: datetime | None


@attrs.frozen
class ResultRow:
    job_id: str
    task_id: str | None
    schedule_id: str | None
    #: ``None`` when no result is stored (never kept, fetched, or expired)
    outcome: str | None
    finished_at: datetime | None
    expires_at: datetime | None
    #: The error the job raised, as text, if a result with one is stored
    error: str | None = None


@attrs.frozen
class SchedulerRow:
    """A live scheduler's record (see :mod:`.._registry`), its fields checked."""

    #: The record's id (one per start of a store)
    id: str
    #: The ids of the schedulers that claimed through its store
    schedulers: list[str]
    host: str | None
    pid: int | None
    started: datetime | None
    heartbeat: datetime | None
    #: Seconds between its heartbeats
    interval: float | None
    #: How far the server's clock was ahead of its host's (seconds), if known
    clock_offset: float | None
    schedules_held: int | None
    jobs_held: int | None
    #: When the last lease it holds lapses (by the server's clock)
    leases_until: datetime | None
    #: Its Python, APScheduler, apscheduler-mongo and pymongo versions, as text
    software: str | None
    #: Its heartbeat is over :data:`~.._registry.QUIET_AFTER` intervals old (or
    #: unreadable): it may be gone
    quiet: bool


#: How long a shown trigger, argument list or error may be
REPR_LIMIT = 400
#: At most this many live schedulers are listed
SCHEDULERS_SHOWN = 200
#: The longest heartbeat interval and the largest clock offset a record may state
#: (seconds): beyond them, it is shown as unknown
MAX_INTERVAL = 86_400.0
MAX_OFFSET = 86_400.0 * 365

#: The fields read of each kind of document (never the ``metadata``)
TASK_FIELDS = dict.fromkeys(["func", "job_executor", "max_running_jobs"], 1)
SCHEDULE_FIELDS = dict.fromkeys(
    [
        "task_id",
        "trigger",
        "args",
        "kwargs",
        "paused",
        "next_fire_time",
        "next_fire_time_offset",
        "acquired_by",
        "acquired_until",
        "acquired_until_offset",
        layout.QUARANTINE,
    ],
    1,
)
RUNNING_JOB_FIELDS = dict.fromkeys(
    ["task_id", "schedule_id", "acquired_by", "acquired_until"], 1
)
RESULT_FIELDS = dict.fromkeys(
    [
        "task_id",
        "schedule_id",
        "finished_time",
        layout.QUARANTINE,
        "result.outcome",
        "result.exception",
        "result.finished_at",
        "result.finished_at_offset",
        "result.expires_at",
        "result.expires_at_offset",
    ],
    1,
)


SCHEDULER_FIELDS = dict.fromkeys(
    [
        "schedulers",
        "host",
        "pid",
        "started",
        "heartbeat",
        "interval",
        "clock_offset",
        "schedules_held",
        "jobs_held",
        "leases_until",
        "software",
    ],
    1,
)


@attrs.frozen
class Page:
    """Which schedules to show: those after a schedule id, so many at most."""

    #: Show the schedules whose (string) ids sort after this one
    after: str | None = None
    #: At most this many (``None``: all); running jobs are capped alike
    size: int | None = None
    #: Only the schedules of this task
    task_id: str | None = None
    #: Only the schedules whose ids start with this
    prefix: str | None = None


@attrs.frozen
class StoreStatus:
    """A snapshot of one store, taken with several reads (not atomically)."""

    database: str
    hosts: list[str]
    #: When, by the server's clock (as estimated from one round trip)
    taken_at: datetime
    #: How far the server's clock is ahead of this host's (seconds), if known
    host_offset: float | None
    tasks: list[TaskRow]
    schedules: list[ScheduleRow]
    queued_jobs: dict[str, int]
    running_jobs: list[RunningJobRow]
    finished_jobs: int
    results: list[ResultRow]
    #: How many schedules there are in all (an estimate from the server's metadata
    #: when only a page is shown)
    schedule_count: int = 0
    #: The id to show the next page after, if there are more schedules
    next_page: str | None = None
    #: How many jobs are running in all (more than shown when capped)
    running_count: int = 0
    #: The live schedulers, and those gone quiet whose records have not expired
    schedulers: list[SchedulerRow] = attrs.Factory(list)


def time_field(document: Mapping[str, Any], key: str) -> datetime | None:
    """Return a stored time, or ``None`` if it is missing or bad."""
    try:
        return get_datetime(document, key)
    except MalformedDocumentError:
        return None


def job_id_text(value: object) -> str:
    """Return a job's id as users know it (its UUID), whatever is stored there."""
    # describe_id shows what is no UUID (a binary of the wrong length, say) as is
    return describe_id(value)


def _task_key(value: object) -> str:
    """Return the key that a task's jobs are counted under: its id, as text."""
    return stored_text(value) or "-"


def quarantine_reason(document: Mapping[str, Any]) -> str | None:
    """
    Return why a document is quarantined, or ``None`` if it is not.

    As the scheduler's queries have it (:data:`~.._layout.ACTIVE`), a document that
    has a ``quarantine`` field is quarantined, whatever the field holds.
    """
    if layout.QUARANTINE not in document:
        return None

    record = document[layout.QUARANTINE]
    reason = record.get("reason") if isinstance(record, Mapping) else None
    return stored_text(reason, REPR_LIMIT) or "no reason recorded"


def _paused(document: Mapping[str, Any]) -> tuple[bool | None, str | None]:
    """
    Return whether a schedule is paused and, if its ``paused`` is no boolean, what
    it holds: the scheduler's queries (``paused: {$ne: true}``) then take the
    schedule as not paused, and so it is not shown as paused.
    """
    value = document.get("paused", False)
    if isinstance(value, bool):
        return value, None

    return None, (
        f"wrong type {type(value).__name__!r}: {shown(value, 40)}, taken as not paused"
    )


def schedule_row(document: Mapping[str, Any]) -> ScheduleRow:
    """Describe a schedule from its stored fields, running nothing stored."""
    trigger = describe(document.get("trigger"), REPR_LIMIT)
    arguments = describe_arguments(
        document.get("args"), document.get("kwargs"), REPR_LIMIT
    )
    paused, note = _paused(document)
    return ScheduleRow(
        id=stored_text(document.get("_id")) or "-",
        task_id=stored_text(document.get("task_id")),
        readable=not (unreadable(trigger) or unreadable(arguments)),
        next_fire_time=time_field(document, "next_fire_time"),
        paused=paused,
        acquired_by=stored_text(document.get("acquired_by")),
        acquired_until=time_field(document, "acquired_until"),
        quarantine=quarantine_reason(document),
        arguments=arguments,
        trigger=trigger,
        paused_note=note,
    )


def _task_row(document: Mapping[str, Any], running: Mapping[str, int]) -> TaskRow:
    cap = document.get("max_running_jobs")
    if cap is not None and _whole(cap) is None:
        cap = shown(cap, 40)

    return TaskRow(
        id=_task_key(document.get("_id")),
        func=stored_text(document.get("func")),
        executor=stored_text(document.get("job_executor")),
        max_running_jobs=cap,
        running_jobs=running.get(_task_key(document.get("_id")), 0),
    )


def _result_row(document: Mapping[str, Any]) -> ResultRow:
    result = document.get("result")
    outcome = finished_at = expires_at = error = None
    if isinstance(result, Mapping):
        outcome = stored_text(result.get("outcome"))
        finished_at = time_field(result, "finished_at")
        expires_at = time_field(result, "expires_at")
        if result.get("exception") is not None:
            error = describe_error(result["exception"], REPR_LIMIT)

    if (reason := quarantine_reason(document)) is not None:
        outcome = f"quarantined: {reason}"

    return ResultRow(
        job_id=job_id_text(document.get("_id")),
        task_id=stored_text(document.get("task_id")),
        schedule_id=stored_text(document.get("schedule_id")),
        outcome=outcome,
        finished_at=finished_at or time_field(document, "finished_time"),
        expires_at=expires_at,
        error=error,
    )


async def require_store(reader: Reader) -> None:
    """
    Check that the reader's database holds a store, without creating anything.

    :raises NotFoundError: if it has neither a ``schedules`` nor a ``jobs``
        collection (a mistyped database name, say)
    """
    names = set(await reader.collection_names())
    if not names & {layout.SCHEDULES, layout.JOBS}:
        raise NotFoundError(
            f"database {reader.database_name!r} holds no store (it has no "
            f"'schedules' or 'jobs' collection); is --database right?"
        )


async def gather_status(
    reader: Reader, limit: int, *, page: Page = Page()
) -> StoreStatus:
    """
    Read what the status command (and the dashboard) shows.

    Everything is read as stored, with projections that leave out what is not
    shown, and rendered without deserializing anything (see :mod:`.._viewing`).
    Every query is served by an index, and the number of commands does not grow
    with the number of documents.

    :param limit: how many of the newest finished jobs to show
    :param page: which schedules to show (and how many running jobs at most)
    :raises NotFoundError: if the database holds no store
    """
    await require_store(reader)
    queued, running_per_task = await job_counts(reader)
    tasks = [
        _task_row(document, running_per_task)
        for document in await reader.find(
            layout.TASKS, {}, TASK_FIELDS, sort=layout.BY_ID
        )
    ]
    schedules, next_page, schedule_count = await _schedule_page(reader, page)
    running = await _running_jobs(reader, page.size)
    running_count = len(running)
    if page.size is not None and running_count >= page.size:
        running_count = await reader.count(layout.JOBS, layout.in_state(ACQUIRED))

    results = await _recent_results(reader, limit)
    clock = await reader.server_clock()
    schedulers = await live_schedulers(reader, clock.now_datetime())
    return StoreStatus(
        database=reader.database_name,
        hosts=reader.adapter.hosts(),
        taken_at=clock.now_datetime(),
        host_offset=clock.measured_offset(),
        tasks=tasks,
        schedules=schedules,
        queued_jobs=queued,
        running_jobs=running,
        finished_jobs=await reader.count(layout.JOBS, layout.in_state(FINISHED)),
        results=results,
        schedule_count=schedule_count,
        next_page=next_page,
        running_count=running_count,
        schedulers=schedulers,
    )


def _number(value: object, limit: float) -> float | None:
    """Return a stored number if it is one, and within ``limit`` of zero."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None

    return float(value) if math.isfinite(value) and abs(value) <= limit else None


def _whole(value: object) -> int | None:
    """Return a stored integer if it is one (a boolean is not)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _software(value: object) -> str | None:
    if not isinstance(value, Mapping):
        return None

    return ", ".join(
        f"{stored_text(name, 40)} {stored_text(version, 40)}"
        for name, version in list(value.items())[:8]
    )


def _scheduler_row(document: Mapping[str, Any], now: datetime) -> SchedulerRow:
    """Describe a scheduler's record from its stored fields, checking each."""
    ids = document.get("schedulers")
    interval = _number(document.get("interval"), MAX_INTERVAL)
    if interval is not None and interval <= 0:
        interval = None
    heartbeat = time_field(document, "heartbeat")
    quiet = (
        interval is None or heartbeat is None or now - heartbeat > quiet_after(interval)
    )
    return SchedulerRow(
        id=stored_text(document.get("_id")) or "-",
        schedulers=[
            stored_text(scheduler_id, 200) or "-"
            for scheduler_id in (ids if isinstance(ids, list) else [])[
                :MAX_SCHEDULER_IDS
            ]
        ],
        host=stored_text(document.get("host"), 200),
        pid=_whole(document.get("pid")),
        started=time_field(document, "started"),
        heartbeat=heartbeat,
        interval=interval,
        clock_offset=_number(document.get("clock_offset"), MAX_OFFSET),
        schedules_held=_whole(document.get("schedules_held")),
        jobs_held=_whole(document.get("jobs_held")),
        leases_until=time_field(document, "leases_until"),
        software=_software(document.get("software")),
        quiet=quiet,
    )


async def live_schedulers(reader: Reader, now: datetime) -> list[SchedulerRow]:
    """
    Return the schedulers whose records have not expired (by the server's clock
    ``now``: the server's TTL monitor deletes expired records only about once a
    minute), in the order they registered. One query, served by the ``expires``
    index, at most :data:`SCHEDULERS_SHOWN` records.
    """
    documents = await reader.find(
        layout.SCHEDULERS,
        {"expires": {"$gt": now}},
        SCHEDULER_FIELDS,
        sort=[("expires", 1)],
        limit=SCHEDULERS_SHOWN,
    )
    rows = [_scheduler_row(document, now) for document in documents]
    return sorted(rows, key=lambda row: (row.started is None, row.started or now))


async def _schedule_page(
    reader: Reader, page: Page
) -> tuple[list[ScheduleRow], str | None, int]:
    """Return the page's schedules, the id to show the next page after, the count."""
    documents = await reader.find(
        layout.SCHEDULES,
        layout.schedule_listing(page.task_id, page.prefix, page.after),
        SCHEDULE_FIELDS,
        sort=layout.BY_ID,
        limit=0 if page.size is None else page.size + 1,
    )
    next_page = _cut_to_page(documents, page.size)
    rows = [schedule_row(document) for document in documents]
    if page.size is None and page.after is None:
        return rows, None, len(rows)

    return rows, next_page, await reader.estimated_count(layout.SCHEDULES)


def _cut_to_page(documents: list[Document], size: int | None) -> str | None:
    """Keep the page's documents; return the id to show the next page after."""
    if size is None or len(documents) <= size:
        return None

    del documents[size:]
    last = documents[-1].get("_id")
    return last if isinstance(last, str) else None


async def job_counts(reader: Reader) -> tuple[dict[str, int], dict[str, int]]:
    """Return the queued and the running jobs of each task (by task id, as text)."""
    queued, running = Counter[str](), Counter[str]()
    for group in await reader.aggregate(layout.JOBS, layout.LIVE_JOB_COUNTS):
        key = group.get("_id")
        key = key if isinstance(key, Mapping) else {}
        count = group.get("count")
        counts = queued if key.get("state") == QUEUED else running
        counts[_task_key(key.get("task"))] += count if isinstance(count, int) else 0

    return dict(sorted(queued.items())), dict(running)


async def _running_jobs(reader: Reader, cap: int | None) -> list[RunningJobRow]:
    return [
        RunningJobRow(
            id=job_id_text(document.get("_id")),
            task_id=stored_text(document.get("task_id")),
            schedule_id=stored_text(document.get("schedule_id")),
            acquired_by=stored_text(document.get("acquired_by")),
            acquired_until=time_field(document, "acquired_until"),
        )
        for document in await reader.find(
            layout.JOBS,
            layout.in_state(ACQUIRED),
            RUNNING_JOB_FIELDS,
            sort=layout.QUEUE_ORDER,
            limit=cap or 0,
        )
    ]


async def _recent_results(reader: Reader, limit: int) -> list[ResultRow]:
    if not limit:
        return []

    finished = await reader.find(
        layout.JOBS,
        layout.in_state(FINISHED),
        RESULT_FIELDS,
        sort=layout.NEWEST_FIRST,
        limit=limit,
    )
    return [_result_row(document) for document in finished]


# One job, and one schedule's runs (the dashboard's detail pages)

#: The outcomes after which a job can be retried: it failed, or never ran. Not
#: ``success`` (nothing to retry), nor ``deserialization_failed`` (its arguments or
#: task could not be read when it was due: retrying would fail alike)
RETRYABLE_OUTCOMES = frozenset(
    {"error", "missed_start_deadline", "abandoned", "cancelled"}
)
#: What reading one job's detail reads of it (never its ``metadata``)
JOB_DETAIL_FIELDS = dict.fromkeys(
    [
        "state",
        "task_id",
        "schedule_id",
        "created_at",
        "created_at_offset",
        "scheduled_fire_time",
        "scheduled_fire_time_offset",
        "start_deadline",
        "start_deadline_offset",
        "acquired_by",
        "acquired_until",
        "args",
        "kwargs",
        "finished_time",
        layout.OUTCOME,
        layout.STARTED_TIME,
        layout.TRACEBACK,
        layout.QUARANTINE,
        "result",
    ],
    1,
)
#: What reading a schedule's runs reads of each
RUN_FIELDS = dict.fromkeys(
    [
        "created_at",
        "created_at_offset",
        "scheduled_fire_time",
        "scheduled_fire_time_offset",
        "fire_key",
        "finished_time",
        layout.OUTCOME,
        layout.STARTED_TIME,
        layout.QUARANTINE,
        "result.outcome",
        "result.started_at",
        "result.started_at_offset",
        "result.finished_at",
        "result.finished_at_offset",
    ],
    1,
)


@attrs.frozen
class JobDetail:
    """One job as stored, every field checked, nothing deserialized."""

    id: str
    #: ``queued``, ``acquired`` (running) or ``finished``; any other stored value
    #: as text
    state: str | None
    task_id: str | None
    schedule_id: str | None
    created_at: datetime | None
    #: When it was meant to run (``None``: as soon as possible, as for jobs added
    #: directly, run now, or retried)
    scheduled_fire_time: datetime | None
    start_deadline: datetime | None
    acquired_by: str | None
    acquired_until: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    #: A :class:`~apscheduler.JobOutcome` name, once finished (if recorded)
    outcome: str | None
    #: The arguments as text; ``None`` when none are stored (a job that succeeded
    #: drops them)
    arguments: str | None
    #: The return value as text, while a result is stored
    result: str | None
    #: The exception as text (``ValueError: boom``), while a result is stored
    error: str | None
    #: When the stored result expires
    expires_at: datetime | None
    #: The formatted traceback of the exception (plain text, its end kept, at most
    #: about 16 KiB); ``(unreadable: ...)`` if the stored value is no text
    traceback: str | None
    #: Why the job is quarantined, if it is
    quarantine: str | None
    #: Why :func:`.actions.retry` does not apply (``None``: it does)
    retry_refusal: str | None
    #: Why :func:`.actions.cancel` does not apply (``None``: it does)
    cancel_refusal: str | None

    @property
    def can_retry(self) -> bool:
        return self.retry_refusal is None

    @property
    def can_cancel(self) -> bool:
        return self.cancel_refusal is None


@attrs.frozen
class RunRow:
    """One finished run of a schedule."""

    job_id: str
    outcome: str | None
    created_at: datetime | None
    #: The fire time it ran for (``None`` for a run added by run-now or retry)
    scheduled_fire_time: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    #: From its start to its end, if both are known
    duration: timedelta | None
    #: From when it was meant to run (its fire time, else its creation) to its start
    lateness: timedelta | None
    #: Whether the schedule's trigger made it (``False``: run-now, or a retry)
    fired: bool


def stored_outcome(document: Mapping[str, Any]) -> str | None:
    """
    Return a finished job's outcome: recorded beside its result since this
    version, else in its stored result (if any); ``None`` if neither is text.
    """
    outcome = document.get(layout.OUTCOME)
    if not isinstance(outcome, str):
        result = document.get("result")
        outcome = result.get("outcome") if isinstance(result, Mapping) else None

    return shorten(outcome, 40) if isinstance(outcome, str) else None


def retry_refusal(document: Mapping[str, Any]) -> str | None:
    """Say why a job (as stored) cannot be retried, or ``None`` if it can."""
    if (reason := quarantine_reason(document)) is not None:
        return f"is quarantined ({reason})"

    state = document.get("state")
    if state in (QUEUED, ACQUIRED):
        running = "queued" if state == QUEUED else "running"
        return f"is {running}: only a finished job that failed can be retried"

    if state != FINISHED:
        return f"is in no known state ({shown(state, 40)})"

    outcome = stored_outcome(document)
    if outcome == "success":
        return "succeeded: only a job that failed can be retried"

    if outcome not in RETRYABLE_OUTCOMES:
        said = "no outcome recorded" if outcome is None else f"outcome {outcome}"
        return (
            f"finished with {said}: only a job that finished with an error, missed "
            f"its start deadline, was abandoned or cancelled can be retried"
        )

    if "args" not in document or "kwargs" not in document:
        return (
            "kept no arguments (it finished before apscheduler-mongo kept the "
            "arguments of jobs that did not succeed)"
        )

    return None


def cancel_refusal(document: Mapping[str, Any]) -> str | None:
    """Say why a job (as stored) cannot be cancelled, or ``None`` if it can."""
    if (reason := quarantine_reason(document)) is not None:
        return f"is quarantined ({reason})"

    state = document.get("state")
    if state == ACQUIRED:
        return (
            "is running (or its scheduler is gone, and it will be finished as "
            "abandoned): only a queued job can be cancelled"
        )

    if state == FINISHED:
        return "has finished: only a queued job can be cancelled"

    if state != QUEUED:
        return f"is in no known state ({shown(state, 40)})"

    return None


def stored_traceback(value: object) -> str | None:
    """Return a stored traceback as text, its end kept; what is no text says so."""
    if value is None:
        return None

    if not isinstance(value, str):
        return f"{UNREADABLE}the stored traceback is {type(value).__name__}, not text)"

    if len(value) <= layout.TRACEBACK_LIMIT:
        return value

    cut = len(value) - layout.TRACEBACK_LIMIT
    return TRACEBACK_CUT.format(cut) + value[cut:]


def _between(start: datetime | None, end: datetime | None) -> timedelta | None:
    return None if start is None or end is None else end - start


def _started_finished(
    document: Mapping[str, Any],
) -> tuple[datetime | None, datetime | None]:
    """Return when a finished job started and finished, from what it recorded."""
    result = document.get("result")
    result = result if isinstance(result, Mapping) else {}
    started = time_field(document, layout.STARTED_TIME) or time_field(
        result, "started_at"
    )
    finished = time_field(result, "finished_at") or time_field(
        document, "finished_time"
    )
    return started, finished


def _job_detail(document: Mapping[str, Any]) -> JobDetail:
    result = document.get("result")
    return_value = error = expires_at = None
    if isinstance(result, Mapping):
        expires_at = time_field(result, "expires_at")
        if result.get("exception") is not None:
            error = describe_error(result["exception"], REPR_LIMIT)
        if result.get("return_value") is not None:
            return_value = describe(result["return_value"], REPR_LIMIT)

    arguments = None
    if "args" in document or "kwargs" in document:
        arguments = describe_arguments(
            document.get("args"), document.get("kwargs"), REPR_LIMIT
        )

    started, finished = _started_finished(document)
    state = document.get("state")
    return JobDetail(
        id=job_id_text(document.get("_id")),
        state=stored_text(state, 40),
        task_id=stored_text(document.get("task_id")),
        schedule_id=stored_text(document.get("schedule_id")),
        created_at=time_field(document, "created_at"),
        scheduled_fire_time=time_field(document, "scheduled_fire_time"),
        start_deadline=time_field(document, "start_deadline"),
        acquired_by=stored_text(document.get("acquired_by")),
        acquired_until=time_field(document, "acquired_until"),
        started_at=started,
        finished_at=finished if state == FINISHED else None,
        outcome=stored_outcome(document) if state == FINISHED else None,
        arguments=arguments,
        result=return_value,
        error=error,
        expires_at=expires_at,
        traceback=stored_traceback(document.get(layout.TRACEBACK)),
        quarantine=quarantine_reason(document),
        retry_refusal=retry_refusal(document),
        cancel_refusal=cancel_refusal(document),
    )


def job_uuid(job_id: str) -> UUID | None:
    """Return a job id given as text as the UUID it names, or ``None`` if none."""
    try:
        return UUID(job_id)
    except (ValueError, TypeError, AttributeError):
        return None


async def job_detail(reader: Reader, job_id: str) -> JobDetail | None:
    """
    Read one job, in any state, for its detail page: one ``find`` by ``_id``.

    Every field is checked and shown as text (see :mod:`.._viewing`): nothing
    stored is deserialized, imported or called.

    :param job_id: the job's UUID, as text
    :return: the job, or ``None`` if there is none with that id (or it is no UUID)
    """
    uuid = job_uuid(job_id)
    if uuid is None:
        return None

    documents = await reader.find(
        layout.JOBS, layout.by_id(uuid_to_bson(uuid)), JOB_DETAIL_FIELDS
    )
    return _job_detail(documents[0]) if documents else None


def _run_row(document: Mapping[str, Any]) -> RunRow:
    started, finished = _started_finished(document)
    created = time_field(document, "created_at")
    fire_time = time_field(document, "scheduled_fire_time")
    return RunRow(
        job_id=job_id_text(document.get("_id")),
        outcome=stored_outcome(document),
        created_at=created,
        scheduled_fire_time=fire_time,
        started_at=started,
        finished_at=finished,
        duration=_between(started, finished),
        lateness=_between(fire_time or created, started),
        fired="fire_key" in document,
    )


async def schedule_runs(reader: Reader, schedule_id: str, limit: int) -> list[RunRow]:
    """
    Return a schedule's last finished runs, newest first (at most ``limit``).

    One query, served by the ``schedule_state`` index (walked backwards). A run
    is there as long as its job's record is: a schedule's jobs keep theirs until
    cleanup forgets their fire time (an hour after they finished, at least);
    those added by run-now or retry, until their result expires.
    """
    if limit <= 0:
        return []

    documents = await reader.find(
        layout.JOBS,
        layout.schedule_runs(schedule_id),
        RUN_FIELDS,
        sort=layout.NEWEST_FIRST,
        limit=limit,
    )
    return [_run_row(document) for document in documents]


# Printing


def _cell(value: str) -> str:
    """Keep a table cell on one line, however odd the stored value."""
    return value if value.isprintable() else value.encode("unicode_escape").decode()


def format_table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, right: Iterable[int] = ()
) -> str:
    """
    Return ``rows`` as plain-text columns under ``headers``, two spaces apart.

    :param right: the indexes of the columns to align to the right (numbers)
    """
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max([len(header), *(len(row[index]) for row in cells)])
        for index, header in enumerate(headers)
    ]
    right_aligned = set(right)
    lines = []
    for row in [list(headers), *cells]:
        line = "  ".join(
            value.rjust(width) if index in right_aligned else value.ljust(width)
            for index, (value, width) in enumerate(zip(row, widths, strict=True))
        )
        lines.append(line.rstrip())

    return "\n".join(lines)


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size, up_to in (("s", 1, 120), ("min", 60, 120), ("h", 3600, 48)):
        if seconds < size * up_to:
            return f"{seconds / size:.0f} {unit}"

    return f"{seconds / 86400:.0f} d"


def when(value: datetime | None, now: datetime, *, lease: bool = False) -> str:
    """Show a time with how far it is from ``now`` ("in 25 s", "3 min ago")."""
    if value is None:
        return "-"

    shown = value.isoformat(sep=" ", timespec="seconds")
    seconds = (value - now).total_seconds()
    if seconds >= 0:
        return f"{shown} (in {_span(seconds)})"

    return f"{shown} ({'lapsed ' if lease else ''}{_span(seconds)} ago)"


def or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def problem(row: ScheduleRow) -> str:
    if row.quarantine is not None:
        return f"quarantined: {row.quarantine}"

    return "" if row.readable else "its trigger or arguments cannot be decoded"


def paused(row: ScheduleRow) -> str:
    """Say whether a schedule is paused: ``yes``, ``no``, or ``?`` and why."""
    if row.paused is None:
        return f"? ({row.paused_note})"

    return "yes" if row.paused else "no"


#: How long a trigger or argument list may be in a table of the text output
CELL_LIMIT = 60


def _schedule_rows(status: StoreStatus, problems: bool) -> list[list[str]]:
    now = status.taken_at
    return [
        [
            row.id,
            or_dash(row.task_id),
            when(row.next_fire_time, now),
            paused(row),
            or_dash(row.acquired_by),
            when(row.acquired_until, now, lease=True),
            shorten(or_dash(row.trigger), CELL_LIMIT),
            shorten(or_dash(row.arguments), CELL_LIMIT),
            *([problem(row)] if problems else []),
        ]
        for row in status.schedules
    ]


def clock_note(offset: float | None) -> str:
    """Say whose clock the times are on, and how far this host's is off."""
    if offset is None:
        return "(by this host's clock)"

    if abs(offset) < 0.05:
        return "(by the server's clock, which this host's agrees with)"

    side = "behind" if offset > 0 else "ahead of"
    return f"(by the server's clock; this host's is {abs(offset):.1f} s {side} it)"


def offset_text(offset: float | None) -> str:
    """Say how far a host's clock is from the server's."""
    if offset is None:
        return "-"

    if abs(offset) < 0.05:
        return "agrees"

    return f"{abs(offset):.1f} s {'behind' if offset > 0 else 'ahead'}"


def scheduler_state(row: SchedulerRow, now: datetime) -> str:
    """Say whether a scheduler is live, or gone quiet and when its leases lapse."""
    if not row.quiet:
        return "live"

    if row.leases_until is None or not (row.schedules_held or row.jobs_held):
        return "gone quiet, holds nothing"

    return f"gone quiet, its leases lapse {when(row.leases_until, now, lease=True)}"


def holds(row: SchedulerRow) -> str:
    return f"{or_dash(row.schedules_held)} schedules, {or_dash(row.jobs_held)} jobs"


def render_text(status: StoreStatus) -> str:
    """Return the status as aligned plain-text tables, one section each."""
    now = status.taken_at
    problems = any(problem(row) for row in status.schedules)
    schedule_rows = _schedule_rows(status, problems)
    sections: list[tuple[str, list[str], list[list[str]], tuple[int, ...]]] = [
        (
            f"Schedulers ({len(status.schedulers)})",
            [
                "SCHEDULER",
                "HOST",
                "PID",
                "STARTED",
                "HEARTBEAT",
                "CLOCK",
                "HOLDS",
                "STATE",
            ],
            [
                [
                    ", ".join(row.schedulers) or f"(store {row.id}, no claim yet)",
                    or_dash(row.host),
                    or_dash(row.pid),
                    when(row.started, now),
                    when(row.heartbeat, now),
                    offset_text(row.clock_offset),
                    holds(row),
                    scheduler_state(row, now),
                ]
                for row in status.schedulers
            ],
            (2,),
        ),
        (
            f"Tasks ({len(status.tasks)})",
            ["ID", "FUNC", "EXECUTOR", "MAX RUNNING", "RUNNING"],
            [
                [
                    task.id,
                    or_dash(task.func),
                    or_dash(task.executor),
                    or_dash(task.max_running_jobs),
                    str(task.running_jobs),
                ]
                for task in status.tasks
            ],
            (3, 4),
        ),
        (
            f"Schedules ({len(status.schedules)})",
            [
                "ID",
                "TASK",
                "NEXT FIRE TIME",
                "PAUSED",
                "OWNER",
                "LEASE EXPIRES",
                "TRIGGER",
                "ARGUMENTS",
            ]
            + (["PROBLEM"] if problems else []),
            schedule_rows,
            (),
        ),
        (
            f"Queued jobs ({sum(status.queued_jobs.values())})",
            ["TASK", "QUEUED"],
            [[task, str(count)] for task, count in status.queued_jobs.items()],
            (1,),
        ),
        (
            f"Running jobs ({len(status.running_jobs)})",
            ["JOB", "TASK", "SCHEDULE", "OWNER", "LEASE EXPIRES"],
            [
                [
                    job.id,
                    or_dash(job.task_id),
                    or_dash(job.schedule_id),
                    or_dash(job.acquired_by),
                    when(job.acquired_until, now, lease=True),
                ]
                for job in status.running_jobs
            ],
            (),
        ),
        (
            f"Recent results ({len(status.results)} newest of "
            f"{status.finished_jobs} finished jobs)",
            [
                "JOB",
                "TASK",
                "SCHEDULE",
                "OUTCOME",
                "FINISHED",
                "RESULT EXPIRES",
                "ERROR",
            ],
            [
                [
                    result.job_id,
                    or_dash(result.task_id),
                    or_dash(result.schedule_id),
                    or_dash(result.outcome),
                    when(result.finished_at, now),
                    when(result.expires_at, now),
                    shorten(result.error or "", CELL_LIMIT),
                ]
                for result in status.results
            ],
            (),
        ),
    ]
    lines = [
        f"Store in database {status.database!r} at {', '.join(status.hosts)}, "
        f"as of {status.taken_at.isoformat(sep=' ', timespec='seconds')} "
        f"{clock_note(status.host_offset)}"
    ]
    for title, headers, rows, right in sections:
        lines += ["", title]
        lines.append(format_table(headers, rows, right=right) if rows else "(none)")

    return "\n".join(lines) + "\n"


def _json_value(_instance: object, _field: object, value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


def render_json(status: StoreStatus) -> str:
    """Return the status as a JSON document (times in ISO 8601, ``null`` if unset)."""
    document = attrs.asdict(status, value_serializer=_json_value)
    return json.dumps(document, indent=2) + "\n"
