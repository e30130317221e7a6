"""The store's operations on jobs and their results."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

from apscheduler import (
    ConflictingIdError,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobResult,
)
from bson import ObjectId
from pymongo import UpdateOne
from pymongo.errors import DuplicateKeyError

from ._core import LIVE_STATES, QUEUE_ORDER, StoreCore
from ._jobs import (
    finish_update,
    free_job_filter,
    plan_claims,
    result_for_document,
)
from ._marshalling import (
    ACQUIRED,
    FINISHED,
    from_micros,
    job_to_document,
    now_micros,
    result_from_document,
    slot_number,
    uuid_to_bson,
)


class JobOperations(StoreCore):
    """Adding, leasing, releasing and finishing jobs; handing out results."""

    async def add_job(self, job: Job) -> None:
        document = job_to_document(job, self.serializer)
        document["v"] = token = ObjectId()

        async def insert(attempt: int) -> bool:
            try:
                await self._jobs.insert_one(document)
            except DuplicateKeyError as exc:
                existing = await self._jobs.find_one({"_id": document["_id"]}, {"v": 1})
                if existing is not None and existing.get("v") == token:
                    return True  # our own insert, retried after a lost reply

                if "fire_key" in ((exc.details or {}).get("keyPattern") or {}):
                    self._logger.debug(
                        "Not adding job %s: schedule %r already has a job for %s",
                        job.id,
                        job.schedule_id,
                        job.original_scheduled_time,
                    )
                    return False

                raise ConflictingIdError(str(job.id)) from None  # type: ignore[no-untyped-call]

            return True

        if await self._run(insert):
            await self._event_broker.publish(
                JobAdded(
                    job_id=job.id, task_id=job.task_id, schedule_id=job.schedule_id
                )
            )

    async def get_jobs(self, ids: Iterable[UUID] | None = None) -> list[Job]:
        query: dict[str, Any] = {"state": {"$in": LIVE_STATES}}
        if ids is not None:
            query["_id"] = {"$in": [uuid_to_bson(job_id) for job_id in ids]}

        async def fetch(attempt: int) -> list[Any]:
            return list(await self._jobs.find(query, sort=QUEUE_ORDER).to_list(None))

        jobs = [self._build_job(document) for document in await self._run(fetch)]
        return [job for job in jobs if job is not None]

    async def acquire_jobs(
        self, scheduler_id: str, lease_duration: timedelta, limit: int | None = None
    ) -> list[Job]:
        token = ObjectId()
        lease_micros = lease_duration // timedelta(microseconds=1)
        jobs: dict[Any, Job] = {}
        finished: dict[Any, JobResult] = {}

        async def claim(attempt: int) -> list[Any]:
            now = now_micros()
            cursor = self._jobs.find(free_job_filter(now), sort=QUEUE_ORDER)
            if limit is not None:
                cursor = cursor.limit(limit)

            documents = list(await cursor.to_list(None))
            if not documents and attempt == 1:
                return []

            task_ids = list({doc.get("task_id") for doc in documents})
            tasks = await self._tasks.find(
                {"_id": {"$in": task_ids}}, {"max_running_jobs": 1}
            ).to_list(None)
            caps = {task["_id"]: task.get("max_running_jobs") for task in tasks}
            held: dict[str, set[int]] = {}
            running: dict[str, int] = {}
            if capped := [task_id for task_id, cap in caps.items() if cap is not None]:
                holders = await self._jobs.find(
                    {"task_id": {"$in": capped}, "state": ACQUIRED},
                    {"task_id": 1, "slot_key": 1},
                ).to_list(None)
                for holder in holders:
                    task_id = holder["task_id"]
                    running[task_id] = running.get(task_id, 0) + 1
                    if "slot_key" in holder:
                        held.setdefault(task_id, set()).add(
                            slot_number(holder["slot_key"])
                        )

            acquired_until = now + lease_micros
            plan = plan_claims(
                documents,
                caps=caps,
                held_slots=held,
                running=running,
                scheduler_id=scheduler_id,
                now=now,
                acquired_until=acquired_until,
                token=token,
                serializer=self.serializer,
                logger=self._logger,
            )
            jobs.update(plan.jobs)
            finished.update(plan.finished)
            matched = await self._bulk_write(self._jobs, plan.requests)
            if matched == len(plan.requests) and attempt == 1:
                planned = plan.jobs.keys() | plan.finished.keys()
                for doc in documents:
                    doc["acquired_until"] = acquired_until
                return [doc for doc in documents if doc["_id"] in planned]

            # Lost a race for some, or retrying after a lost reply: ask what we hold
            cursor = self._jobs.find({"v": token}, sort=QUEUE_ORDER)
            return list(await cursor.to_list(None))

        acquired: list[Job] = []
        events: list[Any] = []
        for document in await self._run(claim):
            if (result := finished.get(document["_id"])) is not None:
                events.append(self._released_event(result, scheduler_id, document))
            elif job := jobs.get(document["_id"]) or self._build_job(document):
                job.acquired_by = scheduler_id
                job.acquired_until = from_micros(document["acquired_until"])
                acquired.append(job)
                events.append(JobAcquired.from_job(job, scheduler_id=scheduler_id))

        await self._publish_all(events)
        return acquired

    async def release_job(self, scheduler_id: str, job: Job, result: JobResult) -> None:
        token = ObjectId()
        update = finish_update(
            result,
            self.serializer,
            self._logger,
            from_schedule=job.schedule_id is not None
            and job.original_scheduled_time is not None,
            token=token,
        )
        query = {
            "_id": uuid_to_bson(job.id),
            "state": ACQUIRED,
            "acquired_by": scheduler_id,
        }

        async def write(attempt: int) -> bool:
            if (await self._jobs.update_one(query, update)).matched_count:
                return True

            # A retry after a lost reply finds the document already finished by us
            mine = {"_id": query["_id"], "v": token}
            return (
                attempt > 1 and await self._jobs.find_one(mine, {"_id": 1}) is not None
            )

        if not await self._run(write):
            self._logger.warning(
                "Discarding the result of job %s: scheduler %r no longer holds its "
                "lease (another scheduler took it over or released it)",
                job.id,
                scheduler_id,
            )
            return

        await self._event_broker.publish(
            JobReleased.from_result(
                result,
                scheduler_id,
                job.task_id,
                job.schedule_id,
                job.scheduled_fire_time,
            )
        )

    async def get_job_result(self, job_id: UUID) -> JobResult | None:
        document_id = uuid_to_bson(job_id)

        async def fetch(attempt: int) -> Any:
            return await self._jobs.find_one(
                {"_id": document_id, "state": FINISHED, "result": {"$exists": True}},
                {"result": 1, "v": 1, "fire_key": 1},
            )

        document = await self._run(fetch)
        if document is None:
            return None

        result = result_from_document(job_id, document["result"], self.serializer)
        if result.expires_at <= datetime.now(timezone.utc):
            return None

        token = ObjectId()
        changes: dict[str, Any] = {"v": token}
        if "fire_key" not in document:
            changes["purge_at"] = datetime.now(timezone.utc)

        async def take(attempt: int) -> bool:
            # Only one caller gets the result: the write re-checks the version
            query = {"_id": document_id, "v": document["v"]}
            update = {"$set": changes, "$unset": {"result": ""}}
            if (await self._jobs.update_one(query, update)).matched_count:
                return True

            mine = {"_id": document_id, "v": token}
            return (
                attempt > 1 and await self._jobs.find_one(mine, {"_id": 1}) is not None
            )

        return result if await self._run(take) else None

    async def extend_acquired_job_leases(
        self, scheduler_id: str, job_ids: set[UUID], duration: timedelta
    ) -> None:
        ids = [uuid_to_bson(job_id) for job_id in job_ids]
        await self._extend_leases(self._jobs, scheduler_id, ids, duration)

    async def _abandon(
        self, documents: Sequence[Mapping[str, Any]]
    ) -> list[JobReleased]:
        """Finish acquired jobs whose scheduler is gone; return the events to send."""
        now = datetime.now(timezone.utc)
        requests: list[UpdateOne] = []
        results: dict[Any, JobResult] = {}
        tokens: dict[Any, ObjectId] = {}
        for document in documents:
            result = result_for_document(document, JobOutcome.abandoned, now)
            tokens[document["_id"]] = token = ObjectId()
            update = finish_update(
                result,
                self.serializer,
                self._logger,
                from_schedule="fire_key" in document,
                token=token,
            )
            query = {"_id": document["_id"], "v": document.get("v"), "state": ACQUIRED}
            requests.append(UpdateOne(query, update))
            results[document["_id"]] = result

        async def write(attempt: int) -> set[Any]:
            if (
                await self._bulk_write(self._jobs, requests) == len(requests)
                and attempt == 1
            ):
                return set(tokens)

            cursor = self._jobs.find({"_id": {"$in": list(tokens)}}, {"v": 1})
            return {
                doc["_id"]
                for doc in await cursor.to_list(None)
                if doc.get("v") == tokens[doc["_id"]]
            }

        applied = await self._run(write) if requests else set()
        return [
            self._released_event(results[doc["_id"]], doc.get("acquired_by", ""), doc)
            for doc in documents
            if doc["_id"] in applied
        ]

    async def reap_abandoned_jobs(self, scheduler_id: str) -> None:
        async def fetch(attempt: int) -> list[Any]:
            query = {"state": ACQUIRED, "acquired_by": scheduler_id}
            cursor = self._jobs.find(query, {"args": 0, "kwargs": 0}, sort=QUEUE_ORDER)
            return list(await cursor.to_list(None))

        await self._publish_all(await self._abandon(await self._run(fetch)))

    async def _forget_used_fire_times(self) -> None:
        """
        Delete finished schedule jobs whose fire time their schedule has moved past.

        Such a document is what makes a second job for the same fire time impossible
        (the unique ``fire_key`` index); it may go once its schedule has been released
        with a later next fire time, or is finished or gone, and its result (if any)
        has been fetched or has expired.
        """

        async def forget(attempt: int) -> None:
            cursor = self._jobs.find(
                {
                    "state": FINISHED,
                    "fire_key": {"$exists": True},
                    "result": {"$exists": False},
                },
                {"schedule_id": 1, "fire_time": 1},
            )
            used = list(await cursor.to_list(None))
            if not used:
                return

            schedule_ids = list({doc.get("schedule_id") for doc in used})
            cursor = self._schedules.find(
                {"_id": {"$in": schedule_ids}}, {"next_fire_time": 1}
            )
            next_times = {
                doc["_id"]: doc.get("next_fire_time")
                for doc in await cursor.to_list(None)
            }
            done = [
                doc["_id"]
                for doc in used
                if doc.get("schedule_id") not in next_times
                or next_times[doc.get("schedule_id")] is None
                or next_times[doc.get("schedule_id")] > doc.get("fire_time", 0)
            ]
            if done:
                await self._jobs.delete_many(
                    {
                        "_id": {"$in": done},
                        "state": FINISHED,
                        "result": {"$exists": False},
                    }
                )

        await self._run(forget)
