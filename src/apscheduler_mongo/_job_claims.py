"""
Reading what a job claim needs, in as few round trips as it can, and keeping it.

A claim reads the free jobs in queue order, each with its task document, and beside
them (in the same round trip, where the server has ``$unionWith``) what the running
jobs of every task hold: enough to plan the claim (:mod:`._planner`). When a capped
task at its limit kept jobs from the batch, a further round reads past them.

The scheduler asks for the task of each job it was handed (``get_task``) before it
runs it; the claim has just read that task and its running jobs, so the store
answers from what the claim read (:class:`ClaimedTasks`), for a moment.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio
import attrs
from apscheduler import Job, JobAdded, Task

from . import _layout as layout
from ._adapters import Collection
from ._clock import ServerClock
from ._layout import Document
from ._marshalling import (
    MalformedDocumentError,
    task_from_document,
    text_of,
    uuid_from_bson,
)
from ._marshalling import uuid_to_bson as bson_id
from ._planner import (
    Cap,
    ClaimContext,
    ClaimPlan,
    Holding,
    Slots,
    holdings_of,
    plan_claims,
    task_cap,
    tasks_of,
)
from ._signing import Codec, DisallowedCallableError, UnverifiedDataError

#: How many rounds a claim reads at most, when capped tasks keep jobs from it
MAX_ROUNDS = 4
#: How long what a claim read of a task may answer ``get_task`` (seconds)
TASK_MEMORY = 1.0


@attrs.define
class ClaimRead:
    """What one claim attempt read and decided."""

    plan: ClaimPlan
    #: The task documents of the candidates, by id
    tasks: dict[str, Document]
    #: What the running jobs held when the claim read, by task id
    holdings: Mapping[str, Holding]
    #: The queued job that falls due next, if it is for later (its id, its task's,
    #: its schedule's and its ``scheduled_fire_time``)
    next_waiting: Document | None = None


async def plan_job_claim(
    jobs: Collection,
    tasks: Collection,
    context: ClaimContext,
    limit: int | None,
) -> ClaimRead:
    """
    Read the free jobs and the running jobs' holdings; plan the claim.

    Queue order holds, but a task that runs all it may does not keep the free
    places from other tasks' jobs: when it kept some of the batch, another round
    reads the next jobs of the other tasks (none in the common case).
    """
    pipeline = layout.candidates_with_tasks(context.now, limit, tasks.name)
    documents, summaries, waiting = await jobs.aggregate_with(
        pipeline,
        (jobs, layout.RUNNING_JOBS),
        (jobs, layout.next_waiting_job(context.now)),
    )
    read = ClaimRead(ClaimPlan(), {}, holdings_of(summaries, context.logger))
    read.next_waiting = waiting[0] if waiting else None
    slots = Slots(read.holdings)
    caps: dict[str, Cap] = {}
    passed_over: list[Any] = []
    asked = limit
    for _ in range(MAX_ROUNDS):
        read.tasks.update(tasks_of(documents))
        for task_id, task in read.tasks.items():
            if task_id not in caps:
                caps[task_id] = task_cap(task, context.codec, context.logger)

        at_cap = set(read.plan.at_cap)
        read.plan.extend(plan_claims(documents, caps, slots, context))
        passed_over += [document["_id"] for document in documents]
        # Another round only if tasks at their cap kept places free, and the
        # queue may hold more
        wanted = limit - len(read.plan.chosen) if limit else 0
        if wanted <= 0 or not asked or len(documents) < asked:
            break

        if read.plan.at_cap <= at_cap:
            break

        pipeline = layout.candidates_with_tasks(
            context.now, wanted, tasks.name, passed_over, read.plan.at_cap
        )
        documents, asked = await jobs.aggregate(pipeline), wanted

    return read


@attrs.define
class _Memory:
    task: Document
    running: int
    uses: int
    until: float


@attrs.define
class ClaimedTasks:
    """
    What the store's latest job claims read of the tasks whose jobs they handed out.

    ``get_task`` for such a task answers from it: once per job handed out, within
    :data:`TASK_MEMORY` seconds of the claim, and until this store writes anything
    that changes the task or its running jobs. The running count is the claim's:
    the jobs that ran when it read, plus those it took.
    """

    _memories: dict[str, _Memory] = attrs.field(factory=dict)

    def remember(self, read: ClaimRead, handed_out: Iterable[Job]) -> None:
        """Remember the tasks of the jobs a claim handed out."""
        until = time.monotonic() + TASK_MEMORY
        jobs = list(handed_out)
        uses = Counter(job.task_id for job in jobs)
        queued = {bson_id(job.id) for job in jobs} & read.plan.were_queued
        newly = Counter(job.task_id for job in jobs if bson_id(job.id) in queued)
        for task_id, count in uses.items():
            if (task := read.tasks.get(task_id)) is not None:
                running = read.holdings.get(task_id, Holding()).running + newly[task_id]
                self._memories[task_id] = _Memory(task, running, count, until)

    def recall(self, task_id: str, codec: Codec) -> Task | None:
        """Return the task as the claim read it, or ``None`` if it is not known."""
        memory = self._memories.get(task_id)
        if memory is None or time.monotonic() > memory.until:
            self._memories.pop(task_id, None)
            return None

        memory.uses -= 1
        if not memory.uses:
            del self._memories[task_id]

        try:
            return task_from_document(memory.task, memory.running, codec)
        except (MalformedDocumentError, UnverifiedDataError, DisallowedCallableError):
            return None  # the store reads it again, and says what is wrong

    def forget(self, task_id: str | None = None) -> None:
        """Forget one task (or all): this store changed it or its running jobs."""
        if task_id is None:
            self._memories.clear()
        else:
            self._memories.pop(task_id, None)


def running_count(summaries: Sequence[Mapping[str, Any]]) -> int:
    """Return the count of ``layout.running_jobs_of()``'s output (none: 0)."""
    for summary in summaries:
        if isinstance(running := summary.get("running"), int):
            return running

    return 0


#: How long after its fire time a job meant for later is announced (seconds)
_ALARM_MARGIN = 0.01


@attrs.define
class JobAlarm:
    """
    Wake this scheduler's job loop when the next job meant for later falls due.

    APScheduler's job loop waits for events, with no deadline. A job added before
    its fire time by the server's clock (by a scheduler whose clock runs ahead) is
    handed out from that time on, and no event marks it: so each claim learns, in
    its round trip, when the next such job falls due, and this alarm announces the
    job again, to this process's subscribers, at that time.
    """

    clock: ServerClock
    announce: Callable[[JobAdded], Awaitable[object]]
    _due: int | None = attrs.field(init=False, default=None)
    _event: JobAdded | None = attrs.field(init=False, default=None)
    _changed: anyio.Event = attrs.field(init=False, factory=anyio.Event)

    def set(self, waiting: Mapping[str, Any]) -> None:
        """Arm the alarm for a job meant for later, unless it rings earlier already."""
        due = waiting.get("scheduled_fire_time")
        if not isinstance(due, int) or (self._due is not None and self._due <= due):
            return

        try:
            job_id = uuid_from_bson(waiting["_id"])
        except MalformedDocumentError:
            return

        self._due = due
        self._event = JobAdded(
            job_id=job_id,
            task_id=text_of(waiting, "task_id") or "",
            schedule_id=text_of(waiting, "schedule_id"),
        )
        self._changed.set()

    async def run(self) -> None:
        while True:
            if self._due is None:
                await self._changed.wait()
                self._changed = anyio.Event()
                continue

            wait = (self._due - self.clock.now_micros()) / 1_000_000 + _ALARM_MARGIN
            with anyio.move_on_after(max(wait, 0)):
                await self._changed.wait()

            if self._changed.is_set():  # armed for an earlier time meanwhile
                self._changed = anyio.Event()
                continue

            event, self._due, self._event = self._event, None, None
            if event is not None:
                await self.announce(event)
