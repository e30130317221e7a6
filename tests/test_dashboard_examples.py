"""
The dashboard's mounting examples (``examples/dashboard_*.py``), each run as the
docs show it: behind the host application's check, actions audited by operator.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from apscheduler_mongo import MongoDBDataStore

from .support.fake_servers import free_port
from .support.items import add_task
from .support.stores import announcing_store
from .support.tiers import WIRE_ONLY
from .test_dashboard import _add_schedules, _token
from .test_examples import EXAMPLES, import_example

pytestmark = pytest.mark.anyio
OPERATORS = {"alice": "token-of-alice", "bob": "token-of-bob"}


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Run an application's lifespan; yield a client of it (over ASGI)."""
    with anyio.fail_after(60):
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://app.test"
            ) as http:
                yield http


def _as(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {OPERATORS[name]}"}


@pytest.mark.parametrize("example", ["dashboard_fastapi", "dashboard_starlette"])
class TestMounted:
    async def test_guarded_and_audited(
        self,
        example: str,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
    ) -> None:
        """Without a token nothing under the mount answers; with one, the pages do,
        and an action is recorded under the operator's name."""
        await add_task(store)
        await _add_schedules(store, "nightly")
        module = import_example(example)
        app = module.create_app(client, database_name, OPERATORS)
        async with running(app) as http:
            refused = [
                await http.get(path, headers=headers)
                for path in ("/scheduler/", "/scheduler/jobs", "/scheduler/events")
                for headers in ({}, {"authorization": "Bearer wrong"})
            ]
            refused.append(await http.post("/scheduler/actions/pause"))
            page = await http.get("/scheduler/", headers=_as("alice"))
            form = {"csrf_token": _token(page.text), "schedule_id": "nightly"}
            paused = await http.post(
                "/scheduler/actions/pause",
                data=form,
                headers={**_as("alice"), "accept": "application/json"},
            )
            audit = await http.get("/scheduler/audit", headers=_as("bob"))
            if example == "dashboard_fastapi":
                assert (await http.get("/api/whoami")).status_code == 401
                whoami = await http.get("/api/whoami", headers=_as("bob"))
                assert whoami.json() == {"operator": "bob"}

        assert [reply.status_code for reply in refused] == [401] * 7
        assert page.status_code == 200
        assert 'href="/scheduler/static/dashboard.css"' in page.text
        assert paused.json() == {"message": "paused schedule 'nightly'"}
        assert (await store.get_schedules({"nightly"}))[0].paused
        assert "<td>alice</td>" in audit.text
        [record] = await client[database_name]["audit"].find({}).to_list(None)
        assert (record["who"], record["action"], record["target"]) == (
            "alice",
            "pause",
            "nightly",
        )


@WIRE_ONLY
class TestBesideWSGI:
    def test_served_alone_under_the_prefix(
        self, wire_uri: str, database_name: str
    ) -> None:
        """Served by uvicorn as the docs say, it answers under the prefix a proxy
        passes on, and records the user the proxy names."""

        async def seed() -> None:
            async with announcing_store(
                wire_uri, database_name, logging.getLogger(__name__)
            ) as other:
                await add_task(other)
                await _add_schedules(other, "nightly")

        anyio.run(seed)
        port = free_port()
        environment = {
            **os.environ,
            "MONGODB_URI": wire_uri,
            "APSCHEDULER_DATABASE": database_name,
            "DASHBOARD_ACTIONS": "1",
            "PYTHONPATH": os.pathsep.join([str(EXAMPLES), *sys.path]),
        }
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "dashboard_wsgi:dashboard",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        url = f"http://127.0.0.1:{port}/scheduler/"
        try:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, process.communicate()[1]
                try:
                    page = httpx.get(url, timeout=5)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the dashboard did not answer"
                    time.sleep(0.1)

            with httpx.Client(cookies=page.cookies) as http:
                paused = http.post(
                    f"{url}actions/pause",
                    data={"csrf_token": _token(page.text), "schedule_id": "nightly"},
                    headers={"accept": "application/json", "x-forwarded-user": "carol"},
                )
                audit = http.get(f"{url}audit")
        finally:
            process.terminate()
            process.communicate(timeout=15)

        assert page.status_code == 200
        assert 'href="/scheduler/static/dashboard.css"' in page.text
        assert paused.json() == {"message": "paused schedule 'nightly'"}
        assert "<td>carol</td>" in audit.text
