"""
The lease protocol: token-checked claims, the ledger of undelivered claims, and the
leases this store holds.

Every leasable document (schedule or job) carries a version token ``v`` that every
write to it replaces. A claim reads candidates, then sends one conditional update per
candidate that demands the token it read (and that the candidate is still free): a
document that anyone changed in between is not taken. When every update matched on
the first attempt, the documents read are exactly what was claimed; otherwise (a lost
race, or a retry after a lost reply) the claim asks what carries its own new token.
:doc:`design` tells the whole protocol.
"""

from __future__ import annotations

from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from datetime import timedelta
from logging import Logger
from typing import Any, TypeVar
from uuid import UUID

import attrs
from apscheduler import Job
from bson import ObjectId

from ._adapters import Collection, Update
from ._clock import ServerClock
from ._layout import (
    Document,
    Tag,
    by_ids,
    claimed_with,
    extension,
    given_back_job,
    given_back_schedule,
    held_by,
    new_token,
    running_of,
    unconfirmed_claim,
)
from ._marshalling import to_micros, uuid_from_bson, uuid_to_bson
from ._metrics import Metrics
from ._retry import Retry

_MICROSECOND = timedelta(microseconds=1)
T = TypeVar("T")

#: Chooses what a claim attempt takes: the candidates as they will be once claimed
#: (``None`` for one the claim writes to without holding it), each with the
#: conditional update that claims it
Choice = Callable[[], Awaitable[list[tuple[Document | None, Update]]]]


async def write_tagged(
    collection: Collection,
    updates: Sequence[Update],
    tags: Mapping[Any, Tag],
    attempts: Retry,
    *,
    gone_counts: bool = False,
) -> set[Any]:
    """
    Send writes that each tag their document with a token (``tags``, by id),
    retrying temporary failures; return the ids of the documents they changed.

    This is how every write learns whether it was applied: if all matched at the
    first attempt, all were; if none did, none were; otherwise (a lost race, or a
    retry after a lost reply whose write may have been applied all the same) the
    documents that carry their write's token were. With ``gone_counts``, a document
    that is gone counts as written (it was finished and then purged, which only our
    write allowed).
    """
    async for attempt in attempts():
        with attempt:
            if len(updates) == 1:
                [update] = updates
                result = await collection.update_one(update.query, update.change)
                matched = result.matched_count
            else:
                matched = await collection.update_each(updates)

            if not attempt.retry and matched in (0, len(updates)):
                return set(tags) if matched else set()

            applied = await landed(collection, tags, gone_counts=gone_counts)

    return applied


async def landed(
    collection: Collection, tags: Mapping[Any, Tag], *, gone_counts: bool = False
) -> set[Any]:
    """
    Return the documents (by id) that carry the token of their tagged write (and,
    with ``gone_counts``, those that are gone).

    Asked when a batch of tagged writes matched fewer documents than it named, or
    after a retry: a lost race, or a lost reply whose write was applied.
    """
    documents = await collection.find(by_ids(tags), {"_id": 1, **_fields(tags)})
    applied = {doc["_id"] for doc in documents if tags[doc["_id"]].on(doc)}
    if gone_counts:
        applied |= set(tags) - {doc["_id"] for doc in documents}

    return applied


def _fields(tags: Mapping[Any, Tag]) -> Document:
    return {
        key: value for tag in tags.values() for key, value in tag.projection().items()
    }


@attrs.frozen
class Claim:
    """A claim whose outcome never reached the scheduler that made it."""

    jobs: bool
    owner: str
    token: ObjectId


@attrs.define
class _Held:
    owner: str
    #: The lease's expiry (the server's clock, microseconds)
    until: int


@attrs.define
class _Handed:
    owner: str
    job: Job
    #: The lease's expiry (the server's clock, microseconds)
    until: int


@attrs.frozen
class Holding:
    """What a store holds: schedules, jobs, and when the last of their leases lapses."""

    schedules: int
    jobs: int
    #: The server's clock, in microseconds; ``None`` when it holds nothing
    until: int | None


def _by_owner(pairs: Iterable[tuple[str, T]]) -> dict[str, list[T]]:
    grouped: dict[str, list[T]] = {}
    for owner, item in pairs:
        grouped.setdefault(owner, []).append(item)

    return grouped


@attrs.define
class Leases:
    """
    The store's side of the lease protocol.

    :param schedules: the schedules collection
    :param jobs: the jobs collection
    :param retry: makes the store's retry loop
    :param logger: where to report claims given back
    :param clock: the server's clock, which judges leases
    :param metrics: count the claims lost to other schedulers
    """

    schedules: Collection
    jobs: Collection
    retry: Retry
    logger: Logger
    clock: ServerClock
    metrics: Metrics
    #: The schedules this store acquired and has not released yet, by id
    _held: dict[str, _Held] = attrs.field(init=False, factory=dict)
    #: The jobs this store handed out and that were not released yet, by id
    _handed: dict[UUID, _Handed] = attrs.field(init=False, factory=dict)
    #: The claims whose outcome never reached the scheduler; the store keeps this
    #: ledger across its restarts (a supervisor restarting a crashed scheduler on
    #: the same store object), so that what they took is still given back
    _unconfirmed: set[Claim] = attrs.field(kw_only=True, factory=set)

    async def claim(
        self,
        collection: Collection,
        token: ObjectId,
        retry: bool,
        order: Sequence[tuple[str, int]],
        choose: Choice,
    ) -> list[Document]:
        """
        Make one attempt of a claim; return the documents it holds, as claimed.

        A retried attempt first asks what the claim holds already: if its first
        attempt was applied (its reply lost), it claims nothing more, so it never
        takes more than its limit.
        """
        if retry and (taken := await self.taken(collection, token, order)):
            return taken

        chosen = await choose()
        if not chosen and not retry:
            return []

        matched = await collection.update_each([update for _, update in chosen])
        if matched == len(chosen) and not retry:
            return [document for document, _ in chosen if document is not None]

        # Lost a race for some of them, or retrying after a lost reply: ask
        taken = await self.taken(collection, token, order)
        wanted = {document["_id"] for document, _ in chosen if document is not None}
        lost = wanted - {document["_id"] for document in taken}
        self.metrics.claims_lost(
            "job" if collection is self.jobs else "schedule", len(lost)
        )
        return taken

    async def taken(
        self, collection: Collection, token: ObjectId, order: Sequence[tuple[str, int]]
    ) -> list[Document]:
        """Return the documents that the claim with ``token`` took."""
        return await collection.find(claimed_with(token), sort=order)

    # The ledger of claims whose outcome never reached the scheduler

    @asynccontextmanager
    async def claiming(
        self, *, jobs: bool, owner: str, token: ObjectId
    ) -> AsyncIterator[None]:
        """
        Remember a claim that fails, so that what it took can be given back.

        A claim that fails or is cancelled after its write may have been applied (a
        lost reply, then the retries ran out) took items the scheduler never saw.
        The next claim or reaping of this store returns them to the queue, instead
        of leaving them leased until the lease lapses (and a job then reported
        abandoned, though it never ran).
        """
        await self.give_back()
        try:
            yield
        except BaseException:
            self._unconfirmed.add(Claim(jobs, owner, token))
            raise

    async def give_back(self) -> None:
        """Give back what earlier claims took if their outcome was never delivered."""
        if not self._unconfirmed:
            return

        claims = list(self._unconfirmed)
        returned = 0
        for claim in claims:
            query = unconfirmed_claim(claim.token, claim.owner, claim.jobs)
            collection = self.jobs if claim.jobs else self.schedules
            returned += len(await self._put_back(collection, query, claim.jobs))

        self._unconfirmed.difference_update(claims)
        if returned:
            self.logger.warning(
                "Returned %d claimed item(s) whose claim never reached the scheduler",
                returned,
            )

    # The schedules this store holds, and the jobs it handed out

    def hold(self, schedule_id: str, owner: str, until: int) -> None:
        self._held[schedule_id] = _Held(owner, until)

    def let_go(self, schedule_id: str) -> None:
        self._held.pop(schedule_id, None)

    def holds(self, schedule_id: object) -> bool:
        """
        Tell whether this store still holds the lease on a schedule it acquired.

        While it does, nobody else can have processed the schedule.
        """
        held = self._held.get(schedule_id) if isinstance(schedule_id, str) else None
        return held is not None and self.clock.now_micros() < held.until

    def handed_out(self, owner: str, jobs: Iterable[Job]) -> None:
        """Note jobs handed to a scheduler (their leases set): held until released."""
        for job in jobs:
            assert job.acquired_until is not None
            self._handed[job.id] = _Handed(owner, job, to_micros(job.acquired_until))

    def released(self, job_id: UUID) -> None:
        self._handed.pop(job_id, None)

    def holding(self) -> Holding:
        """Say what this store holds now (shown in its scheduler's record)."""
        untils = [entry.until for entry in self._held.values()]
        untils += [entry.until for entry in self._handed.values()]
        return Holding(len(self._held), len(self._handed), max(untils, default=None))

    async def hand_back(self) -> tuple[list[Job], list[Document]]:
        """
        Give back, as this store stops, all it still holds: what undelivered claims
        took, the jobs handed out and never released, and the schedules acquired and
        never released. Return the jobs put back in the queue and the schedules let
        go (their ``_id``, ``task_id`` and ``next_fire_time`` only), to be announced.

        When the store stops, its scheduler has stopped: the jobs it started have
        ended and were released (a job cut off is released as cancelled). A job
        still held was taken and never started (the scheduler stopped between the
        claim and its run): it goes back to the queue, to run once, elsewhere or
        later; its slot is free at once. Each write matches only what the owner
        still holds, so a lease that lapsed and was taken over is left alone.
        """
        await self.give_back()
        handed, self._handed = self._handed, {}
        held, self._held = self._held, {}
        returned: list[Job] = []
        for owner, jobs in _by_owner(
            (entry.owner, entry.job) for entry in handed.values()
        ).items():
            ids = {uuid_to_bson(job.id): job for job in jobs}
            back = await self._put_back(self.jobs, running_of(owner, list(ids)), True)
            returned += [ids[doc["_id"]] for doc in back if doc["_id"] in ids]

        let_go: list[Document] = []
        for owner, schedule_ids in _by_owner(
            (entry.owner, schedule_id) for schedule_id, entry in held.items()
        ).items():
            let_go += await self._put_back(
                self.schedules,
                held_by(owner, schedule_ids),
                False,
                {"task_id": 1, "next_fire_time": 1},
            )

        return returned, let_go

    async def _put_back(
        self,
        collection: Collection,
        query: Document,
        jobs: bool,
        fields: Document | None = None,
    ) -> list[Document]:
        """
        Give back what ``query`` matches; return what was given back (its ``_id``
        and ``fields``).

        The write tags what it gives back with a new token, so that a retry after a
        lost reply still learns what the first attempt gave back.
        """
        token = new_token()
        update = given_back_job(token) if jobs else given_back_schedule(token)
        async for attempt in self.retry():
            with attempt:
                await collection.update_many(query, update)
                back = await collection.find(
                    claimed_with(token), {"_id": 1, **(fields or {})}
                )

        return back

    # Lease terms

    def term(self, duration: timedelta) -> tuple[int, int]:
        """
        Return now and when a lease of ``duration`` taken now lapses, both by the
        server's clock (microseconds): every lease this store takes or extends.
        """
        now = self.clock.now_micros()
        return now, now + duration // _MICROSECOND

    # Extending leases

    async def extend(
        self,
        collection: Collection,
        owner: str,
        ids: Sequence[object],
        duration: timedelta,
    ) -> None:
        """
        Move the leases ``owner`` holds on these documents ``duration`` on.

        What this store notes it holds moves on only for the documents the write
        matched: a lease another scheduler took over meanwhile is not one this store
        holds longer (:meth:`holds` must not say otherwise).
        """
        token = new_token()
        async for attempt in self.retry():
            with attempt:
                _, until = self.term(duration)
                result = await collection.update_many(
                    held_by(owner, ids), extension(until, token)
                )
                if not attempt.retry and result.matched_count == len(ids):
                    extended = list(ids)
                else:  # some were not held any more, or a reply was lost
                    found = await collection.find(claimed_with(token), {"_id": 1})
                    extended = [document["_id"] for document in found]

        if collection is self.schedules:
            entries: Iterable[_Held | _Handed | None] = (
                self._held.get(str(id_)) for id_ in extended
            )
        else:
            entries = (self._handed.get(uuid_from_bson(id_)) for id_ in extended)

        for entry in entries:
            if entry is not None and entry.owner == owner:
                entry.until = until
