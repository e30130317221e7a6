"""
Reading what a job claim needs, no more than it can hand out, and keeping it.

A claim reads free jobs in queue order, each with its task document, and beside them
(in the same round trip, where the server has ``$unionWith``) what the running jobs
of every task hold: enough to plan the claim (:mod:`._planner`).

It reads no further than it can hand out. The store knows which tasks are capped
(:class:`TaskLimits`: from the tasks it adds, the task documents its claims read,
and every :data:`LIMITS_REFRESH` seconds every task's limit, read in a claim's round
trip) and how many free slots each had when it last looked. So a claim reads, in
queue order:

- of each capped task, no more jobs than its free slots (none for a task at its cap);
- of the uncapped tasks, up to the claim's limit;
- of the tasks it does not know (added elsewhere, or gone), up to the claim's limit.

What it believed is checked against what the same round trip read: when a task had
more free slots than the claim asked for (another scheduler released a job, or the
task's limit was raised), or a task turned out capped, a further round reads what
was missed (none in the common case). Beliefs only ever cost a round; the plan
itself uses only what the claim read, and the unique slot keys hold the limit.

The scheduler asks for the task of each job it was handed (``get_task``) before it
runs it; the claim has just read that task and its running jobs, so the store
answers from what the claim read (:class:`ClaimedTasks`), for a moment.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from logging import Logger
from typing import Any

import anyio
import attrs
from apscheduler import Job, JobAdded, JobResult, Task
from bson import ObjectId

from . import _layout as layout
from ._adapters import Collection, Update
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
    Refused,
    Slots,
    holdings_of,
    limit_of,
    plan_claims,
    task_cap,
    tasks_of,
)
from ._signing import Codec, DisallowedCallableError, UnverifiedDataError

#: How many rounds a claim reads at most
MAX_ROUNDS = 4
#: How long what a claim read of a task may answer ``get_task`` (seconds)
TASK_MEMORY = 1.0
#: How often a claim also reads every task's limit (seconds): a task that another
#: process added, removed or gave another limit is known this long after, at most
LIMITS_REFRESH = 10.0


@attrs.define
class _Limit:
    #: ``max_running_jobs``: ``None`` for an uncapped task, 0 for one that runs
    #: nothing (it cannot be read)
    cap: int | None
    #: The free slots of a capped task when this store last looked, less what it
    #: took since, plus what it released; ``None``: not known
    free: int | None = None
    #: How many of its jobs were released (by this store, or elsewhere as far as
    #: it heard), ever
    releases: int = 0


@attrs.define
class TaskLimits:
    """What this store believes of each task's limit and free slots."""

    _known: dict[str, _Limit] = attrs.field(factory=dict)
    _refreshed: float = -math.inf

    def learn(self, task_id: str, cap: Cap) -> None:
        """Note a task's limit (a refused task's jobs are read as uncapped ones)."""
        value = None if isinstance(cap, Refused) else cap
        known = self._known.get(task_id)
        if known is None or known.cap != value:
            self._known[task_id] = _Limit(value)

    def forget(self, task_id: str) -> None:
        self._known.pop(task_id, None)

    def released(self, task_id: str) -> None:
        """Note that a job of the task was released (here or elsewhere): a slot."""
        known = self._known.get(task_id)
        if known is not None and known.cap:
            known.releases += 1
            if known.free is not None:
                known.free = min(known.cap, known.free + 1)

    def releases(self) -> dict[str, int]:
        """Return how many jobs of each capped task were released so far."""
        return {task_id: known.releases for task_id, known in self._known.items()}

    def unsure(self) -> None:
        """Forget the free slots (jobs were given back or abandoned)."""
        for known in self._known.values():
            known.free = None

    def refresh_due(self) -> bool:
        return time.monotonic() >= self._refreshed + LIMITS_REFRESH

    def refreshed(self, documents: Sequence[Document]) -> None:
        """
        Take every task's limit, as read (``TASK_LIMITS``), and forget the free
        slots: what other schedulers did is learned this way at the latest.
        """
        self._refreshed = time.monotonic()
        self.unsure()
        present = set()
        for document in documents:
            if isinstance(task_id := document.get("_id"), str):
                present.add(task_id)
                self.learn(task_id, limit_of(document.get("max_running_jobs")))

        for task_id in set(self._known) - present:
            del self._known[task_id]

    def settle(self, read: ClaimRead, handed_out: Iterable[Job]) -> None:
        """
        Note the free slots a claim found, less those it took, plus the jobs
        released since it began (they may have run when it read: a slot counted
        twice costs a read; one missed would keep a job queued).
        """
        holdings, taken = read.holdings, read.taken(handed_out)
        for task_id, known in self._known.items():
            if known.cap and task_id not in read.unread:
                running = holdings.get(task_id, Holding()).running + taken[task_id]
                since = known.releases - read.releases.get(task_id, known.releases)
                known.free = min(known.cap, max(0, known.cap - running) + since)

    def branches(
        self,
        now: int,
        tasks: str,
        limit: int | None,
        free: Callable[[str, int], int],
        done: Done,
        passed_over: Sequence[Any] = (),
    ) -> list[Branch]:
        """
        Return what a round of a claim reads: the free jobs of the capped tasks
        (no more than ``free(task_id, cap)`` of each), of the uncapped tasks, and of
        the tasks not known; none of the tasks found ``done`` already.
        """
        branches: list[Branch] = []
        if not done.unknown:
            query = {"$nin": sorted(self._known)}
            branches.append(Branch(now, tasks, limit, query, passed_over))

        uncapped = sorted(
            task_id
            for task_id, known in self._known.items()
            if known.cap is None and task_id not in done.tasks
        )
        if uncapped:
            query = {"$in": uncapped}
            branches.append(Branch(now, tasks, limit, query, passed_over))

        for task_id, known in sorted(self._known.items()):
            if known.cap and task_id not in done.tasks:
                count = free(task_id, known.cap)
                if count > 0:
                    count = min(count, limit) if limit else count
                    branches.append(Branch(now, tasks, count, task_id, passed_over))

        return branches

    def believed_free(self, task_id: str, cap: int) -> int:
        """Return the free slots this store believes a capped task has."""
        known = self._known.get(task_id)
        return cap if known is None or known.free is None else known.free

    @property
    def known(self) -> frozenset[str]:
        return frozenset(self._known)

    @property
    def capped(self) -> set[str]:
        """The tasks known to be capped, or to run nothing."""
        return {task for task, known in self._known.items() if known.cap is not None}


@attrs.define
class Done:
    """The tasks whose free jobs a claim has read to the end."""

    tasks: set[str] = attrs.field(factory=set)
    #: Whether the jobs of the tasks the store did not know are all read
    unknown: bool = False

    def note(
        self,
        branches: Sequence[Branch],
        outputs: Sequence[Sequence[Document]],
        considered: Sequence[Document],
        learned: Iterable[str],
    ) -> None:
        """
        Note the tasks whose branches read all there was, and all of which the
        round ``considered`` (the others were past the round's limit). ``learned``:
        the tasks the round made known, which the branch of unknown tasks covered.
        """
        kept = {id(document) for document in considered}
        for branch, output in zip(branches, outputs, strict=True):
            if branch.read_all(output) and all(id(doc) in kept for doc in output):
                if branch.covers is None:
                    self.unknown = True
                    self.tasks.update(learned)
                else:
                    self.tasks |= branch.covers


class Branch:
    """
    One read of a claim's round: the free jobs of one capped task (``task_ids`` is
    its id), of some uncapped tasks (``{"$in": ids}``), or of the tasks the store
    does not know (``{"$nin": ids}``); up to a limit.
    """

    def __init__(
        self,
        now: int,
        tasks: str,
        limit: int | None,
        task_ids: str | Document,
        passed_over: Sequence[Any],
    ) -> None:
        self.limit = limit
        self.capped = isinstance(task_ids, str)
        #: The tasks it reads (``None``: those the store did not know)
        self.covers: frozenset[str] | None
        if isinstance(task_ids, str):
            self.covers = frozenset({task_ids})
        else:
            self.covers = frozenset(task_ids["$in"]) if "$in" in task_ids else None

        self.pipeline = layout.queue_branch(now, tasks, limit, task_ids, passed_over)

    def read_all(self, documents: Sequence[Document]) -> bool:
        """Tell whether ``documents`` (its output) are all it could read."""
        return self.limit is None or len(documents) < self.limit


@attrs.define
class ClaimRead:
    """What one claim attempt read and decided."""

    plan: ClaimPlan
    #: The task documents of the candidates, by id
    tasks: dict[str, Document]
    #: What the running jobs held when the claim read, by task id
    holdings: dict[str, Holding]
    #: The tasks whose running jobs the claim did not read
    unread: set[str] = attrs.field(factory=set)
    #: The queued job that falls due next, if it is for later (its id, its task's,
    #: its schedule's and its ``scheduled_fire_time``)
    next_waiting: Document | None = None
    #: How many jobs of each known task had been released when the claim began
    releases: dict[str, int] = attrs.field(factory=dict)

    def taken(self, handed_out: Iterable[Job]) -> Counter[str]:
        """Count, by task, the queued jobs handed out (their slots were free)."""
        queued = self.plan.were_queued
        return Counter(job.task_id for job in handed_out if bson_id(job.id) in queued)


@attrs.define
class JobClaim:
    """
    One ``acquire_jobs`` call: each attempt reads and plans (:meth:`choose`), and
    what its attempts decided tells the store what the documents it holds are.

    A retried attempt may find it holds what an earlier attempt wrote (its reply
    was lost): so the jobs and results of every attempt are kept, and the read of
    the latest, which the store's beliefs are settled with.
    """

    jobs_collection: Collection
    tasks_collection: Collection
    limits: TaskLimits
    limit: int | None
    #: Now and the lease's expiry, by the server's clock (see ``Leases.term``)
    term: Callable[[], tuple[int, int]]
    #: Who claims, the token its writes carry, and how jobs are decoded
    owner: str
    token: ObjectId
    codec: Codec
    logger: Logger
    #: The jobs to hand out and the results of jobs finished, by document id
    jobs: dict[Any, Job] = attrs.field(init=False, factory=dict)
    finished: dict[Any, JobResult] = attrs.field(init=False, factory=dict)
    #: What the latest attempt read
    read: ClaimRead | None = attrs.field(init=False, default=None)

    async def choose(self) -> list[tuple[Document | None, Update]]:
        """Read and plan one attempt; return the updates it sends."""
        now, until = self.term()
        context = ClaimContext(
            self.owner, now, until, self.token, self.codec, self.logger
        )
        self.read = await plan_job_claim(
            self.jobs_collection,
            self.tasks_collection,
            context,
            self.limit,
            self.limits,
        )
        self.jobs.update(self.read.plan.jobs)
        self.finished.update(self.read.plan.finished)
        return self.read.plan.chosen


async def plan_job_claim(
    jobs: Collection,
    tasks: Collection,
    context: ClaimContext,
    limit: int | None,
    limits: TaskLimits,
) -> ClaimRead:
    """
    Read the free jobs, as far as they can be handed out, and what the running jobs
    of their tasks hold; plan the claim.

    Queue order holds, but a task that runs all it may does not keep the free
    places from other tasks' jobs.
    """
    releases = limits.releases()
    done = Done()
    covered = limits.known  # the tasks not known are covered by their own branch
    branches = limits.branches(
        context.now, tasks.name, limit, limits.believed_free, done
    )
    # The holdings of every task but those capped tasks that it reads nothing of
    unread = limits.capped - _capped_in(branches)
    others: list[tuple[Collection, Sequence[Document]]] = [
        (jobs, layout.holdings({"$nin": sorted(unread)})),
        (jobs, layout.next_waiting_job(context.now)),
    ]
    refresh = limits.refresh_due()
    if refresh:
        others.append((tasks, layout.TASK_LIMITS))

    outputs = await _read(jobs, branches, others)
    found = outputs[: len(branches)]
    summaries, waiting = outputs[len(branches)], outputs[len(branches) + 1]
    read = ClaimRead(ClaimPlan(), {}, holdings_of(summaries, context.logger))
    read.releases = releases
    read.next_waiting = waiting[0] if waiting else None
    if refresh:
        limits.refreshed(outputs[-1])

    slots = Slots(read.holdings, unread=set(unread))
    caps: dict[str, Cap] = {}
    passed_over: list[Any] = []
    wanted = limit
    for round_number in range(1, MAX_ROUNDS + 1):
        documents = _in_queue_order(found, wanted)
        _learn_tasks(documents, read.tasks, caps, limits, context)
        read.plan.extend(plan_claims(documents, caps, slots, context))
        passed_over += [document["_id"] for document in documents]
        done.note(branches, found, documents, limits.known - covered)

        wanted = limit - len(read.plan.chosen) if limit else None
        if (wanted is not None and wanted <= 0) or round_number == MAX_ROUNDS:
            break

        def free(task_id: str, cap: int) -> int:
            # What the claim found, where it read the task's running jobs
            if task_id in slots.unread:
                return limits.believed_free(task_id, cap)

            return slots.left(task_id, cap)

        covered = limits.known
        branches = limits.branches(
            context.now, tasks.name, wanted, free, done, passed_over
        )
        if not branches:
            break

        # The holdings of the capped tasks it reads now, if it has not read them
        others = []
        if unread := _capped_in(branches) & slots.unread:
            others.append((jobs, layout.holdings({"$in": sorted(unread)})))

        outputs = await _read(jobs, branches, others)
        found = outputs[: len(branches)]
        if unread:
            slots.read(holdings_of(outputs[-1], context.logger), unread)

    read.unread = slots.unread
    return read


def _capped_in(branches: Sequence[Branch]) -> set[str]:
    """Return the capped tasks that branches of their own read."""
    return {
        task for branch in branches if branch.capped for task in branch.covers or ()
    }


async def _read(
    jobs: Collection,
    branches: Sequence[Branch],
    others: Sequence[tuple[Collection, Sequence[Document]]],
) -> list[list[Document]]:
    """Read the branches and the other pipelines, in one round trip."""
    return await jobs.aggregate_with(
        branches[0].pipeline,
        *((jobs, branch.pipeline) for branch in branches[1:]),
        *others,
    )


def _learn_tasks(
    documents: Sequence[Document],
    tasks: dict[str, Document],
    caps: dict[str, Cap],
    limits: TaskLimits,
    context: ClaimContext,
) -> None:
    """Take the task documents read beside the candidates, and learn their limits."""
    for task_id, task in tasks_of(documents).items():
        tasks[task_id] = task
        if task_id not in caps:
            caps[task_id] = task_cap(task, context.codec, context.logger)
            limits.learn(task_id, caps[task_id])

    for document in documents:
        named = document.get("task_id")
        if isinstance(named, str) and named not in tasks:
            limits.forget(named)  # gone: its jobs finish with an error


def _in_queue_order(
    outputs: Sequence[Sequence[Document]], limit: int | None
) -> list[Document]:
    """
    Merge what the branches of a round read (each in queue order) into one list,
    in queue order, of no more than ``limit`` documents.
    """
    documents = [document for output in outputs for document in output]
    if len(outputs) > 1:
        documents.sort(key=_queue_position)

    return documents[:limit] if limit else documents


def _queue_position(document: Document) -> tuple[Any, ...]:
    # As the server orders them; a malformed document's place matters only in that
    # reading it must not fail
    created, key = document.get("created_at"), document.get("_id")
    if isinstance(created, int) and not isinstance(created, bool):
        first: tuple[int, int] = (0, created)
    else:
        first = (1, 0)

    if isinstance(key, bytes):
        return (*first, 0, len(key), key)

    return (*first, 1, 0, repr(key).encode())


@attrs.define
class _Memory:
    task: Document
    running: int
    #: How many more times it may answer (``None``: any number, until ``until``)
    uses: int | None
    until: float


@attrs.define
class ClaimedTasks:
    """
    What the store's latest reads of a task found: a job claim that handed out its
    jobs, or ``get_task``.

    ``get_task`` for such a task answers from it, within :data:`TASK_MEMORY`
    seconds of the read (after a claim: once per job handed out), and until this
    store writes anything that changes the task or its running jobs. The running
    count is the read's (after a claim: the jobs that ran when it read, plus those
    it took). APScheduler's scheduler asks for the task of each job it adds and of
    each job it runs.
    """

    _memories: dict[str, _Memory] = attrs.field(factory=dict)

    def remember(self, read: ClaimRead, handed_out: Iterable[Job]) -> None:
        """Remember the tasks of the jobs a claim handed out."""
        until = time.monotonic() + TASK_MEMORY
        jobs = list(handed_out)
        uses = Counter(job.task_id for job in jobs)
        newly = read.taken(jobs)
        for task_id, count in uses.items():
            task = read.tasks.get(task_id)
            if task is not None and task_id not in read.unread:
                running = read.holdings.get(task_id, Holding()).running + newly[task_id]
                self._memories[task_id] = _Memory(task, running, count, until)

    def read(self, task: Document, running: int) -> None:
        """Remember a task that ``get_task`` read, and its running count."""
        until = time.monotonic() + TASK_MEMORY
        self._memories[task["_id"]] = _Memory(task, running, None, until)

    def recall(self, task_id: str, codec: Codec) -> Task | None:
        """Return the task as the claim read it, or ``None`` if it is not known."""
        memory = self._memories.get(task_id)
        if memory is None or time.monotonic() > memory.until:
            self._memories.pop(task_id, None)
            return None

        if memory.uses is not None:
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
