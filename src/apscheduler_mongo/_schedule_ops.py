"""The store's operations on schedules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from apscheduler import (
    ConflictingIdError,
    ConflictPolicy,
    Schedule,
    ScheduleAdded,
    ScheduleRemoved,
    ScheduleUpdated,
    SerializationError,
)
from apscheduler._structures import ScheduleResult
from bson import ObjectId
from pymongo import ASCENDING, UpdateOne
from pymongo.errors import DuplicateKeyError

from ._core import LIVE_STATES, StoreCore
from ._marshalling import (
    MalformedDocumentError,
    from_micros,
    get_datetime,
    now_micros,
    put_datetime,
    quarantine_record,
    schedule_to_document,
)


class ScheduleOperations(StoreCore):
    """Adding, reading, leasing and releasing schedules."""

    async def get_schedules(self, ids: set[str] | None = None) -> list[Schedule]:
        query = {} if ids is None else {"_id": {"$in": list(ids)}}

        async def fetch(attempt: int) -> list[Any]:
            cursor = self._schedules.find(query, sort=[("_id", ASCENDING)])
            return list(await cursor.to_list(None))

        schedules = [self._build_schedule(doc) for doc in await self._run(fetch)]
        return [schedule for schedule in schedules if schedule is not None]

    async def add_schedule(
        self, schedule: Schedule, conflict_policy: ConflictPolicy
    ) -> None:
        document = schedule_to_document(schedule, self.serializer)
        document["v"] = document["insert_token"] = token = ObjectId()

        async def insert(attempt: int) -> bool | None:
            """Return True if added, False if replaced, None if left alone."""
            if conflict_policy is ConflictPolicy.replace:
                previous = await self._schedules.find_one_and_replace(
                    {"_id": schedule.id}, document, upsert=True
                )
                return previous is None or previous.get("insert_token") == token

            try:
                await self._schedules.insert_one(document)
            except DuplicateKeyError:
                existing = await self._schedules.find_one(
                    {"_id": schedule.id}, {"insert_token": 1}
                )
                if existing is not None and existing.get("insert_token") == token:
                    return True  # our own insert, retried after a lost reply

                if conflict_policy is ConflictPolicy.exception:
                    raise ConflictingIdError(schedule.id) from None  # type: ignore[no-untyped-call]

                return None

            return True

        added = await self._run(insert)
        if added is None:
            return

        event_class = ScheduleAdded if added else ScheduleUpdated
        await self._event_broker.publish(
            event_class(
                schedule_id=schedule.id,
                task_id=schedule.task_id,
                next_fire_time=schedule.next_fire_time,
            )
        )

    async def remove_schedules(self, ids: Iterable[str]) -> None:
        id_list = list(ids)

        async def delete(attempt: int) -> list[Any]:
            cursor = self._schedules.find({"_id": {"$in": id_list}}, {"task_id": 1})
            documents = list(await cursor.to_list(None))
            await self._schedules.delete_many({"_id": {"$in": id_list}})
            return documents

        documents = await self._run(delete)
        await self._publish_all(
            ScheduleRemoved(
                schedule_id=doc["_id"], task_id=doc.get("task_id", ""), finished=False
            )
            for doc in documents
        )

    def _due_schedules_filter(self, scheduler_id: str, now: int) -> dict[str, Any]:
        return {
            # "$ne: None" keeps servers without type bracketing from matching nulls
            "next_fire_time": {"$lte": now, "$ne": None},
            "paused": {"$ne": True},
            "quarantine": {"$exists": False},
            "$or": [
                {"acquired_by": None},
                {"acquired_until": {"$lt": now, "$ne": None}},
                {"acquired_by": scheduler_id},
            ],
        }

    async def acquire_schedules(
        self, scheduler_id: str, lease_duration: timedelta, limit: int
    ) -> list[Schedule]:
        token = ObjectId()

        async def held_by_us() -> list[Any]:
            cursor = self._schedules.find({"v": token}, sort=[("next_fire_time", 1)])
            return list(await cursor.to_list(None))

        async def claim(attempt: int) -> list[Any]:
            if attempt > 1 and (held_already := await held_by_us()):
                return held_already  # a lost reply: the first attempt did claim

            now = now_micros()
            eligible = self._due_schedules_filter(scheduler_id, now)
            cursor = self._schedules.find(
                eligible, sort=[("next_fire_time", ASCENDING), ("_id", ASCENDING)]
            ).limit(limit)
            documents = list(await cursor.to_list(None))
            if documents:
                acquired_until = now + lease_duration // timedelta(microseconds=1)
                claimed = {
                    "acquired_by": scheduler_id,
                    "acquired_until": acquired_until,
                    "v": token,
                }
                # One write per schedule, each demanding the token that was read
                matched = await self._bulk_write(
                    self._schedules,
                    [
                        UpdateOne(
                            {"_id": doc["_id"], "v": doc.get("v"), **eligible},
                            {"$set": claimed},
                        )
                        for doc in documents
                    ],
                )
                if matched == len(documents) and attempt == 1:
                    for doc in documents:
                        doc.update(
                            acquired_by=scheduler_id,
                            acquired_until=acquired_until,
                            v=token,
                        )
                    return documents
            elif attempt == 1:
                return []

            # Lost a race for some of them, or retrying after a lost reply: ask
            return await held_by_us()

        async with self._claiming("schedules", scheduler_id, token):
            schedules: list[Schedule] = []
            for document in await self._run(claim):
                if (schedule := self._build_schedule(document)) is not None:
                    schedules.append(schedule)
                    self._leases[schedule.id] = document["acquired_until"]
                else:
                    await self._quarantine(
                        document["_id"],
                        token,
                        "the schedule could not be deserialized",
                    )

        return schedules

    async def release_schedules(
        self, scheduler_id: str, results: Sequence[ScheduleResult]
    ) -> None:
        requests: list[UpdateOne] = []
        tokens: dict[str, ObjectId] = {}
        events: dict[str, ScheduleUpdated] = {}
        for result in results:
            self._leases.pop(result.schedule_id, None)
            tokens[result.schedule_id] = token = ObjectId()
            query = {"_id": result.schedule_id, "acquired_by": scheduler_id}
            changes: dict[str, Any] = {
                "acquired_by": None,
                "acquired_until": None,
                "v": token,
                "release_token": token,
            }
            try:
                changes["trigger"] = self.serializer.serialize(result.trigger)
            except SerializationError as exc:
                self._logger.exception(
                    "Cannot serialize the trigger of schedule %r; setting it aside",
                    result.schedule_id,
                )
                changes["quarantine"] = quarantine_record(
                    f"the trigger could not be serialized: {exc}"
                )
            else:
                put_datetime(changes, "last_fire_time", result.last_fire_time)
                put_datetime(changes, "next_fire_time", result.next_fire_time)
                events[result.schedule_id] = ScheduleUpdated(
                    schedule_id=result.schedule_id,
                    task_id=result.task_id,
                    next_fire_time=result.next_fire_time,
                )

            requests.append(UpdateOne(query, {"$set": changes}))

        async def write(attempt: int) -> int:
            return await self._bulk_write(self._schedules, requests)

        if await self._run(write) != len(requests):
            # Some leases were lost (or a retry found its own work done): see which
            async def check(attempt: int) -> list[Any]:
                cursor = self._schedules.find(
                    {"_id": {"$in": list(tokens)}}, {"release_token": 1}
                )
                return list(await cursor.to_list(None))

            applied = {
                doc["_id"]
                for doc in await self._run(check)
                if doc.get("release_token") == tokens[doc["_id"]]
            }
            for schedule_id in tokens.keys() - applied:
                self._logger.warning(
                    "Not releasing schedule %r: scheduler %r no longer holds its lease",
                    schedule_id,
                    scheduler_id,
                )
                events.pop(schedule_id, None)

        await self._publish_all(events.values())

    async def get_next_schedule_run_time(self) -> datetime | None:
        base = {
            "next_fire_time": {"$ne": None},
            "paused": {"$ne": True},
            "quarantine": {"$exists": False},
        }
        # A free schedule can be taken at its next fire time, a leased one when its
        # lease runs out (or earlier, when its owner releases it: an event says so)
        free = await self._earliest(
            {**base, "acquired_by": None}, "next_fire_time", "next_fire_time"
        )
        leased = await self._earliest(
            {**base, "acquired_by": {"$ne": None}}, "acquired_until", "acquired_until"
        )
        candidates = [time for time in (free, leased) if time is not None]
        return min(candidates) if candidates else None

    async def _earliest(
        self, query: dict[str, Any], sort_field: str, time_field: str
    ) -> datetime | None:
        """
        Return the time in ``time_field`` of the first schedule by ``sort_field``.

        A schedule whose time is not an integer (edited by hand, say) is quarantined
        and the next one is tried, so that bad data cannot stop the scheduler.
        """
        while True:

            async def fetch(attempt: int) -> Any:
                return await self._schedules.find_one(
                    query,
                    {"next_fire_time": 1, "next_fire_time_offset": 1, time_field: 1},
                    sort=[(sort_field, ASCENDING)],
                )

            document = await self._run(fetch)
            if document is None:
                return None

            try:
                micros = document.get(time_field)
                if not isinstance(micros, int) or isinstance(micros, bool):
                    raise MalformedDocumentError(f"{time_field} is not an integer")

                if time_field == "next_fire_time":
                    return get_datetime(document, time_field)

                return from_micros(max(micros, document["next_fire_time"]))
            except (MalformedDocumentError, TypeError, OverflowError) as exc:
                self._logger.warning(
                    "Setting schedule %r aside: %s", document["_id"], exc
                )
                await self._quarantine(document["_id"], None, f"malformed: {exc}")

    async def extend_acquired_schedule_leases(
        self, scheduler_id: str, schedule_ids: set[str], duration: timedelta
    ) -> None:
        await self._extend_leases(
            self._schedules, scheduler_id, list(schedule_ids), duration
        )

    async def _remove_finished_schedules(self) -> list[ScheduleRemoved]:
        async def remove(attempt: int) -> list[ScheduleRemoved]:
            # A schedule whose id is no string cannot be read: leave it for a human
            finished_query = {
                "_id": {"$type": "string"},
                "next_fire_time": None,
                "acquired_by": None,
            }
            cursor = self._schedules.find(finished_query, {"task_id": 1, "v": 1})
            finished = {doc["_id"]: doc for doc in await cursor.to_list(None)}
            if not finished:
                return []

            busy = await self._jobs.distinct(
                "schedule_id",
                {
                    "schedule_id": {"$in": list(finished)},
                    "state": {"$in": LIVE_STATES},
                },
            )
            for schedule_id in busy:
                finished.pop(schedule_id, None)

            if not finished:
                return []

            unchanged = [
                {"_id": doc["_id"], "v": doc.get("v")} for doc in finished.values()
            ]
            result = await self._schedules.delete_many(
                {**finished_query, "$or": unchanged}
            )
            if result.deleted_count != len(finished):
                left = await self._schedules.distinct(
                    "_id", {"_id": {"$in": list(finished)}}
                )
                for schedule_id in left:
                    finished.pop(schedule_id, None)

            return [
                ScheduleRemoved(
                    schedule_id=doc["_id"],
                    task_id=doc.get("task_id", ""),
                    finished=True,
                )
                for doc in finished.values()
            ]

        return await self._run(remove)
