"""The examples run, as their users would run them."""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from wsgiref.util import setup_testing_defaults

import anyio
import attrs
import httpx
import pytest
from apscheduler import AsyncScheduler, JobOutcome, JobReleased, Scheduler
from apscheduler.datastores.mongodb import MongoDBDataStore as BuiltinMongoDBDataStore
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker, SyncMongoDBDataStore
from apscheduler_mongo._tools import cli

from .support.fake_servers import free_port
from .support.hostile import system_gadget

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture
def wsgi_admin() -> Iterator[ModuleType]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("wsgi_admin")
    finally:
        sys.path.remove(str(EXAMPLES))


def call(app: Any, method: str, path: str) -> tuple[str, Any]:
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path}
    setup_testing_defaults(environ)
    environ["wsgi.input"] = io.BytesIO()
    status: list[str] = []
    body = b"".join(app(environ, lambda s, _headers: status.append(s)))
    return status[0], json.loads(body)


@pytest.mark.wire
class TestWSGIAdmin:
    """The threaded WSGI example lists and pauses schedules while jobs run."""

    def test_views(self, wsgi_admin: ModuleType, wire_uri: str) -> None:
        database = f"apscheduler_mongo_test_{uuid.uuid4().hex[:12]}"
        store = MongoDBDataStore(wire_uri, database=database)
        broker = MongoDBEventBroker(wire_uri, database=database, poll_interval=0.05)
        with Scheduler(data_store=store, event_broker=broker) as scheduler:
            scheduler.add_schedule(
                wsgi_admin.heartbeat, IntervalTrigger(seconds=1), id="heartbeat"
            )
            scheduler.start_in_background()
            with SyncMongoDBDataStore(wire_uri, database=database) as admin:
                app = wsgi_admin.make_app(admin)
                status, body = call(app, "GET", "/schedules")
                assert status == "200 OK"
                assert [item["id"] for item in body] == ["heartbeat"]
                assert body[0]["paused"] is False

                status, body = call(app, "POST", "/schedules/heartbeat/pause")
                assert (status, body) == ("200 OK", {"id": "heartbeat", "paused": True})
                assert scheduler.get_schedule("heartbeat").paused

                status, body = call(app, "POST", "/schedules/heartbeat/resume")
                assert body["paused"] is False
                assert not scheduler.get_schedule("heartbeat").paused

                status, _ = call(app, "POST", "/schedules/nothing/pause")
                assert status == "404 Not Found"


def sync_client(uri: str) -> MongoClient[dict[str, Any]]:
    return MongoClient(uri, serverSelectionTimeoutMS=5000)


@pytest.fixture
def example_database(wire_uri: str) -> Iterator[str]:
    """A database name for an example; the database is dropped afterwards."""
    database = f"apscheduler_mongo_test_{uuid.uuid4().hex[:12]}"
    yield database
    with sync_client(wire_uri) as client:
        client.drop_database(database)


def import_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as the module ``name``, as its users run it."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.mark.wire
class TestFastAPIApp:
    """The FastAPI example adds jobs and hands out their results over HTTP."""

    @pytest.fixture
    async def http(
        self, wire_uri: str, example_database: str
    ) -> AsyncIterator[httpx.AsyncClient]:
        """A client of the application, whose lifespan (the scheduler) is running."""
        fastapi_app = import_example("fastapi_app")
        app = fastapi_app.create_app(wire_uri, example_database)
        transport = httpx.ASGITransport(app=app)
        # Bounds the startup, the test and the shutdown together: the scheduler's task
        # groups, opened at startup, must sit inside the scope
        with anyio.fail_after(60):
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://example"
                ) as client:
                    yield client

    @pytest.mark.anyio
    async def test_add_job_and_fetch_result(self, http: httpx.AsyncClient) -> None:
        response = await http.post("/jobs", json={"x": 1, "y": 2})
        assert response.status_code == 201
        job_id = response.json()["job_id"]

        response = await http.get(f"/jobs/{job_id}", params={"wait": 10})
        assert response.status_code == 200
        assert response.json() == {
            "job_id": job_id,
            "status": "success",
            "value": 3,
            "error": None,
        }

        # APScheduler hands a result out once
        response = await http.get(f"/jobs/{job_id}")
        assert response.status_code == 404

    @pytest.mark.anyio
    async def test_pending_until_done(self, http: httpx.AsyncClient) -> None:
        response = await http.post("/jobs", json={"x": 20, "y": 22, "delay": 1.5})
        job_id = response.json()["job_id"]

        response = await http.get(f"/jobs/{job_id}")
        assert response.json()["status"] == "pending"

        response = await http.get(f"/jobs/{job_id}", params={"wait": 15})
        assert response.json()["status"] == "success"
        assert response.json()["value"] == 42

    @pytest.mark.anyio
    async def test_bad_requests(self, http: httpx.AsyncClient) -> None:
        response = await http.post("/jobs", json={"x": "one", "y": 2})
        assert response.status_code == 422

        response = await http.post("/jobs", json={"x": 1, "y": 2, "delay": 60})
        assert response.status_code == 422

        response = await http.get(f"/jobs/{uuid.uuid4()}")
        assert response.status_code == 404

        response = await http.get("/jobs/not-a-uuid")
        assert response.status_code == 422

    @pytest.mark.slow
    @pytest.mark.parametrize(
        "command",
        [
            pytest.param(["examples/fastapi_app.py"], id="script"),
            pytest.param(["-m", "uvicorn", "examples.fastapi_app:app"], id="uvicorn"),
        ],
    )
    def test_served(
        self, command: list[str], wire_uri: str, example_database: str
    ) -> None:
        """Run as its docstring says, the application serves jobs over real HTTP."""
        port = free_port()
        env = {
            **os.environ,
            "MONGODB_URI": wire_uri,
            "APSCHEDULER_DATABASE": example_database,
        }
        process = subprocess.Popen(
            [sys.executable, *command, "--port", str(port)],
            cwd=EXAMPLES.parent,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            base_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            with httpx.Client(base_url=base_url, timeout=20) as http:
                while True:
                    try:
                        response = http.post("/jobs", json={"x": 2, "y": 3})
                        break
                    except httpx.TransportError:
                        assert process.poll() is None, "the server exited"
                        assert time.monotonic() < deadline, "the server did not start"
                        time.sleep(0.2)

                assert response.status_code == 201
                job_id = response.json()["job_id"]
                response = http.get(f"/jobs/{job_id}", params={"wait": 10})
                assert response.json()["value"] == 5
        finally:
            process.terminate()  # uvicorn shuts down (and stops the scheduler) on it
            _, stderr = process.communicate(timeout=30)

        # uvicorn shuts down gracefully, then may end itself with the signal it got
        assert process.returncode in (0, -signal.SIGTERM), stderr
        assert "Traceback" not in stderr
        assert "Application startup complete" in stderr
        assert "Application shutdown complete" in stderr


#: A line the launcher of examples/scheduler_and_workers.py relays from a process
LAUNCHER_LINE = re.compile(r"^(?P<name>[\w-]+)\s*\| (?P<line>.*)$")


@pytest.mark.wire
@pytest.mark.slow
class TestSchedulerAndWorkers:
    """A scheduler process adds jobs and only the worker processes run them."""

    def test_launch(self, wire_uri: str, example_database: str) -> None:
        completed = subprocess.run(
            [
                sys.executable,
                str(EXAMPLES / "scheduler_and_workers.py"),
                "launch",
                "--uri",
                wire_uri,
                "--database",
                example_database,
                "--seconds",
                "4",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 0, completed.stderr
        assert "Traceback" not in completed.stderr

        pids: dict[str, int] = {}
        added: list[str] = []
        ran: list[tuple[str, str, str, int]] = []  # name, job, fire time, pid
        for raw in completed.stdout.splitlines():
            if not (match := LAUNCHER_LINE.match(raw)):
                continue

            name, words = match["name"], match["line"].split()
            fields = dict(word.split("=", 1) for word in words[1:] if "=" in word)
            if words[0] == "started":
                pids[name] = int(fields["pid"])
            elif words[0] == "added":
                added.append(fields["job"])
            elif words[0] == "ran":
                ran.append((name, fields["job"], fields["fire"], int(fields["pid"])))

        assert sorted(pids) == ["scheduler", "worker-1", "worker-2"], completed.stdout
        workers = {pids["worker-1"], pids["worker-2"]}
        assert len(added) >= 3, completed.stdout

        # Every job ran in a worker process, and never in the scheduler's
        assert all(pid in workers for _, _, _, pid in ran), completed.stdout
        assert all(pids[name] == pid for name, _, _, pid in ran)
        assert all(name != "scheduler" for name, _, _, _ in ran)

        # Each job the scheduler added ran exactly once, each fire time once. The
        # scheduler's stop cancels its loop, which can fall between the store's
        # insert of a job and the JobAdded event that prints "added": so one job
        # (one add is in flight at a time) may run unannounced, never more
        job_ids = [job for _, job, _, _ in ran]
        assert sorted(job_ids) == sorted(set(job_ids))
        assert set(added) <= set(job_ids), completed.stdout
        assert len(set(job_ids) - set(added)) <= 1, completed.stdout
        fire_times = [fire for _, _, fire, _ in ran]
        assert len(fire_times) == len(set(fire_times))

        # One job at a time per worker, each longer than the interval: both worked
        assert {name for name, _, _, _ in ran} == {"worker-1", "worker-2"}
        assert f"summary: scheduler (pid {pids['scheduler']}) ran 0 job(s)" in (
            completed.stdout
        )


def double(value: int) -> int:
    """The task of the schedules that the migration test moves."""
    return value * 2


@pytest.fixture
def builtin_store_runs(wire_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Let APScheduler's built-in MongoDB store start on the wire tier's server.

    The built-in store calls ``MongoClient.server_info()`` (the ``buildinfo`` command)
    when it starts, to check the server's version. The mongoeco stand-in does not
    implement ``buildinfo`` (it answers "unsupported wire command"), so there that one
    call answers MongoDB 7.0; against a real MongoDB (``MONGODB_URI``) nothing is
    replaced.
    """
    with sync_client(wire_uri) as client:
        try:
            client.server_info()
        except OperationFailure:
            monkeypatch.setattr(
                MongoClient,
                "server_info",
                lambda *_args, **_kwargs: {
                    "version": "7.0.0",
                    "versionArray": [7, 0, 0, 0],
                },
            )


@pytest.mark.wire
@pytest.mark.usefixtures("builtin_store_runs")
class TestMigrateFromBuiltin:
    """
    ``export --builtin`` then ``import`` move the built-in store's tasks, schedules
    and jobs over (docs/migration.rst).
    """

    @pytest.fixture
    def old_database(self, wire_uri: str, example_database: str) -> str:
        """A database that APScheduler's built-in store filled."""

        async def fill() -> None:
            store = BuiltinMongoDBDataStore(wire_uri, database=example_database)
            async with AsyncScheduler(data_store=store) as scheduler:
                await scheduler.configure_task(
                    "double", func=double, max_running_jobs=3
                )
                await scheduler.add_schedule(
                    "double", IntervalTrigger(seconds=1), id="every-second", args=[21]
                )
                await scheduler.add_schedule(
                    double,
                    CronTrigger(hour=3, timezone="Europe/Helsinki"),
                    id="nightly",
                    kwargs={"value": 5},
                    paused=True,
                )
                await scheduler.add_job("double", args=[1])

        anyio.run(fill, backend="asyncio")
        return example_database

    @pytest.fixture
    def new_database(self, wire_uri: str, old_database: str) -> Iterator[str]:
        """The database to move the store to; dropped afterwards."""
        yield f"{old_database}_new"
        with sync_client(wire_uri) as client:
            client.drop_database(f"{old_database}_new")

    @pytest.fixture
    def exported(
        self,
        wire_uri: str,
        old_database: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> Path:
        """The built-in store, exported with its jobs."""
        path = tmp_path / "builtin.jsonl"
        argv = ["--uri", wire_uri, "--database", old_database, "--output", str(path)]
        assert cli.main(["export", "--builtin", "--jobs", *argv]) == 0
        assert capsys.readouterr().err.startswith(
            "exported 2 task(s), 2 schedule(s) and 1 job(s)"
        )
        return path

    def test_migrate(
        self,
        wire_uri: str,
        old_database: str,
        new_database: str,
        exported: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        argv = ["--uri", wire_uri, "--database", new_database]
        assert cli.main(["import", str(exported), *argv]) == 0
        assert "added: 2 task(s), 2 schedule(s), 1 job(s)" in capsys.readouterr().out

        async def check() -> None:
            builtin = BuiltinMongoDBDataStore(wire_uri, database=old_database)
            async with AsyncScheduler(data_store=builtin) as scheduler:
                old_schedules = await scheduler.get_schedules()
                old_tasks = await scheduler.get_tasks()
                [old_job] = await scheduler.get_jobs()

            store = MongoDBDataStore(wire_uri, database=new_database)
            async with AsyncScheduler(data_store=store) as scheduler:
                new_tasks = await scheduler.get_tasks()
                assert [attrs.astuple(task) for task in new_tasks] == [
                    attrs.astuple(task) for task in old_tasks
                ]
                new_schedules = await scheduler.get_schedules()
                assert [schedule.id for schedule in new_schedules] == [
                    "every-second",
                    "nightly",
                ]
                for old, new in zip(old_schedules, new_schedules, strict=True):
                    assert new.trigger.__getstate__() == old.trigger.__getstate__()
                    for field in ("task_id", "args", "kwargs", "paused"):
                        assert getattr(new, field) == getattr(old, field), field

                    assert new.next_fire_time == old.next_fire_time

                [new_job] = await scheduler.get_jobs()
                assert (new_job.id, new_job.args) == (old_job.id, old_job.args)

                # This store runs the moved schedule
                with anyio.fail_after(20):
                    await scheduler.start_in_background()
                    while True:
                        event = await scheduler.get_next_event(JobReleased)
                        if event.schedule_id == "every-second":
                            break

                assert event.outcome is JobOutcome.success

        anyio.run(check, backend="asyncio")

    def test_refuses_the_builtin_database(
        self,
        wire_uri: str,
        old_database: str,
        exported: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """This store will not start on a database that the built-in store used."""

        async def start() -> None:
            store = MongoDBDataStore(wire_uri, database=old_database)
            async with AsyncScheduler(data_store=store):
                pass

        # APScheduler starts the store in a task group: the error comes in a group
        with pytest.RaisesGroup(
            pytest.RaisesExc(RuntimeError, match="built-in MongoDB store"),
            flatten_subgroups=True,
        ):
            anyio.run(start, backend="asyncio")

        # Nor will an import into it, which leaves that database as it was
        with sync_client(wire_uri) as client:
            names = sorted(client[old_database].list_collection_names())

        argv = ["--uri", wire_uri, "--database", old_database]
        assert cli.main(["import", str(exported), *argv]) == 2
        assert "built-in MongoDB store" in capsys.readouterr().err
        with sync_client(wire_uri) as client:
            assert sorted(client[old_database].list_collection_names()) == names

    def test_runs_no_stored_code(
        self,
        wire_uri: str,
        old_database: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A pickle in the built-in store is read by a safe serializer: refused."""
        marker = tmp_path / "ran"
        with sync_client(wire_uri) as client:
            client[old_database]["schedules"].update_one(
                {"_id": "nightly"}, {"$set": {"args": system_gadget(marker)}}
            )

        argv = ["--uri", wire_uri, "--database", old_database]
        path = tmp_path / "builtin.jsonl"
        assert cli.main(["export", "--builtin", *argv, "--output", str(path)]) == 1
        assert "cannot read the store" in capsys.readouterr().err
        assert not marker.exists()
        assert not path.exists()
