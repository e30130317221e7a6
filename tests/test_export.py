"""Export to a file and import back: exact, idempotent, signed, and running nothing."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import stat
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from apscheduler import (
    AsyncScheduler,
    CoalescePolicy,
    ConflictPolicy,
    Job,
    JobReleased,
    Schedule,
    Task,
)
from apscheduler.abc import DataStore, Serializer
from apscheduler.datastores.memory import MemoryDataStore
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.serializers.cbor import CBORSerializer
from apscheduler.serializers.json import JSONSerializer
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.combining import AndTrigger, OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from mongomock_motor import AsyncMongoMockClient
from pymongo import MongoClient

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker, migration
from apscheduler_mongo._export import (
    VERSION,
    Counts,
    ExportFileError,
    ImportReport,
    Skipped,
    export_store,
    import_store,
)
from apscheduler_mongo._signing import Signer
from apscheduler_mongo._tools.cli import build_parser, main, run_command

from .support.hostile import system_gadget
from .support.stores import started_store

KEY = "export-test-signing-key-0123456789"
OTHER_KEY = "another-signing-key-9876543210abc"
NOW = datetime(2026, 12, 6, 12, 30, 15, 123456, tzinfo=timezone.utc)
HELSINKI = timezone(timedelta(hours=2))


@attrs.frozen
class Invoice:
    """A class of the application's, which arguments hold: allowed by name."""

    number: int
    due: datetime


ALLOWED = [Invoice]
#: JSON values of every kind (APScheduler's type of metadata is narrower than it takes)
METADATA: Any = {"team": "ops", "tags": ["a", "b"], "weight": 1.5, "on": True}
INVOICE_REF = f"{__name__}:Invoice"


def stored_trigger(trigger: Any) -> Any:
    """Return a trigger after it computed its first fire time, as stored."""
    trigger.next()
    return trigger


async def fill(store: DataStore, *, jobs: bool = False) -> None:
    """Store tasks, schedules of every trigger kind and, with ``jobs``, jobs."""
    await store.add_task(
        Task(
            id="report",
            func="myapp.reports:send_report",
            job_executor="threadpool",
            max_running_jobs=2,
            misfire_grace_time=timedelta(seconds=30, microseconds=250),
            metadata=METADATA,
        )
    )
    await store.add_task(Task(id="tidy", func="myapp.jobs:tidy", job_executor="async"))
    await store.add_task(
        Task(id="registered", func=None, job_executor="processpool", max_running_jobs=1)
    )
    triggers: dict[str, Any] = {
        "cron": CronTrigger(hour=3, minute=15, timezone="Europe/Helsinki"),
        "interval": IntervalTrigger(minutes=5, start_time=NOW),
        "date": DateTrigger(NOW + timedelta(days=3)),
        "calendar": CalendarIntervalTrigger(
            months=1, hour=4, start_date=NOW.date(), timezone="America/New_York"
        ),
        "and": AndTrigger(
            [
                CronTrigger(day_of_week="mon-fri", hour="*/2", timezone="UTC"),
                IntervalTrigger(
                    hours=6,
                    start_time=NOW.replace(hour=0, minute=0, second=0, microsecond=0),
                ),
            ]
        ),
        "or": OrTrigger(
            [
                DateTrigger(NOW + timedelta(hours=1)),
                CronTrigger(day="1", timezone="Asia/Tokyo"),
            ]
        ),
    }
    for number, (schedule_id, trigger) in enumerate(triggers.items()):
        stored_trigger(trigger)
        # (APScheduler's converters are typed as taking no None)
        fields: dict[str, Any] = {
            "id": schedule_id,
            "task_id": "report" if number % 2 else "tidy",
            "trigger": trigger,
            "args": (number, Invoice(number, NOW), NOW.astimezone(HELSINKI)),
            "kwargs": {"to": ["ops@example.com"], "at": NOW, "ratio": 0.25},
            "paused": schedule_id in ("date", "or"),
            "coalesce": list(CoalescePolicy)[number % 3],
            "misfire_grace_time": timedelta(seconds=number * 7) if number else None,
            "max_jitter": timedelta(seconds=number, microseconds=5) if number else None,
            "job_executor": "threadpool" if number % 2 else "async",
            "job_result_expiration_time": timedelta(minutes=number),
            "metadata": {"n": number, "kind": schedule_id},
            "next_fire_time": trigger.next(),
            "last_fire_time": NOW - timedelta(hours=number) if number % 2 else None,
        }
        await store.add_schedule(Schedule(**fields), ConflictPolicy.exception)

    if jobs:
        await add_jobs(store)


async def add_jobs(store: DataStore) -> None:
    """Add a job of its own and one of the ``interval`` schedule, which moved past."""
    arguments: dict[str, Any] = {"args": (Invoice(7, NOW),), "kwargs": {"when": NOW}}
    await store.add_job(
        Job(
            task_id="report",
            executor="threadpool",
            **arguments,
            result_expiration_time=timedelta(hours=1),
            start_deadline=NOW + timedelta(days=1),
            metadata={"by": "test"},
            created_at=NOW,
        )
    )
    # As a scheduler does: the job for the fire time, then the schedule moved on
    [schedule] = await store.get_schedules({"interval"})
    fire_time = schedule.next_fire_time
    assert fire_time is not None
    await store.add_job(
        Job(
            task_id="tidy",
            executor="async",
            schedule_id="interval",
            scheduled_fire_time=fire_time + timedelta(seconds=2),
            jitter=timedelta(seconds=2),
            created_at=NOW + timedelta(seconds=1),
        )
    )
    schedule.last_fire_time = fire_time
    schedule.next_fire_time = schedule.trigger.next()
    await store.add_schedule(schedule, ConflictPolicy.replace)


def task_fields(task: Task) -> dict[str, Any]:
    return attrs.asdict(
        task, recurse=False, filter=lambda a, _: a.name != "running_jobs"
    )


def schedule_fields(schedule: Schedule) -> dict[str, Any]:
    fields = attrs.asdict(schedule, recurse=False)
    # Triggers compare by their state (they define no equality)
    fields["trigger"] = (type(schedule.trigger), schedule.trigger.__getstate__())
    return fields


def job_fields(job: Job) -> dict[str, Any]:
    return attrs.asdict(job, recurse=False)


async def contents_of(store: DataStore) -> tuple[list[Any], list[Any], list[Any]]:
    """Return the store's tasks, schedules and jobs, field by field."""
    return (
        [task_fields(task) for task in await store.get_tasks()],
        [schedule_fields(schedule) for schedule in await store.get_schedules()],
        sorted(
            (job_fields(job) for job in await store.get_jobs()),
            key=lambda fields: fields["created_at"],
        ),
    )


async def exported(store: DataStore, **options: Any) -> str:
    output = io.StringIO()
    await export_store(store, output, **options)
    return output.getvalue()


async def imported(store: DataStore, text: str, **options: Any) -> ImportReport:
    options.setdefault("allowed_types", ALLOWED)
    return await import_store(store, io.StringIO(text), **options)


def lines_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def text_of(lines: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(line) + "\n" for line in lines)


@pytest.fixture
def source(store: MongoDBDataStore) -> MongoDBDataStore:
    """The store exported from: conftest's, empty, on the test's database."""
    return store


@pytest.fixture
def target_name(database_name: str) -> str:
    return f"{database_name}_copy"


@pytest.fixture
async def target_database(client: Any, target_name: str) -> AsyncIterator[Any]:
    """The database of the stores imported into; dropped afterwards."""
    yield client[target_name]
    if not isinstance(client, AsyncMongoMockClient):
        await client.drop_database(target_name)


@pytest.fixture
def start_target(
    client: Any,
    target_name: str,
    target_database: Any,
    logger: logging.Logger,
) -> Callable[..., Any]:
    """Return a function that starts a store on the target database."""
    del target_database  # there to drop it afterwards

    def start(**options: Any) -> Any:
        return started_store(client, target_name, LocalEventBroker(), logger, **options)

    return start


@pytest.fixture
async def target(start_target: Callable[..., Any]) -> AsyncIterator[MongoDBDataStore]:
    """A started store, empty, on another database of the same server."""
    async with start_target() as store:
        yield store


@pytest.mark.anyio
class TestRoundTrip:
    """Export then import gives a store equal to the first, field by field."""

    async def test_exactly(
        self, source: MongoDBDataStore, target: MongoDBDataStore
    ) -> None:
        await fill(source)
        first = await exported(source)
        report = await imported(target, first)
        assert report.added == Counts(tasks=3, schedules=6, jobs=0)
        assert report.present == report.replaced == Counts()
        assert report.skipped == ()

        assert await contents_of(target) == await contents_of(source)
        # The copy exports to the same file, but for the header's time, id and name
        again = await exported(target)
        first_lines, again_lines = lines_of(first), lines_of(again)
        assert again_lines[1:] == first_lines[1:]
        for header in (first_lines[0], again_lines[0]):
            for volatile in ("exported_at", "file_id", "database"):
                del header[volatile]

        assert again_lines[0] == first_lines[0]

        # Into the store it came from: all there already
        assert (await imported(source, first)).present == Counts(3, 6, 0)

    async def test_through_the_public_functions(
        self, source: MongoDBDataStore, target: MongoDBDataStore
    ) -> None:
        await fill(source)
        stream = io.StringIO()
        written = await migration.export_store(source, stream)
        assert (written.tasks, written.schedules, written.jobs) == (3, 6, 0)
        stream.seek(0)
        report = await migration.import_store(
            target, stream, allowed_types=[INVOICE_REF]
        )
        assert report.added == migration.Counts(tasks=3, schedules=6, jobs=0)
        assert await contents_of(target) == await contents_of(source)

    async def test_file_format(self, source: MongoDBDataStore) -> None:
        """The header, the plain fields as JSON, and the serialized ones."""
        await fill(source)
        lines = lines_of(await exported(source))
        header, *records, end = lines
        assert header["format"] == "apscheduler-mongo-export"
        assert header["version"] == VERSION
        assert header["serializer"] == "pickle"
        assert header["signed"] is False
        assert datetime.fromisoformat(header["exported_at"]).utcoffset() is not None
        assert [record["kind"] for record in records] == ["task"] * 3 + ["schedule"] * 6
        assert end == {
            "kind": "end",
            "records": 9,
            "tasks": 3,
            "schedules": 6,
            "jobs": 0,
        }
        task = records[0]
        assert task["id"] == "registered"
        assert records[1]["misfire_grace_time"] == 30.00025
        cron = next(record for record in records if record.get("id") == "cron")
        assert cron["trigger_text"].startswith("CronTrigger(")
        assert "timezone='Europe/Helsinki'" in cron["trigger_text"]
        assert cron["coalesce"] == "earliest"
        assert cron["next_fire_time"].endswith("+02:00")
        base64.b64decode(cron["trigger"], validate=True)

    @pytest.mark.parametrize(
        ("name", "serializer"),
        [
            pytest.param("json", JSONSerializer(), id="json"),
            pytest.param("cbor", CBORSerializer(), id="cbor"),
        ],
    )
    async def test_other_serializers(
        self,
        name: str,
        serializer: Serializer,
        client: Any,
        database_name: str,
        start_target: Callable[..., Any],
        logger: logging.Logger,
    ) -> None:
        """A store on JSON or CBOR exports its values in that format."""
        async with (
            started_store(
                client,
                database_name,
                LocalEventBroker(),
                logger,
                serializer=serializer,
                start_from_scratch=True,
            ) as store,
            start_target(serializer=serializer) as copy,
        ):
            await store.add_task(Task(id="tidy", func="m:tidy", job_executor="async"))
            trigger = stored_trigger(CronTrigger(hour=2, timezone="Europe/Paris"))
            arguments: dict[str, Any] = {"args": (1, "two"), "kwargs": {"3": [3.0]}}
            schedule = Schedule(
                id="nightly",
                task_id="tidy",
                trigger=trigger,
                **arguments,
                job_executor="async",
                next_fire_time=trigger.next(),
            )
            await store.add_schedule(schedule, ConflictPolicy.exception)
            text = await exported(store, serializer=serializer)
            assert lines_of(text)[0]["serializer"] == name
            assert (await imported(copy, text)).added == Counts(1, 1, 0)
            assert await contents_of(copy) == await contents_of(store)


@pytest.mark.anyio
class TestIdempotence:
    """Importing again creates nothing twice; ``replace`` replaces."""

    async def test_twice(
        self, source: MongoDBDataStore, target: MongoDBDataStore, target_database: Any
    ) -> None:
        await fill(source, jobs=True)
        text = await exported(source, jobs=True)
        assert (await imported(target, text)).added == Counts(3, 6, 2)

        async def documents() -> list[Any]:
            return [
                await target_database[name].find({}).sort("_id").to_list(None)
                for name in ("tasks", "schedules", "jobs")
            ]

        before = await documents()
        report = await imported(target, text)
        assert report.added == report.replaced == Counts()
        assert report.present == Counts(3, 6, 2)
        assert report.skipped == ()
        assert await documents() == before

    async def test_replace(
        self, source: MongoDBDataStore, target: MongoDBDataStore
    ) -> None:
        await fill(source)
        await imported(target, await exported(source))
        # Changed in the source since: a task's limit, a schedule paused
        [task] = [task for task in await source.get_tasks() if task.id == "tidy"]
        await source.add_task(attrs.evolve(task, max_running_jobs=9))
        [schedule] = await source.get_schedules({"cron"})
        schedule.paused = True
        await source.add_schedule(schedule, ConflictPolicy.replace)
        text = await exported(source)

        report = await imported(target, text)
        assert report.present == Counts(3, 6, 0)
        [copied] = await target.get_schedules({"cron"})
        assert copied.paused is False  # left as it was

        report = await imported(target, text, replace=True)
        assert report.replaced == Counts(3, 6, 0)
        assert report.added == report.present == Counts()
        assert await contents_of(target) == await contents_of(source)

    async def test_dry_run(
        self, source: MongoDBDataStore, target: MongoDBDataStore
    ) -> None:
        await fill(source, jobs=True)
        text = await exported(source, jobs=True)
        report = await imported(target, text, dry_run=True)
        assert (report.added, report.dry_run) == (Counts(3, 6, 2), True)
        assert await contents_of(target) == ([], [], [])


@pytest.mark.anyio
class TestJobs:
    """Jobs are exported with ``jobs=True``, and imported before their schedules."""

    async def test_round_trip(
        self, source: MongoDBDataStore, target: MongoDBDataStore
    ) -> None:
        await fill(source, jobs=True)
        kinds = [line.get("kind") for line in lines_of(await exported(source))]
        assert "job" not in kinds

        text = await exported(source, jobs=True)
        assert lines_of(text)[0]["jobs"] is True
        report = await imported(target, text)
        # The schedule's job too, although the schedule has moved past its fire time
        assert report.added == Counts(3, 6, 2)
        assert await contents_of(target) == await contents_of(source)

    async def test_declined_job_is_skipped(
        self, source: MongoDBDataStore, target: MongoDBDataStore, target_database: Any
    ) -> None:
        """A job for a fire time its schedule (already there) moved past: skipped."""
        await fill(source, jobs=True)
        text = await exported(source, jobs=True)
        await imported(target, text)
        [job] = [job for job in await target.get_jobs() if job.schedule_id]
        # It ran, and its record was cleaned up: the store no longer knows that id
        await target_database["jobs"].delete_many({"schedule_id": "interval"})
        report = await imported(target, text)
        assert report.present == Counts(3, 6, 1)
        [skipped] = report.skipped
        assert (skipped.kind, skipped.id) == ("job", str(job.id))
        assert "moved past its fire time" in skipped.reason

    async def test_task_missing(self, target: MongoDBDataStore) -> None:
        """A schedule whose task is neither in the file nor in the store: skipped."""
        output = io.StringIO()
        async with AsyncExitStack() as exit_stack:
            broker = LocalEventBroker()
            await broker.start(exit_stack, logging.getLogger(__name__))
            memory = MemoryDataStore()
            await memory.start(exit_stack, broker, logging.getLogger(__name__))
            trigger = stored_trigger(IntervalTrigger(hours=1, start_time=NOW))
            await memory.add_schedule(
                Schedule(
                    id="orphan",
                    task_id="gone",
                    trigger=trigger,
                    job_executor="async",
                    next_fire_time=trigger.next(),
                ),
                ConflictPolicy.exception,
            )
            await export_store(memory, output)

        report = await imported(target, output.getvalue())
        assert report.added == Counts()
        [skipped] = report.skipped
        assert skipped == Skipped("schedule", "orphan", "its task 'gone' is nowhere")
        assert await target.get_schedules() == []


@pytest.fixture
def signer() -> Signer:
    return Signer(KEY)


def tampered(text: str, how: str) -> str:
    """Return a signed export changed as an attacker (or an accident) would."""
    lines = text.splitlines(keepends=True)
    if how == "trigger byte":
        record = json.loads(lines[4])
        data = bytearray(base64.b64decode(record["trigger"]))
        data[-3] ^= 0x01
        record["trigger"] = base64.b64encode(bytes(data)).decode()
        lines[4] = json.dumps(record) + "\n"
    elif how == "paused":
        record = json.loads(lines[4])
        record["paused"] = not record["paused"]
        lines[4] = json.dumps(record) + "\n"
    elif how == "swapped":
        lines[4], lines[5] = lines[5], lines[4]
    elif how == "dropped":
        del lines[2]
    elif how == "trailer cut":
        del lines[-1]
    elif how == "count and trailer":
        del lines[2]
        end = json.loads(lines[-1])
        end["records"] -= 1
        lines[-1] = json.dumps(end) + "\n"
    elif how == "signature removed":
        record = json.loads(lines[4])
        del record["mac"]
        lines[4] = json.dumps(record) + "\n"
    elif how == "downgraded":
        header = json.loads(lines[0])
        header["signed"] = False
        lines[0] = json.dumps(header) + "\n"
    else:
        raise AssertionError(how)

    return "".join(lines)


@pytest.mark.anyio
class TestSigning:
    """A signed file imports only as it was written; nothing else is written."""

    async def test_signed_file_imports(
        self, source: MongoDBDataStore, target: MongoDBDataStore, signer: Signer
    ) -> None:
        await fill(source, jobs=True)
        text = await exported(source, jobs=True, signer=signer)
        lines = lines_of(text)
        assert lines[0]["signed"] is True
        assert all(len(base64.b64decode(line["mac"])) == 32 for line in lines)
        report = await imported(target, text, signer=signer)
        assert (report.signed, report.added) == (True, Counts(3, 6, 2))

    @pytest.mark.parametrize(
        "how",
        [
            "trigger byte",
            "paused",
            "swapped",
            "dropped",
            "trailer cut",
            "count and trailer",
            "signature removed",
            "downgraded",
        ],
    )
    async def test_changed_file_is_refused(
        self,
        how: str,
        source: MongoDBDataStore,
        target: MongoDBDataStore,
        target_database: Any,
        signer: Signer,
    ) -> None:
        await fill(source, jobs=True)
        text = await exported(source, jobs=True, signer=signer)
        with pytest.raises(ExportFileError) as exc_info:
            await imported(target, tampered(text, how), signer=signer)

        assert any(
            words in str(exc_info.value)
            for words in ("signature", "not signed", "cut short")
        ), exc_info.value
        for name in ("tasks", "schedules", "jobs"):
            assert await target_database[name].count_documents({}) == 0

    async def test_line_of_another_file(
        self, source: MongoDBDataStore, target: MongoDBDataStore, signer: Signer
    ) -> None:
        """The same record, signed for another export, does not fit in this one."""
        await fill(source)
        first = (await exported(source, signer=signer)).splitlines(keepends=True)
        second = (await exported(source, signer=signer)).splitlines(keepends=True)
        assert first[3] != second[3]
        first[3] = second[3]
        with pytest.raises(ExportFileError, match="line 4: the signature"):
            await imported(target, "".join(first), signer=signer)

    async def test_other_key(
        self, source: MongoDBDataStore, target: MongoDBDataStore, signer: Signer
    ) -> None:
        await fill(source)
        text = await exported(source, signer=signer)
        with pytest.raises(ExportFileError, match="line 1: the signature"):
            await imported(target, text, signer=Signer(OTHER_KEY))

        # A rotation: any of the keys checks
        report = await imported(target, text, signer=Signer([OTHER_KEY, KEY]))
        assert report.signed

    async def test_unsigned_into_a_signing_store(
        self,
        source: MongoDBDataStore,
        start_target: Callable[..., Any],
        target_database: Any,
    ) -> None:
        await fill(source)
        text = await exported(source)
        async with start_target(signing_key=KEY) as store:
            with pytest.raises(ExportFileError, match="not signed"):
                await imported(store, text)

            assert await target_database["schedules"].count_documents({}) == 0
            report = await imported(store, text, trust_unsigned=True)
            assert (report.signed, report.added) == (False, Counts(3, 6, 0))

        # Signed in the store now, with its key
        documents = await target_database["schedules"].find({}).to_list(None)
        assert documents
        assert all("trigger" in document["mac"] for document in documents)

    async def test_a_signing_store_signs_its_export(
        self,
        client: Any,
        database_name: str,
        start_target: Callable[..., Any],
        logger: logging.Logger,
    ) -> None:
        """By default, a store with a key signs its export and checks an import."""
        async with (
            started_store(
                client,
                database_name,
                LocalEventBroker(),
                logger,
                signing_key=KEY,
                start_from_scratch=True,
            ) as store,
            start_target(signing_key=KEY) as copy,
        ):
            await fill(store)
            text = await exported(store)
            assert lines_of(text)[0]["signed"] is True
            assert (await imported(copy, text)).signed
            with pytest.raises(ExportFileError):
                await imported(copy, tampered(text, "paused"))


@pytest.mark.anyio
class TestUntrustedFiles:
    """A file names no class that runs: refused before anything is written."""

    async def test_pickle_gadget_in_trigger(
        self,
        source: MongoDBDataStore,
        target: MongoDBDataStore,
        tmp_path: Path,
    ) -> None:
        marker = tmp_path / "ran"
        await fill(source)
        lines = lines_of(await exported(source))
        lines[4]["trigger"] = base64.b64encode(system_gadget(marker)).decode()
        with pytest.raises(ExportFileError, match="line 5: cannot read the trigger"):
            await imported(target, text_of(lines))

        assert not marker.exists()
        assert await target.get_tasks() == []

    async def test_class_not_allowed(
        self, source: MongoDBDataStore, target: MongoDBDataStore
    ) -> None:
        await fill(source)
        text = await exported(source)
        with pytest.raises(ExportFileError) as exc_info:
            await imported(target, text, allowed_types=())

        message = str(exc_info.value)
        assert message.startswith("line 5: cannot read the args of schedule 'and'")
        assert INVOICE_REF in message
        assert await target.get_tasks() == []

    async def test_not_a_trigger(
        self, source: MongoDBDataStore, target: MongoDBDataStore
    ) -> None:
        await fill(source)
        lines = lines_of(await exported(source))
        lines[4]["trigger"] = lines[4]["kwargs"]
        with pytest.raises(ExportFileError, match="line 5: 'trigger' holds a dict"):
            await imported(target, text_of(lines))

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            pytest.param(
                lambda lines: [{"format": "other"}, *lines[1:]],
                "not an apscheduler-mongo export file",
                id="format",
            ),
            pytest.param(
                lambda lines: [{**lines[0], "version": 2}, *lines[1:]],
                "version 2 of the export format; this apscheduler-mongo .* reads "
                "version 1: upgrade it",
                id="newer",
            ),
            pytest.param(
                lambda lines: [lines[0], "{not json", *lines[2:]],
                "line 2: not JSON",
                id="not JSON",
            ),
            pytest.param(
                lambda lines: [lines[0], [1], *lines[2:]],
                "line 2: not a JSON object",
                id="not an object",
            ),
            pytest.param(
                lambda lines: [*lines[:4], {**lines[4], "paused": "no"}, *lines[5:]],
                "line 5: 'paused' must be true or false",
                id="field type",
            ),
            pytest.param(
                lambda lines: [*lines[:3], {**lines[3], "kind": "x"}, *lines[4:]],
                "line 4: unknown kind of record 'x'",
                id="kind",
            ),
            pytest.param(
                lambda lines: [*lines[:5], {**lines[5], "id": "and"}, *lines[6:]],
                "line 6: schedule 'and' is also on line 5",
                id="duplicate",
            ),
            pytest.param(
                lambda lines: [
                    *lines[:4],
                    {**lines[4], "next_fire_time": "2026-12-06"},
                    *lines[5:],
                ],
                "line 5: 'next_fire_time' must be an ISO 8601 time with its UTC offset",
                id="naive time",
            ),
            pytest.param(
                lambda lines: [*lines, {"kind": "task"}],
                r"line 12: a line after the last one \(line 11\)",
                id="after the end",
            ),
            pytest.param(lambda _: [], "the file is empty", id="empty"),
        ],
    )
    async def test_malformed(
        self,
        change: Callable[[list[Any]], list[Any]],
        message: str,
        source: MongoDBDataStore,
        target: MongoDBDataStore,
    ) -> None:
        await fill(source)
        lines = change(lines_of(await exported(source)))
        text = "".join(
            (line if isinstance(line, str) else json.dumps(line)) + "\n"
            for line in lines
        )
        with pytest.raises(ExportFileError, match=message):
            await imported(target, text)

        assert await target.get_tasks() == []


# The command line

CLI_TIERS = [
    pytest.param("mongomock", id="mongomock"),
    pytest.param("wire", id="wire", marks=pytest.mark.wire),
]


@attrs.define
class Cli:
    """Run the command line in-process (mongomock-motor) or over the wire."""

    target: Any
    database: str

    def __call__(self, *argv: str, database: str | None = None) -> int:
        argv = (*argv, "--database", database or self.database)
        if isinstance(self.target, str):
            return main([*argv, "--uri", self.target])

        code: int = anyio.run(run_command, build_parser().parse_args(argv), self.target)
        return code

    def run(
        self, function: Callable[[DataStore], Any], database: str, **options: Any
    ) -> Any:
        """Run ``function`` on a store started on ``database``; return its result."""

        async def run() -> Any:
            async with started_store(
                self.target,
                database,
                LocalEventBroker(),
                logging.getLogger(__name__),
                **options,
            ) as store:
                return await function(store)

        return anyio.run(run)


@pytest.fixture(params=CLI_TIERS)
def cli(request: pytest.FixtureRequest) -> Iterator[Cli]:
    database = f"apscheduler_mongo_test_{uuid.uuid4().hex[:12]}"
    if request.param == "mongomock":
        yield Cli(AsyncMongoMockClient(), database)
        return

    uri: str = request.getfixturevalue("wire_uri")
    yield Cli(uri, database)
    client: MongoClient[Any]
    with MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
        for name in (database, f"{database}_copy"):
            client.drop_database(name)


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("APSCHEDULER_MONGO_SIGNING_KEY", raising=False)
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    return str(path)


class TestCommandLine:
    """``export`` and ``import`` as an operator runs them."""

    def test_export_then_import(
        self,
        cli: Cli,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.delenv("APSCHEDULER_MONGO_SIGNING_KEY", raising=False)
        cli.run(lambda store: fill(store, jobs=True), cli.database)
        path = tmp_path / "backup.jsonl"
        allow = ("--allow-type", INVOICE_REF)
        assert cli("export", "--output", str(path), "--jobs", *allow) == 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert os.listdir(tmp_path) == ["backup.jsonl"]
        err = capsys.readouterr().err
        assert err == (
            f"exported 3 task(s), 6 schedule(s) and 2 job(s) to {path} (pickle, not "
            f"signed)\n"
        )

        copy = f"{cli.database}_copy"
        assert cli("import", str(path), *allow, database=copy) == 0
        out = capsys.readouterr().out
        assert out.splitlines() == [
            f"read {path} (signatures not checked)",
            "added: 3 task(s), 6 schedule(s), 2 job(s)",
            "already present, left as they are: 0 task(s), 0 schedule(s), 0 job(s)",
        ]
        assert cli("import", str(path), *allow, database=copy) == 0
        assert (
            "already present, left as they are: 3 task(s), 6 schedule(s), 2 job(s)"
            in (capsys.readouterr().out)
        )
        assert cli.run(contents_of, copy) == cli.run(contents_of, cli.database)

    def test_standard_output_and_dry_run(
        self,
        cli: Cli,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.delenv("APSCHEDULER_MONGO_SIGNING_KEY", raising=False)
        cli.run(fill, cli.database)
        assert cli("export", "--allow-type", INVOICE_REF) == 0
        path = tmp_path / "backup.jsonl"
        path.write_text(capsys.readouterr().out)
        assert lines_of(path.read_text())[-1]["records"] == 9

        copy = f"{cli.database}_copy"
        argv = ("import", str(path), "--allow-type", INVOICE_REF, "--dry-run")
        assert cli(*argv, database=copy) == 0
        assert "would be added: 3 task(s), 6 schedule(s), 0 job(s)" in (
            capsys.readouterr().out
        )
        assert cli("status", database=copy) == 1  # no store was created

    def test_signed(
        self,
        cli: Cli,
        tmp_path: Path,
        key_file: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        cli.run(fill, cli.database, signing_key=KEY)
        path = tmp_path / "backup.jsonl"
        argv = ("--allow-type", INVOICE_REF, "--key-file", key_file)
        assert cli("export", "--output", str(path), *argv) == 0
        assert lines_of(path.read_text())[0]["signed"] is True
        bad = tmp_path / "bad.jsonl"
        bad.write_text(tampered(path.read_text(), "paused"))
        capsys.readouterr()

        copy = f"{cli.database}_copy"
        assert cli("import", str(bad), *argv, database=copy) == 5
        err = capsys.readouterr().err
        assert err.startswith(f"error: refused {bad}: line 5: the signature does not")
        assert err.endswith("; nothing was written\n")
        assert cli("status", database=copy) == 1  # nothing at all

        assert cli("import", str(path), *argv, database=copy) == 0
        assert "(signatures checked)" in capsys.readouterr().out

    def test_unsigned_into_a_key(
        self,
        cli: Cli,
        tmp_path: Path,
        key_file: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        cli.run(fill, cli.database)
        path = tmp_path / "backup.jsonl"
        allow = ("--allow-type", INVOICE_REF)
        assert cli("export", "--output", str(path), *allow) == 0
        copy = f"{cli.database}_copy"
        keyed = ("--key-file", key_file, *allow)
        assert cli("import", str(path), *keyed, database=copy) == 5
        assert "the file is not signed" in capsys.readouterr().err
        assert cli("import", str(path), *keyed, "--trust-unsigned", database=copy) == 0

    def test_allow_type(
        self, cli: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without --allow-type, a class in arguments is not read (no code runs)."""
        cli.run(fill, cli.database)
        path = tmp_path / "backup.jsonl"
        assert cli("export", "--output", str(path)) == 1
        err = capsys.readouterr().err
        assert INVOICE_REF in err
        assert err.endswith(
            "error: the store could not read 6 record(s) (see the warnings above), "
            "which are not in the file\n"
        )
        assert lines_of(path.read_text())[-1]["schedules"] == 0

        assert cli("export", "--allow-type", "os:nothing") == 2
        assert "does not name a class" in capsys.readouterr().err

    def test_refusals(
        self, cli: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert cli("export", "--output", str(tmp_path / "x")) == 1
        assert "holds no store" in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
        assert os.listdir(tmp_path) == []

        assert cli("import", str(tmp_path / "missing")) == 2
        other = tmp_path / "other.jsonl"
        other.write_text('{"format": "something else"}\n')
        assert cli("import", str(other)) == 5
        assert "not an apscheduler-mongo export file" in capsys.readouterr().err


def ran(value: str) -> str:
    """The task that the imported schedule runs."""
    return value


@pytest.mark.anyio
async def test_import_wakes_a_running_scheduler(tmp_path: Path) -> None:
    """
    A scheduler with nothing to do sleeps until an event wakes it: ``import``
    announces what it adds through the MongoDB event broker, so it runs at once.
    """
    client: Any = AsyncMongoMockClient()
    database = "apscheduler_mongo_test_import_wakeup"
    output = io.StringIO()
    async with AsyncExitStack() as exit_stack:
        broker = LocalEventBroker()
        await broker.start(exit_stack, logging.getLogger(__name__))
        memory = MemoryDataStore()
        await memory.start(exit_stack, broker, logging.getLogger(__name__))
        await memory.add_task(
            Task(id="ran", func=f"{__name__}:ran", job_executor="async")
        )
        trigger = IntervalTrigger(hours=1)
        schedule = Schedule(
            id="hourly", task_id="ran", trigger=trigger, job_executor="async"
        )
        schedule.next_fire_time = trigger.next()
        await memory.add_schedule(schedule, ConflictPolicy.exception)
        await export_store(memory, output)

    path = tmp_path / "hourly.jsonl"
    path.write_text(output.getvalue())
    store = MongoDBDataStore(client, database=database, start_from_scratch=True)
    events = MongoDBEventBroker(client, database=database, poll_interval=0.05)
    async with AsyncScheduler(store, events) as scheduler:
        await scheduler.start_in_background()
        await anyio.sleep(0.3)  # it has found nothing due, and sleeps
        args = build_parser().parse_args(["import", str(path), "--database", database])
        with anyio.fail_after(10):
            assert await run_command(args, client) == 0
            event = await scheduler.get_next_event(JobReleased)

        assert event.schedule_id == "hourly"
