"""Conversion between APScheduler's structures and the documents we store.

Instants are stored as integer microseconds since the Unix epoch (exact and sortable,
unlike BSON dates, which keep milliseconds), with the UTC offset in a sibling field
named ``<field>_offset`` (whole seconds). Durations are integer microseconds. UUIDs
are BSON binary subtype 4, built here rather than through codec options so that every
client (in-process fakes included) stores the same bytes.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from logging import Logger
from typing import Any
from uuid import UUID

import attrs
from apscheduler import (
    Job,
    JobOutcome,
    JobReleased,
    JobResult,
    Schedule,
    SerializationError,
    Task,
)
from apscheduler.abc import Serializer
from bson import Binary

from ._layout import (
    FINISHED,
    FINISHED_DROPS,
    JOBS,
    LEASE_DROPS,
    OUTCOME,
    QUARANTINE,
    QUEUED,
    SCHEDULES,
    STARTED_TIME,
    TASKS,
    TRACEBACK,
    TRACEBACK_LIMIT,
    Document,
    Tag,
    fire_key,
)
from ._signing import Codec

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
#: A result kept this long would expire after the last datetime (year 9999)
_LONGEST_KEPT = timedelta(days=365 * 7000)


class MalformedDocumentError(ValueError):
    """Raised when a stored document lacks a field or holds a value of a wrong type."""


#: What building a structure from a damaged document can raise
_READ_ERRORS = (KeyError, TypeError, ValueError, OverflowError)


def to_micros(value: datetime) -> int:
    """Return the instant ``value`` as whole microseconds since the Unix epoch."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r} cannot be stored")

    return (value - _EPOCH) // _MICROSECOND


def from_micros(micros: int, offset_seconds: int | None = 0) -> datetime:
    """Return the instant ``micros`` expressed in the given UTC offset."""
    tz = timezone(timedelta(seconds=offset_seconds or 0))
    return (_EPOCH + micros * _MICROSECOND).astimezone(tz)


def duration_to_micros(value: timedelta | None) -> int | None:
    return None if value is None else value // _MICROSECOND


def duration_from_micros(value: int | None) -> timedelta | None:
    return None if value is None else value * _MICROSECOND


def put_datetime(document: dict[str, Any], key: str, value: datetime | None) -> None:
    """Store ``value`` under ``key`` (microseconds) and ``key_offset`` (seconds)."""
    if value is None:
        document[key] = document[f"{key}_offset"] = None
    else:
        document[key] = to_micros(value)  # rejects naive datetimes
        offset = value.utcoffset()
        assert offset is not None
        document[f"{key}_offset"] = int(offset.total_seconds())


def get_datetime(document: Mapping[str, Any], key: str) -> datetime | None:
    micros = document.get(key)
    if micros is None:
        return None

    if not isinstance(micros, int):
        raise MalformedDocumentError(f"field {key!r} is not an integer")

    try:
        return from_micros(micros, document.get(f"{key}_offset"))
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedDocumentError(f"field {key!r} is no valid time: {exc}") from exc


def uuid_to_bson(value: UUID) -> Binary:
    return Binary.from_uuid(value)


def uuid_from_bson(value: object) -> UUID:
    if isinstance(value, UUID):
        return value

    if isinstance(value, Binary) and value.subtype == 4:
        try:
            return value.as_uuid()
        except ValueError as exc:  # not 16 bytes long
            raise MalformedDocumentError(f"{value!r} is not a UUID: {exc}") from exc

    raise MalformedDocumentError(f"{value!r} is not a UUID")


def quarantine_record(reason: str, at: datetime) -> dict[str, Any]:
    """Return what a quarantined document carries: why, and since when."""
    return {"reason": reason, "at": at}


# Tasks


def task_to_document(task: Task, codec: Codec) -> dict[str, Any]:
    """
    Return the stored form of ``task``, signed.

    :raises DisallowedCallableError: if its callable is not allowed
    """
    codec.check_callable(task.func)
    document: dict[str, Any] = {
        "_id": task.id,
        "func": task.func,
        "job_executor": task.job_executor,
        "max_running_jobs": task.max_running_jobs,
        "misfire_grace_time": duration_to_micros(task.misfire_grace_time),
        "metadata": task.metadata,
    }
    codec.sign(TASKS, document)
    return document


def task_from_document(
    document: Mapping[str, Any], running_jobs: int, codec: Codec
) -> Task:
    """
    Build a task from its stored form, once its signature and callable are checked.

    :raises UnverifiedDataError: if its signature is missing or wrong
    :raises DisallowedCallableError: if its callable is not allowed
    :raises MalformedDocumentError: if a field is missing or of the wrong type
    """
    codec.check(TASKS, document, "task")
    codec.check_callable(document.get("func"))
    try:
        fields: dict[str, Any] = {
            "id": document["_id"],
            "func": document.get("func"),
            "job_executor": document["job_executor"],
            "max_running_jobs": document.get("max_running_jobs"),
            "misfire_grace_time": duration_from_micros(
                document.get("misfire_grace_time")
            ),
            "metadata": document.get("metadata") or {},
            "running_jobs": running_jobs,
        }
        return Task(**fields)
    except _READ_ERRORS as exc:
        raise MalformedDocumentError(str(exc)) from exc


# Schedules


def schedule_to_document(schedule: Schedule, codec: Codec) -> dict[str, Any]:
    """Return the stored form of ``schedule`` (without a lease), signed."""
    serializer = codec.serializer
    document: dict[str, Any] = {
        "_id": schedule.id,
        "task_id": schedule.task_id,
        "trigger": serializer.serialize(schedule.trigger),
        "args": serializer.serialize(schedule.args),
        "kwargs": serializer.serialize(schedule.kwargs),
        "paused": schedule.paused,
        "coalesce": schedule.coalesce.name,
        "misfire_grace_time": duration_to_micros(schedule.misfire_grace_time),
        "max_jitter": duration_to_micros(schedule.max_jitter),
        "job_executor": schedule.job_executor,
        "job_result_expiration_time": duration_to_micros(
            schedule.job_result_expiration_time
        ),
        "metadata": schedule.metadata,
        "acquired_by": None,
        "acquired_until": None,
    }
    put_datetime(document, "next_fire_time", schedule.next_fire_time)
    put_datetime(document, "last_fire_time", schedule.last_fire_time)
    codec.sign(SCHEDULES, document)
    return document


def released_trigger(schedule_id: str, trigger: object, codec: Codec) -> Document:
    """
    Return the ``$set`` fields that store a schedule's trigger as its release
    leaves it, signed.

    :raises SerializationError: if the trigger cannot be serialized
    """
    changes: Document = {"trigger": codec.serializer.serialize(trigger)}
    return {
        **changes,
        **codec.signed_changes(SCHEDULES, schedule_id, "trigger", changes),
    }


def schedule_from_document(document: Mapping[str, Any], codec: Codec) -> Schedule:
    """
    Build a schedule from its stored form, once its signatures are checked.

    :raises UnverifiedDataError: if a signature is missing or wrong
    :raises DeserializationError: if the serializer cannot read the trigger or the
        arguments
    :raises MalformedDocumentError: if a field is missing or of the wrong type
    """
    # A wrong type in a field the server's queries test would make the scheduler
    # and the viewers disagree on the schedule's state
    if not isinstance(document.get("paused", False), bool):
        raise MalformedDocumentError("field 'paused' is not a boolean")

    codec.check(SCHEDULES, document, "call")
    codec.check(SCHEDULES, document, "trigger")
    serializer = codec.serializer
    try:
        trigger = serializer.deserialize(document["trigger"])
        args = serializer.deserialize(document["args"])
        kwargs = serializer.deserialize(document["kwargs"])
        fields: dict[str, Any] = {
            "id": document["_id"],
            "task_id": document["task_id"],
            "trigger": trigger,
            "args": args,
            "kwargs": kwargs,
            "paused": document.get("paused", False),
            "coalesce": document["coalesce"],
            "misfire_grace_time": duration_from_micros(
                document.get("misfire_grace_time")
            ),
            "max_jitter": duration_from_micros(document.get("max_jitter")),
            "job_executor": document["job_executor"],
            "job_result_expiration_time": duration_from_micros(
                document.get("job_result_expiration_time")
            )
            or timedelta(0),
            "metadata": document.get("metadata") or {},
            "next_fire_time": get_datetime(document, "next_fire_time"),
            "last_fire_time": get_datetime(document, "last_fire_time"),
            "acquired_by": document.get("acquired_by"),
            "acquired_until": (
                from_micros(document["acquired_until"])
                if document.get("acquired_until") is not None
                else None
            ),
        }
        return Schedule(**fields)
    except _READ_ERRORS as exc:
        raise MalformedDocumentError(str(exc)) from exc


# Jobs


def job_to_document(job: Job, codec: Codec) -> dict[str, Any]:
    """
    Return the stored form of a newly added ``job``, signed.

    A job created by a schedule carries ``fire_time``, its un-jittered fire time in
    microseconds, and ``fire_key``, unique per schedule and fire time.
    """
    document: dict[str, Any] = {
        "_id": uuid_to_bson(job.id),
        "state": QUEUED,
        "task_id": job.task_id,
        "args": codec.serializer.serialize(job.args),
        "kwargs": codec.serializer.serialize(job.kwargs),
        "schedule_id": job.schedule_id,
        "executor": job.executor,
        "jitter": duration_to_micros(job.jitter),
        "result_expiration_time": duration_to_micros(job.result_expiration_time),
        "metadata": job.metadata,
    }
    put_datetime(document, "scheduled_fire_time", job.scheduled_fire_time)
    put_datetime(document, "start_deadline", job.start_deadline)
    put_datetime(document, "created_at", job.created_at)
    original = job.original_scheduled_time
    if job.schedule_id is not None and original is not None:
        document["fire_time"] = to_micros(original)
        document["fire_key"] = fire_key(job.schedule_id, document["fire_time"])

    codec.sign(JOBS, document, "call")
    return document


def job_from_document(document: Mapping[str, Any], codec: Codec) -> Job:
    """
    Build a job from its stored form, once its signature is checked.

    :raises UnverifiedDataError: if its signature is missing or wrong
    :raises DeserializationError: if the serializer cannot read the arguments
    :raises MalformedDocumentError: if a field is missing or of the wrong type
    """
    codec.check(JOBS, document, "call")
    try:
        args = codec.serializer.deserialize(document["args"])
        kwargs = codec.serializer.deserialize(document["kwargs"])
        acquired_until = document.get("acquired_until")
        fields: dict[str, Any] = {
            "id": uuid_from_bson(document["_id"]),
            "task_id": document["task_id"],
            "args": args,
            "kwargs": kwargs,
            "schedule_id": document.get("schedule_id"),
            "scheduled_fire_time": get_datetime(document, "scheduled_fire_time"),
            "executor": document["executor"],
            "jitter": duration_from_micros(document.get("jitter")) or timedelta(0),
            "start_deadline": get_datetime(document, "start_deadline"),
            "result_expiration_time": duration_from_micros(
                document.get("result_expiration_time")
            )
            or timedelta(0),
            "metadata": document.get("metadata") or {},
            "created_at": get_datetime(document, "created_at"),
            "acquired_by": document.get("acquired_by"),
            "acquired_until": (
                from_micros(acquired_until) if acquired_until is not None else None
            ),
        }
        # Job does not check these, and the scheduler looks them up in dictionaries
        # (and its events carry them)
        for key in ("task_id", "executor"):
            if not isinstance(fields[key], str):
                raise MalformedDocumentError(f"field {key!r} is not a string")

        if not isinstance(fields["schedule_id"], (str, type(None))):
            raise MalformedDocumentError("field 'schedule_id' is not a string")

        # The scheduler adds it to the finish time: past the last datetime, it
        # would raise there
        if fields["result_expiration_time"] >= _LONGEST_KEPT:
            raise MalformedDocumentError("field 'result_expiration_time' is too long")

        return Job(**fields)
    except _READ_ERRORS as exc:
        raise MalformedDocumentError(str(exc)) from exc


# Job results


def result_to_document(result: JobResult, serializer: Serializer) -> dict[str, Any]:
    """
    Return the stored form of ``result`` (kept inside the finished job's document).

    :raises SerializationError: if the return value or exception cannot be serialized
    """
    document: dict[str, Any] = {"outcome": result.outcome.name}
    put_datetime(document, "started_at", result.started_at)
    put_datetime(document, "finished_at", result.finished_at)
    put_datetime(document, "expires_at", result.expires_at)
    if result.outcome is JobOutcome.error:
        document["exception"] = serializer.serialize(result.exception)
    elif result.outcome is JobOutcome.success:
        document["return_value"] = serializer.serialize(result.return_value)

    return document


def result_from_document(
    job_id: UUID, job_document: Mapping[str, Any], codec: Codec
) -> JobResult:
    """
    Build a job's result from the finished job's document, once its signature is
    checked.

    :raises UnverifiedDataError: if its signature is missing or wrong
    :raises DeserializationError: if the serializer cannot read the return value or
        the exception
    :raises MalformedDocumentError: if a field is missing or of the wrong type
    """
    document = job_document.get("result")
    if not isinstance(document, Mapping):
        raise MalformedDocumentError("field 'result' is not a document")

    codec.check(JOBS, job_document, "result")
    serializer = codec.serializer
    exception = document.get("exception")
    return_value = document.get("return_value")
    try:
        fields: dict[str, Any] = {
            "job_id": job_id,
            "outcome": JobOutcome[document["outcome"]],
            "started_at": get_datetime(document, "started_at"),
            "finished_at": get_datetime(document, "finished_at"),
            "expires_at": get_datetime(document, "expires_at"),
            "exception": (
                serializer.deserialize(exception) if exception is not None else None
            ),
            "return_value": (
                serializer.deserialize(return_value)
                if return_value is not None
                else None
            ),
        }
        for key in ("finished_at", "expires_at"):
            if fields[key] is None:
                raise MalformedDocumentError(f"field {key!r} is missing")

        return JobResult(**fields)
    except _READ_ERRORS as exc:
        raise MalformedDocumentError(str(exc)) from exc


#: What starts a traceback whose beginning was cut off
TRACEBACK_CUT = "(traceback cut: its first {} characters are left out)\n"


def traceback_text(exc: BaseException, limit: int = TRACEBACK_LIMIT) -> str:
    """
    Return the formatted traceback of ``exc`` as plain text, its end kept.

    A traceback longer than ``limit`` characters loses its beginning, cut at a line
    start, and says so on its first line (the end names the error and where it was
    raised). Formatting never fails: an exception whose ``__str__`` raises is
    formatted as Python does, and anything else gives the error's type name.
    """
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:  # a hostile exception can break its formatting
        return f"{type(exc).__name__} (its traceback could not be formatted)\n"

    if len(text) <= limit:
        return text

    start = len(text) - limit
    line_start = text.find("\n", start - 1) + 1
    if line_start <= 0 or line_start >= len(text):
        line_start = start  # one line longer than the limit: cut inside it

    return TRACEBACK_CUT.format(line_start) + text[line_start:]


#: How long the record of a job that did not succeed is kept at least (its
#: outcome, traceback and arguments), whatever its result's expiration time
FAILURES_KEPT = timedelta(hours=24)


def finish_update(
    result: JobResult,
    codec: Codec,
    logger: Logger,
    *,
    from_schedule: bool,
    tag: Tag,
    quarantine: Document | None = None,
) -> Document:
    """
    Return the update that turns an acquired job document into a finished one.

    The result is kept inside the document while it is wanted (``expires_at`` later
    than ``finished_at``). ``purge_at`` lets the TTL index delete the document once
    the result expires; a job created by a schedule gets none, because its document
    also records that its fire time was used, until the store's cleanup sees the
    schedule past that time. ``tag`` lets a retry tell whether the write was
    applied. A result that cannot be serialized is kept without its
    return value or exception, and the error logged. With ``quarantine`` (the record
    of why), the job is finished but quarantined: it keeps its arguments and is
    never purged.

    The document also records the outcome and start time (shown however long the
    result is kept), and the traceback of the exception, if any, as text (see
    :data:`~._layout.TRACEBACK`). A job that did not succeed keeps its arguments,
    signed, so that it can be retried, for :data:`FAILURES_KEPT` at least; one that
    succeeded drops them.
    """
    changes: Document = {
        "state": FINISHED,
        **tag.fields(),
        "finished_time": to_micros(result.finished_at),
        OUTCOME: result.outcome.name,
    }
    if result.started_at is not None:
        changes[STARTED_TIME] = to_micros(result.started_at)

    if result.exception is not None:
        changes[TRACEBACK] = traceback_text(result.exception)

    keep = result.expires_at > result.finished_at
    if keep:
        try:
            changes["result"] = result_to_document(result, codec.serializer)
        except SerializationError:
            logger.exception(
                "Cannot serialize the result of job %s; keeping its outcome only",
                result.job_id,
            )
            changes["result"] = result_to_document(
                attrs.evolve(result, exception=None, return_value=None),
                codec.serializer,
            )

        document_id = uuid_to_bson(result.job_id)
        changes.update(codec.signed_changes(JOBS, document_id, "result", changes))

    if quarantine is not None:
        # Kept as found, arguments and all, until someone looks (never purged)
        changes[QUARANTINE] = quarantine
        return {"$set": changes, "$unset": LEASE_DROPS}

    if not from_schedule:
        purge_at = result.expires_at if keep else result.finished_at
        if result.outcome is not JobOutcome.success:
            # Kept a while, for an operator to see why and retry it
            purge_at = max(purge_at, result.finished_at + FAILURES_KEPT)
        changes["purge_at"] = purge_at

    drops = FINISHED_DROPS if result.outcome is JobOutcome.success else LEASE_DROPS
    return {"$set": changes, "$unset": drops}


def result_for_document(
    document: Mapping[str, Any],
    outcome: JobOutcome,
    now: datetime,
    exception: BaseException | None = None,
) -> JobResult:
    """Build a result for a job known only by its (possibly damaged) document."""
    try:
        expires_at = now + (
            duration_from_micros(document.get("result_expiration_time")) or timedelta(0)
        )
    except (TypeError, OverflowError):  # a hand-made expiration time
        expires_at = now

    return JobResult(
        job_id=uuid_from_bson(document["_id"]),
        outcome=outcome,
        finished_at=now,
        expires_at=expires_at,
        exception=exception,
    )


def describe_id(value: object) -> str:
    """Return a document id as users know it (a job's UUID rather than BSON)."""
    try:
        return str(uuid_from_bson(value))
    except MalformedDocumentError:
        return repr(value)


def explain(exc: BaseException) -> str:
    """Describe an error and its cause (serializers raise bare wrappers)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if exc.__cause__ is not None:
        text += f" (caused by {explain(exc.__cause__)})"

    return text


def scheduled_fire_time(document: Mapping[str, Any]) -> datetime | None:
    """Return a job document's scheduled fire time, or ``None`` if unreadable."""
    try:
        return get_datetime(document, "scheduled_fire_time")
    except MalformedDocumentError:
        return None


def is_from_schedule(document: Mapping[str, Any]) -> bool:
    """Tell whether a job document records a schedule's fire time."""
    return "fire_key" in document


def lease_expiry(document: Mapping[str, Any]) -> datetime | None:
    """Return the expiry of a document's lease, or ``None`` if unset or unreadable."""
    try:
        return get_datetime(document, "acquired_until")
    except MalformedDocumentError:
        return None


def text_of(document: Mapping[str, Any], key: str) -> str | None:
    """
    Return a field that an event carries, if it is a string (else ``None``).

    Events are signed by the broker that publishes them: a field copied from a
    document no signature covers (a job's ``schedule_id``, a lapsed job's owner)
    must not carry anything but text into them, or the broker would vouch for an
    object that a serializer rebuilds.
    """
    value = document.get(key)
    return value if isinstance(value, str) else None


def released_event(
    result: JobResult, scheduler_id: str, document: Mapping[str, Any]
) -> JobReleased:
    """Return the event announcing a job finished from its (maybe damaged) document."""
    return JobReleased.from_result(
        result,
        scheduler_id,
        text_of(document, "task_id") or "",
        text_of(document, "schedule_id"),
        scheduled_fire_time(document),
    )
