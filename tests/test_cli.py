"""The command line, as a new user and as an operator run it."""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import attrs
import bson
import bson.errors
import pytest
from apscheduler import (
    AsyncScheduler,
    ConflictPolicy,
    Job,
    JobOutcome,
    JobReleased,
    JobResult,
    Schedule,
    Task,
)
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.serializers.pickle import PickleSerializer
from apscheduler.triggers.interval import IntervalTrigger
from bson import Binary
from mongomock_motor import AsyncMongoMockClient
from pymongo import AsyncMongoClient, MongoClient
from pymongo.collection import Collection

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker
from apscheduler_mongo.__main__ import main
from apscheduler_mongo._marshalling import to_micros, uuid_to_bson
from apscheduler_mongo._signing import Codec, Signer
from apscheduler_mongo._tools.cli import build_parser, run_command
from apscheduler_mongo._tools.status import format_table, when

from .support.fake_servers import free_port
from .support.hostile import (
    HUGE_INTEGER,
    exec_gadget,
    popen_gadget,
    protocol_0_gadget,
    system_gadget,
)
from .support.servers import mongoeco_process, needs_mongoeco

LEASE = timedelta(minutes=1)
PASSWORD = "pW-cli-probe-7Hq"
QUARANTINE_REASON = "the schedule could not be deserialized"

CLI_TIERS = [
    pytest.param("mongomock", id="mongomock"),
    pytest.param("wire", id="wire", marks=pytest.mark.wire),
]


def ran(value: str) -> str:
    """Task run by the scheduler in the wake-up test."""
    return value


@attrs.frozen
class Seeded:
    """The ids of what :func:`seed` stored."""

    running_job: str
    kept_result: str
    expired_result: str


@asynccontextmanager
async def raw_database(target: Any, database: str) -> AsyncIterator[Any]:
    """Yield the database of ``target`` (a mongomock client or a URI) for raw access."""
    if not isinstance(target, str):
        yield target[database]
        return

    client: AsyncMongoClient[Any] = AsyncMongoClient(target)
    try:
        yield client[database]
    finally:
        await client.close()


async def seed(target: Any, database: str) -> Seeded:
    """
    Store tasks, schedules and jobs in every state the status command shows.

    Schedule ``every-5-min`` is due and leased by ``worker-a``; ``nightly`` is
    waiting; ``hourly-sync`` is paused with a fire time three hours ago; ``broken``
    is quarantined. A ``report`` job runs under ``worker-b``, two ``tidy`` jobs are
    queued, and two ``tidy`` jobs finished: one result is kept for an hour, one (of
    a job from ``every-5-min``) expired.
    """
    now = datetime.now(timezone.utc)
    async with AsyncExitStack() as exit_stack:
        broker = LocalEventBroker()
        logger = logging.getLogger("apscheduler_mongo.tests")
        await broker.start(exit_stack, logger)
        store = MongoDBDataStore(target, database=database, start_from_scratch=True)
        await store.start(exit_stack, broker, logger)

        await store.add_task(
            Task(
                id="report",
                func="myapp.jobs:send_report",
                job_executor="threadpool",
                max_running_jobs=1,
            )
        )
        await store.add_task(
            Task(id="tidy", func="myapp.jobs:tidy", job_executor="async")
        )
        for schedule_id, task_id, start, paused in [
            ("every-5-min", "tidy", now - timedelta(seconds=1), False),
            ("nightly", "report", now + timedelta(hours=8), False),
            ("hourly-sync", "tidy", now - timedelta(hours=3), True),
            ("broken", "tidy", now + timedelta(minutes=1), False),
        ]:
            trigger = IntervalTrigger(minutes=5, start_time=start)
            schedule = Schedule(
                id=schedule_id,
                task_id=task_id,
                trigger=trigger,
                job_executor="async",
                paused=paused,
            )
            schedule.next_fire_time = trigger.next()
            await store.add_schedule(schedule, ConflictPolicy.exception)

        acquired = await store.acquire_schedules("worker-a", LEASE, 10)
        assert [schedule.id for schedule in acquired] == ["every-5-min"]

        async def run_one(
            job: Job, worker: str, finished: datetime | None = None
        ) -> None:
            await store.add_job(job)
            (claimed,) = await store.acquire_jobs(worker, LEASE, 1)
            assert claimed.id == job.id
            if finished is not None:
                result = JobResult.from_job(
                    job, JobOutcome.success, finished_at=finished, return_value=1
                )
                await store.release_job(worker, claimed, result)

        running = Job(task_id="report", executor="threadpool")
        await run_one(running, "worker-b")
        # A job of a schedule: its document outlives its result (it records the
        # fire time), so only the store's cleanup removes the expired result
        fire_time = acquired[0].next_fire_time
        assert fire_time is not None
        expired = Job(
            task_id="tidy",
            executor="async",
            schedule_id="every-5-min",
            scheduled_fire_time=fire_time,
            result_expiration_time=timedelta(minutes=1),
        )
        await run_one(expired, "worker-c", now - timedelta(hours=2))
        kept = Job(task_id="tidy", executor="async", result_expiration_time=LEASE * 60)
        await run_one(kept, "worker-c", datetime.now(timezone.utc))
        for _ in range(2):
            await store.add_job(Job(task_id="tidy", executor="async"))

        # These leases stand for schedulers that still run elsewhere: this store
        # must not give them back as it stops (as it would its own scheduler's)
        store._leases._handed.clear()
        store._leases._held.clear()

    async with raw_database(target, database) as raw:
        quarantine = {"reason": QUARANTINE_REASON, "at": now}
        await raw["schedules"].update_one(
            {"_id": "broken"}, {"$set": {"quarantine": quarantine}}
        )

    return Seeded(str(running.id), str(kept.id), str(expired.id))


@attrs.define
class Cli:
    """Run the command line on one test database, in-process or over the wire."""

    tier: str
    target: Any
    database: str

    def __call__(self, *argv: str) -> int:
        """Run a store command on the test database; return its exit status."""
        argv = (*argv, "--database", self.database)
        if self.tier == "wire":
            return main([*argv, "--uri", self.target])

        # The seam: the same command, on a mongomock-motor client
        code: int = anyio.run(run_command, build_parser().parse_args(argv), self.target)
        return code

    def seed(self) -> Seeded:
        seeded: Seeded = anyio.run(seed, self.target, self.database)
        return seeded

    def documents(self, collection: str, query: dict[str, Any]) -> list[Any]:
        async def find() -> list[Any]:
            async with raw_database(self.target, self.database) as raw:
                return list(await raw[collection].find(query).to_list(None))

        found: list[Any] = anyio.run(find)
        return found

    def update(self, collection: str, query: dict[str, Any], fields: Any) -> None:
        """Set ``fields`` in the one document ``query`` matches, behind the API."""

        async def update() -> None:
            async with raw_database(self.target, self.database) as raw:
                changed = await raw[collection].update_one(query, {"$set": fields})
                assert changed.matched_count == 1

        anyio.run(update)

    def insert(self, collection: str, *documents: dict[str, Any]) -> None:
        async def insert() -> None:
            async with raw_database(self.target, self.database) as raw:
                await raw[collection].insert_many(documents)

        anyio.run(insert)

    def collection_names(self) -> list[str]:
        async def names() -> list[str]:
            async with raw_database(self.target, self.database) as raw:
                return list(await raw.list_collection_names())

        found: list[str] = anyio.run(names)
        return found


@pytest.fixture(params=CLI_TIERS)
def cli(request: pytest.FixtureRequest) -> Iterator[Cli]:
    database = f"apscheduler_mongo_test_{uuid.uuid4().hex[:12]}"
    if request.param == "mongomock":
        yield Cli("mongomock", AsyncMongoMockClient(), database)
        return

    uri: str = request.getfixturevalue("wire_uri")
    yield Cli("wire", uri, database)
    client: MongoClient[Any]
    with MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
        client.drop_database(database)


@pytest.fixture
def seeded(cli: Cli) -> Seeded:
    return cli.seed()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A file that stored code creates if anything runs it."""
    return tmp_path / "ran"


def job_query(job_id: str) -> dict[str, Any]:
    return {"_id": uuid_to_bson(uuid.UUID(job_id))}


def row(output: str, first_cell: str) -> list[str]:
    """Return the cells (split on runs of two or more spaces) of a table's row."""
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == first_cell:
            return cells

    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


class TestDemo:
    """``python -m apscheduler_mongo demo`` runs schedules and reports them."""

    def test_demo_in_process(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("MONGODB_URI", raising=False)
        assert main(["demo", "--seconds", "2.2"]) == 0
        output = capsys.readouterr().out
        assert "mongomock-motor" in output
        ran = re.findall(r"success: job from schedule '(every-[a-z-]+)'", output)
        assert ran.count("every-second") >= 2
        assert ran.count("every-two-seconds") >= 1
        assert re.search(r"done: \d+ jobs ran", output)

    @pytest.mark.wire
    def test_demo_over_the_wire(
        self, capsys: pytest.CaptureFixture[str], wire_uri: str
    ) -> None:
        database = "apscheduler_mongo_test_demo"
        assert (
            main(
                ["demo", "--uri", wire_uri, "--database", database, "--seconds", "1.6"]
            )
            == 0
        )
        output = capsys.readouterr().out
        assert "127.0.0.1" in output or "MONGODB_URI" not in output
        assert "success: job from schedule 'every-second'" in output

    def test_bad_uri_is_a_clear_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["demo", "--uri", "http://example.invalid"]) == 2
        assert "must start with 'mongodb://'" in capsys.readouterr().err

    def test_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exc_info:
            main(["demo", "--help"])

        assert exc_info.value.code == 0
        assert "MONGODB_URI" in capsys.readouterr().out

    @pytest.mark.wire
    def test_refuses_a_store(
        self,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
        wire_uri: str,
    ) -> None:
        """The demo empties its database: one that holds a store needs --overwrite."""
        database = f"apscheduler_mongo_test_{uuid.uuid4().hex[:12]}"
        argv = ["demo", "--database", database, "--seconds", "1.6"]
        monkeypatch.setenv("MONGODB_URI", wire_uri)
        mongo: MongoClient[Any]
        with MongoClient(wire_uri) as mongo:
            try:
                anyio.run(seed, wire_uri, database)
                assert main(argv) == 2
                assert capsys.readouterr().err == (
                    f"error: database {database!r} holds a store (its tasks, "
                    f"schedules, jobs are not empty), which the demo would empty: "
                    f"choose another --database, or pass --overwrite to empty it\n"
                )
                schedules: Collection[Any] = mongo[database]["schedules"]
                assert schedules.count_documents({}) == 4

                assert main([*argv, "--overwrite"]) == 0
                assert "success: job from schedule" in capsys.readouterr().out
                assert schedules.count_documents({"_id": "nightly"}) == 0
            finally:
                mongo.drop_database(database)


class TestStatus:
    """``status`` shows tasks, schedules, leases, quarantines, jobs and results."""

    def test_tables(
        self, cli: Cli, seeded: Seeded, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert cli("status") == 0
        captured = capsys.readouterr()
        output = captured.out
        assert captured.err == ""
        assert f"Store in database {cli.database!r}" in output
        assert row(output, "report") == [
            "report",
            "myapp.jobs:send_report",
            "threadpool",
            "1",
            "1",
        ]
        assert row(output, "tidy")[:5] == ["tidy", "myapp.jobs:tidy", "async", "-", "0"]

        leased = row(output, "every-5-min")
        assert leased[1] == "tidy"
        assert leased[3:5] == ["no", "worker-a"]
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+00:00 \(in \d+ s\)", leased[5]
        )
        assert row(output, "nightly")[2].endswith("(in 8 h)")
        assert row(output, "hourly-sync")[2:6] == [
            row(output, "hourly-sync")[2],
            "yes",
            "-",
            "-",
        ]
        assert row(output, "hourly-sync")[2].endswith("(3 h ago)")
        broken = row(output, "broken")
        assert broken[-1] == f"quarantined: {QUARANTINE_REASON}"

        assert "Queued jobs (2)" in output
        assert row(output, "TASK") == ["TASK", "QUEUED"]
        running = row(output, seeded.running_job)
        assert running[1:4] == ["report", "-", "worker-b"]
        assert re.search(r"\(in \d+ s\)$", running[4])

        assert "Recent results (2 newest of 2 finished jobs)" in output
        kept = row(output, seeded.kept_result)
        assert kept[1:4] == ["tidy", "-", "success"]
        assert kept[5].endswith("(in 60 min)")
        expired = row(output, seeded.expired_result)
        assert expired[1:4] == ["tidy", "every-5-min", "success"]
        assert expired[4].endswith("(2 h ago)")
        assert expired[5].endswith("(119 min ago)")

    def test_json(
        self, cli: Cli, seeded: Seeded, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert cli("status", "--json", "--limit", "1") == 0
        status = json.loads(capsys.readouterr().out)
        assert status["database"] == cli.database
        schedules = {schedule["id"]: schedule for schedule in status["schedules"]}
        leased = schedules["every-5-min"]
        assert leased["acquired_by"] == "worker-a"
        lease_end = datetime.fromisoformat(leased["acquired_until"])
        assert timedelta(0) < lease_end - datetime.now(timezone.utc) <= LEASE
        assert schedules["hourly-sync"]["paused"] is True
        assert schedules["broken"]["quarantine"] == QUARANTINE_REASON
        assert status["queued_jobs"] == {"tidy": 2}
        (running,) = status["running_jobs"]
        assert (running["id"], running["acquired_by"]) == (
            seeded.running_job,
            "worker-b",
        )
        (result,) = status["results"]  # --limit 1: the newest only
        assert (result["job_id"], result["outcome"]) == (seeded.kept_result, "success")
        assert status["finished_jobs"] == 2

    @pytest.mark.usefixtures("seeded")
    def test_no_results(self, cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli("status", "--limit", "0") == 0
        assert "Recent results (0 newest of 2 finished jobs)\n(none)" in (
            capsys.readouterr().out
        )

    @pytest.mark.usefixtures("seeded")
    def test_triggers_and_arguments(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Shown as text (shortened in tables), read without the store's serializer."""
        cli.update("schedules", {"_id": "nightly"}, {"args": pickle.dumps(("a", 1))})
        assert cli("status") == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        nightly = row(captured.out, "nightly")
        assert nightly[3:6] == ["no", "-", "-"]
        trigger = "apscheduler.triggers.interval.IntervalTrigger(version=1, ..."
        assert nightly[6:8] == [trigger, "'a', 1"]
        assert cli("status", "--json") == 0
        (schedule,) = [
            schedule
            for schedule in json.loads(capsys.readouterr().out)["schedules"]
            if schedule["id"] == "nightly"
        ]
        assert schedule["readable"] is True
        assert schedule["arguments"] == "'a', 1"
        assert schedule["trigger"].startswith(
            "apscheduler.triggers.interval.IntervalTrigger(version=1, "
            "interval=[0, 0, 0, 5, 0, 0], start_time=datetime("
        )

    @pytest.mark.usefixtures("seeded")
    def test_undecodable_trigger(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cli.update("schedules", {"_id": "nightly"}, {"trigger": b"not a trigger"})
        assert cli("status") == 0
        nightly = row(capsys.readouterr().out, "nightly")
        assert nightly[6].startswith("(unreadable: JSONDecodeError: ")
        assert nightly[-1] == "its trigger or arguments cannot be decoded"

    def test_serializer_not_an_option(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Nothing is deserialized: ``status`` takes no serializer."""
        with pytest.raises(SystemExit):
            main(["status", "--serializer", "json"])

        assert "unrecognized arguments: --serializer" in capsys.readouterr().err

    def test_empty_store(self, cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
        async def create() -> None:
            async with AsyncExitStack() as exit_stack:
                logger = logging.getLogger("apscheduler_mongo.tests")
                store = MongoDBDataStore(cli.target, database=cli.database)
                await store.start(exit_stack, LocalEventBroker(), logger)

        anyio.run(create)
        assert cli("status") == 0
        output = capsys.readouterr().out
        # The store stopped cleanly: it deregistered, so no scheduler is listed
        assert "Schedulers (0)\n(none)" in output
        assert output.count("(none)") == 6

    def test_no_store_in_database(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A mistyped database name is not created: it is reported as not found."""
        assert cli("status") == 1
        assert "holds no store" in capsys.readouterr().err
        assert cli.documents("schedules", {}) == []

    @pytest.mark.usefixtures("seeded")
    def test_damaged_documents(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Hand-edited or set-aside documents are shown as far as they can be read."""
        finished, running = uuid.uuid4(), uuid.uuid4()

        async def damage() -> None:
            async with raw_database(cli.target, cli.database) as raw:
                await raw["jobs"].insert_many(
                    [
                        {
                            "_id": "not-a-uuid",
                            "state": "finished",
                            "task_id": "tidy",
                            "quarantine": {"reason": "its id is no UUID"},
                        },
                        {
                            "_id": uuid_to_bson(finished),
                            "state": "finished",
                            "task_id": "tidy",
                            "finished_time": 1.5,
                            "result": {"outcome": "success", "finished_at": "x"},
                        },
                        {
                            "_id": uuid_to_bson(running),
                            "state": "acquired",
                            "task_id": "report",
                            "acquired_by": "worker-d",
                            "acquired_until": "soon",
                        },
                    ]
                )

        anyio.run(damage)
        assert cli("status", "--limit", "10") == 0
        output = capsys.readouterr().out
        assert row(output, "'not-a-uuid'")[3] == "quarantined: its id is no UUID"
        assert "Recent results (4 newest of 4 finished jobs)" in output
        assert row(output, str(finished))[3:] == ["success", "-", "-"]
        assert row(output, str(running))[1:] == ["report", "-", "worker-d", "-"]


class TestUntrustedData:
    """
    The database is untrusted input: ``status`` runs no code stored in it, shows
    what it holds as the schedulers read it, and one value it cannot show spoils
    only its own cell.
    """

    def test_gadgets_shown_as_text(
        self,
        cli: Cli,
        seeded: Seeded,
        marker: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        cli.update(
            "schedules",
            {"_id": "nightly"},
            {"args": system_gadget(marker), "kwargs": exec_gadget(marker)},
        )
        cli.update(
            "schedules", {"_id": "hourly-sync"}, {"trigger": popen_gadget(marker)}
        )
        cli.update(
            "jobs",
            job_query(seeded.kept_result),
            {"result.outcome": "error", "result.exception": protocol_0_gadget(marker)},
        )
        system = f"{os.system.__module__}.system('touch {marker}')"
        assert cli("status") == 0
        output = capsys.readouterr().out
        shown = f"*{system}, **builtins.exec("[:57]
        assert row(output, "nightly")[7] == f"{shown}..."
        assert row(output, "hourly-sync")[6].startswith("subprocess.Popen(['touch', ")
        assert row(output, seeded.kept_result)[6].startswith("os.system('touch ")

        assert cli("status", "--json") == 0
        status = json.loads(capsys.readouterr().out)
        schedules = {schedule["id"]: schedule for schedule in status["schedules"]}
        assert schedules["nightly"]["arguments"].startswith(
            f'*{system}, **builtins.exec("open('
        )
        assert schedules["hourly-sync"]["trigger"] == (
            f"subprocess.Popen(['touch', '{marker}'])"
        )
        results = {result["job_id"]: result for result in status["results"]}
        assert results[seeded.kept_result]["error"] == f"os.system('touch {marker}')"
        assert not marker.exists()

    @pytest.mark.usefixtures("seeded")
    @pytest.mark.parametrize("command", ["pause", "resume", "remove"])
    def test_changes_without_a_key_run_no_gadget(
        self, cli: Cli, marker: Path, monkeypatch: pytest.MonkeyPatch, command: str
    ) -> None:
        """Without a key nothing can be authenticated: a change reads the schedule
        with a serializer that rebuilds only allowed classes."""
        monkeypatch.delenv("APSCHEDULER_MONGO_SIGNING_KEY", raising=False)
        cli.update("schedules", {"_id": "nightly"}, {"args": system_gadget(marker)})
        cli("pause", "nightly")
        cli(command, "nightly")
        assert not marker.exists()

    @pytest.mark.usefixtures("seeded")
    def test_paused_and_quarantined_as_the_schedulers_read_them(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """
        ``paused`` other than true (a string left by a hand edit) does not pause a
        schedule; a ``quarantine`` field, whatever it holds, sets it aside.
        """
        cli.update("schedules", {"_id": "nightly"}, {"paused": "true"})
        cli.update("schedules", {"_id": "every-5-min"}, {"quarantine": None})
        assert cli("status") == 0
        output = capsys.readouterr().out
        note = "wrong type 'str': 'true', taken as not paused"
        assert row(output, "nightly")[3] == f"? ({note})"
        assert row(output, "every-5-min")[-1] == "quarantined: no reason recorded"

        assert cli("status", "--json") == 0
        status = json.loads(capsys.readouterr().out)
        schedules = {schedule["id"]: schedule for schedule in status["schedules"]}
        assert (
            schedules["nightly"]["paused"],
            schedules["nightly"]["paused_note"],
        ) == (
            None,
            note,
        )
        assert schedules["every-5-min"]["quarantine"] == "no reason recorded"

        # Pausing it would lift the quarantine: refused, as for any quarantine
        assert cli("pause", "every-5-min") == 1
        err = capsys.readouterr().err
        assert "is quarantined (no reason recorded)" in err
        (document,) = cli.documents("schedules", {"_id": "every-5-min"})
        assert document["quarantine"] is None

        # The store refuses to read the hand-edited one: the actions leave it alone
        assert cli("pause", "nightly") == 1
        assert "schedule 'nightly' cannot be read here" in capsys.readouterr().err
        (document,) = cli.documents("schedules", {"_id": "nightly"})
        assert document["paused"] == "true"

    @pytest.mark.usefixtures("seeded")
    def test_one_value_that_cannot_be_shown(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An integer too long for repr, a UUID of three bytes, odd ids and names."""
        cli.update(
            "schedules", {"_id": "nightly"}, {"args": pickle.dumps((1, HUGE_INTEGER))}
        )
        finished = to_micros(datetime.now(timezone.utc))
        odd = {"_id": Binary(b"odd", 4), "state": "finished", "finished_time": finished}
        # pymongo before 4.19 refuses to decode such a binary at all (InvalidBSON,
        # from inside the driver): no reader can show it there
        short_uuids = cli.tier == "mongomock" or _decodes(odd)
        if short_uuids:
            cli.insert("jobs", odd)

        cli.insert(
            "tasks", {"_id": 7, "func": {"not": "a name"}, "max_running_jobs": "2"}
        )
        assert cli("status") == 0
        captured = capsys.readouterr()
        cannot = "(cannot be shown: ValueError: Exceeds the limit"
        assert row(captured.out, "nightly")[7].startswith(f"1, {cannot}")
        if short_uuids:
            assert row(captured.out, "Binary(b'odd', 4)")[1:4] == ["-", "-", "-"]

        assert row(captured.out, "7") == ["7", "{'not': 'a name'}", "-", "'2'", "0"]
        assert row(captured.out, "report")[1] == "myapp.jobs:send_report"
        assert captured.err == ""

        assert cli("status", "--json") == 0
        status = json.loads(capsys.readouterr().out)
        (nightly,) = [s for s in status["schedules"] if s["id"] == "nightly"]
        assert nightly["arguments"].startswith(f"1, {cannot}")
        if short_uuids:
            job_ids = [result["job_id"] for result in status["results"]]
            assert "Binary(b'odd', 4)" in job_ids


def _decodes(document: dict[str, Any]) -> bool:
    """Tell whether this pymongo decodes ``document`` (as the wire tier reads it)."""
    try:
        bson.decode(bson.encode(document))
    except bson.errors.InvalidBSON:
        return False

    return True


def test_format_table() -> None:
    table = format_table(
        ["NAME", "COUNT", "NOTE"],
        [["a", "1", "x"], ["longer", "100", "line\nbreak"]],
        right=(1,),
    )
    assert table.splitlines() == [
        "NAME    COUNT  NOTE",
        "a           1  x",
        "longer    100  line\\nbreak",
    ]


@pytest.mark.parametrize(
    ("offset", "shown"),
    [
        (timedelta(seconds=25.4), "(in 25 s)"),
        (timedelta(minutes=-3), "(3 min ago)"),
        (timedelta(hours=5), "(in 5 h)"),
        (timedelta(days=3), "(in 3 d)"),
    ],
)
def test_times_say_how_far(offset: timedelta, shown: str) -> None:
    now = datetime(2026, 11, 25, 12, tzinfo=timezone.utc)
    assert when(now + offset, now).endswith(f" {shown}")
    assert when(None, now) == "-"
    lapsed = when(now - timedelta(seconds=5), now, lease=True)
    assert lapsed == "2026-11-25 11:59:55+00:00 (lapsed 5 s ago)"


class TestPauseResume:
    """``pause`` and ``resume`` act as AsyncScheduler's methods, for every process."""

    @pytest.mark.usefixtures("seeded")
    def test_pause_then_resume(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert cli("pause", "nightly") == 0
        assert capsys.readouterr().out == "paused schedule 'nightly'\n"
        assert cli("status") == 0
        assert row(capsys.readouterr().out, "nightly")[3] == "yes"

        assert cli("pause", "nightly") == 0
        assert capsys.readouterr().out == "schedule 'nightly' is already paused\n"

        assert cli("resume", "nightly") == 0
        assert "resumed schedule 'nightly'; next fire time: " in capsys.readouterr().out
        assert cli("status") == 0
        assert row(capsys.readouterr().out, "nightly")[3] == "no"

        assert cli("resume", "nightly") == 0
        assert capsys.readouterr().out == "schedule 'nightly' is not paused\n"

    @pytest.mark.usefixtures("seeded")
    def test_resume_where_it_left_off(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without --now the missed fire time stays; with --now it is skipped."""
        (before,) = cli.documents("schedules", {"_id": "hourly-sync"})
        assert cli("resume", "hourly-sync") == 0
        (after,) = cli.documents("schedules", {"_id": "hourly-sync"})
        assert after["next_fire_time"] == before["next_fire_time"]
        assert after["paused"] is False

        assert cli("pause", "hourly-sync") == 0
        capsys.readouterr()
        started = datetime.now(timezone.utc)
        assert cli("resume", "hourly-sync", "--now") == 0
        printed = capsys.readouterr().out.rpartition("next fire time: ")[2].strip()
        next_fire_time = datetime.fromisoformat(printed)
        assert started - timedelta(seconds=1) <= next_fire_time  # shown in seconds
        assert next_fire_time <= started + timedelta(minutes=5)

    @pytest.mark.usefixtures("seeded")
    def test_unknown_schedule(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        for command in ("pause", "resume", "remove"):
            assert cli(command, "nope") == 1
            err = capsys.readouterr().err
            assert err == f"error: no schedule 'nope' in database {cli.database!r}\n"

    @pytest.mark.usefixtures("seeded")
    def test_quarantined_schedule_stays_quarantined(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert cli("pause", "broken") == 1
        assert "is quarantined" in capsys.readouterr().err
        (document,) = cli.documents("schedules", {"_id": "broken"})
        assert document["quarantine"]["reason"] == QUARANTINE_REASON
        assert document["paused"] is False

    @pytest.mark.usefixtures("seeded")
    def test_unreadable_schedule(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert cli("pause", "nightly", "--serializer", "cbor") == 1
        assert "cannot be read here" in capsys.readouterr().err
        (document,) = cli.documents("schedules", {"_id": "nightly"})
        assert document["paused"] is False

    @pytest.mark.anyio
    async def test_resume_wakes_a_running_scheduler(self) -> None:
        """
        A scheduler whose only schedule is paused sleeps until an event wakes it:
        ``resume`` announces itself through the MongoDB event broker, so it runs.
        """
        client: Any = AsyncMongoMockClient()
        database = "apscheduler_mongo_test_wakeup"
        store = MongoDBDataStore(client, database=database, start_from_scratch=True)
        broker = MongoDBEventBroker(client, database=database, poll_interval=0.05)
        async with AsyncScheduler(store, broker) as scheduler:
            await scheduler.add_schedule(
                ran, IntervalTrigger(hours=1), id="hourly", args=["x"], paused=True
            )
            await scheduler.start_in_background()
            await anyio.sleep(0.3)  # it has found nothing due, and sleeps
            args = build_parser().parse_args(
                ["resume", "hourly", "--database", database]
            )
            with anyio.fail_after(10):
                assert await run_command(args, client) == 0
                event = await scheduler.get_next_event(JobReleased)

            assert event.schedule_id == "hourly"


class TestRemove:
    """``remove`` deletes a schedule, quarantined or not."""

    @pytest.mark.usefixtures("seeded")
    def test_remove(self, cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli("remove", "broken") == 0
        assert cli("remove", "nightly") == 0
        assert capsys.readouterr().out == (
            "removed schedule 'broken'\nremoved schedule 'nightly'\n"
        )
        remaining = {doc["_id"] for doc in cli.documents("schedules", {})}
        assert remaining == {"every-5-min", "hourly-sync"}
        assert cli("remove", "nightly") == 1


class TestJobActions:
    """``run-now``, ``retry`` and ``cancel``: exit statuses and what they change."""

    def test_cancel(
        self, cli: Cli, seeded: Seeded, capsys: pytest.CaptureFixture[str]
    ) -> None:
        queued = [doc["_id"] for doc in cli.documents("jobs", {"state": "queued"})]
        job_id = str(bson.Binary.as_uuid(queued[0]))
        assert cli("cancel", job_id) == 0
        assert capsys.readouterr().out == f"cancelled job {job_id}\n"
        assert len(cli.documents("jobs", {"state": "queued"})) == 1

        assert cli("cancel", seeded.running_job) == 5
        assert "is running" in capsys.readouterr().err
        assert cli("cancel", seeded.kept_result) == 5
        assert "has finished" in capsys.readouterr().err
        assert cli("cancel", str(uuid.uuid4())) == 1
        assert "error: no job " in capsys.readouterr().err

    def test_retry_refusals(
        self, cli: Cli, seeded: Seeded, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert cli("retry", seeded.kept_result) == 5
        assert "succeeded: only a job that failed" in capsys.readouterr().err
        assert cli("retry", seeded.running_job) == 5
        assert "is running" in capsys.readouterr().err
        assert cli("retry", "no-such-job") == 1

    @pytest.mark.usefixtures("seeded")
    def test_run_now(self, cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
        (before,) = cli.documents("schedules", {"_id": "nightly"})
        assert cli("run-now", "nightly") == 0
        said = capsys.readouterr().out
        assert said.endswith(
            "to run schedule 'nightly' now; its next fire time is unchanged\n"
        )
        (job,) = cli.documents("jobs", {"schedule_id": "nightly"})
        assert job["state"] == "queued" and job["task_id"] == "report"
        assert str(bson.Binary.as_uuid(job["_id"])) in said
        (after,) = cli.documents("schedules", {"_id": "nightly"})
        assert after["next_fire_time"] == before["next_fire_time"]
        assert cli("run-now", "broken") == 1
        assert "is quarantined" in capsys.readouterr().err
        assert cli("run-now", "nope") == 1


class TestPurge:
    """``purge`` runs the store's cleanup: expired results go, fresh ones stay."""

    def test_purge(
        self, cli: Cli, seeded: Seeded, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert cli("purge") == 0
        output = capsys.readouterr().out
        assert output.startswith("ran the store's cleanup\n")
        assert row(output, "stored results") == ["stored results", "2", "1"]
        assert row(output, "running jobs") == ["running jobs", "1", "1"]

        def job(job_id: str) -> Any:
            query = {"_id": uuid_to_bson(uuid.UUID(job_id))}
            (document,) = cli.documents("jobs", query)
            return document

        assert "result" not in job(seeded.expired_result)  # kept: the fire time record
        assert job(seeded.kept_result)["result"]["outcome"] == "success"
        assert job(seeded.running_job)["state"] == "acquired"

        assert cli("status") == 0
        output = capsys.readouterr().out
        assert row(output, seeded.expired_result)[3:6:2] == ["-", "-"]
        assert row(output, seeded.kept_result)[3] == "success"


class TestErrors:
    """Each class of error has its exit status and a one-line message, no secrets."""

    def test_missing_uri(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("MONGODB_URI", raising=False)
        assert main(["status"]) == 2
        assert capsys.readouterr().err == (
            "error: no MongoDB URI: pass --uri, or set MONGODB_URI\n"
        )

    def test_uri_from_the_environment(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("MONGODB_URI", f"mongodb://user:{PASSWORD}@host:port/")
        assert main(["status"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --uri is not a valid MongoDB URI")
        assert PASSWORD not in err
        assert err.count("\n") == 1

    @pytest.mark.parametrize(
        "uri",
        [
            pytest.param("http://example.invalid", id="scheme"),
            pytest.param(f"mongodb://u:{PASSWORD}@host:99999/", id="port"),
        ],
    )
    def test_bad_uri(
        self,
        uri: str,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("MONGODB_URI", uri)
        assert main(["pause", "x"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --uri ")
        assert PASSWORD not in err
        assert err.count("\n") == 1

    @pytest.mark.parametrize("command", [["status"], ["demo"], ["dashboard"]])
    def test_password_on_the_command_line(
        self,
        command: list[str],
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Other users of the host can read it (``ps``): it is warned about."""
        uri = f"mongodb://ops:{PASSWORD}@host:99999/"  # refused before connecting
        assert main([*command, "--uri", uri]) == 2
        warning, error = capsys.readouterr().err.splitlines()
        assert warning == (
            "warning: the URI given with --uri carries a password, which other users "
            "of this host can read in the process list; set the MONGODB_URI "
            "environment variable instead"
        )
        assert error.startswith("error: --uri is not a valid MongoDB URI")
        assert PASSWORD not in error

        # Not for a URI without a password, nor for one from the environment
        assert main([*command, "--uri", "mongodb://ops@host:99999/"]) == 2
        monkeypatch.setenv("MONGODB_URI", uri)
        assert main(command) == 2
        assert "warning" not in capsys.readouterr().err

    def test_bad_database_name(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cli.database = "bad.name"
        assert cli("status") == 2
        assert "forbidden characters" in capsys.readouterr().err

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            pytest.param(
                ["status", "--limit", "-1"],
                "argument --limit: must not be negative, not -1",
                id="negative limit",
            ),
            pytest.param(
                ["status", "--limit", str(2**64)],
                f"argument --limit: must be at most {2**63 - 1}, not {2**64}",
                id="limit beyond 64 bits",
            ),
            pytest.param(
                ["status", "--limit", "ten"],
                "argument --limit: must be a whole number, not 'ten'",
                id="limit no number",
            ),
            pytest.param(
                ["status", "--timeout", "0"], "must be more than 0", id="timeout"
            ),
            pytest.param(
                ["pause", "x", "--serializer", "yaml"],
                "invalid choice",
                id="serializer",
            ),
            pytest.param(
                ["dashboard", "--port", "99999"],
                "argument --port: must be from 1 to 65535, not 99999",
                id="port",
            ),
            pytest.param(
                ["dashboard", "--port", "0"],
                "argument --port: must be from 1 to 65535, not 0",
                id="port 0",
            ),
            pytest.param(
                ["demo", "--seconds", "-1"], "must be more than 0", id="seconds"
            ),
        ],
    )
    def test_bad_option(
        self, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with pytest.raises(SystemExit) as exc_info:
            main(argv)

        assert exc_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err
        assert "Traceback" not in err

    def test_bad_root_path(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("MONGODB_URI", "mongodb://127.0.0.1:1/")
        assert main(["dashboard", "--root-path", "ops scheduler"]) == 2
        assert capsys.readouterr().err == (
            "error: root_path must be empty or a path such as '/ops/scheduler', not "
            "'ops scheduler'\n"
        )

    def test_unreachable_server(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The driver's short selection timeout ends the retries within --timeout."""
        address = f"127.0.0.1:{free_port()}"
        uri = f"mongodb://user:{PASSWORD}@{address}/?serverSelectionTimeoutMS=200"
        monkeypatch.setenv("MONGODB_URI", uri)
        started = time.monotonic()
        assert main(["status", "--timeout", "2"]) == 3
        assert time.monotonic() - started < 10
        err = capsys.readouterr().err
        assert PASSWORD not in err
        *warnings, error = err.splitlines()
        assert all(
            line.startswith("warning: Temporary MongoDB error") for line in warnings
        )
        assert error.startswith("error: ")
        assert address in error

    def test_deadline(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without a short selection timeout, --timeout cuts the wait short."""
        address = f"127.0.0.1:{free_port()}"
        monkeypatch.setenv("MONGODB_URI", f"mongodb://user:{PASSWORD}@{address}/")
        started = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            assert main(["pause", "x", "--timeout", "1"]) == 3
            gc.collect()  # an unclosed client warns when it is collected

        assert time.monotonic() - started < 8
        assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
        err = capsys.readouterr().err
        assert err.startswith(f"error: no answer from MongoDB at {address} within 1 s")
        assert "the change may or may not have been made" in err
        assert PASSWORD not in err
        assert err.count("\n") == 1

    @pytest.mark.wire
    @needs_mongoeco
    def test_authentication_failure(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with mongoeco_process(auth=("ops", "right-password")) as port:
            uri = (
                f"mongodb://ops:{PASSWORD}@127.0.0.1:{port}/?directConnection=true"
                f"&authMechanism=SCRAM-SHA-256"
            )
            monkeypatch.setenv("MONGODB_URI", uri)
            assert main(["status", "--timeout", "10"]) == 3

        err = capsys.readouterr().err
        assert "error: Authentication failed" in err
        assert PASSWORD not in err
        assert err.count("\n") == 1

    def test_help_explains_exit_statuses(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        for argv in (["--help"], ["status", "--help"], ["purge", "--help"]):
            with pytest.raises(SystemExit) as exc_info:
                main(argv)

            assert exc_info.value.code == 0
            output = capsys.readouterr().out
            assert "exit statuses:" in output
            assert "130  interrupted" in output
            assert "MONGODB_URI" in output

        with pytest.raises(SystemExit):
            main(["--help"])

        output = capsys.readouterr().out
        for command in ("demo", "status", "pause", "resume", "remove", "purge"):
            assert re.search(rf"^    {command} ", output, re.MULTILINE)

    @pytest.mark.parametrize(
        ("argv", "said"),
        [
            pytest.param(["status"], "error: interrupted\n", id="status"),
            pytest.param(
                ["pause", "x"],
                "error: interrupted (the change may or may not have been made)\n",
                id="pause",
            ),
        ],
    )
    def test_interrupted(self, argv: list[str], said: str) -> None:
        """Ctrl-C: one line, exit status 130, and no traceback."""
        # A server that never answers: the command waits for it
        with socket.create_server(("127.0.0.1", 0)) as silent:
            silent.settimeout(60)
            uri = f"mongodb://127.0.0.1:{silent.getsockname()[1]}/"
            process = subprocess.Popen(
                [sys.executable, "-m", "apscheduler_mongo", *argv, "--timeout", "60"],
                env={**os.environ, "MONGODB_URI": uri},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            connection, _ = silent.accept()  # the command is waiting for an answer
            with connection:
                process.send_signal(signal.SIGINT)
                out, err = process.communicate(timeout=30)

        assert (process.returncode, out, err) == (130, "", said)

    def test_module_exit_status(self) -> None:
        """``python -m apscheduler_mongo`` exits with the command's status."""
        process = subprocess.run(
            [sys.executable, "-m", "apscheduler_mongo", "status"],
            capture_output=True,
            text=True,
            env={"PATH": ""},
            timeout=60,
            check=False,
        )
        assert process.returncode == 2
        assert process.stderr.startswith("error: no MongoDB URI")


SIGNING_KEY = "cli-test-signing-key-0123456789"


@pytest.mark.usefixtures("seeded")
class TestSigning:
    """``sign`` signs a store in place; changes keep a signed store signed."""

    def test_sign_signs_every_schedule(
        self, cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.delenv("APSCHEDULER_MONGO_SIGNING_KEY", raising=False)
        assert cli("sign") == 2  # no key
        key_file = tmp_path / "key"
        key_file.write_text(SIGNING_KEY + "\n")
        assert cli("sign", "--key-file", str(key_file)) == 1  # unsigned, left alone
        assert not cli.documents("tasks", {"mac": {"$exists": True}})
        adopt = ("sign", "--key-file", str(key_file), "--adopt-unsigned")
        assert cli(*adopt, "--dry-run") == 0
        assert not cli.documents("tasks", {"mac": {"$exists": True}})
        assert cli(*adopt) == 0
        signed = cli.documents("schedules", {"mac.call": {"$exists": True}})
        assert len(signed) == len(cli.documents("schedules", {}))
        # Signing again finds nothing to do
        assert cli("sign", "--key-file", str(key_file)) == 0

    def test_a_wrong_signature_is_reported_not_signed(
        self, cli: Cli, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("APSCHEDULER_MONGO_SIGNING_KEY", SIGNING_KEY)
        cli("sign", "--adopt-unsigned")
        cli.update(
            "tasks",
            {"_id": cli.documents("tasks", {})[0]["_id"]},
            {"func": "os:system"},
        )
        assert cli("sign") == 1

    def test_pause_keeps_a_signed_schedule_signed(
        self, cli: Cli, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("APSCHEDULER_MONGO_SIGNING_KEY", SIGNING_KEY)
        cli("sign", "--adopt-unsigned")
        assert cli("pause", "nightly") == 0
        [document] = cli.documents("schedules", {"_id": "nightly"})
        assert document["paused"] is True
        codec = Codec(PickleSerializer(), Signer(SIGNING_KEY), scope=cli.database)
        codec.check("schedules", document, "call")
        codec.check("schedules", document, "trigger")

    def test_a_change_without_the_key_is_refused(
        self, cli: Cli, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without the key, a change on a signed store would write it unsigned."""
        monkeypatch.setenv("APSCHEDULER_MONGO_SIGNING_KEY", SIGNING_KEY)
        assert cli("sign", "--adopt-unsigned") == 0
        monkeypatch.delenv("APSCHEDULER_MONGO_SIGNING_KEY")
        assert cli("pause", "nightly") == 3
        [document] = cli.documents("schedules", {"_id": "nightly"})
        assert document.get("paused") is not True

    def test_pause_refuses_an_unsigned_schedule_with_a_key(
        self, cli: Cli, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With a key, a change reads the schedule only once its signature checks."""
        monkeypatch.setenv("APSCHEDULER_MONGO_SIGNING_KEY", SIGNING_KEY)
        assert cli("pause", "nightly") == 1
        assert cli("pause", "nightly", "--accept-unsigned") == 0
