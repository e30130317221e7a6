"""
Bad data never stops the scheduler (guarantee 8).

Values of the wrong type (as hand edits write them) are quarantined or ignored;
documents the serializer cannot read, or that lack fields, are skipped, quarantined or
finished with a result saying why; arguments too large to store fail clearly.

The cases under "Every damage" take a document that the store (or the event broker)
wrote itself, damage one field in one way, and run every read path of its collection
next to a healthy neighbour of the same kind. No exception escapes (except the clear
errors APScheduler's contract asks for), a warning names the damaged document, the
document stays in the database (possibly quarantined, never deleted unannounced), and
the neighbour is still served in the same call.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

import anyio
import pytest
from apscheduler import (
    AsyncScheduler,
    ConflictPolicy,
    DeserializationError,
    Event,
    Job,
    JobOutcome,
    JobReleased,
    JobResult,
    RunState,
    Schedule,
    ScheduleRemoved,
    Task,
    TaskAdded,
    TaskLookupError,
)
from apscheduler._structures import ScheduleResult
from apscheduler.abc import EventBroker
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.serializers.json import JSONSerializer
from apscheduler.serializers.pickle import PickleSerializer
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from bson import Binary, ObjectId
from pymongo.errors import DocumentTooLarge

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker
from apscheduler_mongo._marshalling import MalformedDocumentError

from .support.logs import logged
from .support.tiers import WIRE_ONLY

pytestmark = [
    pytest.mark.anyio,
    # mongomock's TTL index support calls datetime.utcnow() (deprecated in 3.12)
    pytest.mark.filterwarnings(
        "ignore:datetime.datetime.utcnow:DeprecationWarning:mongomock"
    ),
]

LEASE = timedelta(minutes=1)
#: What a pickle looks like in its first bytes, and then not
NOT_A_PICKLE = b"\x80\x05 this is not a pickle"
#: Random bytes where serializer output belongs
GARBAGE = random.Random(8).randbytes(48)
#: Well-formed pickles of the wrong kind: not a trigger, not a tuple
FOREIGN = PickleSerializer().serialize(42)
#: Well-formed JSON that is no event's fields
FOREIGN_JSON = JSONSerializer().serialize([1, 2])
#: Arguments for schedules and jobs (APScheduler types its converters loosely)
ARGS: Any = (1,)
KWARGS: Any = {"key": 1}
NESTED = {"nested": 1}
ARRAY = [1, 2]
#: Beyond what a datetime can hold (year 146,000 or so)
HUGE = 2**62
#: An instant in microseconds, around the year 2112
FAR_FUTURE = 2**52


class _Missing(Enum):
    MISSING = "missing"


#: Use as a field's new value to remove the field
MISSING = _Missing.MISSING


def damaged(document: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``document`` with ``changes`` (dotted paths) applied."""
    copy = {
        key: dict(value) if isinstance(value, Mapping) else value
        for key, value in document.items()
    }
    for path, value in changes.items():
        *parents, name = path.split(".")
        target = copy
        for parent in parents:
            target = target[parent]

        if value is MISSING:
            target.pop(name, None)
        else:
            target[name] = value

    return copy


async def damage(collection: Any, document_id: Any, changes: Mapping[str, Any]) -> Any:
    """Replace a stored document with a damaged copy; return the copy's ``_id``."""
    original = await collection.find_one({"_id": document_id})
    assert original is not None
    await collection.delete_one({"_id": document_id})
    result = await collection.insert_one(damaged(original, changes))
    return result.inserted_id


def shown(document_id: Any) -> str:
    """Return how the store names a document id in its logs and errors."""
    if isinstance(document_id, Binary) and document_id.subtype == 4:
        return str(document_id.as_uuid())

    if isinstance(document_id, Binary) and document_id.subtype == 0:
        return repr(bytes(document_id))  # how pymongo reads it back

    if isinstance(document_id, ObjectId):
        return str(document_id)

    return repr(document_id)


def complaints(
    caplog: pytest.LogCaptureFixture, document_id: Any, logger: str = ""
) -> list[str]:
    """Return the warnings and errors that name ``document_id`` (from ``logger``)."""
    name = shown(document_id)
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.WARNING
        and name in record.getMessage()
        and record.name.startswith(logger)
    ]


def success(job: Job) -> JobResult:
    return JobResult.from_job(job, JobOutcome.success, return_value=42)


class Read(Enum):
    """How a damaged document reads."""

    #: not at all: it is skipped with a warning (and quarantined if it was claimed)
    UNREADABLE = "unreadable"
    #: as a valid item (the damage is harmless, or not the store's to judge)
    VALID = "valid"
    #: as a finished schedule, which cleanup removes, announcing it
    FINISHED = "finished"
    #: as a job that cannot run: finished with a result saying why
    FAILED = "failed"
    #: as a job that cannot run, and whose result cannot be kept (no valid
    #: expiration): finished, announced and purged at once
    DISCARDED = "discarded"
    #: as a job of an unknown task: finished with TaskLookupError
    ORPHAN = "orphan"
    #: as a job that is quarantined: no result can name it (its id is no UUID)
    QUARANTINED = "quarantined"
    #: as a job in no known state: left alone, reported by cleanup
    STRAY = "stray"
    #: as a job held by someone else: left alone, reported when met
    HELD = "held"
    #: not at all, and not seen by any query (left alone)
    UNSEEN = "unseen"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return logged(caplog, logging.WARNING)


async def add_task(store: MongoDBDataStore, task_id: str = "task") -> None:
    await store.add_task(Task(id=task_id, func="math:floor", job_executor="async"))


async def add_schedule(
    store: MongoDBDataStore, schedule_id: str, next_fire_time: datetime
) -> Schedule:
    schedule = Schedule(
        id=schedule_id,
        task_id="task",
        trigger=DateTrigger(next_fire_time),
        job_executor="async",
        next_fire_time=next_fire_time,
    )
    await store.add_schedule(schedule, ConflictPolicy.exception)
    return schedule


async def add_job(store: MongoDBDataStore, task_id: str = "task") -> Job:
    job = Job(
        task_id=task_id,
        executor="async",
        result_expiration_time=timedelta(minutes=5),
    )
    await store.add_job(job)
    return job


# Values of the wrong type


class TestWrongTypes:
    """Values edited by hand (mongosh writes numbers as doubles) are quarantined."""

    @pytest.mark.parametrize(
        "value", [pytest.param(1.5e15, id="double"), pytest.param("soon", id="string")]
    )
    async def test_next_fire_time(self, store: MongoDBDataStore, value: Any) -> None:
        now = datetime.now(timezone.utc)
        await add_schedule(store, "broken", now + timedelta(days=1))
        await add_schedule(store, "good", now + timedelta(days=2))
        await store._schedules.update_one(
            {"_id": "broken"}, {"$set": {"next_fire_time": value}}
        )

        next_time = await store.get_next_schedule_run_time()
        [good] = await store.get_schedules({"good"})
        assert next_time == good.next_fire_time
        broken = await store._schedules.find_one({"_id": "broken"})
        assert broken is not None
        if isinstance(value, float):
            # A double sorts among the integers, so it was met and quarantined; a
            # string sorts after every number and is never the earliest
            assert "quarantine" in broken

    @pytest.mark.parametrize(
        "value", [pytest.param(2.0, id="double"), pytest.param("2", id="string")]
    )
    async def test_max_running_jobs(self, store: MongoDBDataStore, value: Any) -> None:
        await add_task(store, "bad")
        await add_task(store, "good")
        await store._tasks.update_one(
            {"_id": "bad"}, {"$set": {"max_running_jobs": value}}
        )
        await store.add_job(Job(task_id="bad", executor="async"))
        await store.add_job(Job(task_id="good", executor="async"))

        acquired = await store.acquire_jobs("me", timedelta(minutes=1), 10)
        assert [job.task_id for job in acquired] == ["good"]
        assert [job.task_id for job in await store.get_jobs()] == ["bad", "good"]


@WIRE_ONLY
class TestOversized:
    """Arguments beyond MongoDB's 16 MB document limit fail clearly, writing nothing."""

    BIG = b"x" * (17 * 1024 * 1024)
    #: APScheduler types its ``args`` converter loosely; pass them untyped
    ARGS: Any = (BIG,)

    async def test_add_job(self, store: MongoDBDataStore) -> None:
        await store.add_task(Task(id="task", func="builtins:len", job_executor="async"))
        with pytest.raises(DocumentTooLarge, match="too large"):
            await store.add_job(Job(task_id="task", executor="async", args=self.ARGS))

        assert await store.get_jobs() == []

    @pytest.mark.parametrize(
        "policy", [ConflictPolicy.exception, ConflictPolicy.replace]
    )
    async def test_add_schedule(
        self, store: MongoDBDataStore, policy: ConflictPolicy
    ) -> None:
        trigger = DateTrigger(datetime.now(timezone.utc) + timedelta(days=1))
        schedule = Schedule(
            id="big",
            task_id="task",
            trigger=trigger,
            job_executor="async",
            args=self.ARGS,
        )
        with pytest.raises(DocumentTooLarge, match="too large"):
            await store.add_schedule(schedule, policy)

        assert await store.get_schedules() == []


# Corrupted documents


class TestCorruptedSchedules:
    """An unreadable schedule is skipped and quarantined, never deleted."""

    async def test_get_schedules_skips_it(
        self,
        store: MongoDBDataStore,
        database: Any,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        now = datetime.now(timezone.utc)
        await add_task(store)
        await add_schedule(store, "good", now + timedelta(hours=1))
        await add_schedule(store, "bad", now + timedelta(hours=1))
        collection = database["schedules"]
        await collection.update_one({"_id": "bad"}, {"$set": {"trigger": NOT_A_PICKLE}})

        with anyio.fail_after(10):
            schedules = await store.get_schedules()

        assert [schedule.id for schedule in schedules] == ["good"]
        assert any("'bad'" in message for message in warnings_of(caplog))
        assert await collection.count_documents({"_id": "bad"}) == 1

    async def test_acquire_schedules_quarantines_it(
        self,
        store: MongoDBDataStore,
        database: Any,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        past = datetime.now(timezone.utc) - timedelta(minutes=1)
        await add_task(store)
        await add_schedule(store, "good", past)
        await add_schedule(store, "bad", past)
        collection = database["schedules"]
        await collection.update_one({"_id": "bad"}, {"$set": {"trigger": NOT_A_PICKLE}})

        with anyio.fail_after(10):
            acquired = await store.acquire_schedules("scheduler-1", LEASE, 10)

        assert [schedule.id for schedule in acquired] == ["good"]
        assert any("'bad'" in message for message in warnings_of(caplog))
        document = await collection.find_one({"_id": "bad"})
        assert document is not None
        assert document["trigger"] == NOT_A_PICKLE
        assert document["quarantine"]["reason"]
        assert document["acquired_by"] is None

        with anyio.fail_after(10):
            again = await store.acquire_schedules("scheduler-1", LEASE, 10)
            other = await store.acquire_schedules("scheduler-2", LEASE, 10)

        assert "bad" not in [schedule.id for schedule in again]
        assert other == []
        assert await collection.count_documents({"_id": "bad"}) == 1

    async def test_next_run_time_ignores_quarantined(
        self, store: MongoDBDataStore, database: Any
    ) -> None:
        now = datetime.now(timezone.utc)
        await add_task(store)
        bad = await add_schedule(store, "bad", now - timedelta(minutes=1))
        later = await add_schedule(store, "later", now + timedelta(hours=1))
        collection = database["schedules"]
        await collection.update_one({"_id": "bad"}, {"$set": {"trigger": NOT_A_PICKLE}})

        with anyio.fail_after(10):
            assert await store.get_next_schedule_run_time() == bad.next_fire_time
            assert await store.acquire_schedules("scheduler-1", LEASE, 10) == []
            assert await store.get_next_schedule_run_time() == later.next_fire_time

        assert await collection.count_documents({"quarantine": {"$exists": True}}) == 1


async def assert_finished(
    store: MongoDBDataStore,
    jobs: Any,
    job: Job,
    outcome: JobOutcome,
    *,
    documents: int,
) -> JobResult:
    """
    Assert that ``job`` was finished with ``outcome`` instead of being handed out.

    No other scheduler gets it, its document stays (one of ``documents`` in ``jobs``)
    and its result is handed out; return the result.
    """
    document = await jobs.find_one({"_id": Binary.from_uuid(job.id)})
    assert document is not None
    assert document["state"] == "finished"
    assert document["result"]["outcome"] == outcome.name

    with anyio.fail_after(10):
        assert await store.acquire_jobs("scheduler-2", LEASE) == []

    assert await jobs.count_documents({}) == documents
    with anyio.fail_after(10):
        result = await store.get_job_result(job.id)

    assert result is not None
    assert result.outcome is outcome
    return result


class TestCorruptedJobs:
    """An unusable job is finished with a result instead of being handed out."""

    @pytest.mark.parametrize(
        "damage",
        [
            pytest.param({"$set": {"args": NOT_A_PICKLE}}, id="garbage-args"),
            pytest.param({"$set": {"kwargs": NOT_A_PICKLE}}, id="garbage-kwargs"),
            pytest.param({"$unset": {"executor": ""}}, id="no-executor"),
            pytest.param({"$unset": {"task_id": ""}}, id="no-task-id"),
            pytest.param({"$set": {"created_at": "yesterday"}}, id="bad-created-at"),
        ],
    )
    async def test_unreadable_job(
        self,
        store: MongoDBDataStore,
        database: Any,
        caplog: pytest.LogCaptureFixture,
        damage: dict[str, Any],
    ) -> None:
        await add_task(store)
        first = await add_job(store)
        bad = await add_job(store)
        last = await add_job(store)
        collection = database["jobs"]
        bad_id = Binary.from_uuid(bad.id)
        assert (await collection.update_one({"_id": bad_id}, damage)).matched_count

        with anyio.fail_after(10):
            acquired = await store.acquire_jobs("scheduler-1", LEASE)

        assert {job.id for job in acquired} == {first.id, last.id}
        assert any("Cannot read job" in message for message in warnings_of(caplog))
        outcome = JobOutcome.deserialization_failed
        await assert_finished(store, collection, bad, outcome, documents=3)

    async def test_unreadable_job_is_named_in_the_log(
        self,
        store: MongoDBDataStore,
        database: Any,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        await add_task(store)
        bad = await add_job(store)
        collection = database["jobs"]
        await collection.update_one(
            {"_id": Binary.from_uuid(bad.id)}, {"$set": {"args": NOT_A_PICKLE}}
        )

        with anyio.fail_after(10):
            assert await store.acquire_jobs("scheduler-1", LEASE) == []

        assert any(str(bad.id) in message for message in warnings_of(caplog))

    async def test_unknown_task(
        self,
        store: MongoDBDataStore,
        database: Any,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        await add_task(store)
        good = await add_job(store)
        orphan = await add_job(store, task_id="no-such-task")

        with anyio.fail_after(10):
            acquired = await store.acquire_jobs("scheduler-1", LEASE)

        assert [job.id for job in acquired] == [good.id]
        assert any(
            str(orphan.id) in message and "no-such-task" in message
            for message in warnings_of(caplog)
        )
        collection = database["jobs"]
        result = await assert_finished(
            store, collection, orphan, JobOutcome.error, documents=2
        )
        assert isinstance(result.exception, TaskLookupError)


class TestCorruptedTasks:
    """A task document missing required fields is skipped, never deleted."""

    @pytest.mark.parametrize(
        "damage",
        [
            pytest.param({"$unset": {"job_executor": ""}}, id="no-job-executor"),
            pytest.param(
                {"$set": {"misfire_grace_time": "soon"}}, id="bad-misfire-grace-time"
            ),
        ],
    )
    async def test_get_tasks_skips_it(
        self,
        store: MongoDBDataStore,
        database: Any,
        caplog: pytest.LogCaptureFixture,
        damage: dict[str, Any],
    ) -> None:
        await add_task(store, "bad")
        await add_task(store, "good")
        collection = database["tasks"]
        await collection.update_one({"_id": "bad"}, damage)

        with anyio.fail_after(10):
            tasks = await store.get_tasks()

        assert [task.id for task in tasks] == ["good"]
        assert any("'bad'" in message for message in warnings_of(caplog))
        assert await collection.count_documents({"_id": "bad"}) == 1


# Every damage to every kind of document

# Tasks

#: Unreadable task documents: get_tasks skips them, get_task raises
TASK_DAMAGE = [
    pytest.param({"job_executor": MISSING}, id="tasks-job_executor-missing"),
    pytest.param({"job_executor": None}, id="tasks-job_executor-null"),
    pytest.param({"job_executor": NESTED}, id="tasks-job_executor-doc"),
    pytest.param({"func": 7}, id="tasks-func-int"),
    pytest.param({"func": "not a reference"}, id="tasks-func-string"),
    pytest.param({"max_running_jobs": ARRAY}, id="tasks-max_running_jobs-array"),
    pytest.param({"misfire_grace_time": "5s"}, id="tasks-misfire_grace_time-string"),
    pytest.param({"misfire_grace_time": GARBAGE}, id="tasks-misfire_grace_time-bin"),
    pytest.param({"metadata": ARRAY}, id="tasks-metadata-array"),
    pytest.param({"_id": MISSING}, id="tasks-_id-objectid"),
    pytest.param({"_id": NESTED}, id="tasks-_id-doc"),
]


class TestTasks:
    """An unreadable task is skipped and named; its jobs wait; others carry on."""

    @pytest.mark.parametrize("changes", TASK_DAMAGE)
    async def test_read_paths(
        self,
        store: MongoDBDataStore,
        database: Any,
        caplog: pytest.LogCaptureFixture,
        changes: dict[str, Any],
    ) -> None:
        tasks = database["tasks"]
        for task_id in ("bad", "good"):
            await store.add_task(
                Task(
                    id=task_id,
                    func="math:floor",
                    job_executor="async",
                    max_running_jobs=3,
                    misfire_grace_time=timedelta(seconds=5),
                    metadata={"owner": "ops"},
                )
            )

        bad_id = await damage(tasks, "bad", changes)
        await store.add_job(Job(task_id="bad", executor="async"))
        good_job = Job(task_id="good", executor="async")
        await store.add_job(good_job)

        with anyio.fail_after(10):
            assert [task.id for task in await store.get_tasks()] == ["good"]
            if bad_id == "bad":
                # APScheduler's contract: get_task raises; ours says which and why
                with pytest.raises(MalformedDocumentError, match="'bad'"):
                    await store.get_task("bad")

            acquired = await store.acquire_jobs("me", LEASE, 10)
            assert [job.id for job in acquired] == [good_job.id]
            # What the scheduler does next with each job it acquired
            for job in acquired:
                assert (await store.get_task(job.task_id)).id == "good"

            await store.cleanup()

        assert complaints(caplog, bad_id)
        assert await tasks.count_documents({"_id": bad_id}) == 1
        if bad_id == "bad":
            # Its job waits for the task to be mended
            jobs = database["jobs"]
            assert await jobs.count_documents({"task_id": "bad", "state": "queued"})


# Schedules


SCHEDULE_DAMAGE = [
    pytest.param({"trigger": MISSING}, Read.UNREADABLE, id="schedules-trigger-missing"),
    pytest.param({"args": MISSING}, Read.UNREADABLE, id="schedules-args-missing"),
    pytest.param({"kwargs": MISSING}, Read.UNREADABLE, id="schedules-kwargs-missing"),
    pytest.param({"task_id": MISSING}, Read.UNREADABLE, id="schedules-task_id-missing"),
    pytest.param(
        {"coalesce": MISSING}, Read.UNREADABLE, id="schedules-coalesce-missing"
    ),
    pytest.param(
        {"job_executor": MISSING},
        Read.UNREADABLE,
        id="schedules-job_executor-missing",
    ),
    pytest.param(
        {"next_fire_time": MISSING, "next_fire_time_offset": MISSING},
        Read.FINISHED,
        id="schedules-next_fire_time-missing",
    ),
    pytest.param({"trigger": 7}, Read.UNREADABLE, id="schedules-trigger-int"),
    pytest.param({"trigger": GARBAGE}, Read.UNREADABLE, id="schedules-trigger-garbage"),
    pytest.param({"trigger": FOREIGN}, Read.UNREADABLE, id="schedules-trigger-foreign"),
    pytest.param({"args": GARBAGE}, Read.UNREADABLE, id="schedules-args-garbage"),
    pytest.param({"kwargs": None}, Read.UNREADABLE, id="schedules-kwargs-null"),
    pytest.param({"task_id": NESTED}, Read.UNREADABLE, id="schedules-task_id-doc"),
    pytest.param(
        {"task_id": "no-such-task"}, Read.VALID, id="schedules-task_id-unknown"
    ),
    pytest.param(
        {"coalesce": "sometimes"}, Read.UNREADABLE, id="schedules-coalesce-string"
    ),
    pytest.param(
        {"next_fire_time": "soon"}, Read.UNREADABLE, id="schedules-next_fire_time-str"
    ),
    pytest.param(
        {"next_fire_time": HUGE}, Read.UNREADABLE, id="schedules-next_fire_time-huge"
    ),
    pytest.param(
        {"next_fire_time_offset": 10**6},
        Read.UNREADABLE,
        id="schedules-next_fire_time_offset-huge",
    ),
    pytest.param(
        {"misfire_grace_time": ARRAY},
        Read.UNREADABLE,
        id="schedules-misfire_grace_time-array",
    ),
    pytest.param(
        {"acquired_by": "ghost", "acquired_until": "later"},
        Read.UNREADABLE,
        id="schedules-acquired_until-string",
    ),
    pytest.param({"_id": 7}, Read.UNREADABLE, id="schedules-_id-int"),
    pytest.param(
        {"_id": NESTED, "next_fire_time": None, "next_fire_time_offset": None},
        Read.UNREADABLE,
        id="schedules-_id-doc-finished",
    ),
]


def interval_schedule(schedule_id: str, next_fire_time: datetime) -> Schedule:
    return Schedule(
        id=schedule_id,
        task_id="task",
        trigger=IntervalTrigger(hours=1, start_time=next_fire_time),
        args=ARGS,
        kwargs=KWARGS,
        job_executor="async",
        misfire_grace_time=timedelta(seconds=5),
        max_jitter=timedelta(seconds=1),
        job_result_expiration_time=timedelta(minutes=5),
        metadata={"owner": "ops"},
        next_fire_time=next_fire_time,
    )


class TestSchedules:
    """An unreadable schedule is skipped, named and quarantined; others are served."""

    @pytest.mark.parametrize(("changes", "reads_as"), SCHEDULE_DAMAGE)
    async def test_read_paths(
        self,
        store: MongoDBDataStore,
        local_broker: EventBroker,
        database: Any,
        caplog: pytest.LogCaptureFixture,
        changes: dict[str, Any],
        reads_as: Read,
    ) -> None:
        schedules = database["schedules"]
        removed: list[Event] = []
        announced = anyio.Event()

        def note_removal(event: Event) -> None:
            removed.append(event)
            announced.set()

        local_broker.subscribe(note_removal, {ScheduleRemoved})
        await store.add_task(Task(id="task", func="math:floor", job_executor="async"))
        past = datetime.now(timezone.utc) - timedelta(minutes=5)
        await store.add_schedule(
            interval_schedule("bad", past), ConflictPolicy.exception
        )
        good = interval_schedule("good", past + timedelta(minutes=1))
        await store.add_schedule(good, ConflictPolicy.exception)
        bad_id = await damage(schedules, "bad", changes)
        original = await schedules.find_one({"_id": bad_id})

        with anyio.fail_after(10):
            listed = [schedule.id for schedule in await store.get_schedules()]
            assert isinstance(await store.get_next_schedule_run_time(), datetime)
            acquired = await store.acquire_schedules("me", LEASE, 10)
            assert "good" in [schedule.id for schedule in acquired]
            next_fire_time = past + timedelta(hours=1, minutes=1)
            await store.release_schedules(
                "me",
                [
                    ScheduleResult(
                        schedule_id="good",
                        task_id="task",
                        trigger=good.trigger,
                        last_fire_time=good.next_fire_time,  # type: ignore[arg-type]
                        next_fire_time=next_fire_time,
                    )
                ],
            )
            [released] = await store.get_schedules({"good"})
            assert released.next_fire_time == next_fire_time
            assert isinstance(await store.get_next_schedule_run_time(), datetime)
            await store.cleanup()

        document = await schedules.find_one({"_id": bad_id})
        if reads_as is Read.FINISHED:
            assert listed == ["bad", "good"]
            assert document is None
            with anyio.fail_after(5):
                await announced.wait()  # delivered in a task of the broker's

            [event] = removed
            assert isinstance(event, ScheduleRemoved)
            assert event.schedule_id == "bad"
            return

        assert document is not None
        if reads_as is Read.VALID:
            assert listed == ["bad", "good"]
            assert "bad" in [schedule.id for schedule in acquired]
            return

        assert listed == ["good"]
        assert [schedule.id for schedule in acquired] == ["good"]
        assert complaints(caplog, bad_id)
        assert document.get("acquired_by") != "me"
        if "quarantine" in document:
            assert document["quarantine"]["reason"]

        # Quarantining changes the lease and records why; the data stays as it was
        kept = {"quarantine", "acquired_by", "acquired_until", "v"}
        assert damaged(document, dict.fromkeys(kept, MISSING)) == damaged(
            original, dict.fromkeys(kept, MISSING)
        )


# Jobs

JOB_DAMAGE = [
    pytest.param({"task_id": MISSING}, Read.FAILED, id="jobs-task_id-missing"),
    pytest.param({"args": MISSING}, Read.FAILED, id="jobs-args-missing"),
    pytest.param({"kwargs": MISSING}, Read.FAILED, id="jobs-kwargs-missing"),
    pytest.param({"executor": MISSING}, Read.FAILED, id="jobs-executor-missing"),
    pytest.param({"state": None}, Read.STRAY, id="jobs-state-null"),
    pytest.param({"args": GARBAGE}, Read.FAILED, id="jobs-args-garbage"),
    pytest.param({"args": 7}, Read.FAILED, id="jobs-args-int"),
    pytest.param({"args": FOREIGN}, Read.FAILED, id="jobs-args-foreign"),
    pytest.param({"kwargs": None}, Read.FAILED, id="jobs-kwargs-null"),
    pytest.param({"task_id": NESTED}, Read.FAILED, id="jobs-task_id-doc"),
    pytest.param({"task_id": "no-such-task"}, Read.ORPHAN, id="jobs-task_id-unknown"),
    pytest.param({"executor": NESTED}, Read.FAILED, id="jobs-executor-doc"),
    pytest.param({"created_at": "today"}, Read.FAILED, id="jobs-created_at-string"),
    pytest.param(
        {"scheduled_fire_time": 0, "scheduled_fire_time_offset": "UTC"},
        Read.FAILED,
        id="jobs-scheduled_fire_time_offset-string",
    ),
    pytest.param({"start_deadline": HUGE}, Read.FAILED, id="jobs-start_deadline-huge"),
    pytest.param(
        {"args": GARBAGE, "result_expiration_time": "5m"},
        Read.DISCARDED,
        id="jobs-result_expiration_time-string",
    ),
    pytest.param({"state": 1}, Read.STRAY, id="jobs-state-int"),
    pytest.param({"_id": "job-1"}, Read.QUARANTINED, id="jobs-_id-string"),
    pytest.param(
        # Not subtype 3 (legacy UUIDs): mongoeco cannot find documents by those
        {"_id": Binary(bytes(16), 0)},
        Read.QUARANTINED,
        id="jobs-_id-binary",
    ),
    pytest.param(
        {
            "_id": NESTED,
            "state": "acquired",
            "acquired_by": "ghost",
            "acquired_until": 0,
        },
        Read.QUARANTINED,
        id="jobs-_id-doc-lease-lapsed",
    ),
    pytest.param(
        {
            "state": "acquired",
            "acquired_by": "ghost",
            "acquired_until": FAR_FUTURE,
            "slot_key": "garbage",
        },
        Read.HELD,
        id="jobs-slot_key-garbage",
    ),
]


class TestJobs:
    """A job that cannot run is finished (or quarantined) and named; others run."""

    @pytest.mark.parametrize(("changes", "reads_as"), JOB_DAMAGE)
    async def test_read_paths(
        self,
        store: MongoDBDataStore,
        database: Any,
        caplog: pytest.LogCaptureFixture,
        changes: dict[str, Any],
        reads_as: Read,
    ) -> None:
        jobs = database["jobs"]
        await store.add_task(
            Task(id="task", func="math:floor", job_executor="async", max_running_jobs=5)
        )
        bad, good = (
            Job(
                task_id="task",
                executor="async",
                args=ARGS,
                kwargs=KWARGS,
                result_expiration_time=timedelta(minutes=5),
            )
            for _ in range(2)
        )
        await store.add_job(bad)
        await store.add_job(good)
        bad_id = await damage(jobs, Binary.from_uuid(bad.id), changes)

        with anyio.fail_after(10):
            listed = [job.id for job in await store.get_jobs()]
            await store.cleanup()
            acquired = await store.acquire_jobs("me", LEASE, 10)
            assert [job.id for job in acquired] == [good.id]
            for job in acquired:
                await store.get_task(job.task_id)

            await store.release_job("me", acquired[0], success(acquired[0]))
            result = await store.get_job_result(good.id)
            assert result is not None
            assert result.return_value == 42

        if reads_as in (Read.VALID, Read.ORPHAN, Read.HELD):
            assert listed == [bad.id, good.id]
        else:
            assert listed == [good.id]

        document = await jobs.find_one({"_id": bad_id})
        with anyio.fail_after(10):
            bad_result = await store.get_job_result(bad.id)
            await store.cleanup()

        assert complaints(caplog, bad_id)
        if reads_as is Read.DISCARDED:
            assert bad_result is None
            return

        assert document is not None
        if reads_as is Read.FAILED:
            assert bad_result is not None
            assert bad_result.outcome is JobOutcome.deserialization_failed
        elif reads_as is Read.ORPHAN:
            assert bad_result is not None
            assert bad_result.outcome is JobOutcome.error
            assert isinstance(bad_result.exception, TaskLookupError)
        else:
            assert bad_result is None

        if reads_as in (Read.FAILED, Read.ORPHAN):
            # Finished with a result, which was fetched: purged as usual
            assert document["state"] == "finished"
            return

        # Nothing can name these, so nothing deletes them
        assert await jobs.count_documents({"_id": bad_id}) == 1
        if reads_as is Read.QUARANTINED:
            assert document["state"] == "finished"
            assert document["quarantine"]["reason"]
        elif reads_as is Read.STRAY:
            assert document.get("state") == changes["state"]
        elif reads_as is Read.HELD:
            assert document["acquired_by"] == "ghost"


# Job results (finished job documents)

RESULT_DAMAGE = [
    pytest.param({"result.outcome": MISSING}, id="results-outcome-missing"),
    pytest.param({"result.outcome": "won"}, id="results-outcome-string"),
    pytest.param({"result.return_value": GARBAGE}, id="results-return_value-garbage"),
    pytest.param({"result.finished_at": MISSING}, id="results-finished_at-missing"),
    pytest.param({"result.expires_at": MISSING}, id="results-expires_at-missing"),
    pytest.param({"result.finished_at": "now"}, id="results-finished_at-string"),
    pytest.param({"result": "done"}, id="results-result-string"),
]


class TestJobResults:
    """An unreadable result raises a clear error naming its job, and is kept."""

    @pytest.mark.parametrize("changes", RESULT_DAMAGE)
    async def test_get_job_result(
        self,
        store: MongoDBDataStore,
        database: Any,
        changes: dict[str, Any],
    ) -> None:
        jobs = database["jobs"]
        await store.add_task(Task(id="task", func="math:floor", job_executor="async"))
        for _ in range(2):
            await store.add_job(
                Job(
                    task_id="task",
                    executor="async",
                    result_expiration_time=timedelta(minutes=5),
                )
            )

        bad, good = await store.acquire_jobs("me", LEASE, 10)
        for job in (bad, good):
            await store.release_job("me", job, success(job))

        bad_id = await damage(jobs, Binary.from_uuid(bad.id), changes)

        with anyio.fail_after(10):
            # APScheduler's stores raise when a result cannot be read back
            with pytest.raises(
                (DeserializationError, MalformedDocumentError), match=str(bad.id)
            ):
                await store.get_job_result(bad.id)

            result = await store.get_job_result(good.id)
            assert result is not None
            assert result.return_value == 42
            await store.cleanup()

        assert await jobs.count_documents({"_id": bad_id}) == 1

    async def test_fire_time_record_of_a_malformed_schedule_id(
        self,
        store: MongoDBDataStore,
        database: Any,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Cleanup names a fire time record it cannot judge, and keeps it."""
        jobs = database["jobs"]
        await add_task(store)
        await add_job(store)
        [job] = await store.acquire_jobs("me", LEASE, 10)
        await store.release_job("me", job, success(job))
        # What a finished schedule job looks like an hour later, result fetched
        changes = {"schedule_id": NESTED, "fire_key": "0/x", "fire_time": 0}
        changes.update(finished_time=0, purge_at=MISSING, result=MISSING)
        bad_id = await damage(jobs, Binary.from_uuid(job.id), changes)

        with anyio.fail_after(10):
            await store.cleanup()

        assert await jobs.count_documents({"_id": bad_id}) == 1
        assert complaints(caplog, bad_id)


# Events

EVENT_DAMAGE = [
    pytest.param(
        {"publisher": MISSING}, Read.UNREADABLE, id="events-publisher-missing"
    ),
    pytest.param({"publisher": 7}, Read.UNREADABLE, id="events-publisher-int"),
    pytest.param({"seq": MISSING}, Read.UNREADABLE, id="events-seq-missing"),
    pytest.param({"seq": "1"}, Read.UNREADABLE, id="events-seq-string"),
    pytest.param({"seq": 1.5}, Read.UNREADABLE, id="events-seq-double"),
    pytest.param({"type": MISSING}, Read.UNREADABLE, id="events-type-missing"),
    pytest.param({"type": "NoSuchEvent"}, Read.UNREADABLE, id="events-type-unknown"),
    pytest.param({"payload": MISSING}, Read.UNREADABLE, id="events-payload-missing"),
    pytest.param({"payload": 7}, Read.UNREADABLE, id="events-payload-int"),
    pytest.param({"payload": GARBAGE}, Read.UNREADABLE, id="events-payload-garbage"),
    pytest.param(
        {"payload": FOREIGN_JSON}, Read.UNREADABLE, id="events-payload-foreign"
    ),
    pytest.param({"_id": "event-1"}, Read.VALID, id="events-_id-string"),
    pytest.param({"at": MISSING}, Read.UNSEEN, id="events-at-missing"),
]


@pytest.fixture
async def publisher(
    client: Any, database_name: str, logger: logging.Logger
) -> AsyncIterator[MongoDBEventBroker]:
    async with AsyncExitStack() as exit_stack:
        broker = MongoDBEventBroker(
            client, database=database_name, mode="polling", poll_interval=0.02
        )
        await broker.start(exit_stack, logger)
        yield broker


class TestEvents:
    """A polling broker names an unusable event once, skips it and reads on."""

    @pytest.mark.parametrize(("changes", "reads_as"), EVENT_DAMAGE)
    async def test_polling_reader(
        self,
        publisher: MongoDBEventBroker,
        client: Any,
        database_name: str,
        caplog: pytest.LogCaptureFixture,
        changes: dict[str, Any],
        reads_as: Read,
    ) -> None:
        events = client[database_name]["events"]
        logger = logging.getLogger("apscheduler_mongo.tests.reader")
        await publisher.publish(TaskAdded(task_id="template"))
        [template] = await events.find().to_list(None)
        fresh = {"_id": ObjectId(), "publisher": "junk", "seq": 1}
        junk = damaged(damaged(template, fresh), changes)

        received: list[str] = []
        async with AsyncExitStack() as exit_stack:
            # Started after the template was stored: only the junk copy is new to it
            reader = MongoDBEventBroker(
                client, database=database_name, mode="polling", poll_interval=0.02
            )
            await reader.start(exit_stack, logger)
            send, receive = anyio.create_memory_object_stream[Event](10)
            exit_stack.enter_context(send)
            exit_stack.enter_context(receive)
            reader.subscribe(send.send, {TaskAdded})
            junk_id = (await events.insert_one(junk)).inserted_id
            await publisher.publish(TaskAdded(task_id="good"))
            with anyio.fail_after(5):
                while "good" not in received:
                    event = await receive.receive()
                    received.append(event.task_id)  # type: ignore[attr-defined]

            await anyio.sleep(0.2)  # a few more polls

        assert await events.count_documents({"_id": junk_id}) == 1
        if reads_as is Read.VALID:
            assert received == ["template", "good"]
        else:
            assert received == ["good"]

        if reads_as is Read.UNREADABLE:
            # Named once, not on every poll
            assert len(complaints(caplog, junk_id, logger.name)) == 1


# End to end


def record(name: str) -> str:
    return name


class TestScheduler:
    """Junk of every kind in every collection never stops a running scheduler."""

    async def test_good_work_runs_among_junk(
        self,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        database = client[database_name]
        past = datetime.now(timezone.utc) - timedelta(minutes=5)
        junk_task = Task(id="junk-task", func="math:floor", job_executor="threadpool")
        await store.add_task(junk_task)
        for task_id in ("bad-task-1", "bad-task-2"):
            await store.add_task(Task(id=task_id, func="math:floor", job_executor="x"))

        await damage(database["tasks"], "bad-task-1", {"job_executor": MISSING})
        await damage(database["tasks"], "bad-task-2", {"_id": NESTED})
        schedule_damage: list[dict[str, Any]] = [
            {"trigger": GARBAGE},
            {"task_id": NESTED},
            {"next_fire_time": HUGE},
            {"next_fire_time": "soon"},
            {"next_fire_time_offset": 10**6},
            {"_id": NESTED, "next_fire_time": None, "next_fire_time_offset": None},
        ]
        for number, changes in enumerate(schedule_damage):
            schedule = Schedule(
                id=f"junk-{number}",
                task_id="junk-task",
                trigger=IntervalTrigger(hours=1, start_time=past),
                job_executor="threadpool",
                next_fire_time=past,
            )
            await store.add_schedule(schedule, ConflictPolicy.exception)
            await damage(database["schedules"], schedule.id, changes)

        job_damage: list[dict[str, Any]] = [
            {"args": GARBAGE},
            {"task_id": "no-such-task"},
            {"task_id": "bad-task-1"},
            {"_id": "job-1"},
            {"executor": NESTED},
            {"task_id": NESTED},
            {"state": "running"},
            {"scheduled_fire_time": 0, "scheduled_fire_time_offset": "UTC"},
        ]
        for changes in job_damage:
            job = Job(task_id="junk-task", executor="threadpool")
            await store.add_job(job)
            await damage(database["jobs"], Binary.from_uuid(job.id), changes)

        fired: list[JobReleased] = []
        fired_twice = anyio.Event()

        def note_release(event: JobReleased) -> None:
            if event.schedule_id == "good-schedule":
                fired.append(event)
                if len(fired) == 2:
                    fired_twice.set()

        scheduler_store = MongoDBDataStore(client, database=database_name)
        async with AsyncScheduler(
            data_store=scheduler_store, event_broker=LocalEventBroker()
        ) as scheduler:
            scheduler.subscribe(note_release, JobReleased)
            await scheduler.add_schedule(
                record,
                IntervalTrigger(seconds=0.5),
                id="good-schedule",
                args=["schedule"],
            )
            job_id = await scheduler.add_job(
                record, args=["job"], result_expiration_time=timedelta(minutes=1)
            )
            await scheduler.start_in_background()
            with anyio.fail_after(10):
                result = await scheduler.get_job_result(job_id)
                await fired_twice.wait()

            await anyio.sleep(2)
            assert scheduler.state is RunState.started

        assert all(event.outcome is JobOutcome.success for event in fired)
        assert result is not None
        assert result.outcome is JobOutcome.success
        assert result.return_value == "job"
        assert "Scheduler crashed" not in caplog.text
        assert await database["schedules"].count_documents({"_id": NESTED}) == 1
        assert await database["jobs"].count_documents({}) >= len(job_damage)
