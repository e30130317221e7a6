"""
Planning a job claim: what to take, what to finish at once, what to leave queued.

Pure functions of the documents a claim read; no round trips. The store reads the
free jobs (each with its task) and the slots held, plans, and sends the plan's
updates in one bulk write (see :mod:`._leases`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from logging import Logger
from typing import Any

import attrs
from apscheduler import (
    DeserializationError,
    Job,
    JobOutcome,
    JobResult,
    TaskLookupError,
)
from bson import ObjectId

from ._adapters import Update
from ._layout import (
    ACQUIRED,
    RELEASE_TOKEN,
    TASK_FIELD,
    Document,
    Tag,
    free_jobs,
    lease,
    quarantined_job_update,
    slot_key,
    slot_number,
    unchanged,
)
from ._marshalling import (
    MalformedDocumentError,
    describe_id,
    explain,
    finish_update,
    from_micros,
    is_from_schedule,
    job_from_document,
    quarantine_record,
    result_for_document,
    task_from_document,
    uuid_from_bson,
)
from ._signing import Codec, DisallowedCallableError, UnverifiedDataError


@attrs.frozen
class ClaimContext:
    """Who claims, when, and with what."""

    owner: str
    #: Now and the lease's expiry, in microseconds
    now: int
    acquired_until: int
    token: ObjectId
    codec: Codec
    logger: Logger


@attrs.frozen
class Refused:
    """A task this store will not hand out: its jobs finish with ``error``."""

    error: Exception


#: What a claim knows of a task: its ``max_running_jobs``, or that it is refused
Cap = int | None | Refused


@attrs.define
class ClaimPlan:
    """What one claim attempt decided for its candidate job documents."""

    #: Each candidate to write, as it will be once the write is applied (``None``
    #: for one quarantined, which the claim does not hold), with its update
    chosen: list[tuple[Document | None, Update]] = attrs.field(factory=list)
    #: The jobs to hand to the scheduler, by document id
    jobs: dict[Any, Job] = attrs.field(factory=dict)
    #: The results of jobs finished without running, by document id
    finished: dict[Any, JobResult] = attrs.field(factory=dict)
    #: The tasks whose jobs were left queued because they run all they may
    at_cap: set[str] = attrs.field(factory=set)
    #: The jobs to hand out that were queued (the others' leases had lapsed: they
    #: were counted as running already), by document id
    were_queued: set[Any] = attrs.field(factory=set)

    def extend(self, other: ClaimPlan) -> None:
        """Add what a further round of the same claim decided."""
        self.chosen += other.chosen
        self.jobs.update(other.jobs)
        self.finished.update(other.finished)
        self.at_cap |= other.at_cap
        self.were_queued |= other.were_queued


def tasks_of(documents: Sequence[Document]) -> dict[str, Document]:
    """Take the task documents a claim's read put beside its jobs, by task id."""
    tasks: dict[str, Document] = {}
    for document in documents:
        for task in document.pop(TASK_FIELD, None) or ():
            if isinstance(task.get("_id"), str):
                tasks[task["_id"]] = task

    return tasks


def task_cap(task: Mapping[str, Any], codec: Codec, logger: Logger) -> Cap:
    """
    Return a task's ``max_running_jobs``; 0 (run nothing) if the task is bad; or
    :class:`Refused` if its signature or its callable is refused.
    """
    try:
        # The scheduler reads the task of each job it gets: it must be readable
        task_from_document(task, 0, codec)
    except (UnverifiedDataError, DisallowedCallableError) as exc:
        logger.warning(
            "Refusing task %r: %s; its jobs finish with this error", task["_id"], exc
        )
        return Refused(exc)
    except MalformedDocumentError as exc:
        logger.warning(
            "Cannot read task %r: %s; its jobs stay queued", task["_id"], exc
        )
        return 0

    cap = limit_of(task.get("max_running_jobs"))
    if cap == 0:
        logger.warning(
            "Task %r has an invalid max_running_jobs (%r); its jobs stay queued",
            task["_id"],
            task.get("max_running_jobs"),
        )

    return cap


def limit_of(cap: object) -> int | None:
    """Return a task's limit as given: ``None`` (uncapped), positive, or 0 (bad)."""
    if cap is None or (isinstance(cap, int) and not isinstance(cap, bool) and cap > 0):
        return cap

    return 0


@attrs.frozen
class Holding:
    """What a task's running jobs hold: how many run, and which slots they have."""

    running: int = 0
    slots: frozenset[int] = frozenset()


def holdings_of(
    summaries: Sequence[Mapping[str, Any]], logger: Logger
) -> dict[str, Holding]:
    """
    Read what the running jobs hold (``holdings()``: one document listing, per task,
    a count and each job holding a slot, with its key) into holdings by task id.

    A malformed slot key is warned about; its job still counts as running.
    """
    holdings: dict[str, Holding] = {}
    for summary in summaries:
        for entry in _listed(summary.get("tasks")):
            task_id, running = entry.get("task"), entry.get("running")
            if isinstance(task_id, str) and isinstance(running, int):
                held = (_slot_of(job, logger) for job in _listed(entry.get("held")))
                slots = frozenset(slot for slot in held if slot is not None)
                holdings[task_id] = Holding(running, slots)

    return holdings


def _listed(value: Any) -> list[Any]:
    """Return the mappings in a list (a server may list a removed value as null)."""
    return (
        [item for item in value if isinstance(item, Mapping)]
        if isinstance(value, list)
        else []
    )


def _slot_of(job: Mapping[str, Any], logger: Logger) -> int | None:
    """Return the number of the slot a running job holds."""
    try:
        return slot_number(job["key"])
    except (AttributeError, KeyError, TypeError, ValueError):
        logger.warning(
            "Job %s holds a malformed slot key %r",
            describe_id(job.get("job")),
            job.get("key"),
        )
        return None


@attrs.define
class Slots:
    """
    The numbered slots of the capped tasks that a claim may still take.

    Running jobs without a slot (acquired before the task had a limit) count against
    the limit too.
    """

    holdings: dict[str, Holding]
    #: The tasks whose running jobs the claim has not read: it takes none of their
    #: slots (their jobs stay queued)
    unread: set[str] = attrs.field(kw_only=True, factory=set)
    _pools: dict[str, _Pool] = attrs.field(init=False, factory=dict)

    def read(self, holdings: Mapping[str, Holding], tasks: Iterable[str]) -> None:
        """Take what the running jobs of ``tasks`` hold, read since."""
        for task_id in tasks:
            self.unread.discard(task_id)
            if task_id in holdings:
                self.holdings[task_id] = holdings[task_id]

    def take(self, task_id: str, cap: int) -> int | None:
        """Take a free slot of a task capped at ``cap``; ``None`` if none is left."""
        if task_id in self.unread:
            return None

        pool = self._pool(task_id, cap)
        number = next(pool.numbers, None) if pool.left > 0 else None
        if number is not None:
            pool.left -= 1

        return number

    def left(self, task_id: str, cap: int) -> int:
        """Return how many slots of a task capped at ``cap`` the claim may take."""
        return 0 if task_id in self.unread else self._pool(task_id, cap).left

    def _pool(self, task_id: str, cap: int) -> _Pool:
        # Numbers are made as they are taken: a stored limit can be huge
        if task_id not in self._pools:
            holding = self.holdings.get(task_id, Holding())
            numbers = (n for n in range(cap) if n not in holding.slots)
            self._pools[task_id] = _Pool(numbers, max(0, cap - holding.running))

        return self._pools[task_id]


@attrs.define
class _Pool:
    #: The numbers of the slots no running job holds, lowest first
    numbers: Iterator[int]
    #: How many the claim may still take
    left: int


def plan_claims(
    documents: Sequence[Document],
    caps: Mapping[str, Cap],
    slots: Slots,
    context: ClaimContext,
) -> ClaimPlan:
    """
    Decide, for each free job document (in queue order), whether to claim it.

    A job whose task has ``max_running_jobs`` needs one of the task's numbered slots;
    the unique ``slot_key`` index makes a slot impossible to hold twice; a job for
    which none is left stays queued, and the plan names its task in ``at_cap``. Jobs
    that cannot run (unreadable, unknown task, start deadline passed) are finished in
    the same bulk write instead of being handed out; a job whose id is no UUID is
    quarantined. A job left queued is not decoded.
    """
    plan = ClaimPlan()
    for document in documents:
        if (task_id := _at_cap(document, caps, slots)) is not None:
            context.logger.debug(
                "Skipping job %s: task %r runs its maximum number of jobs",
                describe_id(document.get("_id")),
                task_id,
            )
            plan.at_cap.add(task_id)
            continue

        query = {**unchanged(document), **free_jobs(context.now)}
        try:
            uuid_from_bson(document["_id"])
        except MalformedDocumentError as exc:
            context.logger.warning(
                "Quarantining job %r: its id is no UUID, so no result can name it",
                document["_id"],
            )
            record = quarantine_record(str(exc), from_micros(context.now))
            update = quarantined_job_update(record)
            plan.chosen.append((None, Update(query, update)))
            continue

        job, result = _read(document, caps, context)
        if result is not None:
            _finish(plan, document, query, result, context)
        elif job is not None:
            _take(plan, document, query, job, caps, slots, context)

    return plan


def _at_cap(document: Document, caps: Mapping[str, Cap], slots: Slots) -> str | None:
    """Return the task of a job that must stay queued: its task has no free slot."""
    task_id = document.get("task_id")
    if not isinstance(task_id, str) or "slot_key" in document:
        return None

    cap = caps.get(task_id)
    if isinstance(cap, int) and not slots.left(task_id, cap):
        return task_id

    return None


def _read(
    document: Document, caps: Mapping[str, Cap], context: ClaimContext
) -> tuple[Job | None, JobResult | None]:
    """
    Read a candidate: the job to claim, or the result to finish it with.

    The job of a refused task is finished before its arguments are read.
    """
    now = from_micros(context.now)
    task_id = document.get("task_id")
    if isinstance(task_id, str) and isinstance(cap := caps.get(task_id), Refused):
        outcome = JobOutcome.error
        return None, result_for_document(document, outcome, now, cap.error)

    try:
        job = job_from_document(document, context.codec)
    except (DeserializationError, MalformedDocumentError) as exc:
        context.logger.warning(
            "Cannot read job %s: %s", describe_id(document.get("_id")), explain(exc)
        )
        outcome = JobOutcome.deserialization_failed
        return None, result_for_document(document, outcome, now, exc)

    return job, _cannot_run(job, caps, now, context.logger)


def _cannot_run(
    job: Job, caps: Mapping[str, Cap], now: datetime, logger: Logger
) -> JobResult | None:
    """Return the result of a job that cannot run, or ``None`` if it can."""
    if job.task_id not in caps:
        logger.warning("Job %s refers to unknown task %r", job.id, job.task_id)
        return JobResult.from_job(
            job,
            JobOutcome.error,
            finished_at=now,
            exception=TaskLookupError(job.task_id),
        )

    if job.start_deadline is not None and job.start_deadline < now:
        return JobResult.from_job(
            job, JobOutcome.missed_start_deadline, finished_at=now
        )

    return None


def _finish(
    plan: ClaimPlan,
    document: Document,
    query: Document,
    result: JobResult,
    context: ClaimContext,
) -> None:
    # A job that fails its signature check is quarantined as found (nothing is
    # deleted); its result still tells whoever waits for it
    quarantine = None
    if result.outcome is JobOutcome.deserialization_failed and isinstance(
        result.exception, UnverifiedDataError
    ):
        reason = explain(result.exception)
        quarantine = quarantine_record(reason, from_micros(context.now))

    update = finish_update(
        result,
        context.codec,
        context.logger,
        from_schedule=is_from_schedule(document),
        tag=Tag(RELEASE_TOKEN, context.token),
        quarantine=quarantine,
    )
    plan.chosen.append((document, Update(query, update)))
    plan.finished[document["_id"]] = result


def _take(
    plan: ClaimPlan,
    document: Document,
    query: Document,
    job: Job,
    caps: Mapping[str, Cap],
    slots: Slots,
    context: ClaimContext,
) -> None:
    changes = {
        "state": ACQUIRED,
        **lease(context.owner, context.acquired_until, context.token),
    }
    cap = caps[job.task_id]
    assert not isinstance(cap, Refused)  # its jobs were finished by _read
    if cap is not None and "slot_key" not in document:
        slot = slots.take(job.task_id, cap)
        if slot is None:  # none left (checked before its job was read)
            plan.at_cap.add(job.task_id)
            return

        changes["slot_key"] = slot_key(job.task_id, slot)

    job.acquired_by = context.owner
    job.acquired_until = from_micros(context.acquired_until)
    plan.chosen.append(({**document, **changes}, Update(query, {"$set": changes})))
    plan.jobs[document["_id"]] = job
    if document.get("state") != ACQUIRED:
        plan.were_queued.add(document["_id"])
