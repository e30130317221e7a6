"""
APScheduler 3's MongoDBJobStore jobs, imported: read without APScheduler 3, running
no stored code, and firing when 3.x would have.

The documents in ``tests/data/v3`` were written by APScheduler 3.11's own
``MongoDBJobStore``, and ``expected.json`` holds the next fire times its triggers
computed (see ``tests/data/v3/make_documents.py``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import struct
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
from apscheduler import AsyncScheduler, JobOutcome, JobReleased, Schedule
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from bson import Binary, json_util
from pymongo import MongoClient

from apscheduler_mongo import MongoDBDataStore, _v3
from apscheduler_mongo._tools.cli import main
from apscheduler_mongo._v3 import (
    CRON,
    OR,
    NotConvertibleError,
    convert_job,
    convert_trigger,
    read_job,
)
from apscheduler_mongo.migration import check_v3_source, import_v3

from .support.stores import started_store

DATA = Path(__file__).parent / "data" / "v3"
DOCUMENTS: list[dict[str, Any]] = json_util.loads((DATA / "documents.json").read_text())
EXPECTED: dict[str, Any] = json.loads((DATA / "expected.json").read_text())["jobs"]
#: The job whose trigger is a class of the user's own: it cannot be read
CUSTOM = "custom-trigger"
#: The jobs that cannot be converted: that one, and an interval in a combination
REFUSED = {CUSTOM, "or-interval"}
#: When the tests say "now" (a paused job's next fire time is computed from it)
NOW = datetime(2026, 12, 6, 15, 0, tzinfo=timezone.utc)
FIRING = sorted(
    job_id
    for job_id, job in EXPECTED.items()
    if job["next_fire_times"] and job_id not in REFUSED
)


@pytest.fixture(autouse=True)
def user_types(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The module the 3.x jobs name (functions, a class in arguments, a trigger)."""
    monkeypatch.syspath_prepend(str(DATA))
    yield importlib.import_module("v3_user_types")
    sys.modules.pop("v3_user_types", None)


def document(job_id: str) -> dict[str, Any]:
    return next(item for item in DOCUMENTS if item["_id"] == job_id)


def times(values: list[str]) -> list[datetime]:
    return [datetime.fromisoformat(value) for value in values]


def instants(values: list[datetime] | list[datetime | None]) -> list[float | None]:
    return [None if value is None else value.timestamp() for value in values]


def next_times(schedule: Schedule, count: int) -> list[datetime | None]:
    """Return the schedule's next fire time and those its trigger computes after."""
    found: list[datetime | None] = [schedule.next_fire_time]
    while len(found) < count:
        found.append(schedule.trigger.next())

    return found


def check_fire_times(schedule: Schedule) -> None:
    """Check the schedule fires when 3.x's job would have."""
    expected = times(EXPECTED[schedule.id]["next_fire_times"])
    found = next_times(schedule, len(expected))
    jitter = schedule.max_jitter
    if jitter is None:
        # Compared as instants: a wall time in a DST gap never equals one of
        # another zone (PEP 495), though it is the same instant
        assert instants(found) == instants(expected)
        return

    # 3.x moved each later fire time by up to the jitter; its interval trigger adds
    # the interval to the moved time, so there the moves add up
    drifts = isinstance(schedule.trigger, IntervalTrigger)
    for index, (ours, theirs) in enumerate(zip(found, expected, strict=True)):
        assert ours is not None
        assert timedelta(0) <= theirs - ours <= jitter * (index + 1 if drifts else 1)


class TestReading:
    """3.x's pickles are read as records of their state, and nothing else runs."""

    def test_every_job_is_read(self, user_types: ModuleType) -> None:
        read = [
            read_job(item, [user_types.Point])
            for item in DOCUMENTS
            if item["_id"] != CUSTOM
        ]
        assert len(read) == len(DOCUMENTS) - 1 == 31
        kinds = {job.trigger[0].rpartition(":")[2] for job in read}
        assert kinds == {
            "CronTrigger",
            "IntervalTrigger",
            "DateTrigger",
            "CalendarIntervalTrigger",
            "AndTrigger",
            "OrTrigger",
        }

    def test_the_options_are_read(self, user_types: ModuleType) -> None:
        job = read_job(document("with-options"), [user_types.Point])
        assert job.func == "v3_user_types:tock"
        assert job.args == (user_types.Point(1, 2), "text", 3)
        assert job.kwargs == {"when": datetime(2027, 1, 1, tzinfo=timezone.utc)}
        assert job.name == "Nightly report"
        assert job.misfire_grace_time == timedelta(seconds=30)
        assert (job.coalesce, job.max_instances, job.executor) == (
            False,
            3,
            "processpool",
        )

    def test_a_class_in_the_arguments_needs_allowing(self) -> None:
        with pytest.raises(NotConvertibleError, match="v3_user_types:Point"):
            read_job(document("with-options"))

    def test_a_trigger_class_of_the_users_is_refused(self) -> None:
        with pytest.raises(NotConvertibleError, match="EveryOtherDay"):
            read_job(document(CUSTOM))

    def test_a_malformed_cron_trigger_is_refused(self) -> None:
        state = {"version": 2, "fields": [], "timezone": timezone.utc}
        with pytest.raises(NotConvertibleError, match="8 fields"):
            convert_trigger(CRON, state, NOW)


class _Call:
    """Pickles as a call of ``function`` with ``args``: what an attacker writes."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.function, self.args


def _state(**changes: Any) -> dict[str, Any]:
    return {"version": 1, "id": "evil", **changes}


class TestPayloads:
    """A document that an attacker wrote runs nothing when read."""

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param(lambda cmd: _Call(os.system, cmd), id="state-is-a-call"),
            pytest.param(
                lambda cmd: _state(args=(_Call(os.system, cmd),)), id="call-in-args"
            ),
            pytest.param(
                lambda cmd: _state(
                    trigger=_Call(eval, f"__import__('os').system({cmd!r})")
                ),
                id="eval-as-trigger",
            ),
            pytest.param(
                lambda _: _state(func=_Call(pickle.loads, b"")), id="nested-loads"
            ),
        ],
    )
    def test_nothing_runs(self, payload: Any, tmp_path: Path) -> None:
        marker = tmp_path / "ran"
        blob = pickle.dumps(payload(f"touch {marker}"), protocol=2)
        with pytest.raises(NotConvertibleError, match="refusing"):
            read_job({"_id": "evil", "next_run_time": 0.0, "job_state": Binary(blob)})

        assert not marker.exists()

    def test_a_3x_helper_that_imports_is_refused(self) -> None:
        # apscheduler.util.ref_to_obj would import what its argument names
        blob = (
            b"\x80\x02capscheduler.util\nref_to_obj\nq\x00X\t\x00\x00\x00os:systemq"
            b"\x01\x85q\x02Rq\x03."
        )
        with pytest.raises(NotConvertibleError, match=r"apscheduler\.util:ref_to_obj"):
            read_job({"_id": "evil", "job_state": blob})

    @pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/localtime", 3])
    def test_a_bad_pytz_zone_is_refused(self, name: object) -> None:
        blob = b"\x80\x02cpytz\n_p\n" + pickle.dumps((name,), protocol=2)[2:-1]
        blob += b"R."
        with pytest.raises(NotConvertibleError, match="time zone"):
            read_job({"_id": "evil", "job_state": blob})


class TestCraftedDocuments:
    """A crafted document is refused alone, quickly, and changes nothing shared."""

    def test_a_record_in_the_arguments_is_refused(self) -> None:
        # The user's class in the arguments swapped for a 3.x expression record
        blob = _swap(
            bytes(document("with-options")["job_state"]),
            b"\x8c\rv3_user_types\x94\x8c\x05Point\x94",
            b"\x8c%apscheduler.triggers.cron.expressions\x94\x8c\rAllExpression\x94",
        )
        with pytest.raises(NotConvertibleError, match="not a value"):
            read_job({**document("with-options"), "job_state": blob})

    def test_build_changes_nothing_shared(self) -> None:
        # pytz._p, then BUILD with {"x": 1}: sets x on what find_class handed out
        blob = b"\x80\x02cpytz\n_p\n}q\x00X\x01\x00\x00\x00xK\x01sb."
        with pytest.raises(NotConvertibleError):
            read_job({"_id": "evil", "job_state": blob})

        assert not hasattr(_v3._PYTZ["pytz:_p"], "x")

    @pytest.mark.parametrize(
        "grace",
        [float("nan"), float("inf"), 1e300, -1],
        ids=["nan", "inf", "huge", "negative"],
    )
    def test_a_bad_number_is_refused(self, grace: float) -> None:
        blob = _swap(
            bytes(document("no-grace")["job_state"]),
            b"\x8c\x12misfire_grace_time\x94N",
            b"\x8c\x12misfire_grace_time\x94G" + struct.pack(">d", grace),
        )
        assert blob != bytes(document("no-grace")["job_state"])
        with pytest.raises(NotConvertibleError, match="misfire_grace_time"):
            read_job({**document("no-grace"), "job_state": blob})

    def test_many_expressions_are_refused_at_once(self) -> None:
        expressions = [
            _record(EXPRESSIONS + "RangeExpression", first=1, last=None, step=None)
        ] * 10_000
        state = _cron_state(minute=expressions)
        started = time.monotonic()
        with pytest.raises(NotConvertibleError, match="minute field is malformed"):
            convert_trigger(CRON, state, NOW)

        assert time.monotonic() - started < 5  # the bound, not a measurement

    def test_a_day_of_week_step_runs_to_sunday(self) -> None:
        step = _record(EXPRESSIONS + "RangeExpression", first=3, last=None, step=2)
        trigger = convert_trigger(CRON, _cron_state(day_of_week=[step]), NOW)
        assert isinstance(trigger, CronTrigger)
        assert "day_of_week='thu,sat'" in repr(trigger)

    def test_a_self_containing_combination_is_refused(self) -> None:
        state: dict[str, Any] = {"version": 1, "jitter": None}
        state["triggers"] = [(OR, state), (OR, state)]
        with pytest.raises(NotConvertibleError, match="nest more than"):
            convert_trigger(OR, state, NOW)


def _swap(blob: bytes, old: bytes, new: bytes) -> bytes:
    """Replace ``old`` by ``new`` in a pickle, mending its (only) frame's length."""
    assert blob.count(old) == 1
    changed = blob.replace(old, new)
    assert changed[2] == pickle.FRAME[0]  # protocol 4 and 5 frame what they write
    size = int.from_bytes(changed[3:11], "little") + len(new) - len(old)
    return changed[:3] + size.to_bytes(8, "little") + changed[11:]


def _record(ref: str, **state: Any) -> Any:
    record = _v3._RECORDS[ref]()
    record.state = state
    return record


EXPRESSIONS = "apscheduler.triggers.cron.expressions:"


def _cron_state(**fields: list[Any]) -> dict[str, Any]:
    """Return a 3.x cron trigger's state, every field '*' unless given."""
    every = [_record(EXPRESSIONS + "AllExpression", step=None)]
    return {
        "version": 2,
        "timezone": timezone.utc,
        "start_date": None,
        "end_date": None,
        "jitter": None,
        "fields": [
            _record(
                "apscheduler.triggers.cron.fields:BaseField",
                name=name,
                is_default=name not in fields,
                expressions=fields.get(name, every),
            )
            for name in _v3.CRON_FIELDS
        ],
    }


class TestFireTimes:
    """Each converted trigger fires when 3.x's did, DST changes included."""

    @pytest.mark.parametrize("job_id", FIRING)
    def test_next_fire_times(self, job_id: str, user_types: ModuleType) -> None:
        job = read_job(document(job_id), [user_types.Point])
        converted = convert_job(job, job.func, NOW)
        check_fire_times(converted.schedule)

    def test_a_paused_job_is_a_paused_schedule(self) -> None:
        job = read_job(document("paused"))
        schedule = convert_job(job, job.func, NOW).schedule
        assert schedule.paused
        # cron[hour='5'] in Berlin, from NOW
        assert schedule.next_fire_time == datetime(2026, 12, 7, 4, tzinfo=timezone.utc)


@pytest.mark.anyio
class TestImport:
    """Importing adds each job's schedule once, and leaves the 3.x jobs as they are."""

    async def test_import(
        self,
        client: Any,
        database: Any,
        database_name: str,
        logger: logging.Logger,
        user_types: ModuleType,
    ) -> None:
        source = database["apscheduler3_jobs"]
        await source.insert_many(DOCUMENTS)
        before = await source.find({}, sort=[("_id", 1)]).to_list(None)
        async with started_store(
            client, database_name, LocalEventBroker(), logger
        ) as store:
            report = await import_v3(source, store, allowed_types=[user_types.Point])
            assert report.read == 32
            assert set(report.refused) == REFUSED
            assert sorted(report.schedules_added) == sorted(
                job_id for job_id in EXPECTED if job_id not in REFUSED
            )
            assert set(report.tasks_added) == {
                "v3_user_types:tick",
                "v3_user_types:tock",
                "v3_user_types:tock (max_instances=3)",
            }

            schedules = {item.id: item for item in await store.get_schedules()}
            assert set(schedules) == set(report.schedules_added)
            for job_id in FIRING:
                check_fire_times(schedules[job_id])

            assert schedules["paused"].paused
            options = schedules["with-options"]
            assert options.args == (user_types.Point(1, 2), "text", 3)
            assert options.job_executor == "processpool"
            assert options.task_id == "v3_user_types:tock (max_instances=3)"
            tasks = {task.id: task for task in await store.get_tasks()}
            assert tasks[options.task_id].max_running_jobs == 3

            again = await import_v3(source, store, allowed_types=[user_types.Point])
            assert (again.schedules_added, again.tasks_added) == ((), ())
            assert sorted(again.schedules_present) == sorted(report.schedules_added)
            assert len(await store.get_schedules()) == len(schedules)

        assert await source.find({}, sort=[("_id", 1)]).to_list(None) == before

    async def test_dry_run_writes_nothing(
        self, database: Any, user_types: ModuleType
    ) -> None:
        source = database["apscheduler3_jobs"]
        await source.insert_many(DOCUMENTS)
        report = await import_v3(source, None, allowed_types=[user_types.Point])
        assert report.dry_run
        assert len(report.schedules_added) == 30
        assert await database.list_collection_names() == ["apscheduler3_jobs"]

    async def test_a_scheduler_runs_an_imported_job(
        self, client: Any, database: Any, database_name: str, logger: logging.Logger
    ) -> None:
        # A date trigger without a misfire grace time, overdue since 2026-01-01
        source = database["apscheduler3_jobs"]
        await source.insert_one(document("date-past"))
        async with started_store(
            client, database_name, LocalEventBroker(), logger
        ) as store:
            await import_v3(source, store)

        released: list[JobReleased] = []
        done = anyio.Event()

        def note(event: Any) -> None:
            released.append(event)
            done.set()

        store = MongoDBDataStore(client, database=database_name)
        async with AsyncScheduler(store, logger=logger) as scheduler:
            scheduler.subscribe(note, {JobReleased})
            await scheduler.start_in_background()
            with anyio.fail_after(10):
                await done.wait()

        assert [event.outcome for event in released] == [JobOutcome.success]

    async def test_the_collection_it_reads_is_refused(
        self, client: Any, database: Any, database_name: str, logger: logging.Logger
    ) -> None:
        async with started_store(
            client, database_name, LocalEventBroker(), logger
        ) as store:
            with pytest.raises(ValueError, match="another database"):
                await import_v3(database["jobs"], store)

    def test_the_store_collections_are_refused(self) -> None:
        with pytest.raises(ValueError, match="collection 'jobs' of database"):
            check_v3_source("apscheduler", "jobs", "apscheduler")

        check_v3_source("apscheduler", "jobs", "apscheduler4")
        check_v3_source("apscheduler", "v3_jobs", "apscheduler")


@pytest.fixture
def v3_databases(wire_uri: str) -> Iterator[tuple[str, str]]:
    """A 3.x job store's database (its documents in ``jobs``) and an empty one."""
    suffix = uuid.uuid4().hex[:12]
    names = (f"apscheduler3_test_{suffix}", f"apscheduler_mongo_test_{suffix}")
    client: MongoClient[dict[str, Any]] = MongoClient(
        wire_uri, serverSelectionTimeoutMS=5000
    )
    with client:
        client[names[0]]["jobs"].insert_many(DOCUMENTS)
        try:
            yield names
        finally:
            for name in names:
                client.drop_database(name)


@pytest.mark.wire
class TestCommand:
    """``apscheduler-mongo import-v3`` as an operator runs it, over the wire."""

    def test_dry_run_then_import_then_again(
        self,
        wire_uri: str,
        v3_databases: tuple[str, str],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        source, target = v3_databases
        argv = [
            "import-v3",
            *("--uri", wire_uri, "--from-database", source, "--database", target),
            *("--allow-type", "v3_user_types:Point"),
        ]
        assert main([*argv, "--dry-run"]) == 1  # the user's trigger class
        out = capsys.readouterr().out
        assert f"read 32 APScheduler 3 job(s) from {source}.jobs" in out
        assert "not converted: job 'custom-trigger': its pickle cannot be read" in out
        assert out.splitlines()[-1] == (
            "would add 3 task(s) and 30 schedule(s); already in the store, left as "
            "they are: 0 task(s) and 0 schedule(s); not converted: 2 job(s)"
        )
        client: MongoClient[dict[str, Any]] = MongoClient(
            wire_uri, serverSelectionTimeoutMS=5000
        )
        with client:
            assert client[target].list_collection_names() == []
            before = list(client[source]["jobs"].find({}, sort=[("_id", 1)]))

            assert main(argv) == 1
            out = capsys.readouterr().out
            assert "added: schedule 'cron-dst-berlin' of task" in out
            assert out.splitlines()[-1].startswith(
                "added 3 task(s) and 30 schedule(s); already in the store, left as "
                "they are: 0 task(s) and 0 schedule(s)"
            )
            assert client[target]["schedules"].count_documents({}) == 30

            assert main(argv) == 1
            assert (
                capsys.readouterr()
                .out.splitlines()[-1]
                .startswith(
                    "added 0 task(s) and 0 schedule(s); already in the store, left as "
                    "they are: 3 task(s) and 30 schedule(s)"
                )
            )
            assert client[target]["schedules"].count_documents({}) == 30
            assert list(client[source]["jobs"].find({}, sort=[("_id", 1)])) == before

    def test_a_class_needs_allowing(
        self,
        wire_uri: str,
        v3_databases: tuple[str, str],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        source, target = v3_databases
        argv = ["import-v3", "--uri", wire_uri, "--from-database", source]
        assert main([*argv, "--database", target, "--dry-run"]) == 1
        assert (
            "not converted: job 'with-options': its pickle cannot be read: refusing "
            "to rebuild 'v3_user_types:Point': not an allowed type"
        ) in capsys.readouterr().out

    def test_a_signing_store_takes_only_the_allowed_functions(
        self,
        wire_uri: str,
        v3_databases: tuple[str, str],
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # The store signs what is imported: the operator names what may run
        monkeypatch.setenv(
            "APSCHEDULER_MONGO_SIGNING_KEY", "v3-import-test-key-0123456789"
        )
        source, target = v3_databases
        argv = ["import-v3", "--uri", wire_uri, "--from-database", source]
        argv += ["--database", target, "--allow-type", "v3_user_types:Point"]
        assert main(argv) == 2
        assert "--allow" in capsys.readouterr().err

        assert main([*argv, "--allow", "v3_user_types:tick"]) == 1
        out = capsys.readouterr().out
        assert (
            "not converted: job 'with-options': its function 'v3_user_types:tock' is "
            "not among the allowed callables"
        ) in out
        client: MongoClient[dict[str, Any]] = MongoClient(
            wire_uri, serverSelectionTimeoutMS=5000
        )
        with client:
            funcs = {task["func"] for task in client[target]["tasks"].find()}

        assert funcs == {"v3_user_types:tick"}

    def test_a_password_in_from_uri_is_warned_of_and_never_shown(
        self, wire_uri: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        argv = ["import-v3", "--uri", wire_uri, "--dry-run", "--timeout", "1"]
        argv += ["--from-uri", "mongodb://ops:s3cret-word@127.0.0.1:1/"]
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert "--from-uri carries a password" in err
        assert "APSCHEDULER3_MONGODB_URI" in err
        assert "s3cret-word" not in err

    def test_the_collection_it_reads_is_refused(
        self,
        wire_uri: str,
        v3_databases: tuple[str, str],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        source, _ = v3_databases
        argv = ["import-v3", "--uri", wire_uri, "--from-database", source]
        assert main([*argv, "--database", source]) == 2
        assert "import into another database" in capsys.readouterr().err
