"""
The trust boundary: whoever can only write the database runs no code on our hosts.

An attacker with raw write access (no key) tampers with the database along every
path in :data:`tests.support.attack.PATHS`; each payload would touch a marker file of
its own if it ran. The victims are a scheduler, a worker that configured no task,
``apscheduler-mongo status`` (each a process of its own) and the dashboard page.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from apscheduler.eventbrokers.local import LocalEventBroker
from pymongo import MongoClient

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo.dashboard import Dashboard

from .support.attack import (
    ALLOWED,
    PATHS,
    RUNS,
    marker,
    publish_evil_event,
    set_up,
    tamper,
    write_evil_module,
)
from .support.tiers import MULTI_PROCESS

pytestmark = [pytest.mark.anyio, *MULTI_PROCESS]

KEY = "attack-test-signing-key-0123456789"
#: How long the victim schedulers run after the tampering
RUN_FOR = 8.0
ROOT = Path(__file__).parent.parent


def _environment(
    uri: str, database: str, modules: Path, key: str | None
) -> dict[str, str]:
    env = {
        **os.environ,
        "ATTACK_URI": uri,
        "ATTACK_DATABASE": database,
        "MONGODB_URI": uri,
        # The module the event names is importable, should anything try
        "PYTHONPATH": os.pathsep.join([str(modules), str(ROOT)]),
    }
    env.pop("APSCHEDULER_MONGO_SIGNING_KEY", None)
    if key is not None:
        env["ATTACK_KEY"] = key
        env["APSCHEDULER_MONGO_SIGNING_KEY"] = key

    return env


def _victims(env: dict[str, str], secured: bool) -> list[subprocess.Popen[bytes]]:
    flags = ["--secured"] if secured else []
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.attack", role, str(RUN_FOR), *flags],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for role in ("both", "worker")
    ]


#: When the attacker publishes the event, once the victims' brokers run
EVENT_AFTER = 4.0


def _finish(victims: list[subprocess.Popen[bytes]]) -> list[str]:
    outputs = []
    for victim in victims:
        output, _ = victim.communicate(timeout=RUN_FOR + 60)
        outputs.append(output.decode(errors="replace"))
        assert victim.returncode == 0, outputs[-1]

    return outputs


def _status(env: dict[str, str], database: str) -> str:
    """Run ``apscheduler-mongo status`` as an operator would; return what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "apscheduler_mongo", "status", "--database", database],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert "Schedules" in done.stdout, (done.stdout, done.stderr)
    return done.stdout


async def _dashboard_page(uri: str, database: str) -> str:
    """Open the dashboard page in this process; return its HTML."""
    dashboard = Dashboard(uri, database=database)
    async with dashboard:
        transport = httpx.ASGITransport(app=dashboard)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://dashboard"
        ) as http:
            response = await http.get("/")

    assert response.status_code == 200, response.text
    return response.text


def _ran(markers: Path) -> list[str]:
    return [path for path in PATHS if marker(markers, path).exists()]


@pytest.fixture
def signed() -> bool:
    """Whether the legitimate app signs (overridden to ``False`` where it does not)."""
    return True


@pytest.fixture
async def tampered(
    wire_uri: str, database_name: str, tmp_path: Path, signed: bool
) -> AsyncIterator[tuple[str, Path, Path]]:
    """A database the legitimate app set up (with the key if ``signed``), then the
    attacker's writes."""
    markers, modules = tmp_path / "markers", tmp_path / "modules"
    markers.mkdir()
    write_evil_module(modules, markers)
    async with AsyncExitStack() as exit_stack:
        broker = LocalEventBroker()
        logger = logging.getLogger("attack")
        await broker.start(exit_stack, logger)
        store = MongoDBDataStore(
            wire_uri,
            database=database_name,
            signing_key=KEY if signed else None,
            allowed_callables=ALLOWED,
        )
        await store.start(exit_stack, broker, logger)
        await set_up(store, markers)

    tamper(wire_uri, database_name, markers)
    yield database_name, markers, modules
    client: MongoClient[dict[str, Any]] = MongoClient(wire_uri)
    with client:
        client.drop_database(database_name)


class TestWithAKey:
    """With a key and allowed callables, no tampering path runs code anywhere."""

    async def test_no_path_runs_and_the_legitimate_schedule_does(
        self,
        wire_uri: str,
        tampered: tuple[str, Path, Path],
        figures: Callable[[str], None],
    ) -> None:
        database, markers, modules = tampered
        env = _environment(wire_uri, database, modules, KEY)
        victims = _victims(env, secured=True)
        await anyio.sleep(EVENT_AFTER)
        publish_evil_event(wire_uri, database)
        outputs = _finish(victims)
        status = _status(env, database)
        page = await _dashboard_page(wire_uri, database)

        assert _ran(markers) == [], outputs
        client: MongoClient[dict[str, Any]] = MongoClient(wire_uri)
        with client:
            db = client[database]
            runs = db[RUNS].count_documents({})
            quarantined = {
                doc["_id"]: doc["quarantine"]["reason"]
                for doc in db["schedules"].find({"quarantine": {"$exists": True}})
            }
            jobs: list[dict[str, Any]] = list(db["jobs"].find({"state": "finished"}))

        # The legitimate schedule kept running, in the scheduler
        assert runs >= 3, outputs
        # Every tampered schedule was quarantined, saying why; the legitimate ones not
        assert set(quarantined) == {
            "args",
            "trigger",
            "new-task",
            "func-swap",
            "admin",
            "stripped",
        }, quarantined
        assert "signature" in quarantined["args"]
        assert "no signature" in quarantined["stripped"]
        assert "refused" in quarantined["func-swap"]
        assert "refused" in quarantined["new-task"]
        # The event was dropped, saying so
        assert any("Dropping event" in output for output in outputs), outputs
        # The viewers showed the gadget as text
        assert "os" in status and "system" in status
        assert "system" in page
        figures(
            f"{len(PATHS)} tampering paths, 0 ran; the legitimate schedule ran "
            f"{runs} times; {len(quarantined)} schedules quarantined; "
            f"{len(jobs)} finished jobs"
        )

    async def test_a_scheduler_left_without_the_key_refuses_to_start(
        self, wire_uri: str, tampered: tuple[str, Path, Path]
    ) -> None:
        """It would read what others signed unchecked, and run the payloads."""
        database, markers, modules = tampered
        env = _environment(wire_uri, database, modules, None)
        [victim, worker] = _victims(env, secured=False)
        for process in (victim, worker):
            output, _ = process.communicate(timeout=RUN_FOR + 60)
            assert process.returncode == 1
            assert b"are signed, and this store has no signing key" in output

        assert _ran(markers) == []


class TestWithoutAKey:
    """On a store that never signed, the viewers still run nothing; a scheduler is
    exposed."""

    @pytest.fixture
    def signed(self) -> bool:
        return False

    async def test_viewers_run_nothing(
        self, wire_uri: str, tampered: tuple[str, Path, Path]
    ) -> None:
        database, markers, modules = tampered
        env = _environment(wire_uri, database, modules, None)
        _status(env, database)
        await _dashboard_page(wire_uri, database)

        assert _ran(markers) == []

    async def test_a_scheduler_without_a_key_runs_the_payloads(
        self, wire_uri: str, tampered: tuple[str, Path, Path]
    ) -> None:
        """The control: the markers do show a payload that ran."""
        database, markers, modules = tampered
        env = _environment(wire_uri, database, modules, None)
        victims = _victims(env, secured=False)
        await anyio.sleep(EVENT_AFTER)
        publish_evil_event(wire_uri, database)
        _finish(victims)

        ran = _ran(markers)
        assert {"args", "trigger", "new-task", "func-swap", "splice"} <= set(ran), ran
        # The broker's default serializer imports nothing, key or no key
        assert "event" not in ran
