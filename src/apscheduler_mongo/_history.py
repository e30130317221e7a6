"""
The job history that the dashboard's charts read, in the ``history`` collection.

Each store counts in memory, per minute of the server's clock, the jobs it released
by outcome and how late they started (a histogram), and once a minute samples how
many jobs are queued. A task of its own writes those counts every ``history_interval``
seconds: one upsert per minute that has anything new, by a deterministic ``_id``
(the minute and this store's process id), adding with ``$inc`` and keeping the
largest queue sample with ``$max``. So no job waits for the history, and no job costs
a write of its own. A clean stop writes what is pending; a crash loses what was
counted since the last write (at most one interval). The documents expire
:data:`KEPT_FOR` after their minute (a TTL index on ``expires``).

A write whose reply was lost is retried with the same token (``flush``): the filter
only matches a document that this write has not changed yet, so a retry of a write
that was applied finds no document, tries to insert one with the same ``_id`` and
gets a duplicate key error, which means "already applied". So a retried ``$inc`` does
not count twice.

:func:`read_history` reads the minutes of a span in one aggregation, grouped by step
on the server, and checks every number it gets back: the documents are untrusted
input (anyone who can write the database can write them).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from logging import Logger
from typing import TYPE_CHECKING, Any

import anyio
import attrs
from apscheduler import JobOutcome
from bson import ObjectId
from pymongo.errors import DuplicateKeyError

from . import _layout as layout
from ._adapters import Collection
from ._clock import ServerClock
from ._layout import Document
from ._marshalling import explain, from_micros
from ._metrics import TIME_BUCKETS
from ._retry import Retry, Trouble

if TYPE_CHECKING:
    from ._tools.status import Reader

#: The outcomes counted, by APScheduler's names; any other name is not counted
OUTCOMES: tuple[str, ...] = tuple(outcome.name for outcome in JobOutcome)
#: The outcome that counts as succeeded; every other one counts as failed
SUCCESS = JobOutcome.success.name
#: The upper bounds of the lateness buckets (seconds); one more bucket holds the rest
LATENESS_BOUNDS: tuple[float, ...] = TIME_BUCKETS
#: The lateness buckets' field names: the upper bound in milliseconds, and "more"
LATENESS_KEYS: tuple[str, ...] = (
    *(f"ms{round(bound * 1000)}" for bound in LATENESS_BOUNDS),
    "more",
)
#: How long a minute's counts are kept (after the minute)
KEPT_FOR = timedelta(hours=25)
#: The longest span and the most points :func:`read_history` gives
MAX_SPAN = timedelta(hours=24)
MAX_POINTS = 1_440
#: Any stored count above this is junk, and is not shown
MAX_COUNT = 10**12
#: How long a stopping store tries to write what it counted (seconds)
FINAL_WRITE_TIMEOUT = 5.0

_MINUTE = 60_000_000  # microseconds


def minute_of(micros: int) -> int:
    """Return the start of the minute that holds ``micros`` (both microseconds)."""
    return micros - micros % _MINUTE


@attrs.define
class Counts:
    """What one store counted in one minute, not yet written."""

    outcomes: Counter[str] = attrs.field(factory=Counter)
    #: Jobs per lateness bucket (see :data:`LATENESS_KEYS`)
    lateness: list[int] = attrs.field(factory=lambda: [0] * len(LATENESS_KEYS))
    #: The largest number of queued jobs sampled, if any was
    queued: int | None = None

    def update(self, minute: int, process: ObjectId, token: ObjectId) -> Document:
        """Return the update that adds these counts to the minute's document."""
        increments = {
            f"outcomes.{name}": count for name, count in self.outcomes.items() if count
        }
        increments.update(
            (f"lateness.{key}", count)
            for key, count in zip(LATENESS_KEYS, self.lateness, strict=True)
            if count
        )
        at = from_micros(minute)
        update: Document = {
            "$set": {"flush": token},
            "$setOnInsert": {
                "minute": at,
                "process": process,
                "expires": at + KEPT_FOR,
            },
        }
        if increments:
            update["$inc"] = increments
        if self.queued is not None:
            update["$max"] = {"queued": self.queued}

        return update


def bucket_id(minute: int, process: ObjectId) -> str:
    """Return the ``_id`` of one store process's document of one minute."""
    return f"{from_micros(minute):%Y-%m-%dT%H:%M}/{process}"


def unwritten(bucket: str, token: ObjectId) -> Document:
    """Match the minute's document unless the write tagged ``token`` changed it."""
    return {"_id": bucket, "flush": {"$ne": token}}


@attrs.define
class Recorder:
    """
    Count this store's released jobs and queue depth per minute, and write them.

    :param collection: the ``history`` collection
    :param jobs: the ``jobs`` collection (its queued jobs are counted)
    :param clock: the server's clock (the minutes are on it)
    :param attempts: the store's retry loop, for the last write as it stops
    :param logger: where to report writes and samples that failed
    :param interval: seconds between writes
    """

    collection: Collection
    jobs: Collection
    clock: ServerClock
    attempts: Retry
    logger: Logger
    interval: float
    #: This store's id in the documents' ``_id``, one per start
    process: ObjectId = attrs.field(init=False, factory=ObjectId)
    #: Counts not written yet, by minute (microseconds)
    _pending: dict[int, Counts] = attrs.field(init=False, factory=dict)
    #: Writes that failed, maybe after they were applied: retried as they were
    _in_doubt: dict[int, tuple[ObjectId, Counts]] = attrs.field(
        init=False, factory=dict
    )
    #: The last minute whose queue depth was sampled
    _sampled: int | None = attrs.field(init=False, default=None)
    _writing: anyio.Lock = attrs.field(init=False, factory=anyio.Lock)

    def _counts(self) -> Counts:
        return self._pending.setdefault(minute_of(self.clock.now_micros()), Counts())

    def released(self, outcome: str, lateness: float | None) -> None:
        """
        Count a job released with ``outcome`` (a :class:`~apscheduler.JobOutcome`
        name), started ``lateness`` seconds after its scheduled fire time, if known.
        """
        counts = self._counts()
        counts.outcomes[outcome if outcome in OUTCOMES else "error"] += 1
        if lateness is not None and math.isfinite(lateness):
            counts.lateness[bisect.bisect_left(LATENESS_BOUNDS, lateness)] += 1

    def reaped(self, count: int) -> None:
        """Count jobs finished as abandoned (their scheduler gone)."""
        if count:
            self._counts().outcomes[JobOutcome.abandoned.name] += count

    async def sample(self) -> None:
        """Count the queued jobs, once per minute (served by the ``queue`` index)."""
        minute = minute_of(self.clock.now_micros())
        if self._sampled != minute:
            queued = await self.jobs.count_documents(layout.in_state(layout.QUEUED))
            self._sampled = minute
            counts = self._pending.setdefault(minute, Counts())
            counts.queued = max(counts.queued or 0, queued)

    async def flush(self, attempts: Retry | None = None) -> int:
        """
        Write what was counted: one upsert per minute with new counts.

        :param attempts: the retry loop to write in (default: one attempt)
        :return: how many documents were written
        """
        async with self._writing:
            written = 0
            for minute, (token, counts) in sorted(self._in_doubt.items()):
                await self._write(minute, token, counts, attempts)
                del self._in_doubt[minute]
                written += 1

            while self._pending:
                minute = min(self._pending)
                token = ObjectId()
                self._in_doubt[minute] = (token, self._pending.pop(minute))
                await self._write(minute, token, self._in_doubt[minute][1], attempts)
                del self._in_doubt[minute]
                written += 1

            return written

    async def _write(
        self, minute: int, token: ObjectId, counts: Counts, attempts: Retry | None
    ) -> None:
        bucket = bucket_id(minute, self.process)
        query = unwritten(bucket, token)
        update = counts.update(minute, self.process, token)
        try:
            if attempts is None:
                await self.collection.update_one(query, update, upsert=True)
            else:
                async for attempt in attempts():
                    with attempt:
                        await self.collection.update_one(query, update, upsert=True)
        except DuplicateKeyError:
            pass  # this write was applied: its reply was lost

    def _forget_expired(self) -> None:
        """Drop counts (held through a long outage) that would have expired."""
        oldest = minute_of(self.clock.now_micros()) - KEPT_FOR // timedelta(
            microseconds=1
        )
        for held in (self._pending, self._in_doubt):
            for minute in [minute for minute in held if minute < oldest]:
                del held[minute]

    async def run(self) -> None:
        """
        Every interval, sample the queue (once a minute) and write what was
        counted. A failure of either is logged once per episode; a failed write is
        tried again at the next interval, a failed sample skipped.
        """
        sampling = Trouble(self.logger, "Queue depth sample")
        writing = Trouble(self.logger, "Job history write")
        while True:
            await anyio.sleep(self.interval)
            try:
                await self.sample()
            except Exception as exc:
                sampling.failed(exc)
            else:
                sampling.over()

            self._forget_expired()
            try:
                await self.flush()
            except Exception as exc:
                writing.failed(exc)
            else:
                writing.over()

    async def close(self) -> None:
        """
        Write what is pending as the store stops, retrying temporary failures for
        at most :data:`FINAL_WRITE_TIMEOUT` seconds, even if the stop is a
        cancellation; what cannot be written then is lost (logged).
        """
        problem = "timed out"
        with anyio.CancelScope(shield=True), anyio.move_on_after(FINAL_WRITE_TIMEOUT):
            try:
                await self.flush(self.attempts)
            except Exception as exc:
                problem = explain(exc)

        if self._pending or self._in_doubt:
            self.logger.warning(
                "Could not write the job history counted since its last write (%s): "
                "the dashboard's charts miss those jobs",
                problem,
            )


# Reading


@attrs.frozen
class Point:
    """
    What all the stores recorded in one step of time.

    :var start: the start of the step (the server's clock, UTC); the step ends
        where the next one starts
    :var succeeded: jobs released with the outcome ``success``
    :var failed: jobs released with any other outcome
    :var outcomes: jobs per outcome (every name of :data:`OUTCOMES`, zeros too)
    :var lateness_p50: the median of how late jobs of schedules started (seconds,
        estimated), or ``None`` when no such job was released
    :var lateness_p95: the 95th percentile of the same, or ``None``
    :var queued: the largest number of queued jobs that any store sampled, or
        ``None`` when none sampled
    """

    start: datetime
    succeeded: int
    failed: int
    outcomes: Mapping[str, int]
    lateness_p50: float | None
    lateness_p95: float | None
    queued: int | None


@attrs.frozen
class History:
    """
    The points of a span of time, oldest first, one per step (none missing).

    :var start: the start of the first step (the server's clock, UTC)
    :var step: the length of each step
    :var points: one per step; the last one holds the current step, so far
    """

    start: datetime
    step: timedelta
    points: tuple[Point, ...]


def _count(value: object) -> int | None:
    """Return ``value`` as a count if it is one: a whole number in range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None

    if not (0 <= value <= MAX_COUNT) or value != int(value):
        return None  # NaN fails the range check

    return int(value)


def _valid(path: str) -> Document:
    """
    An aggregation expression: whether the field at ``path`` is a count in range.

    By BSON's comparison order, only numbers lie between 0 and :data:`MAX_COUNT`:
    missing and null compare lower, strings, objects, arrays, booleans and dates
    higher, and NaN below every number; so this checks the type too.
    """
    return {"$and": [{"$gte": [path, 0]}, {"$lte": [path, MAX_COUNT]}]}


def _summed(path: str) -> Document:
    return {"$sum": {"$cond": [_valid(path), path, 0]}}


def history_pipeline(start: datetime, end: datetime, step: timedelta) -> list[Document]:
    """
    Return the aggregation that sums the minutes from ``start`` to ``end`` by step.

    Its ``$match`` is a range on ``minute`` (the ``minute`` index); each group's
    ``_id`` is the step's offset from ``start`` in milliseconds. Only the known
    outcomes and lateness buckets are read, and of each document only the counts
    that are numbers in range.
    """
    # Naive UTC: the in-process stand-in compares and subtracts naive dates only,
    # and pymongo writes a naive datetime as UTC
    first, last = (
        moment.astimezone(timezone.utc).replace(tzinfo=None) for moment in (start, end)
    )
    step_ms = step // timedelta(milliseconds=1)
    since = {"$subtract": ["$minute", first]}
    group: Document = {
        "_id": {"$subtract": [since, {"$mod": [since, step_ms]}]},
        "queued": {"$max": {"$cond": [_valid("$queued"), "$queued", None]}},
    }
    for name in OUTCOMES:
        group[f"o_{name}"] = _summed(f"$outcomes.{name}")
    for key in LATENESS_KEYS:
        group[f"l_{key}"] = _summed(f"$lateness.{key}")

    return [
        {
            "$match": {
                "minute": {"$gte": first, "$lt": last, "$type": "date"},
                # Not an array that holds a date (which matches the above)
                "minute.0": {"$exists": False},
            }
        },
        {"$group": group},
        {"$sort": {"_id": 1}},
        {"$limit": MAX_POINTS},
    ]


def quantile(buckets: list[int], q: float) -> float | None:
    """
    Estimate the ``q`` quantile (0 to 1) of lateness from a histogram's counts.

    The estimate finds the bucket that holds the ``q`` quantile and interpolates
    linearly between its bounds (0 for the first bucket's lower bound), as
    Prometheus's ``histogram_quantile`` does, so it is exact at the bounds and
    within a bucket's width elsewhere. A quantile in the last, unbounded bucket is
    given as that bucket's lower bound (it is at least that). Early starts count
    as 0.

    :return: seconds, or ``None`` if the histogram is empty
    """
    total = sum(buckets)
    if not total:
        return None

    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index == len(LATENESS_BOUNDS):
                return LATENESS_BOUNDS[-1]

            lower = LATENESS_BOUNDS[index - 1] if index else 0.0
            upper = LATENESS_BOUNDS[index]
            return lower + (upper - lower) * (rank - seen) / count

        seen += count

    return LATENESS_BOUNDS[-1]  # pragma: no cover (the loop reaches the total)


def _point(start: datetime, group: Mapping[str, Any] | None) -> Point:
    group = group or {}
    outcomes = {name: _count(group.get(f"o_{name}")) or 0 for name in OUTCOMES}
    lateness = [_count(group.get(f"l_{key}")) or 0 for key in LATENESS_KEYS]
    succeeded = outcomes[SUCCESS]
    return Point(
        start=start,
        succeeded=succeeded,
        failed=sum(outcomes.values()) - succeeded,
        outcomes=outcomes,
        lateness_p50=quantile(lateness, 0.5),
        lateness_p95=quantile(lateness, 0.95),
        queued=_count(group.get("queued")),
    )


def span_of(now: datetime, span: timedelta, step: timedelta) -> tuple[datetime, int]:
    """
    Return the start of the first step and how many steps there are.

    Steps are aligned on multiples of ``step`` since the Unix epoch, and the last
    one holds ``now``.

    :raises ValueError: if ``now`` is naive, ``step`` is not a whole number of
        minutes, ``span`` not a whole number of steps, or either is out of range
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime (the server's clock)")

    if step < timedelta(minutes=1) or step % timedelta(minutes=1):
        raise ValueError(f"step must be a whole number of minutes, not {step}")

    if not step <= span <= MAX_SPAN or span % step:
        raise ValueError(
            f"span must be a whole number of steps, at most {MAX_SPAN}, not {span}"
        )

    points = span // step
    if points > MAX_POINTS:
        raise ValueError(f"at most {MAX_POINTS} points, not {points}")

    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    end = epoch + ((now - epoch) // step + 1) * step
    return end - span, points


async def read_history(
    reader: Reader,
    now: datetime,
    span: timedelta = timedelta(hours=1),
    step: timedelta = timedelta(minutes=1),
) -> History:
    """
    Read what the stores recorded over the last ``span``, one point per ``step``.

    One aggregation, served by the ``minute`` index of ``history``, returns at most
    one document per step. Every number in it is checked (booleans, NaN, infinities,
    negative and huge numbers are not counts), outcomes other than APScheduler's
    are ignored, and nothing is deserialized; a point with nothing recorded has
    zero counts and ``None`` for lateness and queue depth.

    :param reader: a read-only reader of the store's database
    :param now: the server's time (see ``Reader.server_clock``)
    :param span: how far back to read (at most 24 hours)
    :param step: the time each point covers (whole minutes)
    :raises ValueError: if the span or step is not as :func:`span_of` requires
    """
    start, points = span_of(now, span, step)
    pipeline = history_pipeline(start, start + span, step)
    groups: dict[int, Mapping[str, Any]] = {}
    step_ms = step // timedelta(milliseconds=1)
    for group in await reader.aggregate(layout.HISTORY, pipeline):
        offset = _count(group.get("_id"))
        if offset is not None and offset % step_ms == 0:
            index = offset // step_ms
            if index < points:
                groups.setdefault(index, group)

    return History(
        start=start,
        step=step,
        points=tuple(
            _point(start + index * step, groups.get(index)) for index in range(points)
        ),
    )
