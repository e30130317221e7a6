"""
The operator's job actions (run now, retry, cancel) and the detail readers.

Each runs through ``_tools/actions.py`` on an action scheduler, as the command line
and the dashboard run it, against schedulers that really run the jobs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from apscheduler import (
    AsyncScheduler,
    ConflictPolicy,
    Event,
    Job,
    JobOutcome,
    JobReleased,
    JobResult,
    RetrySettings,
    Schedule,
    Task,
)
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.serializers.pickle import PickleSerializer
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from tenacity import stop_after_delay

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker
from apscheduler_mongo._adapters import adapter_for
from apscheduler_mongo._layout import TRACEBACK_LIMIT
from apscheduler_mongo._marshalling import TRACEBACK_CUT, traceback_text, uuid_to_bson
from apscheduler_mongo._signing import Signer
from apscheduler_mongo._tools import actions
from apscheduler_mongo._tools.actions import RefusedError
from apscheduler_mongo._tools.status import (
    NotFoundError,
    Reader,
    job_detail,
    schedule_runs,
)

from .support.hostile import system_gadget

pytestmark = pytest.mark.anyio

#: The tiers: in process, and pymongo over real sockets
ACTION_TIERS = [
    pytest.param("mongomock", id="mongomock"),
    pytest.param("wire", id="wire", marks=pytest.mark.wire),
]
KEY = "actions-test-signing-key-0123456789"
LEASE = timedelta(minutes=1)

#: What the tasks below were called with, in order (this process's runs)
CALLS: list[tuple[str, Any]] = []
#: The values whose first call fails
FAIL_ONCE: set[str] = set()


async def flaky(value: str, *, extra: Any = None) -> str:
    """Fail the first time for a value in :data:`FAIL_ONCE`, then succeed."""
    CALLS.append((value, extra))
    if value in FAIL_ONCE:
        FAIL_ONCE.discard(value)
        raise ValueError(f"boom: {value}")

    return value


async def slow(value: str) -> str:
    CALLS.append((value, None))
    await anyio.sleep(0.05)
    return value


@pytest.fixture(params=ACTION_TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def fresh_calls() -> Iterator[None]:
    CALLS.clear()
    FAIL_ONCE.clear()
    yield
    CALLS.clear()
    FAIL_ONCE.clear()


@pytest.fixture
def settings() -> RetrySettings:
    return RetrySettings(stop=stop_after_delay(10))


@pytest.fixture
def reader(
    client: Any, database_name: str, settings: RetrySettings, logger: logging.Logger
) -> Reader:
    return Reader(adapter_for(client), database_name, settings, logger)


@asynccontextmanager
async def operator(
    client: Any,
    database: str,
    settings: RetrySettings,
    logger: logging.Logger,
    key: str | None = None,
) -> AsyncIterator[AsyncScheduler]:
    """Yield a started action scheduler, as the command line makes its changes."""
    scheduler = actions.action_scheduler(
        client,
        database,
        PickleSerializer(),
        "events",
        settings,
        logger,
        signing_key=None if key is None else Signer([key]),
    )
    async with scheduler:
        yield scheduler


class Released:
    """The ``JobReleased`` events a scheduler received, by job id."""

    def __init__(self) -> None:
        self.events: dict[uuid.UUID, JobReleased] = {}
        self._changed = anyio.Event()

    def __call__(self, event: Event) -> None:
        assert isinstance(event, JobReleased)
        self.events[event.job_id] = event
        self._changed.set()
        self._changed = anyio.Event()

    async def wait(self, job_id: uuid.UUID, seconds: float = 10) -> JobReleased:
        with anyio.fail_after(seconds):
            while job_id not in self.events:
                await self._changed.wait()

        return self.events[job_id]

    async def wait_for_count(self, count: int, seconds: float = 10) -> None:
        with anyio.fail_after(seconds):
            while len(self.events) < count:
                await self._changed.wait()


@asynccontextmanager
async def worker(
    client: Any, database: str, *, start: bool = True, key: str | None = None
) -> AsyncIterator[tuple[AsyncScheduler, Released]]:
    """Yield a scheduler of the application on the store (running if ``start``)."""
    store = MongoDBDataStore(client, database=database, signing_key=key)
    broker = MongoDBEventBroker(
        client, database=database, poll_interval=0.05, signing_key=key
    )
    released = Released()
    async with AsyncScheduler(store, broker, cleanup_interval=3600) as scheduler:
        scheduler.subscribe(released, {JobReleased})
        if start:
            await scheduler.start_in_background()

        yield scheduler, released


@asynccontextmanager
async def plain_store(
    client: Any, database: str, logger: logging.Logger, key: str | None = None
) -> AsyncIterator[MongoDBDataStore]:
    async with AsyncExitStack() as exit_stack:
        broker = LocalEventBroker()
        await broker.start(exit_stack, logger)
        store = MongoDBDataStore(client, database=database, signing_key=key)
        await store.start(exit_stack, broker, logger)
        yield store
        # Stand for schedulers that still run elsewhere: nothing is given back
        store._leases._handed.clear()
        store._leases._held.clear()


async def finish(
    store: MongoDBDataStore,
    job: Job,
    outcome: JobOutcome,
    exception: BaseException | None = None,
) -> None:
    """
    Add ``job``, claim it and release it with ``outcome``, its result kept an hour
    (without a result to keep, its record would go at once).
    """
    job = attrs.evolve(job, result_expiration_time=timedelta(hours=1))
    await store.add_job(job)
    (claimed,) = await store.acquire_jobs("worker", LEASE, 1)
    assert claimed.id == job.id
    result = JobResult.from_job(
        claimed,
        outcome,
        started_at=datetime.now(timezone.utc),
        exception=exception,
        return_value="done" if outcome is JobOutcome.success else None,
    )
    await store.release_job("worker", claimed, result)


def raised(message: str) -> ValueError:
    """Return an exception raised and caught (it has a traceback)."""
    try:
        raise ValueError(message)
    except ValueError as exc:
        return exc


async def document(database: Any, job_id: uuid.UUID) -> dict[str, Any]:
    found = await database["jobs"].find_one({"_id": uuid_to_bson(job_id)})
    assert found is not None
    return dict(found)


def new_job(**fields: Any) -> Job:
    """Return a new job (the arguments typed loosely, as APScheduler takes them)."""
    return Job(**fields)


TASK = Task(id="flaky", func=f"{__name__}:flaky", job_executor="async")


class TestTraceback:
    """A job that raised keeps its traceback as text, bounded, shown as text."""

    def test_bounded_at_a_line_start(self) -> None:
        # A long chain of causes (repeated frames would be folded into one line)
        exc = raised("cause 0")
        for index in range(1, 300):
            later = raised(f"cause {index}")
            later.__cause__ = exc
            exc = later

        final = raised("the end")
        final.__cause__ = exc
        text = traceback_text(final)
        full = traceback_text(final, limit=10**9)

        assert len(full) > TRACEBACK_LIMIT
        first, _, rest = text.partition("\n")
        # Says how much was left out, and keeps the end from a line start on
        assert f"{first}\n" == TRACEBACK_CUT.format(len(full) - len(rest))
        assert len(rest) <= TRACEBACK_LIMIT
        assert full.endswith(rest)
        assert full[len(full) - len(rest) - 1] == "\n"
        assert rest.endswith("ValueError: the end\n")

    def test_hostile_exception(self) -> None:
        class Hostile(Exception):
            def __str__(self) -> str:
                raise RuntimeError("no")

        text = traceback_text(Hostile())
        assert "Hostile" in text

    async def test_stored_and_read_as_text(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        logger: Any,
    ) -> None:
        async with plain_store(client, database_name, logger) as store:
            await store.add_task(TASK)
            failed = new_job(task_id="flaky", executor="async", args=("x",))
            await finish(store, failed, JobOutcome.error, raised("boom"))
            succeeded = new_job(task_id="flaky", executor="async", args=("y",))
            await finish(store, succeeded, JobOutcome.success)

        stored = await document(database, failed.id)
        assert stored["outcome"] == "error"
        assert stored["traceback"].startswith("Traceback (most recent call last):")
        assert stored["traceback"].endswith("ValueError: boom\n")
        assert "args" in stored  # kept, to be retried
        assert "args" not in await document(database, succeeded.id)

        detail = await job_detail(reader, str(failed.id))
        assert detail is not None
        assert detail.traceback == stored["traceback"]
        assert detail.outcome == "error"
        assert detail.arguments == "'x'"
        assert detail.started_at is not None and detail.finished_at is not None
        assert detail.can_retry and not detail.can_cancel

        ok = await job_detail(reader, str(succeeded.id))
        assert ok is not None
        assert ok.traceback is None and ok.arguments is None
        assert ok.result == "'done'"
        assert ok.retry_refusal is not None and "succeeded" in ok.retry_refusal

    async def test_unreadable_and_oversized(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        logger: Any,
    ) -> None:
        async with plain_store(client, database_name, logger) as store:
            await store.add_task(TASK)
            failed = new_job(task_id="flaky", executor="async")
            await finish(store, failed, JobOutcome.error, raised("boom"))

        query = {"_id": uuid_to_bson(failed.id)}
        for value in (42, {"$gt": 1}, b"Traceback", ["a"]):
            await database["jobs"].update_one(query, {"$set": {"traceback": value}})
            detail = await job_detail(reader, str(failed.id))
            assert detail is not None and detail.traceback is not None
            assert detail.traceback.startswith("(unreadable: ")

        huge = "line\n" * 10_000 + "ValueError: end\n"
        await database["jobs"].update_one(query, {"$set": {"traceback": huge}})
        detail = await job_detail(reader, str(failed.id))
        assert detail is not None and detail.traceback is not None
        assert len(detail.traceback) < TRACEBACK_LIMIT + 100
        assert detail.traceback.endswith("ValueError: end\n")


class TestRetry:
    """A failed job is run again, with the same task and arguments, as a new job."""

    async def test_retry_runs_the_same_call(
        self,
        client: Any,
        database_name: str,
        reader: Reader,
        settings: Any,
        logger: Any,
    ) -> None:
        FAIL_ONCE.add("a")
        async with worker(client, database_name) as (app, released):
            job_id = await app.add_job(
                flaky,
                args=["a"],
                kwargs={"extra": {"n": 1}},
                result_expiration_time=60,
                metadata={"origin": "test"},
            )
            assert (await released.wait(job_id)).outcome is JobOutcome.error
            async with operator(client, database_name, settings, logger) as ops:
                said = await actions.retry(ops, reader, str(job_id))

            new_id = uuid.UUID(said.rpartition(" ")[2])
            assert said == f"retried job {job_id} as job {new_id}"
            assert (await released.wait(new_id)).outcome is JobOutcome.success

        assert CALLS == [("a", {"n": 1}), ("a", {"n": 1})]
        detail = await job_detail(reader, str(new_id))
        assert detail is not None and detail.outcome == "success"
        assert detail.result == "'a'"
        assert detail.task_id == f"{__name__}:flaky"
        old = await job_detail(reader, str(job_id))
        assert old is not None and old.outcome == "error"
        assert old.traceback is not None and "ValueError: boom: a" in old.traceback

    async def test_refusals(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        settings: Any,
        logger: Any,
    ) -> None:
        async with plain_store(client, database_name, logger) as store:
            await store.add_task(TASK)
            queued = new_job(task_id="flaky", executor="async", args=("q",))
            succeeded = new_job(task_id="flaky", executor="async")
            await finish(store, succeeded, JobOutcome.success)
            old = new_job(task_id="flaky", executor="async")
            await finish(store, old, JobOutcome.error, raised("old"))
            unreadable = new_job(task_id="flaky", executor="async")
            await finish(store, unreadable, JobOutcome.deserialization_failed)
            orphan = new_job(task_id="gone", executor="async", args=("o",))
            await store.add_task(
                Task(id="gone", func=f"{__name__}:flaky", job_executor="async")
            )
            await finish(store, orphan, JobOutcome.error, raised("o"))
            await store.remove_task("gone")
            await store.add_job(queued)

        # As a job finished by an earlier version, its result fetched: no
        # arguments, no outcome
        await database["jobs"].update_one(
            {"_id": uuid_to_bson(old.id)},
            {"$unset": {"args": "", "kwargs": "", "outcome": "", "result": ""}},
        )
        count = await database["jobs"].count_documents({})
        async with operator(client, database_name, settings, logger) as ops:
            for missing in (str(uuid.uuid4()), "not-a-uuid"):
                with pytest.raises(NotFoundError, match="no job"):
                    await actions.retry(ops, reader, missing)

            for job, why in [
                (queued, "is queued"),
                (succeeded, "succeeded"),
                (old, "no outcome recorded"),
                (unreadable, "outcome deserialization_failed"),
            ]:
                with pytest.raises(RefusedError, match=why):
                    await actions.retry(ops, reader, str(job.id))

            with pytest.raises(NotFoundError, match="task 'gone' does not exist"):
                await actions.retry(ops, reader, str(orphan.id))

        assert await database["jobs"].count_documents({}) == count

    async def test_old_failure_without_arguments(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        settings: Any,
        logger: Any,
    ) -> None:
        """A failure recorded by an earlier version kept no arguments: refused."""
        async with plain_store(client, database_name, logger) as store:
            await store.add_task(TASK)
            old = new_job(task_id="flaky", executor="async")
            await finish(store, old, JobOutcome.error, raised("old"))

        await database["jobs"].update_one(
            {"_id": uuid_to_bson(old.id)}, {"$unset": {"args": "", "kwargs": ""}}
        )
        async with operator(client, database_name, settings, logger) as ops:
            with pytest.raises(RefusedError, match="kept no arguments"):
                await actions.retry(ops, reader, str(old.id))

    async def test_tampered_arguments_are_not_read(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        settings: Any,
        logger: Any,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """
        On a signed store, arguments rewritten without the key are refused before
        they are deserialized: the gadget runs nowhere, and no job is added.
        """
        marker = tmp_path / "ran-retry"
        async with plain_store(client, database_name, logger, KEY) as store:
            await store.add_task(TASK)
            failed = new_job(task_id="flaky", executor="async", args=("x",))
            await finish(store, failed, JobOutcome.error, raised("boom"))

        stored = await document(database, failed.id)
        assert "call" in stored["mac"]  # the failed job keeps its signed arguments
        await database["jobs"].update_one(
            {"_id": uuid_to_bson(failed.id)},
            {"$set": {"args": system_gadget(marker)}},
        )
        count = await database["jobs"].count_documents({})
        async with operator(client, database_name, settings, logger, KEY) as ops:
            with pytest.raises(NotFoundError, match="cannot be read here"):
                await actions.retry(ops, reader, str(failed.id))

        assert "signature" in caplog.text
        detail = await job_detail(reader, str(failed.id))
        assert detail is not None and detail.arguments is not None
        assert "system" in detail.arguments  # shown as the call it would make
        assert not marker.exists()
        assert await database["jobs"].count_documents({}) == count

    async def test_signed_retry(
        self,
        client: Any,
        database_name: str,
        reader: Reader,
        settings: Any,
        logger: Any,
    ) -> None:
        async with plain_store(client, database_name, logger, KEY) as store:
            await store.add_task(TASK)
            failed = new_job(task_id="flaky", executor="async", args=("x",))
            await finish(store, failed, JobOutcome.abandoned)
            async with operator(client, database_name, settings, logger, KEY) as ops:
                said = await actions.retry(ops, reader, str(failed.id))

            (job,) = await store.get_jobs()
            assert said.endswith(str(job.id))
            assert job.args == ("x",)


class TestRunNow:
    """Run-now adds one job for now; the schedule's own fire times stay its own."""

    async def test_runs_now_and_the_fire_time_still_runs(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        settings: Any,
        logger: Any,
    ) -> None:
        fire_time = datetime.now(timezone.utc) + timedelta(seconds=2)
        async with worker(client, database_name) as (app, released):
            await app.add_schedule(
                flaky,
                DateTrigger(fire_time),
                id="soon",
                args=["scheduled"],
                misfire_grace_time=30,
                job_result_expiration_time=60,
            )
            before = await app.get_schedule("soon")
            async with operator(client, database_name, settings, logger) as ops:
                said = await actions.run_now(ops, reader, "soon")

            run_id = uuid.UUID(said.split()[2])
            event = await released.wait(run_id)
            assert event.outcome is JobOutcome.success
            assert event.schedule_id == "soon"
            assert (await app.get_schedule("soon")).next_fire_time == (
                before.next_fire_time
            )
            # The schedule's fire time still makes (and runs) its own job
            await released.wait_for_count(2)

        assert CALLS == [("scheduled", None), ("scheduled", None)]
        run = await document(database, run_id)
        assert "fire_key" not in run and run["scheduled_fire_time"] is None
        assert run["start_deadline"] is not None
        runs = await schedule_runs(reader, "soon", 10)
        assert [row.fired for row in runs] == [True, False]
        assert runs[1].job_id == str(run_id)
        assert all(row.outcome == "success" for row in runs)
        assert runs[0].scheduled_fire_time == fire_time
        assert all(
            row.lateness is not None and row.duration is not None for row in runs
        )
        assert await schedule_runs(reader, "soon", 1) == runs[:1]
        assert await schedule_runs(reader, "soon", 0) == []
        assert await schedule_runs(reader, "nothing", 5) == []

    async def test_paused_and_refusals(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        settings: Any,
        logger: Any,
    ) -> None:
        async with plain_store(client, database_name, logger) as store:
            await store.add_task(TASK)
            await store.add_task(
                Task(id="gone", func=f"{__name__}:flaky", job_executor="async")
            )
            for schedule_id, task_id, paused in [
                ("paused", "flaky", True),
                ("orphan", "gone", False),
                ("broken", "flaky", False),
            ]:
                trigger = IntervalTrigger(hours=1)
                schedule = Schedule(
                    id=schedule_id,
                    task_id=task_id,
                    trigger=trigger,
                    job_executor="async",
                    paused=paused,
                )
                schedule.next_fire_time = trigger.next()
                await store.add_schedule(schedule, ConflictPolicy.exception)

            await store.remove_task("gone")

        await database["schedules"].update_one(
            {"_id": "broken"}, {"$set": {"quarantine": {"reason": "bad"}}}
        )
        (before,) = await database["schedules"].find({"_id": "paused"}).to_list(None)
        async with operator(client, database_name, settings, logger) as ops:
            said = await actions.run_now(ops, reader, "paused")
            assert "(the schedule stays paused)" in said
            with pytest.raises(NotFoundError, match="no schedule 'nope'"):
                await actions.run_now(ops, reader, "nope")
            with pytest.raises(NotFoundError, match="quarantined"):
                await actions.run_now(ops, reader, "broken")
            with pytest.raises(NotFoundError, match="task 'gone' does not exist"):
                await actions.run_now(ops, reader, "orphan")

        (after,) = await database["schedules"].find({"_id": "paused"}).to_list(None)
        assert after["paused"] is True
        assert after["next_fire_time"] == before["next_fire_time"]
        (job,) = await database["jobs"].find({}).to_list(None)
        assert job["schedule_id"] == "paused" and job["state"] == "queued"


class TestCancel:
    """A queued job is cancelled in one conditional write: it then never runs."""

    async def test_cancelled_job_never_runs(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        settings: Any,
        logger: Any,
    ) -> None:
        async with worker(client, database_name, start=False) as (app, _):
            cancelled = await app.add_job(
                flaky, args=["cancelled"], result_expiration_time=60
            )

        async with (
            operator(client, database_name, settings, logger) as ops,
            worker(client, database_name, start=False) as (app, released),
        ):
            assert await actions.cancel(ops, reader, str(cancelled)) == (
                f"cancelled job {cancelled}"
            )
            await app.start_in_background()
            # The announcement reaches the scheduler, through the event broker
            event = await released.wait(cancelled)
            assert event.outcome is JobOutcome.cancelled
            sentinel = await app.add_job(flaky, args=["sentinel"])
            await released.wait(sentinel)
            await anyio.sleep(0.3)

        assert CALLS == [("sentinel", None)]
        stored = await document(database, cancelled)
        assert stored["state"] == "finished" and stored["outcome"] == "cancelled"
        detail = await job_detail(reader, str(cancelled))
        assert detail is not None and detail.can_retry and not detail.can_cancel

    async def test_cancel_races_claims(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        settings: Any,
        logger: Any,
        figures: Callable[[str], None],
    ) -> None:
        """Each job runs exactly once, or is cancelled and never runs: never both."""
        job_ids: list[uuid.UUID] = []
        outcomes: dict[uuid.UUID, bool] = {}
        async with (
            operator(client, database_name, settings, logger) as ops,
            worker(client, database_name) as (app, released),
        ):

            async def cancel(job_id: uuid.UUID) -> None:
                try:
                    await actions.cancel(ops, reader, str(job_id))
                except RefusedError:
                    outcomes[job_id] = False
                else:
                    outcomes[job_id] = True

            for index in range(20):
                job_id = await app.add_job(
                    slow, args=[str(index)], result_expiration_time=60
                )
                job_ids.append(job_id)
                await anyio.sleep(0.003 * (index % 7))
                await cancel(job_id)

            for job_id in job_ids:
                await released.wait(job_id)

            await anyio.sleep(0.3)

        ran = [value for value, _ in CALLS]
        for index, job_id in enumerate(job_ids):
            stored = await document(database, job_id)
            if outcomes[job_id]:
                assert str(index) not in ran
                assert stored["outcome"] == "cancelled"
            else:
                assert ran.count(str(index)) == 1
                assert stored["outcome"] == "success"

        cancelled = sum(outcomes.values())
        figures(f"{cancelled} of {len(job_ids)} jobs cancelled, the others ran once")

    async def test_claim_first_or_cancel_first(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        settings: Any,
        logger: Any,
    ) -> None:
        async with plain_store(client, database_name, logger) as store:
            await store.add_task(TASK)
            claimed = new_job(task_id="flaky", executor="async")
            await store.add_job(claimed)
            async with operator(client, database_name, settings, logger) as ops:
                # A claim between the operator's read and its write: not cancelled
                ops_store = ops.data_store
                assert isinstance(ops_store, MongoDBDataStore)
                assert [job.id for job in await store.acquire_jobs("w", LEASE)] == [
                    claimed.id
                ]
                assert not await ops_store.cancel_job(ops.identity, claimed.id)
                with pytest.raises(RefusedError, match="is running"):
                    await actions.cancel(ops, reader, str(claimed.id))

                # Cancelled first: no claim hands it out
                first = new_job(task_id="flaky", executor="async")
                await store.add_job(first)
                await actions.cancel(ops, reader, str(first.id))
                assert await store.acquire_jobs("w", LEASE) == []

        stored = await document(database, claimed.id)
        assert stored["state"] == "acquired"

    async def test_schedule_job_keeps_its_fire_time(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        settings: Any,
        logger: Any,
    ) -> None:
        """A cancelled job of a fire time keeps the record: no second job for it."""
        fire_time = datetime.now(timezone.utc) - timedelta(seconds=1)
        async with plain_store(client, database_name, logger) as store:
            await store.add_task(TASK)
            job = new_job(
                task_id="flaky",
                executor="async",
                schedule_id="s",
                scheduled_fire_time=fire_time,
            )
            await store.add_job(job)
            async with operator(client, database_name, settings, logger) as ops:
                await actions.cancel(ops, reader, str(job.id))

            again = new_job(
                task_id="flaky",
                executor="async",
                schedule_id="s",
                scheduled_fire_time=fire_time,
            )
            await store.add_job(again)  # refused: the fire time was used
            assert await store.get_jobs() == []

        stored = await document(database, job.id)
        assert stored["outcome"] == "cancelled" and "fire_key" in stored
        assert "purge_at" not in stored

    async def test_refusals(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        settings: Any,
        logger: Any,
    ) -> None:
        async with plain_store(client, database_name, logger) as store:
            await store.add_task(TASK)
            done = new_job(task_id="flaky", executor="async")
            await finish(store, done, JobOutcome.success)
            quarantined = new_job(task_id="flaky", executor="async")
            await store.add_job(quarantined)

        await database["jobs"].update_one(
            {"_id": uuid_to_bson(quarantined.id)},
            {"$set": {"quarantine": {"reason": "bad"}}},
        )
        async with operator(client, database_name, settings, logger) as ops:
            with pytest.raises(RefusedError, match="has finished"):
                await actions.cancel(ops, reader, str(done.id))
            with pytest.raises(RefusedError, match="quarantined"):
                await actions.cancel(ops, reader, str(quarantined.id))
            with pytest.raises(NotFoundError, match="no job"):
                await actions.cancel(ops, reader, str(uuid.uuid4()))


class TestJobDetail:
    """One job's detail: every state, read as stored."""

    async def test_states(
        self,
        client: Any,
        database: Any,
        database_name: str,
        reader: Reader,
        logger: Any,
    ) -> None:
        async with plain_store(client, database_name, logger) as store:
            await store.add_task(TASK)
            running = new_job(task_id="flaky", executor="async", kwargs={"a": 1})
            await store.add_job(running)
            await store.acquire_jobs("worker-1", LEASE)
            queued = new_job(task_id="flaky", executor="async", args=(1, 2))
            await store.add_job(queued)

        detail = await job_detail(reader, str(running.id))
        assert detail is not None
        assert detail.state == "acquired" and detail.acquired_by == "worker-1"
        assert detail.arguments == "a=1"
        assert detail.outcome is None and detail.finished_at is None
        assert not detail.can_cancel and not detail.can_retry
        detail = await job_detail(reader, str(queued.id))
        assert detail is not None
        assert detail.state == "queued" and detail.can_cancel
        assert detail.created_at is not None
        assert await job_detail(reader, str(uuid.uuid4())) is None
        assert await job_detail(reader, "not-a-uuid") is None

        # Damaged fields are shown as unknown, never raised
        await database["jobs"].update_one(
            {"_id": uuid_to_bson(queued.id)},
            {"$set": {"created_at": "yesterday", "task_id": 7, "state": ["x"]}},
        )
        detail = await job_detail(reader, str(queued.id))
        assert detail is not None
        assert detail.created_at is None and detail.task_id == "7"
        assert detail.state == "['x']" and not detail.can_cancel
