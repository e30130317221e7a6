"""The command line, as a new user and as an operator run it."""

from __future__ import annotations

import gc
import json
import logging
import re
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import attrs
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
from apscheduler.triggers.interval import IntervalTrigger
from mongomock_motor import AsyncMongoMockClient
from pymongo import AsyncMongoClient, MongoClient

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker
from apscheduler_mongo.__main__ import main
from apscheduler_mongo._marshalling import uuid_to_bson
from apscheduler_mongo._tools.cli import build_parser, run_command
from apscheduler_mongo._tools.status import format_table, when

from .support.fake_servers import free_port
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
    def test_schedules_it_cannot_read(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With the wrong serializer, schedules are listed as unreadable, and why."""
        assert cli("status", "--serializer", "json") == 0
        captured = capsys.readouterr()
        nightly = row(captured.out, "nightly")
        assert nightly[1] == "report"
        assert nightly[2].endswith("(in 8 h)")
        assert nightly[3:] == ["no", "-", "-", "cannot be read here (see the warnings)"]
        leased = row(captured.out, "every-5-min")
        assert leased[4] == "worker-a"
        assert leased[5].endswith(" s)")
        assert "warning: Cannot read schedule 'nightly'" in captured.err

    def test_empty_store(self, cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
        async def create() -> None:
            async with AsyncExitStack() as exit_stack:
                logger = logging.getLogger("apscheduler_mongo.tests")
                store = MongoDBDataStore(cli.target, database=cli.database)
                await store.start(exit_stack, LocalEventBroker(), logger)

        anyio.run(create)
        assert cli("status") == 0
        assert capsys.readouterr().out.count("(none)") == 5

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
        assert row(output, "'not-a-uuid'")[3] == "set aside: its id is no UUID"
        assert "Recent results (4 newest of 4 finished jobs)" in output
        assert row(output, str(finished))[3:] == ["success", "-", "-"]
        assert row(output, str(running))[1:] == ["report", "-", "worker-d", "-"]


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
    def test_bad_uri(self, uri: str, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["pause", "x", "--uri", uri]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --uri ")
        assert PASSWORD not in err
        assert err.count("\n") == 1

    def test_bad_database_name(
        self, cli: Cli, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cli.database = "bad.name"
        assert cli("status") == 2
        assert "forbidden characters" in capsys.readouterr().err

    @pytest.mark.parametrize(
        ("option", "message"),
        [
            pytest.param(["--limit", "-1"], "must not be negative", id="limit"),
            pytest.param(["--timeout", "0"], "must be more than 0", id="timeout"),
            pytest.param(["--serializer", "yaml"], "invalid choice", id="serializer"),
        ],
    )
    def test_bad_option(
        self, option: list[str], message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with pytest.raises(SystemExit) as exc_info:
            main(["status", *option])

        assert exc_info.value.code == 2
        assert message in capsys.readouterr().err

    def test_unreachable_server(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The driver's short selection timeout ends the retries within --timeout."""
        address = f"127.0.0.1:{free_port()}"
        uri = f"mongodb://user:{PASSWORD}@{address}/?serverSelectionTimeoutMS=200"
        started = time.monotonic()
        assert main(["status", "--uri", uri, "--timeout", "2"]) == 3
        assert time.monotonic() - started < 10
        err = capsys.readouterr().err
        assert PASSWORD not in err
        *warnings, error = err.splitlines()
        assert all(
            line.startswith("warning: Temporary MongoDB error") for line in warnings
        )
        assert error.startswith("error: ")
        assert address in error

    def test_deadline(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without a short selection timeout, --timeout cuts the wait short."""
        address = f"127.0.0.1:{free_port()}"
        uri = f"mongodb://user:{PASSWORD}@{address}/"
        started = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            assert main(["pause", "x", "--uri", uri, "--timeout", "1"]) == 3
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
    def test_authentication_failure(self, capsys: pytest.CaptureFixture[str]) -> None:
        with mongoeco_process(auth=("ops", "right-password")) as port:
            uri = (
                f"mongodb://ops:{PASSWORD}@127.0.0.1:{port}/?directConnection=true"
                f"&authMechanism=SCRAM-SHA-256"
            )
            assert main(["status", "--uri", uri, "--timeout", "10"]) == 3

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
            assert "MONGODB_URI" in output

        with pytest.raises(SystemExit):
            main(["--help"])

        output = capsys.readouterr().out
        for command in ("demo", "status", "pause", "resume", "remove", "purge"):
            assert re.search(rf"^    {command} ", output, re.MULTILINE)

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
