"""Pure helpers for job documents: finishing them and planning their claims."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from logging import Logger
from typing import Any

import attrs
from apscheduler import (
    DeserializationError,
    Job,
    JobOutcome,
    JobResult,
    SerializationError,
    TaskLookupError,
)
from apscheduler.abc import Serializer
from bson import ObjectId
from pymongo import UpdateOne

from ._marshalling import (
    ACQUIRED,
    FINISHED,
    QUEUED,
    MalformedDocumentError,
    duration_from_micros,
    from_micros,
    get_datetime,
    job_from_document,
    quarantine_record,
    result_to_document,
    slot_key,
    to_micros,
    uuid_from_bson,
)


def free_job_filter(now: int) -> dict[str, Any]:
    """Match the jobs a scheduler may take: queued, or acquired with a lapsed lease."""
    return {
        "$or": [
            {"state": QUEUED},
            {"state": ACQUIRED, "acquired_until": {"$lt": now, "$ne": None}},
        ]
    }


def finish_update(
    result: JobResult,
    serializer: Serializer,
    logger: Logger,
    *,
    from_schedule: bool,
    token: ObjectId,
) -> dict[str, Any]:
    """
    Return the update that turns an acquired job document into a finished one.

    The result is kept inside the document while it is wanted (``expires_at`` later
    than ``finished_at``). ``purge_at`` lets the TTL index delete the document once
    the result expires; a job created by a schedule gets none, because its document
    also records that its fire time was used, until :meth:`cleanup` sees the schedule
    past that time.
    """
    changes: dict[str, Any] = {
        "state": FINISHED,
        "v": token,
        "release_token": token,
        "finished_time": to_micros(result.finished_at),
    }
    keep = result.expires_at > result.finished_at
    if keep:
        try:
            changes["result"] = result_to_document(result, serializer)
        except SerializationError:
            logger.exception(
                "Cannot serialize the result of job %s; keeping its outcome only",
                result.job_id,
            )
            changes["result"] = result_to_document(
                attrs.evolve(result, exception=None, return_value=None), serializer
            )

    if not from_schedule:
        changes["purge_at"] = result.expires_at if keep else result.finished_at

    return {
        "$set": changes,
        "$unset": {
            "args": "",
            "kwargs": "",
            "acquired_by": "",
            "acquired_until": "",
            "slot_key": "",
        },
    }


def set_aside_update(reason: str) -> dict[str, Any]:
    """
    Return the update that takes a job document out of the queue for good.

    For a job that no result can name (its id is no UUID): it becomes finished
    without a result, purge time or finish time, so nothing deletes it, and it
    records why.
    """
    return {
        "$set": {
            "state": FINISHED,
            "quarantine": quarantine_record(reason),
            "v": ObjectId(),
        },
        "$unset": {"acquired_by": "", "acquired_until": "", "slot_key": ""},
    }


def result_for_document(
    document: Mapping[str, Any],
    outcome: JobOutcome,
    now: datetime,
    exception: BaseException | None = None,
) -> JobResult:
    """Build a result for a job known only by its (possibly damaged) document."""
    try:
        expiration = duration_from_micros(document.get("result_expiration_time"))
    except TypeError:
        expiration = None

    return JobResult(
        job_id=uuid_from_bson(document["_id"]),
        outcome=outcome,
        finished_at=now,
        expires_at=now + (expiration or timedelta(0)),
        exception=exception,
    )


def describe_id(value: Any) -> str:
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
    try:
        return get_datetime(document, "scheduled_fire_time")
    except MalformedDocumentError:
        return None


@attrs.define
class ClaimPlan:
    """What one acquisition round decided for each candidate job document."""

    #: requests to send in one bulk write
    requests: list[UpdateOne] = attrs.field(factory=list)
    #: jobs to hand to the scheduler, by document id
    jobs: dict[Any, Job] = attrs.field(factory=dict)
    #: results of jobs finished without running, by document id
    finished: dict[Any, JobResult] = attrs.field(factory=dict)
    #: the documents of the jobs claimed or finished, in queue order
    documents: list[Any] = attrs.field(factory=list)


def plan_claims(
    documents: Sequence[Mapping[str, Any]],
    *,
    caps: Mapping[str, int | None],
    held_slots: Mapping[str, set[int]],
    running: Mapping[str, int],
    scheduler_id: str,
    now: int,
    acquired_until: int,
    token: ObjectId,
    serializer: Serializer,
    logger: Logger,
) -> ClaimPlan:
    """
    Decide, for each free job document (in queue order), whether to claim it.

    A job whose task has ``max_running_jobs`` needs one of the task's numbered slots;
    the unique ``slot_key`` index makes a slot impossible to hold twice. Running jobs
    without a slot (acquired before the task had a limit) count against the limit
    too. Jobs that
    cannot run (unreadable, unknown task, start deadline passed) are finished in the
    same bulk write instead of being handed out; a job whose id is no UUID is set
    aside.
    """
    plan = ClaimPlan()
    now_time = from_micros(now)
    free_slots: dict[str, list[int]] = {}
    for task_id, cap in caps.items():
        if cap is not None:
            held = held_slots.get(task_id, set())
            available = max(0, cap - running.get(task_id, 0))
            free_slots[task_id] = [n for n in range(cap) if n not in held][:available]

    for document in documents:
        query = {"_id": document["_id"], "v": document.get("v"), **free_job_filter(now)}
        try:
            uuid_from_bson(document["_id"])
        except MalformedDocumentError as exc:
            logger.warning(
                "Setting job %r aside: its id is no UUID, so no result can name it",
                document["_id"],
            )
            plan.requests.append(UpdateOne(query, set_aside_update(str(exc))))
            continue

        from_schedule = "fire_key" in document
        result: JobResult | None = None
        job: Job | None = None
        try:
            job = job_from_document(document, serializer)
        except (DeserializationError, MalformedDocumentError) as exc:
            logger.warning(
                "Cannot read job %s: %s", describe_id(document.get("_id")), explain(exc)
            )
            result = result_for_document(
                document, JobOutcome.deserialization_failed, now_time, exc
            )
        else:
            if job.task_id not in caps:
                logger.warning("Job %s refers to unknown task %r", job.id, job.task_id)
                result = JobResult.from_job(
                    job,
                    JobOutcome.error,
                    finished_at=now_time,
                    exception=TaskLookupError(job.task_id),
                )
            elif job.start_deadline is not None and job.start_deadline < now_time:
                result = JobResult.from_job(
                    job, JobOutcome.missed_start_deadline, finished_at=now_time
                )

        if result is not None:
            update = finish_update(
                result, serializer, logger, from_schedule=from_schedule, token=token
            )
            plan.requests.append(UpdateOne(query, update))
            plan.finished[document["_id"]] = result
            plan.documents.append(document)
            continue

        assert job is not None
        changes: dict[str, Any] = {
            "state": ACQUIRED,
            "acquired_by": scheduler_id,
            "acquired_until": acquired_until,
            "v": token,
        }
        if job.task_id in free_slots and "slot_key" not in document:
            if not free_slots[job.task_id]:
                logger.debug(
                    "Skipping job %s: task %r runs its maximum number of jobs",
                    job.id,
                    job.task_id,
                )
                continue

            changes["slot_key"] = slot_key(job.task_id, free_slots[job.task_id].pop(0))

        plan.requests.append(UpdateOne(query, {"$set": changes}))
        job.acquired_by = scheduler_id
        job.acquired_until = from_micros(acquired_until)
        plan.jobs[document["_id"]] = job
        plan.documents.append(document)

    return plan
