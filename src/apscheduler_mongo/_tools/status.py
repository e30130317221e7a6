"""What ``apscheduler-mongo status`` reports: gathering it, and printing it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from logging import Logger
from typing import Any

import attrs
from apscheduler import RetrySettings, Schedule
from apscheduler.abc import DataStore, Serializer

from .. import _layout as layout
from .._adapters import Adapter, Collection
from .._clock import ServerClock, timed_hello
from .._layout import ACQUIRED, FINISHED, QUEUED, Document
from .._marshalling import MalformedDocumentError, describe_id, explain, get_datetime
from .._retry import retrying


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
    executor: str
    max_running_jobs: int | None
    running_jobs: int


@attrs.frozen
class ScheduleRow:
    id: str
    task_id: str | None
    #: ``False`` when this process cannot read the schedule (the other fields then
    #: come from the document as stored)
    readable: bool
    next_fire_time: datetime | None = None
    paused: bool | None = None
    acquired_by: str | None = None
    acquired_until: datetime | None = None
    quarantine: str | None = None
    #: The repr of the positional and keyword arguments (shortened), if readable
    arguments: str | None = None


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


#: How long a shown repr may be
REPR_LIMIT = 200


@attrs.frozen
class Page:
    """Which schedules to show: those after a schedule id, so many at most."""

    #: Show the schedules whose (string) ids sort after this one
    after: str | None = None
    #: At most this many (``None``: all); running jobs are capped alike
    size: int | None = None


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


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _time_field(document: Mapping[str, Any], key: str) -> datetime | None:
    """Return a stored time, or ``None`` if it is missing or bad."""
    try:
        return get_datetime(document, key)
    except MalformedDocumentError:
        return None


def shorten(text: str, limit: int = REPR_LIMIT) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _arguments(schedule: Schedule) -> str:
    parts = [repr(arg) for arg in schedule.args]
    parts += [f"{key}={value!r}" for key, value in schedule.kwargs.items()]
    return shorten(", ".join(parts))


def _schedule_row(
    document: Mapping[str, Any], schedule: Schedule | None
) -> ScheduleRow:
    """Describe a schedule as the store reads it, or from its stored fields."""
    quarantine = document.get("quarantine")
    reason = None
    if quarantine is not None:
        reason = str(
            quarantine.get("reason") if isinstance(quarantine, Mapping) else ""
        )
        reason = reason or "no reason recorded"

    if schedule is None:
        paused = document.get("paused", False)
        return ScheduleRow(
            id=str(document["_id"]),
            task_id=_text(document.get("task_id")),
            readable=False,
            next_fire_time=_time_field(document, "next_fire_time"),
            paused=paused if isinstance(paused, bool) else None,
            acquired_by=_text(document.get("acquired_by")),
            acquired_until=_time_field(document, "acquired_until"),
            quarantine=reason,
        )

    return ScheduleRow(
        id=schedule.id,
        task_id=schedule.task_id,
        readable=True,
        next_fire_time=schedule.next_fire_time,
        paused=schedule.paused,
        acquired_by=schedule.acquired_by,
        acquired_until=schedule.acquired_until,
        quarantine=reason,
        arguments=_arguments(schedule),
    )


def _error_text(result: Mapping[str, Any], serializer: Serializer | None) -> str | None:
    """Return the stored exception of a result as text, or why it cannot be read."""
    exception = result.get("exception")
    if exception is None or serializer is None:
        return None

    try:
        error = serializer.deserialize(exception)
    except Exception as exc:
        return f"(cannot be read here: {explain(exc)})"

    return shorten(explain(error) if isinstance(error, BaseException) else repr(error))


def _result_row(
    document: Mapping[str, Any], serializer: Serializer | None = None
) -> ResultRow:
    result = document.get("result")
    outcome = finished_at = expires_at = error = None
    if isinstance(result, Mapping):
        outcome = _text(result.get("outcome"))
        finished_at = _time_field(result, "finished_at")
        expires_at = _time_field(result, "expires_at")
        error = _error_text(result, serializer)

    quarantine = document.get("quarantine")
    if isinstance(quarantine, Mapping):
        outcome = f"set aside: {quarantine.get('reason')}"

    return ResultRow(
        job_id=describe_id(document["_id"]),
        task_id=_text(document.get("task_id")),
        schedule_id=_text(document.get("schedule_id")),
        outcome=outcome,
        finished_at=finished_at or _time_field(document, "finished_time"),
        expires_at=expires_at,
        error=error,
    )


async def gather_status(
    data_store: DataStore,
    reader: Reader,
    limit: int,
    *,
    page: Page = Page(),
    serializer: Serializer | None = None,
) -> StoreStatus:
    """
    Read what the status command (and the dashboard) shows.

    Tasks and schedules come from the store's API; a schedule that it cannot read
    here is described from its stored fields. Jobs are read directly, without their
    arguments: the API hands out every queued job with its arguments, which this
    process may be unable to deserialize. Quarantines and results are not shown by
    the API at all. Every query is served by an index, and the number of commands
    does not grow with the number of documents.

    :param limit: how many of the newest finished jobs to show
    :param page: which schedules to show (and how many running jobs at most)
    :param serializer: to read the errors of stored results (not shown without)
    """
    tasks = [
        TaskRow(
            id=task.id,
            func=_text(task.func),
            executor=task.job_executor,
            max_running_jobs=task.max_running_jobs,
            running_jobs=task.running_jobs,
        )
        for task in await data_store.get_tasks()
    ]
    schedules, next_page, schedule_count = await _schedule_page(
        data_store, reader, page
    )
    running = await _running_jobs(reader, page.size)
    running_count = len(running)
    if page.size is not None and running_count >= page.size:
        running_count = await reader.count("jobs", {"state": ACQUIRED})

    results = await _recent_results(reader, limit, serializer)
    clock = await reader.server_clock()
    return StoreStatus(
        database=reader.database_name,
        hosts=reader.adapter.hosts(),
        taken_at=clock.now_datetime(),
        host_offset=clock.measured_offset(),
        tasks=tasks,
        schedules=schedules,
        queued_jobs=await _queued_counts(reader),
        running_jobs=running,
        finished_jobs=await reader.count("jobs", {"state": FINISHED}),
        results=results,
        schedule_count=schedule_count,
        next_page=next_page,
        running_count=running_count,
    )


async def _schedule_page(
    data_store: DataStore, reader: Reader, page: Page
) -> tuple[list[ScheduleRow], str | None, int]:
    """Return the page's schedules, the id to show the next page after, the count."""
    documents = await reader.find(
        "schedules",
        {} if page.after is None else {"_id": {"$gt": page.after}},
        {"trigger": 0, "args": 0, "kwargs": 0, "metadata": 0},
        sort=layout.BY_ID,
        limit=0 if page.size is None else page.size + 1,
    )
    next_page = _cut_to_page(documents, page.size)
    readable = await _readable_schedules(data_store, documents, page.size is None)
    rows = [
        # An id that is no string (hand-made, maybe not even hashable): unread
        _schedule_row(document, readable.get(key) if isinstance(key, str) else None)
        for document in documents
        for key in [document["_id"]]
    ]
    if page.size is None and page.after is None:
        return rows, None, len(rows)

    return rows, next_page, await reader.estimated_count("schedules")


def _cut_to_page(documents: list[Document], size: int | None) -> str | None:
    """Keep the page's documents; return the id to show the next page after."""
    if size is None or len(documents) <= size:
        return None

    del documents[size:]
    last = documents[-1]["_id"]
    return last if isinstance(last, str) else None


async def _readable_schedules(
    data_store: DataStore, documents: Sequence[Document], every: bool
) -> dict[str, Schedule]:
    """Read the schedules of ``documents`` through the store (all, if ``every``)."""
    ids = {key for document in documents if isinstance(key := document["_id"], str)}
    if not ids:
        return {}

    schedules = await data_store.get_schedules(None if every else ids)
    return {schedule.id: schedule for schedule in schedules}


async def _queued_counts(reader: Reader) -> dict[str, int]:
    """Count the queued jobs of each task (on the server, in one command)."""
    groups = await reader.aggregate(
        "jobs",
        [
            {"$match": {"state": QUEUED}},
            {"$group": {"_id": "$task_id", "count": {"$sum": 1}}},
        ],
    )
    counts = Counter[str]()
    for group in groups:
        counts[str(group["_id"])] += int(group["count"])

    return dict(sorted(counts.items()))


async def _running_jobs(reader: Reader, cap: int | None) -> list[RunningJobRow]:
    return [
        RunningJobRow(
            id=describe_id(document["_id"]),
            task_id=_text(document.get("task_id")),
            schedule_id=_text(document.get("schedule_id")),
            acquired_by=_text(document.get("acquired_by")),
            acquired_until=_time_field(document, "acquired_until"),
        )
        for document in await reader.find(
            "jobs",
            {"state": ACQUIRED},
            {"task_id": 1, "schedule_id": 1, "acquired_by": 1, "acquired_until": 1},
            sort=layout.QUEUE_ORDER,
            limit=cap or 0,
        )
    ]


async def _recent_results(
    reader: Reader, limit: int, serializer: Serializer | None
) -> list[ResultRow]:
    if not limit:
        return []

    finished = await reader.find(
        "jobs",
        {"state": FINISHED},
        {
            "task_id": 1,
            "schedule_id": 1,
            "finished_time": 1,
            "quarantine": 1,
            "result.outcome": 1,
            "result.exception": 1,
            "result.finished_at": 1,
            "result.finished_at_offset": 1,
            "result.expires_at": 1,
            "result.expires_at_offset": 1,
        },
        sort=layout.NEWEST_FIRST,
        limit=limit,
    )
    return [_result_row(document, serializer) for document in finished]


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

    return "" if row.readable else "cannot be read here (see the warnings)"


def paused(row: ScheduleRow) -> str:
    return "?" if row.paused is None else ("yes" if row.paused else "no")


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


def render_text(status: StoreStatus) -> str:
    """Return the status as aligned plain-text tables, one section each."""
    now = status.taken_at
    problems = any(problem(row) for row in status.schedules)
    schedule_rows = _schedule_rows(status, problems)
    sections = [
        (
            f"Tasks ({len(status.tasks)})",
            ["ID", "FUNC", "EXECUTOR", "MAX RUNNING", "RUNNING"],
            [
                [
                    task.id,
                    or_dash(task.func),
                    task.executor,
                    or_dash(task.max_running_jobs),
                    str(task.running_jobs),
                ]
                for task in status.tasks
            ],
            (3, 4),
        ),
        (
            f"Schedules ({len(status.schedules)})",
            ["ID", "TASK", "NEXT FIRE TIME", "PAUSED", "OWNER", "LEASE EXPIRES"]
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
            ["JOB", "TASK", "SCHEDULE", "OUTCOME", "FINISHED", "RESULT EXPIRES"],
            [
                [
                    result.job_id,
                    or_dash(result.task_id),
                    or_dash(result.schedule_id),
                    or_dash(result.outcome),
                    when(result.finished_at, now),
                    when(result.expires_at, now),
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
