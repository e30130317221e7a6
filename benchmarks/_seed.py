"""
Fill a store with many jobs quickly: one through the store, the rest as copies.

Adding thousands of jobs one ``add_job`` at a time is slow on the mongoeco server
(each insert there costs time in proportion to the collection's size), so one job of
each kind is made through the store's own API, and copies of its stored document,
with fresh ids, are inserted a few hundred at a time. The copies are what the store
itself would have written, so both stores are measured on documents of their own
format.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal
from uuid import UUID, uuid4

from apscheduler import Job, JobOutcome, JobResult
from apscheduler.abc import DataStore
from bson import Binary, ObjectId
from pymongo import AsyncMongoClient

from _common import StoreKind

JobState = Literal["queued", "leased", "finished"]
BATCH = 250
#: Whoever holds the "leased" jobs: nobody that takes part in a measurement
OTHER_SCHEDULER = "elsewhere"


def _copy(template: Mapping[str, Any]) -> tuple[UUID, dict[str, Any]]:
    """Return a fresh id and a copy of ``template`` with it (and new version tokens)."""
    job_id = uuid4()
    document = {
        key: ObjectId() if isinstance(value, ObjectId) else value
        for key, value in template.items()
    }
    document["_id"] = Binary.from_uuid(job_id)
    return job_id, document


async def seed_jobs(
    store: DataStore,
    kind: StoreKind,
    uri: str,
    database: str,
    count: int,
    state: JobState = "queued",
    task_id: str = "work",
) -> list[UUID]:
    """
    Put ``count`` jobs of ``task_id`` in the given state into ``store``.

    Seed finished and leased jobs before queued ones: making the template of a
    finished or leased job acquires the oldest queued job.

    :param state: ``"queued"`` (waiting to be acquired), ``"leased"`` (acquired by
        another scheduler for a day) or ``"finished"`` (released, with its result
        kept for an hour)
    :return: the ids of the jobs
    """
    if count <= 0:
        return []

    expiration = timedelta(hours=1) if state == "finished" else timedelta(0)
    job = Job(task_id=task_id, executor="bench", result_expiration_time=expiration)
    await store.add_job(job)
    collection = "jobs"
    if state != "queued":
        lease = timedelta(days=1)
        [acquired] = await store.acquire_jobs(OTHER_SCHEDULER, lease, 1)
        assert acquired.id == job.id, "seed finished and leased jobs first"
        if state == "finished":
            result = JobResult.from_job(acquired, JobOutcome.success, return_value=1)
            await store.release_job(OTHER_SCHEDULER, acquired, result)
            if kind == "builtin":
                collection = "job_results"  # the built-in keeps results apart

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        target = client[database][collection]
        template = await target.find_one({"_id": Binary.from_uuid(job.id)})
        assert template is not None, f"no {state} job document in {collection}"
        ids = [job.id]
        for start in range(1, count, BATCH):
            copies = [_copy(template) for _ in range(min(BATCH, count - start))]
            await target.insert_many([document for _, document in copies])
            ids.extend(job_id for job_id, _ in copies)
    finally:
        await client.close()

    return ids


async def drop_database(uri: str, database: str) -> None:
    """Drop ``database`` (the benchmarks use a fresh one for each measurement)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        await client.drop_database(database)
    finally:
        await client.close()
