"""
Finding jobs and schedules for the dashboard: filters, id prefixes and paging.

Every listing is one query served by an index, cut at a page's size, and paged by
the last row's sort key (never by skipping), so a page costs the same whether the
store holds a hundred jobs or a million. What the user types arrives here as text
and is checked before it reaches a query: a state or outcome must be one APScheduler
knows, a job id prefix hexadecimal, a paging key well formed; anything else is
refused with a message, never passed on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

import attrs
from apscheduler import JobOutcome
from bson import Binary

from .. import _layout as layout
from .._layout import ACQUIRED, FINISHED, QUEUED, Document
from .._tools.status import (
    Reader,
    job_id_text,
    quarantine_reason,
    stored_outcome,
    time_field,
)
from .._viewing import stored_text

#: The states a listing shows, as the page names them
STATES = {"queued": QUEUED, "running": ACQUIRED, "finished": FINISHED}
#: The outcomes a listing of finished jobs can be filtered by
OUTCOMES = frozenset(outcome.name for outcome in JobOutcome)
#: The longest text accepted in a filter (a task or schedule id, a prefix)
MAX_FILTER = 200
#: The fields a job listing reads (never its arguments or result value)
JOB_FIELDS = dict.fromkeys(
    [
        "task_id",
        "schedule_id",
        "state",
        "created_at",
        "created_at_offset",
        "scheduled_fire_time",
        "scheduled_fire_time_offset",
        "acquired_by",
        "acquired_until",
        "acquired_until_offset",
        "finished_time",
        layout.OUTCOME,
        "result.outcome",
        layout.QUARANTINE,
    ],
    1,
)
_HEX = re.compile(r"[0-9a-f]{1,32}")
_AFTER = re.compile(r"(-?[0-9]{1,20})\.([0-9a-f]{32})")


class FilterError(ValueError):
    """Raised when a listing's filter or paging key is malformed."""


@attrs.frozen
class JobRow:
    id: str
    task_id: str | None
    schedule_id: str | None
    state: str | None
    created_at: datetime | None
    scheduled_fire_time: datetime | None
    acquired_by: str | None
    acquired_until: datetime | None
    finished_at: datetime | None
    outcome: str | None


@attrs.frozen
class JobFilter:
    """What a job listing shows: one state's jobs (of a task, with an outcome), or
    the jobs whose id starts with a prefix."""

    #: ``queued``, ``running`` or ``finished``
    state: str = "queued"
    task_id: str | None = None
    #: Only for finished jobs: an APScheduler :class:`~apscheduler.JobOutcome` name
    outcome: str | None = None
    #: Hexadecimal digits the job's id starts with (dashes left out)
    prefix: str | None = None
    #: The previous page's last row's key
    after: str | None = None

    @classmethod
    def parse(cls, fields: Mapping[str, str]) -> JobFilter:
        """
        Return the filter that a page's query string asks for.

        :raises FilterError: if a field holds what no listing can show
        """
        state = fields.get("state") or "queued"
        if state not in STATES:
            raise FilterError(f"no state {shorten_input(state)!r}")

        outcome = fields.get("outcome") or None
        if outcome is not None and (outcome not in OUTCOMES or state != "finished"):
            raise FilterError(f"no outcome {shorten_input(outcome)!r} of {state} jobs")

        prefix = (fields.get("id") or "").replace("-", "").strip().lower() or None
        if prefix is not None and not _HEX.fullmatch(prefix):
            raise FilterError(
                f"a job id has hexadecimal digits only, not {shorten_input(prefix)!r}"
            )

        return cls(
            state=state,
            task_id=bounded(fields.get("task")),
            outcome=outcome,
            prefix=prefix,
            after=fields.get("after") or None,
        )

    def query_string(self, after: str | None = None) -> str:
        """Return the query string that asks for this filter (and a page)."""
        from urllib.parse import urlencode

        fields = {
            "state": self.state,
            "task": self.task_id,
            "outcome": self.outcome,
            "id": self.prefix,
            "after": after,
        }
        return urlencode({key: value for key, value in fields.items() if value})


@attrs.frozen
class JobPage:
    rows: list[JobRow]
    #: The key to ask for the next page with, if there are more rows
    next_page: str | None


def shorten_input(text: str) -> str:
    """Return a user's input, shortened for quoting in a message."""
    return text if len(text) <= 40 else f"{text[:40]}..."


def bounded(text: str | None) -> str | None:
    if not text:
        return None
    if len(text) > MAX_FILTER:
        raise FilterError(f"at most {MAX_FILTER} characters: {shorten_input(text)!r}")

    return text


def _prefix_range(prefix: str) -> tuple[Binary, Binary | None]:
    """Return the range of stored job ids (UUIDs) that start with ``prefix``."""
    low = Binary.from_uuid(UUID(prefix.ljust(32, "0")))
    end = int(prefix, 16) + 1
    if end >= 16 ** len(prefix):
        return low, None  # all f: up to the last UUID

    high = UUID(format(end, f"0{len(prefix)}x").ljust(32, "0"))
    return low, Binary.from_uuid(high)


def _after_key(text: str) -> tuple[int, Binary]:
    match = _AFTER.fullmatch(text)
    if match is None or not -(2**63) <= int(match[1]) < 2**63:  # a BSON integer
        raise FilterError(f"no page {shorten_input(text)!r}")

    return int(match[1]), Binary.from_uuid(UUID(match[2]))


def _key_of(document: Document) -> str | None:
    """Return the paging key of a job listed in queue order."""
    created_at, document_id = document.get("created_at"), document.get("_id")
    if not isinstance(created_at, int) or isinstance(created_at, bool):
        return None
    if not isinstance(document_id, Binary) or document_id.subtype != 4:
        return None

    return f"{created_at}.{document_id.hex()}"


def job_row(document: Mapping[str, Any]) -> JobRow:
    state = document.get("state")
    names = {stored: shown for shown, stored in STATES.items()}
    outcome = stored_outcome(document)
    if (reason := quarantine_reason(document)) is not None:
        outcome = f"quarantined: {reason}"

    return JobRow(
        id=job_id_text(document.get("_id")),
        task_id=stored_text(document.get("task_id")),
        schedule_id=stored_text(document.get("schedule_id")),
        state=names.get(state) if isinstance(state, str) else None,
        created_at=time_field(document, "created_at"),
        scheduled_fire_time=time_field(document, "scheduled_fire_time"),
        acquired_by=stored_text(document.get("acquired_by")),
        acquired_until=time_field(document, "acquired_until"),
        finished_at=time_field(document, "finished_time"),
        outcome=outcome,
    )


async def find_jobs(reader: Reader, wanted: JobFilter, size: int) -> JobPage:
    """
    Return one page of the jobs ``wanted`` asks for: one query, served by an index.

    :raises FilterError: if its paging key is malformed
    """
    if wanted.prefix is not None:
        low, high = _prefix_range(wanted.prefix)
        after = _after_key(wanted.after)[1] if wanted.after else None
        query: Document = {"_id": {"$gte": low} if after is None else {"$gt": after}}
        if high is not None:
            query["_id"]["$lt"] = high

        documents = await reader.find(
            layout.JOBS, query, JOB_FIELDS, sort=layout.BY_ID, limit=size + 1
        )
        more = len(documents) > size
        del documents[size:]
        last = documents[-1].get("_id") if documents else None
        next_page = (
            f"0.{last.hex()}"
            if more and isinstance(last, Binary) and last.subtype == 4
            else None
        )
        return JobPage([job_row(document) for document in documents], next_page)

    newest_first = wanted.state == "finished"
    documents = await reader.find(
        layout.JOBS,
        layout.job_listing(
            STATES[wanted.state],
            wanted.task_id,
            wanted.outcome,
            _after_key(wanted.after) if wanted.after else None,
            newest_first=newest_first,
        ),
        JOB_FIELDS,
        sort=layout.listing_order(newest_first),
        limit=size + 1,
    )
    more = len(documents) > size
    del documents[size:]
    next_page = _key_of(documents[-1]) if more and documents else None
    return JobPage([job_row(document) for document in documents], next_page)


async def live_jobs_of(reader: Reader, schedule_id: str, limit: int) -> list[JobRow]:
    """
    Return the queued and running jobs of one schedule (at most ``limit``, oldest
    first): one query, served by the ``schedule_state`` index.
    """
    documents = await reader.find(
        layout.JOBS,
        layout.live_jobs_of_schedules([schedule_id]),
        JOB_FIELDS,
        limit=limit,
    )
    rows = [job_row(document) for document in documents]
    return sorted(rows, key=lambda row: (row.created_at is None, row.created_at or 0))
