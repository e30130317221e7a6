"""
The dashboard's pages: what each reads, and which template shows it.

Each page is a function of the request's view (the reader and the page's settings)
that returns a :class:`Shown`: its template and what the template shows. The
application (:mod:`._app`) renders it whole, or only its panels when the page's
script asks for them after a live update. Pages only read, through the read-only
:class:`~.._tools.status.Reader`, and deserialize nothing (see :mod:`.._viewing`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import attrs

from .. import _layout as layout
from .._history import History, read_history
from .._tools.status import (
    REPR_LIMIT,
    SCHEDULE_FIELDS,
    Page,
    Reader,
    ScheduleRow,
    gather_status,
    job_detail,
    live_schedulers,
    or_dash,
    require_store,
    schedule_row,
    schedule_runs,
    time_field,
)
from .._trigger_view import schedule_outlook
from .._viewing import shown, stored_text
from . import _audit, _finding


@attrs.frozen
class View:
    """What a page is drawn from: the store's reader and the dashboard's settings."""

    reader: Reader
    #: The request's query string fields (the first value of each)
    query: Mapping[str, str]
    page_size: int
    results: int


@attrs.frozen
class Shown:
    """A page to show: its panels' template, and what they show."""

    #: The template of the page's panels (the part a live update fetches again)
    template: str
    #: The page's title, after the database's name
    title: str
    context: dict[str, Any]
    #: 404 when what the page is about does not exist
    status_code: int = 200


PageFunction = Callable[[View], Awaitable[Shown]]
#: The longest duration shown as one (microseconds in 100 years)
MAX_MICROS = 100 * 365 * 86_400 * 1_000_000


async def _now(reader: Reader) -> tuple[datetime, float | None]:
    clock = await reader.server_clock()
    return clock.now_datetime(), clock.measured_offset()


#: The spans the overview charts: its name, how far back, the time per point
CHART_SPANS = [
    ("hour", timedelta(hours=1), timedelta(minutes=1)),
    ("day", timedelta(days=1), timedelta(minutes=10)),
]


def chart_data(history: History) -> str:
    """
    Return what the page's script draws a span's charts from, as JSON: the points'
    times, and for each chart its series (jobs by outcome, lateness, queue depth).
    """
    points = history.points
    return json.dumps(
        {
            "times": [point.start.strftime("%H:%M") for point in points],
            "step": history.step.total_seconds(),
            "jobs": {
                "succeeded": [point.succeeded for point in points],
                "failed": [point.failed for point in points],
            },
            "lateness": {
                "p50": [point.lateness_p50 for point in points],
                "p95": [point.lateness_p95 for point in points],
            },
            "queued": {"queued": [point.queued for point in points]},
        },
        separators=(",", ":"),
        allow_nan=False,
    )


async def overview(view: View) -> Shown:
    """Tasks, schedules (a page, filtered), queued and running jobs, results."""
    task_id = view.query.get("task") or None
    prefix = view.query.get("id") or None
    for text in (task_id, prefix):
        if text is not None and len(text) > _finding.MAX_FILTER:
            raise _finding.FilterError(
                f"at most {_finding.MAX_FILTER} characters in a filter"
            )

    page = Page(view.query.get("after") or None, view.page_size, task_id, prefix)
    status = await gather_status(view.reader, view.results, page=page)
    charts = {
        name: chart_data(await read_history(view.reader, status.taken_at, span, step))
        for name, span, step in CHART_SPANS
    }
    fields = {key: value for key, value in (("task", task_id), ("id", prefix)) if value}
    return Shown(
        "panels.html",
        "overview",
        {
            "status": status,
            "task_filter": task_id or "",
            "prefix_filter": prefix or "",
            "filtered": bool(fields),
            "filter_fields": fields,
            "filters": f"?{urlencode(fields)}" if fields else "",
            "after": page.after,
            "charts": charts,
        },
    )


async def schedulers(view: View) -> Shown:
    """The live schedulers, and those gone quiet whose records have not expired."""
    await require_store(view.reader)
    now, offset = await _now(view.reader)
    rows = await live_schedulers(view.reader, now)
    return Shown(
        "schedulers.html",
        "schedulers",
        {"schedulers": rows, "now": now, "host_offset": offset},
    )


async def jobs(view: View) -> Shown:
    """One page of the jobs a filter asks for (state, task, outcome, id prefix)."""
    await require_store(view.reader)
    wanted = _finding.JobFilter.parse(view.query)
    found = await _finding.find_jobs(view.reader, wanted, view.page_size)
    now, offset = await _now(view.reader)
    return Shown(
        "jobs.html",
        "jobs",
        {
            "wanted": wanted,
            "found": found,
            "states": list(_finding.STATES),
            "outcomes": sorted(_finding.OUTCOMES),
            "now": now,
            "host_offset": offset,
        },
    )


#: What a schedule's page reads of it, beyond what the overview's row shows
SCHEDULE_PAGE_FIELDS = {
    **SCHEDULE_FIELDS,
    **dict.fromkeys(
        [
            "coalesce",
            "misfire_grace_time",
            "max_jitter",
            "job_executor",
            "job_result_expiration_time",
            "metadata",
            "last_fire_time",
            "last_fire_time_offset",
        ],
        1,
    ),
}
#: How many fire times a schedule's page shows, and its last runs
FIRE_TIMES_SHOWN = 10
RUNS_SHOWN = 20


def _duration(value: object) -> str | None:
    """Show a stored duration (integer microseconds), or what is stored instead."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= MAX_MICROS:
            return str(timedelta(microseconds=value))

    return f"? ({shown(value, 40)})"


@attrs.frozen
class ScheduleDetail:
    """What a schedule's page shows, each stored field checked."""

    row: ScheduleRow
    #: Its trigger in words, if its kind is one of APScheduler's
    words: str | None
    #: Its next fire times: the stored next one, then the trigger's
    fire_times: list[datetime]
    #: Why its fire times are not shown (or stop early)
    outlook_note: str | None
    last_fire_time: datetime | None
    #: Each setting's name and value as text, in the page's order
    settings: list[tuple[str, str]]


def schedule_detail(document: Mapping[str, Any]) -> ScheduleDetail:
    """Describe a schedule for its page, from its stored fields, running nothing."""
    row = schedule_row(document)
    outlook = schedule_outlook(
        document.get("trigger"),
        FIRE_TIMES_SHOWN,
        next_fire_time=row.next_fire_time,
    )
    settings = [
        ("Executor", or_dash(stored_text(document.get("job_executor")))),
        ("Coalesce", or_dash(stored_text(document.get("coalesce"), 40))),
        ("Misfire grace time", or_dash(_duration(document.get("misfire_grace_time")))),
        ("Max jitter", or_dash(_duration(document.get("max_jitter")))),
        (
            "Results kept for",
            or_dash(_duration(document.get("job_result_expiration_time"))),
        ),
        ("Metadata", shown(document.get("metadata", {}), REPR_LIMIT)),
    ]
    return ScheduleDetail(
        row=row,
        words=outlook.words,
        fire_times=outlook.next_times if row.next_fire_time is not None else [],
        outlook_note=outlook.reason,
        last_fire_time=time_field(document, "last_fire_time"),
        settings=settings,
    )


async def schedule(view: View) -> Shown:
    """One schedule: its trigger in words, next fire times, settings, last runs."""
    await require_store(view.reader)
    schedule_id = _finding.bounded(view.query.get("id")) or ""
    documents = await view.reader.find(
        layout.SCHEDULES, layout.by_id(schedule_id), SCHEDULE_PAGE_FIELDS, limit=1
    )
    now, offset = await _now(view.reader)
    context: dict[str, Any] = {
        "schedule_id": schedule_id,
        "now": now,
        "host_offset": offset,
        "detail": None,
    }
    if not documents:
        return Shown("schedule.html", "schedule", context, status_code=404)

    context["detail"] = schedule_detail(documents[0])
    context["runs"] = await schedule_runs(view.reader, schedule_id, RUNS_SHOWN)
    context["live"] = await _finding.live_jobs_of(view.reader, schedule_id, RUNS_SHOWN)
    return Shown("schedule.html", "schedule", context)


async def job(view: View) -> Shown:
    """One job: its state, lease, arguments, and result or error with traceback."""
    await require_store(view.reader)
    job_id = _finding.bounded(view.query.get("id")) or ""
    detail = await job_detail(view.reader, job_id)
    now, offset = await _now(view.reader)
    context = {"job_id": job_id, "job": detail, "now": now, "host_offset": offset}
    return Shown("job.html", "job", context, status_code=200 if detail else 404)


async def audit(view: View) -> Shown:
    """The newest records of the actions made through dashboards, newest first."""
    await require_store(view.reader)
    now, offset = await _now(view.reader)
    return Shown(
        "audit.html",
        "audit",
        {
            "entries": await _audit.newest(view.reader),
            "shown": _audit.SHOWN,
            "now": now,
            "host_offset": offset,
        },
    )
