"""The store's operations on jobs and their results."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

from apscheduler import (
    ConflictingIdError,
    DeserializationError,
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

from ._client import aggregate
from ._core import LIVE_STATES, QUEUE_ORDER, StoreCore
from ._jobs import (
    describe_id,
    explain,
    finish_update,
    free_job_filter,
    plan_claims,
    result_for_document,
)
from ._marshalling import (
    ACQUIRED,
    FINISHED,
    MalformedDocumentError,
    from_micros,
    job_to_document,
    now_micros,
    result_from_document,
    slot_number,
    task_from_document,
    uuid_to_bson,
)

#: How long a used fire time is remembered at least (see _forget_used_fire_times)
FIRE_TIME_RETENTION = timedelta(hours=1)
#: Where a claim's read puts each job's task document (removed before use)
_TASK = "_task"


#: How a duplicate key error names its index, for servers whose errors carry no
#: ``keyPattern`` ("E11000 duplicate key error collection: db.jobs index: fire_key")
_DUPLICATE_INDEX = re.compile(r"\bindex: (\S+)")


def duplicated_key(exc: DuplicateKeyError) -> str | None:
    """Return the (first) field of the unique index a duplicate key error names."""
    key_pattern = (exc.details or {}).get("keyPattern")
    if isinstance(key_pattern, Mapping) and key_pattern:
        return str(next(iter(key_pattern)))

    match = _DUPLICATE_INDEX.search(str(exc))
    return match.group(1) if match else None


def passed(next_times: Mapping[Any, Any], schedule_id: Any, fire_time: Any) -> bool:
    """Tell whether a schedule is gone, finished, or past ``fire_time``."""
    if schedule_id not in next_times or next_times[schedule_id] is None:
        return True

    next_time = next_times[schedule_id]
    return (
        isinstance(next_time, int)
        and isinstance(fire_time, int)
        and (next_time > fire_time)
    )


class JobOperations(StoreCore):
    """Adding, leasing, releasing and finishing jobs; handing out results."""

    async def add_job(self, job: Job) -> None:
        document = job_to_document(job, self.serializer)
        document["v"] = document["insert_token"] = token = ObjectId()

        async def insert(attempt: int) -> bool:
            if (
                "fire_time" in document
                and not self._holds_lease(job.schedule_id)
                and not await self._fire_time_current(
                    job.schedule_id, document["fire_time"]
                )
            ):
                self._logger.warning(
                    "Not adding job %s: schedule %r has moved past %s "
                    "(its lease probably passed to another scheduler)",
                    job.id,
                    job.schedule_id,
                    job.original_scheduled_time,
                )
                return False

            try:
                await self._jobs.insert_one(document)
            except DuplicateKeyError as exc:
                existing = await self._jobs.find_one(
                    {"_id": document["_id"]}, {"insert_token": 1}
                )
                if existing is not None and existing.get("insert_token") == token:
                    return True  # our own insert, retried after a lost reply

                if duplicated_key(exc) == "fire_key":
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

    def _holds_lease(self, schedule_id: Any) -> bool:
        """
        Tell whether this store holds the lease on a schedule it acquired.

        While it does, nobody else can have processed the schedule, so its jobs need
        no :meth:`_fire_time_current` check (which costs a round trip per job).
        """
        until = self._leases.get(schedule_id)
        return until is not None and now_micros() < until

    async def _fire_time_current(self, schedule_id: Any, fire_time: int) -> bool:
        """
        Tell whether a job for ``fire_time`` may still be added to the schedule.

        Whoever processes a schedule adds jobs for its stored next fire time and
        later ones; a scheduler that lost its lease while stalled, and comes back
        after the schedule moved on, must not add a job for a fire time that has
        been dealt with (its record may already have been forgotten).
        """
        schedule = await self._schedules.find_one(
            {"_id": schedule_id}, {"next_fire_time": 1}
        )
        if schedule is None:
            return True  # if it was just removed, the fire time record still holds

        next_fire_time = schedule.get("next_fire_time")
        return isinstance(next_fire_time, int) and next_fire_time <= fire_time

    async def get_jobs(self, ids: Iterable[UUID] | None = None) -> list[Job]:
        query: dict[str, Any] = {"state": {"$in": LIVE_STATES}}
        if ids is not None:
            query["_id"] = {"$in": [uuid_to_bson(job_id) for job_id in ids]}

        async def fetch(attempt: int) -> list[Any]:
            return list(await self._jobs.find(query, sort=QUEUE_ORDER).to_list(None))

        jobs = [self._build_job(document) for document in await self._run(fetch)]
        return [job for job in jobs if job is not None]

    def _task_cap(self, task: Mapping[str, Any]) -> int | None:
        """Return a task's ``max_running_jobs``; 0 (run nothing) if the task is bad."""
        try:
            # The scheduler reads the task of each job it gets: it must be readable
            task_from_document(task, 0)
        except MalformedDocumentError as exc:
            self._logger.warning(
                "Cannot read task %r: %s; its jobs stay queued", task["_id"], exc
            )
            return 0

        cap = task.get("max_running_jobs")
        if cap is None or (
            isinstance(cap, int) and not isinstance(cap, bool) and cap > 0
        ):
            return cap

        self._logger.warning(
            "Task %r has an invalid max_running_jobs (%r); its jobs stay queued",
            task["_id"],
            cap,
        )
        return 0

    async def _held_by(self, token: ObjectId) -> list[Any]:
        """Return the job documents that the claim with ``token`` took."""
        cursor = self._jobs.find({"v": token}, sort=QUEUE_ORDER)
        return list(await cursor.to_list(None))

    async def acquire_jobs(
        self, scheduler_id: str, lease_duration: timedelta, limit: int | None = None
    ) -> list[Job]:
        token = ObjectId()
        lease_micros = lease_duration // timedelta(microseconds=1)
        jobs: dict[Any, Job] = {}
        finished: dict[Any, JobResult] = {}

        async def claim(attempt: int) -> list[Any]:
            if attempt > 1 and (held_already := await self._held_by(token)):
                return held_already  # a lost reply: the first attempt did claim

            now = now_micros()
            # One round trip reads the free jobs and, beside each, its task
            pipeline: list[dict[str, Any]] = [
                {"$match": free_job_filter(now)},
                {"$sort": dict(QUEUE_ORDER)},
            ]
            if limit:
                pipeline.append({"$limit": limit})

            pipeline.append(
                {
                    "$lookup": {
                        "from": self._tasks.name,
                        "localField": "task_id",
                        "foreignField": "_id",
                        "as": _TASK,
                    }
                }
            )
            documents = await aggregate(self._jobs, pipeline)
            if not documents and attempt == 1:
                return []

            tasks: dict[str, Any] = {}
            for doc in documents:
                for task in doc.pop(_TASK, None) or ():
                    if isinstance(task.get("_id"), str):
                        tasks[task["_id"]] = task

            caps = {task_id: self._task_cap(task) for task_id, task in tasks.items()}
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
                        try:
                            number = slot_number(holder["slot_key"])
                        except (TypeError, ValueError):
                            # Still counted as running; its slot number is unknown
                            self._logger.warning(
                                "Job %s holds a malformed slot key %r",
                                describe_id(holder["_id"]),
                                holder["slot_key"],
                            )
                        else:
                            held.setdefault(task_id, set()).add(number)

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
                for doc in plan.documents:
                    doc["acquired_until"] = acquired_until
                return plan.documents

            # Lost a race for some, or retrying after a lost reply: ask what we hold
            return await self._held_by(token)

        async with self._claiming("jobs", scheduler_id, token):
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
            return attempt > 1 and await self._written_by(
                query["_id"], "release_token", token
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

    async def _written_by(self, document_id: Any, field: str, token: Any) -> bool:
        """
        Tell whether a write that carried ``token`` in ``field`` was applied.

        Used when a retried write matches nothing: either the lost attempt was
        applied, or someone else changed the document first. A document that is gone
        was finished and purged, most likely by our attempt (anyone else needed our
        lease to lapse first).
        """
        document = await self._jobs.find_one({"_id": document_id}, {field: 1})
        return document is None or document.get(field) == token

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

        try:
            if not isinstance(document["result"], Mapping):
                raise MalformedDocumentError("field 'result' is not a document")

            result = result_from_document(job_id, document["result"], self.serializer)
        except (DeserializationError, MalformedDocumentError) as exc:
            # The result stays stored: APScheduler's stores raise here too
            raise type(exc)(
                f"cannot read the result of job {job_id}: {explain(exc)}"
            ) from exc

        if result.expires_at <= datetime.now(timezone.utc):
            return None

        token = ObjectId()
        changes: dict[str, Any] = {"v": token, "take_token": token}
        if "fire_key" not in document:
            changes["purge_at"] = datetime.now(timezone.utc)

        async def take(attempt: int) -> bool:
            # Only one caller gets the result: the write re-checks the version
            query = {"_id": document_id, "v": document["v"]}
            update = {"$set": changes, "$unset": {"result": ""}}
            if (await self._jobs.update_one(query, update)).matched_count:
                return True

            return attempt > 1 and await self._written_by(
                document_id, "take_token", token
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
        finishing: dict[Any, Mapping[str, Any]] = {}
        for document in documents:
            try:
                result = result_for_document(document, JobOutcome.abandoned, now)
            except MalformedDocumentError as exc:
                self._logger.warning(
                    "Cannot finish job %s: %s", describe_id(document["_id"]), exc
                )
                continue

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
            finishing[document["_id"]] = document

        async def write(attempt: int) -> set[Any]:
            if (
                await self._bulk_write(self._jobs, requests) == len(requests)
                and attempt == 1
            ):
                return set(tokens)

            cursor = self._jobs.find(
                {"_id": {"$in": list(tokens)}}, {"release_token": 1}
            )
            return {
                doc["_id"]
                for doc in await cursor.to_list(None)
                if doc.get("release_token") == tokens[doc["_id"]]
            }

        applied = await self._run(write) if requests else set()
        return [
            self._released_event(results[key], doc.get("acquired_by", ""), doc)
            for key, doc in finishing.items()
            if key in applied
        ]

    async def reap_abandoned_jobs(self, scheduler_id: str) -> None:
        await self._return_unconfirmed()  # those never reached the scheduler

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
        with a later next fire time, or is finished or gone, its result (if any) has
        been fetched or has expired, and it finished longer than
        ``FIRE_TIME_RETENTION`` ago (so that a scheduler that stalled while adding
        jobs finds it when it wakes).
        """

        async def forget(attempt: int) -> None:
            cutoff = now_micros() - FIRE_TIME_RETENTION // timedelta(microseconds=1)
            cursor = self._jobs.find(
                {
                    "state": FINISHED,
                    "fire_key": {"$exists": True},
                    "result": {"$exists": False},
                    "finished_time": {"$lt": cutoff, "$ne": None},
                },
                {"schedule_id": 1, "fire_time": 1},
            )
            used = []
            for doc in await cursor.to_list(None):
                if isinstance(doc.get("schedule_id"), str):
                    used.append(doc)
                else:
                    self._logger.warning(
                        "Keeping finished job %s: its schedule_id %r is no string",
                        describe_id(doc["_id"]),
                        doc.get("schedule_id"),
                    )

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
                if passed(next_times, doc.get("schedule_id"), doc.get("fire_time"))
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
