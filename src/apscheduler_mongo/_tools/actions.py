"""
The changes an operator makes to a store: pause, resume and remove a schedule, run
it now, retry a failed job, cancel a queued one, purge.

The command line and the dashboard both make them through here, on a scheduler
(never started) whose event broker announces each change to the schedulers. Unlike
looking at a store, changing it goes through the store's API, which deserializes
the schedule it changes with the store's serializer.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from logging import Logger
from typing import Any
from uuid import UUID

import attrs
from apscheduler import AsyncScheduler, Job, RetrySettings, Schedule, TaskLookupError
from apscheduler.abc import Serializer
from apscheduler.serializers.json import JSONSerializer
from apscheduler.serializers.pickle import PickleSerializer

from .. import _layout as layout
from .._datastore import MongoDBDataStore
from .._eventbroker import MongoDBEventBroker
from .._layout import ACQUIRED
from .._marshalling import uuid_to_bson
from .._signing import Signer
from ..serializers import SafeCBORSerializer, SafeJSONSerializer, SafePickleSerializer
from .status import (
    NotFoundError,
    Reader,
    cancel_refusal,
    job_uuid,
    quarantine_reason,
    retry_refusal,
)


class RefusedError(ValueError):
    """Raised when an action does not apply to a job or schedule as it stands."""


def action_scheduler(
    client: object,
    database: str,
    serializer: Serializer,
    events_collection: str,
    retry_settings: RetrySettings,
    logger: Logger,
    *,
    signing_key: Signer | None = None,
    accept_unsigned: bool = False,
) -> AsyncScheduler:
    """
    Return a scheduler (never started processing) on the store, to make changes.

    It announces each change through a :class:`MongoDBEventBroker` on the same
    database, so that schedulers in other processes see it at once (one whose
    schedules are all paused sleeps until an event wakes it). The broker polls,
    and seldom: it only publishes (a change stream needs privileges).

    Start it (``async with``) only on a database that holds a store (see
    :func:`.status.require_store`): starting the store creates its collections.
    A store whose schedulers sign needs the key here too: a change rewrites the
    schedule, which must stay signed (and is checked before it is read). Without
    a key, nothing read can be authenticated: the schedule is read with the safe
    counterpart of ``serializer`` (:func:`restricted`), so that a change made
    from an operator's host runs no stored code, whatever the database holds.

    :raises ValueError: if an option has a bad value
    """
    store = MongoDBDataStore(
        client,
        database=database,
        serializer=serializer if signing_key is not None else restricted(serializer),
        retry_settings=retry_settings,
        signing_key=signing_key,
        accept_unsigned=accept_unsigned,
    )
    broker = MongoDBEventBroker(
        client,
        database=database,
        collection=events_collection,
        retry_settings=retry_settings,
        mode="polling",
        poll_interval=3600,
        signing_key=signing_key,
        accept_unsigned=accept_unsigned,
    )
    return AsyncScheduler(store, broker, logger=logger)


def restricted(serializer: Serializer) -> Serializer:
    """
    Return the counterpart of one of APScheduler's serializers that rebuilds only
    allowed classes (:mod:`apscheduler_mongo.serializers`); others as they are.

    It writes the same bytes: a schedule changed through it reads back the same.
    """
    if isinstance(serializer, (SafePickleSerializer, SafeJSONSerializer)):
        return serializer

    if isinstance(serializer, PickleSerializer):
        return SafePickleSerializer(protocol=serializer.protocol)

    if isinstance(serializer, JSONSerializer):
        return SafeJSONSerializer(magic_key=serializer.magic_key)

    # Told by name: its module needs cbor2, an optional dependency
    if type(serializer).__name__ == "CBORSerializer" and not isinstance(
        serializer, SafeCBORSerializer
    ):
        return SafeCBORSerializer(type_tag=getattr(serializer, "type_tag", 4664))

    return serializer


def innermost(exc: BaseException) -> BaseException:
    """Return the error inside the exception groups that task groups wrap it in."""
    while isinstance(inner := getattr(exc, "exceptions", None), tuple) and inner:
        exc = inner[0]

    return exc


async def schedule_to_change(
    scheduler: AsyncScheduler,
    reader: Reader,
    schedule_id: str,
    *,
    quarantined: str = "pausing or resuming it would lift the quarantine",
) -> Schedule:
    """
    Return the schedule to pause or resume (or run now).

    :param quarantined: why a quarantined schedule is refused
    :raises NotFoundError: if it does not exist, is quarantined, or cannot be read
    """
    documents = await reader.find(
        layout.SCHEDULES, layout.by_id(schedule_id), {layout.QUARANTINE: 1}
    )
    if not documents:
        raise NotFoundError(
            f"no schedule {schedule_id!r} in database {reader.database_name!r}"
        )

    if (reason := quarantine_reason(documents[0])) is not None:
        raise NotFoundError(
            f"schedule {schedule_id!r} is quarantined ({reason}); {quarantined}: "
            f"remove it, or add it again from your application"
        )

    schedules = await scheduler.data_store.get_schedules({schedule_id})
    if not schedules:
        raise NotFoundError(
            f"schedule {schedule_id!r} cannot be read here (see the warning); is "
            f"the serializer (--serializer) right, and can this Python import what "
            f"its trigger and arguments use?"
        )

    return schedules[0]


async def pause(scheduler: AsyncScheduler, reader: Reader, schedule_id: str) -> str:
    """Pause a schedule; return what was done."""
    schedule = await schedule_to_change(scheduler, reader, schedule_id)
    # As the schedulers' queries have it: only true pauses ("true" from a hand edit
    # does not)
    if schedule.paused is True:
        return f"schedule {schedule.id!r} is already paused"

    await scheduler.pause_schedule(schedule.id)
    return f"paused schedule {schedule.id!r}"


async def resume(
    scheduler: AsyncScheduler, reader: Reader, schedule_id: str, *, now: bool = False
) -> str:
    """
    Resume a paused schedule; return what was done.

    :param now: resume from now, skipping the fire times it missed while paused
    """
    schedule = await schedule_to_change(scheduler, reader, schedule_id)
    if schedule.paused is not True:
        return f"schedule {schedule.id!r} is not paused"

    await scheduler.unpause_schedule(schedule.id, resume_from="now" if now else None)
    resumed = await scheduler.get_schedule(schedule.id)
    next_time = resumed.next_fire_time
    when = next_time.isoformat(sep=" ", timespec="seconds") if next_time else "none"
    return f"resumed schedule {schedule.id!r}; next fire time: {when}"


async def remove(scheduler: AsyncScheduler, reader: Reader, schedule_id: str) -> str:
    """Remove a schedule (quarantined or unreadable ones too); return what was done."""
    if not await reader.find(layout.SCHEDULES, layout.by_id(schedule_id), {"_id": 1}):
        raise NotFoundError(
            f"no schedule {schedule_id!r} in database {reader.database_name!r}"
        )

    await scheduler.remove_schedule(schedule_id)
    return f"removed schedule {schedule_id!r}"


def _store(scheduler: AsyncScheduler) -> MongoDBDataStore:
    store = scheduler.data_store
    if not isinstance(store, MongoDBDataStore):  # pragma: no cover (a misuse)
        raise TypeError(f"not a scheduler on a MongoDBDataStore: {store!r}")

    return store


async def _require_task(scheduler: AsyncScheduler, task_id: str) -> None:
    """
    :raises NotFoundError: if the task does not exist (a job of it would only
        finish with an error)
    """
    try:
        await scheduler.data_store.get_task(task_id)
    except TaskLookupError:
        raise NotFoundError(
            f"task {task_id!r} does not exist (was it removed?); add it again "
            f"from your application first"
        ) from None


async def run_now(scheduler: AsyncScheduler, reader: Reader, schedule_id: str) -> str:
    """
    Add one job that runs a schedule's task now; return what was done.

    The job is built as APScheduler's scheduler builds the job of a fire time (the
    schedule's task, arguments, job executor, metadata and result expiration time,
    and ``schedule_id``, so that it shows among the schedule's runs), read through
    the store (its signature checked first), added with the store's ``add_job`` and
    announced (``JobAdded``). It has no scheduled fire time: it is for now, so it
    has no fire-time key either, and neither collides with nor stands in for the
    job of any fire time of the schedule (whose next fire time does not change).
    Its start deadline is now plus the schedule's misfire grace time, by this
    host's clock, as the scheduler sets it from a fire time; no jitter is added
    (jitter spreads fire times; run-now means now). A paused schedule may be run
    now (it stays paused); so may a finished one. Costs five commands: the
    quarantine check, the schedule, the task, the insert, the event.

    :raises NotFoundError: if the schedule does not exist, is quarantined, cannot
        be read here, or its task does not exist
    """
    schedule = await schedule_to_change(
        scheduler,
        reader,
        schedule_id,
        quarantined="its trigger or arguments could not be read or trusted",
    )
    await _require_task(scheduler, schedule.task_id)
    deadline: dict[str, Any] = {}
    if (grace := schedule.misfire_grace_time) is not None:
        deadline["start_deadline"] = datetime.now(timezone.utc) + grace

    job = Job(
        task_id=schedule.task_id,
        args=schedule.args,
        kwargs=schedule.kwargs,
        schedule_id=schedule.id,
        executor=schedule.job_executor,
        result_expiration_time=schedule.job_result_expiration_time,
        metadata=schedule.metadata.copy(),
        **deadline,
    )
    await _store(scheduler).add_job(job)
    paused = " (the schedule stays paused)" if schedule.paused is True else ""
    return (
        f"added job {job.id} to run schedule {schedule.id!r} now{paused}; its "
        f"next fire time is unchanged"
    )


#: What telling whether an action applies to a job reads of it
_JOB_STATE_FIELDS = dict.fromkeys(
    ["state", layout.OUTCOME, "result.outcome", layout.QUARANTINE, "args", "kwargs"],
    1,
)


async def _job_to_change(reader: Reader, job_id: str) -> tuple[UUID, Mapping[str, Any]]:
    """
    Return a job's id and the fields that tell whether an action applies.

    :raises NotFoundError: if there is no such job
    """
    uuid = job_uuid(job_id)
    documents = (
        []
        if uuid is None
        else await reader.find(
            layout.JOBS, layout.by_id(uuid_to_bson(uuid)), _JOB_STATE_FIELDS
        )
    )
    if uuid is None or not documents:
        raise NotFoundError(f"no job {job_id!r} in database {reader.database_name!r}")

    return uuid, documents[0]


async def retry(scheduler: AsyncScheduler, reader: Reader, job_id: str) -> str:
    """
    Add a new job that runs a failed job's task again; return what was done.

    The job must have finished with one of
    :data:`~.status.RETRYABLE_OUTCOMES` (an error, a missed start deadline,
    abandoned, cancelled), and kept its arguments: a job that does not succeed
    keeps them, signed, until its record goes (see :doc:`design`). They are read
    through the store, which checks their signature before deserializing them.
    The new job has the same task, arguments, job executor, metadata, result
    expiration time and schedule (so that it shows among the schedule's runs), no
    scheduled fire time and no start deadline (it is for now; it takes no fire
    time of the schedule); it is added with the store's ``add_job`` and announced
    (``JobAdded``). Costs five commands: the job's state, the job, its task, the
    insert, the event.

    :raises NotFoundError: if the job does not exist, its arguments cannot be read
        here (a wrong serializer, a signature that does not match: the warning
        says which), or its task does not exist
    :raises RefusedError: if it is not finished, succeeded, finished otherwise
        than by failing, is quarantined, or kept no arguments
    """
    uuid, document = await _job_to_change(reader, job_id)
    if (refusal := retry_refusal(document)) is not None:
        raise RefusedError(f"job {uuid} {refusal}")

    store = _store(scheduler)
    failed = await store.read_job(uuid)
    if failed is None:
        raise NotFoundError(
            f"job {uuid} cannot be read here (see the warning); is the serializer "
            f"(--serializer) right, the signing key, and can this Python import "
            f"what its arguments use?"
        )

    await _require_task(scheduler, failed.task_id)
    job = Job(
        task_id=failed.task_id,
        args=failed.args,
        kwargs=failed.kwargs,
        schedule_id=failed.schedule_id,
        executor=failed.executor,
        result_expiration_time=failed.result_expiration_time,
        metadata=dict(failed.metadata),
    )
    await store.add_job(job)
    return f"retried job {uuid} as job {job.id}"


async def cancel(scheduler: AsyncScheduler, reader: Reader, job_id: str) -> str:
    """
    Cancel a queued job: it never runs; return what was done.

    The job is finished with the outcome ``cancelled`` in one conditional write
    that re-checks that it is still queued, so a job that a scheduler claimed
    meanwhile is not cancelled (and runs), and is announced (``JobReleased``).
    It keeps its arguments, so it can be retried, and a job of a schedule keeps
    its fire time (no other job is added for it). Costs four commands: the job's
    state, the job again (as the write needs it), the write, the event.

    :raises NotFoundError: if the job does not exist
    :raises RefusedError: if it is not queued (running, finished, quarantined),
        or a scheduler claimed it meanwhile
    """
    uuid, document = await _job_to_change(reader, job_id)
    if (refusal := cancel_refusal(document)) is not None:
        raise RefusedError(f"job {uuid} {refusal}")

    if not await _store(scheduler).cancel_job(scheduler.identity, uuid):
        raise RefusedError(
            f"job {uuid} is no longer queued (a scheduler claimed it meanwhile, or "
            f"it was removed): not cancelled"
        )

    return f"cancelled job {uuid}"


@attrs.frozen
class Purged:
    """What the store held before and after its cleanup."""

    #: The names of the counts, and each count before and after
    counts: list[tuple[str, int, int]]

    def summary(self) -> str:
        return "; ".join(
            f"{name}: {before} -> {after}" for name, before, after in self.counts
        )


async def _purge_counts(reader: Reader) -> list[int]:
    return [
        await reader.count(layout.JOBS, layout.STORED_RESULTS),
        await reader.count(layout.JOBS, layout.in_state(ACQUIRED)),
        await reader.count("jobs", {}),
        await reader.count("schedules", {}),
    ]


async def purge(scheduler: AsyncScheduler, reader: Reader) -> Purged:
    """Run the store's cleanup (expired results, finished schedules, dead owners)."""
    before = await _purge_counts(reader)
    await scheduler.cleanup()
    after = await _purge_counts(reader)
    names = ["stored results", "running jobs", "job documents", "schedules"]
    return Purged(list(zip(names, before, after, strict=True)))
