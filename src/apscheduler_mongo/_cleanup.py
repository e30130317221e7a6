"""The store's cleanup, and the finishing of jobs whose scheduler is gone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from logging import Logger
from typing import Any

import attrs
from apscheduler import JobOutcome, JobReleased, JobResult, ScheduleRemoved

from . import _layout as layout
from ._adapters import Collection, Update
from ._clock import ServerClock
from ._layout import Document
from ._leases import write_tagged
from ._marshalling import (
    MalformedDocumentError,
    describe_id,
    finish_update,
    from_micros,
    is_from_schedule,
    released_event,
    result_for_document,
    text_of,
)
from ._retry import Retry
from ._signing import Codec

#: How long a used fire time is remembered at least (see forget_used_fire_times)
FIRE_TIME_RETENTION = timedelta(hours=1)
#: How many documents cleanup reads (and names in one command) at a time
BATCH = 1000


def passed(
    next_times: Mapping[object, object], schedule_id: object, fire_time: object
) -> bool:
    """Tell whether a schedule is gone, finished, or past ``fire_time``."""
    if schedule_id not in next_times or next_times[schedule_id] is None:
        return True

    next_time = next_times[schedule_id]
    return (
        isinstance(next_time, int)
        and isinstance(fire_time, int)
        and (next_time > fire_time)
    )


@attrs.define
class Cleanup:
    """What :meth:`MongoDBDataStore.cleanup` does, step by step."""

    schedules: Collection
    jobs: Collection
    codec: Codec
    retry: Retry
    logger: Logger
    #: The server's clock, which judges leases and expiry
    clock: ServerClock

    async def run(self) -> list[JobReleased | ScheduleRemoved]:
        """Clean up; return the events to publish."""
        await self.purge_expired()
        events: list[JobReleased | ScheduleRemoved] = []
        events.extend(await self.abandon(await self.lapsed_jobs()))
        events.extend(await self.remove_finished_schedules())
        await self.forget_used_fire_times()
        await self.name_strays()
        return events

    async def purge_expired(self) -> None:
        """
        Purge expired results and the records they were kept in.

        The TTL index does the same, but only every minute or so, and not at all on
        some servers.
        """
        async for attempt in self.retry():
            with attempt:
                now = self.clock.now_micros()
                await self.jobs.delete_many(layout.expired_records(from_micros(now)))
                await self.jobs.update_many(
                    layout.expired_results(now), layout.DROP_RESULT
                )

    async def lapsed_jobs(self) -> list[Document]:
        """Return the jobs whose leases lapsed (their schedulers are presumed dead)."""
        async for attempt in self.retry():
            with attempt:
                lapsed = await self.jobs.find(
                    layout.lapsed_jobs(self.clock.now_micros()),
                    layout.WITHOUT_ARGUMENTS,
                    sort=layout.QUEUE_ORDER,
                )

        return lapsed

    async def abandon(self, documents: Sequence[Document]) -> list[JobReleased]:
        """Finish acquired jobs whose scheduler is gone; return the events to send."""
        now = self.clock.now_datetime()
        updates: list[Update] = []
        results: dict[Any, JobResult] = {}
        tags: dict[Any, layout.Tag] = {}
        finishing: dict[Any, Document] = {}
        for document in documents:
            try:
                result = result_for_document(document, JobOutcome.abandoned, now)
            except MalformedDocumentError as exc:
                self.logger.warning(
                    "Cannot finish job %s: %s", describe_id(document["_id"]), exc
                )
                continue

            tags[document["_id"]] = tag = layout.Tag(layout.RELEASE_TOKEN)
            update = finish_update(
                result,
                self.codec,
                self.logger,
                from_schedule=is_from_schedule(document),
                tag=tag,
            )
            query = layout.unchanged_acquired(document)
            updates.append(Update(query, update))
            results[document["_id"]] = result
            finishing[document["_id"]] = document

        applied = await self._applied(updates, tags) if updates else set()
        return [
            released_event(results[key], text_of(doc, "acquired_by") or "", doc)
            for key, doc in finishing.items()
            if key in applied
        ]

    async def _applied(
        self, updates: Sequence[Update], tags: Mapping[Any, layout.Tag]
    ) -> set[Any]:
        """Send finishing updates; return the ids of the jobs they finished."""
        return await write_tagged(self.jobs, updates, tags, self.retry)

    async def remove_finished_schedules(self) -> list[ScheduleRemoved]:
        """
        Remove finished schedules that have no queued or running jobs left.

        They are read in batches of :data:`BATCH`, by id.
        """
        removed: list[Document] = []
        after: str | None = None
        while True:
            async for attempt in self.retry():
                with attempt:
                    batch = await self.schedules.find(
                        layout.finished_schedules(after),
                        layout.FINISHED_SCHEDULE_FIELDS,
                        sort=layout.BY_ID,
                        limit=BATCH,
                    )
                    removed += await self._remove_unused(batch)

            if len(batch) < BATCH:
                break

            after = batch[-1]["_id"]

        return [
            ScheduleRemoved(
                schedule_id=doc["_id"],
                task_id=text_of(doc, "task_id") or "",
                finished=True,
            )
            for doc in removed
        ]

    async def _remove_unused(self, documents: Sequence[Document]) -> list[Document]:
        """Remove these finished schedules if no live job is left of them."""
        finished = {doc["_id"]: doc for doc in documents}
        if finished:
            busy = await self.jobs.distinct(
                "schedule_id", layout.live_jobs_of_schedules(list(finished))
            )
            for schedule_id in busy:
                if isinstance(schedule_id, str):  # others match no finished schedule
                    finished.pop(schedule_id, None)

        if not finished:
            return []

        unchanged = [layout.unchanged(doc) for doc in finished.values()]
        result = await self.schedules.delete_many(
            {**layout.finished_schedules(None), "$or": unchanged}
        )
        if result.deleted_count != len(finished):
            left = await self.schedules.distinct(
                "_id", {"_id": {"$in": list(finished)}}
            )
            for schedule_id in left:
                finished.pop(schedule_id, None)

        return list(finished.values())

    async def forget_used_fire_times(self) -> None:
        """
        Delete finished schedule jobs whose fire time their schedule has moved past.

        Such a document is what makes a second job for the same fire time impossible
        (the unique ``fire_key`` index); it may go once its schedule has been released
        with a later next fire time, or is finished or gone, its result (if any) has
        been fetched or has expired, and it finished longer than
        :data:`FIRE_TIME_RETENTION` ago (so that a scheduler that stalled while adding
        jobs finds it when it wakes). The records are read in batches of
        :data:`BATCH`, oldest first, so that any number of them is gone through and
        no command grows with their number.
        """
        retention = FIRE_TIME_RETENTION // timedelta(microseconds=1)
        cutoff = self.clock.now_micros() - retention
        after: tuple[int, Any] | None = None
        while True:
            async for attempt in self.retry():
                with attempt:
                    batch = await self.jobs.find(
                        layout.used_fire_times(cutoff, after),
                        layout.USED_FIRE_TIME_FIELDS,
                        sort=layout.FINISH_ORDER,
                        limit=BATCH,
                    )
                    if done := await self._moved_past(self._readable(batch)):
                        await self.jobs.delete_many(layout.forgettable(done))

            if len(batch) < BATCH:
                return

            after = (batch[-1]["finished_time"], batch[-1]["_id"])

    def _readable(self, documents: Sequence[Document]) -> list[Document]:
        readable = []
        for doc in documents:
            if isinstance(doc.get("schedule_id"), str):
                readable.append(doc)
            else:
                self.logger.warning(
                    "Keeping finished job %s: its schedule_id %r is no string",
                    describe_id(doc["_id"]),
                    doc.get("schedule_id"),
                )

        return readable

    async def _moved_past(self, used: Sequence[Document]) -> list[Any]:
        """Return the ids of the records whose schedules moved past their times."""
        if not used:
            return []

        schedule_ids = list({doc["schedule_id"] for doc in used})
        next_times = {
            doc["_id"]: doc.get("next_fire_time")
            for doc in await self.schedules.find(
                layout.by_ids(schedule_ids), layout.NEXT_FIRE_TIME_ONLY
            )
        }
        return [
            doc["_id"]
            for doc in used
            if passed(next_times, doc["schedule_id"], doc.get("fire_time"))
        ]

    async def name_strays(self) -> None:
        """Name the jobs in no known state: no query of the store ever meets them."""
        async for attempt in self.retry():
            with attempt:
                strays = await self.jobs.find(layout.STRAY_JOBS, layout.STATE_ONLY)

        for document in strays:
            self.logger.warning(
                "Leaving job %s alone: its state %r is none the store knows",
                describe_id(document["_id"]),
                document.get("state"),
            )
