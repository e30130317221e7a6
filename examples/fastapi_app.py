"""
A FastAPI application that runs jobs in the background and hands out their results.

The application's lifespan starts an ``AsyncScheduler`` on ``MongoDBDataStore`` and
``MongoDBEventBroker`` (in FastAPI's own event loop) and stops it at shutdown. Two
endpoints use it:

- ``POST /jobs`` with ``{"x": 1, "y": 2}`` adds a job of the task ``add`` and answers
  ``{"job_id": "..."}``. An optional ``"delay"`` (seconds, at most 10) makes the task
  sleep first, to watch a job stay pending;
- ``GET /jobs/<job_id>`` answers ``{"status": "pending"}`` while the job is queued or
  running, then ``{"status": "success", "value": 3}`` (or the outcome, such as
  ``"error"``, and the error). ``?wait=5`` waits up to 5 seconds for the job to end
  first. APScheduler hands a result out once: asking again answers 404.

Run it (``pip install fastapi uvicorn``) from the repository root with
``MONGODB_URI=mongodb://127.0.0.1:27017/ uvicorn examples.fastapi_app:app`` or
``python examples/fastapi_app.py [--port 8000]``, then::

    curl -X POST localhost:8000/jobs -H 'content-type: application/json' \\
        -d '{"x": 1, "y": 2}'
    curl 'localhost:8000/jobs/<job_id>?wait=5'

``MONGODB_URI`` (default ``mongodb://127.0.0.1:27017/``) says which MongoDB to use and
``APSCHEDULER_DATABASE`` (default ``apscheduler_fastapi_example``) which database.
With several application processes (``uvicorn --workers 4``, or many hosts) on the
same database, each runs a scheduler, a job runs in exactly one of them, and any of
them can answer for any job: the event broker tells each scheduler when a job
somewhere ends.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated, Any
from uuid import UUID

import anyio
from apscheduler import AsyncScheduler, JobLookupError, JobOutcome, JobResult
from fastapi import FastAPI, HTTPException, Query, Request
from pydantic import BaseModel, Field

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker

DEFAULT_URI = "mongodb://127.0.0.1:27017/"
DEFAULT_DATABASE = "apscheduler_fastapi_example"
#: The task's id in the data store: the same in every process of the application
TASK_ID = "add"
#: How long a finished job's result stays available
RESULT_LIFETIME = timedelta(hours=1)


async def add(x: int, y: int, delay: float = 0) -> int:
    """The task the jobs run: add two numbers (after ``delay`` seconds)."""
    await anyio.sleep(delay)
    return x + y


class Numbers(BaseModel):
    """What ``POST /jobs`` takes."""

    x: int
    y: int
    delay: float = Field(default=0, ge=0, le=10)


class JobCreated(BaseModel):
    """What ``POST /jobs`` answers."""

    job_id: UUID


class JobStatus(BaseModel):
    """What ``GET /jobs/<job_id>`` answers."""

    job_id: UUID
    #: ``pending``, or the outcome of the finished job (``success``, ``error`` ...)
    status: str
    value: int | None = None
    error: str | None = None


def create_app(uri: str | None = None, database: str | None = None) -> FastAPI:
    """
    Return the application, which uses ``database`` on the MongoDB at ``uri``.

    Without arguments, they come from ``MONGODB_URI`` and ``APSCHEDULER_DATABASE`` (or
    the defaults) when the application starts.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mongodb_uri = uri or os.environ.get("MONGODB_URI", DEFAULT_URI)
        name = database or os.environ.get("APSCHEDULER_DATABASE", DEFAULT_DATABASE)
        store = MongoDBDataStore(mongodb_uri, database=name)
        broker = MongoDBEventBroker(mongodb_uri, database=name)
        async with AsyncScheduler(data_store=store, event_broker=broker) as scheduler:
            # A fixed task id, and the function given here: the task does not depend
            # on how this module was imported (``__main__`` or ``examples.fastapi_app``)
            await scheduler.configure_task(TASK_ID, func=add, max_running_jobs=None)
            await scheduler.start_in_background()
            app.state.scheduler = scheduler
            yield  # the application serves requests; leaving stops the scheduler

    app = FastAPI(title="apscheduler-mongo example", lifespan=lifespan)

    def scheduler_of(request: Request) -> AsyncScheduler:
        scheduler: AsyncScheduler = request.app.state.scheduler
        return scheduler

    @app.post("/jobs", status_code=201)
    async def add_job(numbers: Numbers, request: Request) -> JobCreated:
        job_id = await scheduler_of(request).add_job(
            TASK_ID,
            kwargs=numbers.model_dump(),
            result_expiration_time=RESULT_LIFETIME,
        )
        return JobCreated(job_id=job_id)

    @app.get("/jobs/{job_id}")
    async def get_job(
        job_id: UUID,
        request: Request,
        wait: Annotated[float, Query(ge=0, le=30)] = 0,
    ) -> JobStatus:
        scheduler = scheduler_of(request)
        result: JobResult | None = None
        if wait:
            with anyio.move_on_after(wait):
                try:
                    result = await scheduler.get_job_result(job_id)
                except JobLookupError:
                    pass  # unknown, or its result was handed out: answered below

        if result is None:
            # Ask whether the job is still there before looking for its result: a job
            # that ends in between then has its result found, not a 404
            pending = bool(await scheduler.data_store.get_jobs([job_id]))
            result = await scheduler.data_store.get_job_result(job_id)
            if result is None:
                if pending:
                    return JobStatus(job_id=job_id, status="pending")

                raise HTTPException(
                    404, "no such job, or its result was handed out already"
                )

        return describe(result)

    return app


def describe(result: JobResult) -> JobStatus:
    """Turn a job's result into the answer of ``GET /jobs/<job_id>``."""
    status = JobStatus(job_id=result.job_id, status=result.outcome.name)
    if result.outcome is JobOutcome.success:
        value: Any = result.return_value
        status.value = value
    elif result.exception is not None:
        status.error = f"{type(result.exception).__name__}: {result.exception}"

    return status


#: The application, for ``uvicorn examples.fastapi_app:app``
app = create_app()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the example application.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
