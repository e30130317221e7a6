"""
The web dashboard: its panels, paging, actions and their CSRF protection, escaping,
the commands a page costs, live updates, and the page in a real browser.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import bson
import bson.errors
import httpx
import pytest
import uvicorn
from apscheduler import ConflictPolicy, Job, JobOutcome, JobResult, Schedule
from apscheduler.triggers.interval import IntervalTrigger
from bson import Binary
from pymongo import MongoClient
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._marshalling import to_micros, uuid_to_bson
from apscheduler_mongo.dashboard import Dashboard, _csrf

from .support.commands import CommandLog
from .support.fake_servers import free_port
from .support.hostile import (
    HUGE_INTEGER,
    exec_gadget,
    popen_gadget,
    system_gadget,
)
from .support.index_rules import queries_of, served
from .support.items import add_task, due_schedule
from .support.stores import announcing_store
from .support.tiers import WIRE_ONLY

pytestmark = pytest.mark.anyio
HOSTILE = "<script>alert('x')</script>"
SECRET = b"a csrf secret for the tests"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _token(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page)
    assert match, "the page has no action form"
    return match.group(1)


@asynccontextmanager
async def browsing(dashboard: Dashboard) -> AsyncIterator[httpx.AsyncClient]:
    """Open the dashboard and an HTTP client of it (in process, over ASGI)."""
    async with dashboard:
        transport = httpx.ASGITransport(app=dashboard)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://dashboard.test"
        ) as http:
            yield http


async def _add_schedules(store: MongoDBDataStore, *ids: str, **options: Any) -> None:
    """Add schedules of ``task`` firing hourly, the first fire time a second ago."""
    for schedule_id in ids:
        due = due_schedule(schedule_id)
        schedule = Schedule(
            id=due.id,
            task_id=due.task_id,
            trigger=IntervalTrigger(hours=1),
            job_executor="async",
            **options,
        )
        schedule.next_fire_time = due.next_fire_time
        await store.add_schedule(schedule, ConflictPolicy.exception)


class TestPanels:
    async def test_every_panel(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(store, max_running_jobs=3)
        await _add_schedules(store, "nightly", args=(42,), kwargs={"to": "ops"})
        running = Job(task_id="task", executor="async")
        await store.add_job(running)
        failed = Job(
            task_id="task", executor="async", result_expiration_time=timedelta(hours=1)
        )
        await store.add_job(failed)
        claimed = await store.acquire_jobs("worker-1", timedelta(minutes=5), 2)
        assert [job.id for job in claimed] == [running.id, failed.id]
        finishing = claimed[1]
        await store.release_job(
            "worker-1",
            finishing,
            JobResult.from_job(
                finishing, JobOutcome.error, exception=ValueError("disk <full>")
            ),
        )
        await store.add_job(Job(task_id="task", executor="async"))

        async with browsing(Dashboard(client, database=database_name)) as http:
            reply = await http.get("/")

        page = reply.text
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/html")
        # Tasks, with running count and cap; queued jobs per task
        assert re.search(
            r'data-task="task">.*<td class="n">1</td><td class="n">3</td>'
            r'<td class="n">1</td>',
            page,
        )
        # Schedules, with their arguments' repr (escaped)
        assert 'data-schedule="nightly"' in page
        assert "42, to=&#39;ops&#39;" in page
        # Running jobs, with owner and lease
        assert f'data-job="{running.id}"' in page
        assert "worker-1" in page
        # Results with outcome and error, escaped
        assert f'data-result="{finishing.id}"' in page
        assert "ValueError: disk &lt;full&gt;" in page
        # No action is offered: they are off by default
        assert 'method="post"' not in page

    async def test_unreadable_schedule_shown_as_such(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(store)
        await _add_schedules(store, "broken")
        await client[database_name]["schedules"].update_one(
            {"_id": "broken"}, {"$set": {"trigger": b"not a trigger"}}
        )
        async with browsing(Dashboard(client, database=database_name)) as http:
            page = (await http.get("/")).text

        assert 'data-schedule="broken"' in page
        assert "(unreadable: JSONDecodeError: " in page
        assert "its trigger or arguments cannot be decoded" in page

    async def test_everything_escaped(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(store, task_id=HOSTILE)
        schedule = due_schedule(HOSTILE, task_id=HOSTILE)
        # Passed as Any: APScheduler's converters confuse mypy about these types
        arguments: dict[str, Any] = {"args": (HOSTILE,)}
        schedule = Schedule(
            id=HOSTILE,
            task_id=HOSTILE,
            trigger=schedule.trigger,
            job_executor="async",
            **arguments,
        )
        await store.add_schedule(schedule, ConflictPolicy.exception)
        await store.add_job(Job(task_id=HOSTILE, executor="async"))
        dashboard = Dashboard(client, database=database_name, actions=True)
        async with browsing(dashboard) as http:
            page = (await http.get("/")).text
            panels = (await http.get("/panels")).text

        for body in (page, panels):
            assert "<script>alert" not in body
            assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in body

        # The only scripts are the dashboard's own file
        assert re.findall(r"<script[^>]*>", page) == [
            '<script src="/static/dashboard.js" defer>'
        ]

    async def test_headers_and_no_secrets(
        self, client: Any, database_name: str
    ) -> None:
        dashboard = Dashboard(client, database=database_name)
        async with browsing(dashboard) as http:
            reply = await http.get("/")
            script = await http.get("/static/dashboard.js")

        assert "default-src 'self'" in reply.headers["content-security-policy"]
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert script.status_code == 200
        assert "EventSource" in script.text
        assert "mongodb://" not in reply.text
        assert "mongodb://" not in repr(dashboard)
        cookie = reply.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie

    async def test_paging(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(store)
        ids = [f"s-{n}" for n in range(7)]
        await _add_schedules(store, *ids)
        seen: list[str] = []
        dashboard = Dashboard(client, database=database_name, page_size=3)
        async with browsing(dashboard) as http:
            url = "/"
            for _ in range(4):
                page = (await http.get(url)).text
                seen += re.findall(r'<tr data-schedule="([^"]+)"', page)
                more = re.search(r'href="(/\?after=[^"]+)" data-page', page)
                if more is None:
                    break

                url = more.group(1)

        assert seen == ids
        assert '<span class="count">7</span>' in page


class TestUntrustedData:
    """
    The database is untrusted input: the page runs no code stored in it, shows what
    it holds as the schedulers read it, and one value it cannot show spoils only its
    own cell.
    """

    async def test_gadgets_shown_as_text(
        self, store: MongoDBDataStore, client: Any, database: Any, tmp_path: Path
    ) -> None:
        marker = tmp_path / "ran"
        await add_task(store)
        await _add_schedules(store, "s")
        job = Job(
            task_id="task", executor="async", result_expiration_time=timedelta(hours=1)
        )
        await store.add_job(job)
        (claimed,) = await store.acquire_jobs("worker-1", timedelta(minutes=5), 1)
        failure = JobResult.from_job(claimed, JobOutcome.error, exception=OSError())
        await store.release_job("worker-1", claimed, failure)
        await database["schedules"].update_one(
            {"_id": "s"},
            {"$set": {"args": system_gadget(marker), "trigger": popen_gadget(marker)}},
        )
        await database["jobs"].update_one(
            {"_id": uuid_to_bson(job.id)},
            {"$set": {"result.exception": exec_gadget(marker)}},
        )
        dashboard = Dashboard(client, database=database.name, actions=True)
        async with browsing(dashboard) as http:
            reply = await http.get("/")

        page = reply.text
        assert reply.status_code == 200
        system = f"{os.system.__module__}.system(&#39;touch {marker}&#39;)"
        assert f'<td class="args">*{system}</td>' in page
        assert f"subprocess.Popen([&#39;touch&#39;, &#39;{marker}&#39;])" in page
        assert f'<td class="error">builtins.exec(&#34;open(&#39;{marker}' in page
        assert not marker.exists()

    async def test_paused_and_quarantined_as_the_schedulers_read_them(
        self, store: MongoDBDataStore, client: Any, database: Any
    ) -> None:
        """
        ``paused`` other than true (a string left by a hand edit) does not pause a
        schedule; a ``quarantine`` field, whatever it holds, sets it aside.
        """
        await add_task(store)
        await _add_schedules(store, "hand-edited", "set-aside")
        schedules = database["schedules"]
        await schedules.update_one({"_id": "hand-edited"}, {"$set": {"paused": "true"}})
        await schedules.update_one({"_id": "set-aside"}, {"$set": {"quarantine": None}})
        dashboard = Dashboard(client, database=database.name, actions=True)
        async with browsing(dashboard) as http:
            page = (await http.get("/")).text

        edited = _row(page, "hand-edited")
        assert '<tr data-schedule="hand-edited" class=" problem">' in edited
        assert (
            '<td class="state">? (wrong type &#39;str&#39;: &#39;true&#39;, taken as '
            "not paused)</td>" in edited
        )
        assert 'class="pause"' in edited
        set_aside = _row(page, "set-aside")
        assert "<td>quarantined: no reason recorded</td>" in set_aside
        assert 'class="pause"' not in set_aside
        assert 'class="resume"' not in set_aside
        assert 'class="remove"' in set_aside

    async def test_one_value_that_cannot_be_shown(
        self, tier: str, store: MongoDBDataStore, client: Any, database: Any
    ) -> None:
        """An integer too long for repr, a UUID of three bytes, odd ids and names."""
        await add_task(store)
        await _add_schedules(store, "huge", "fine", args=("ok",))
        await database["schedules"].update_one(
            {"_id": "huge"}, {"$set": {"args": pickle.dumps((1, HUGE_INTEGER))}}
        )
        odd = {
            "_id": Binary(b"odd", 4),
            "state": "finished",
            "finished_time": to_micros(datetime.now(timezone.utc)),
        }
        # pymongo before 4.19 refuses to decode such a binary at all (InvalidBSON,
        # from inside the driver): no reader can show it there
        short_uuids = tier == "mongomock" or _decodes(odd)
        if short_uuids:
            await database["jobs"].insert_one(odd)

        await database["tasks"].insert_one({"_id": 7, "func": {"not": "a name"}})
        async with browsing(Dashboard(client, database=database.name)) as http:
            reply = await http.get("/")

        page = reply.text
        assert reply.status_code == 200
        assert (
            '<td class="args">1, (cannot be shown: ValueError: Exceeds the limit'
            in _row(page, "huge")
        )
        assert '<td class="args">&#39;ok&#39;</td>' in _row(page, "fine")
        if short_uuids:
            assert 'data-result="Binary(b&#39;odd&#39;, 4)"' in page

        assert (
            '<tr data-task="7"><td>7</td><td>{&#39;not&#39;: &#39;a name&#39;}' in page
        )


def _decodes(document: dict[str, Any]) -> bool:
    """Tell whether this pymongo decodes ``document`` (as the wire tier reads it)."""
    try:
        bson.decode(bson.encode(document))
    except bson.errors.InvalidBSON:
        return False

    return True


class TestNoStore:
    """A mistyped database name: the page says so, and nothing is created."""

    async def test_page_says_so_and_writes_nothing(
        self, client: Any, database: Any
    ) -> None:
        dashboard = Dashboard(
            client, database=database.name, actions=True, csrf_secret=SECRET
        )
        async with browsing(dashboard) as http:
            page = await http.get("/")
            panels = await http.get("/panels")
            nonce = page.cookies[_csrf.COOKIE]  # the page has no form: no token
            form = {"csrf_token": _csrf.token_for(SECRET, nonce), "schedule_id": "s"}
            paused = await http.post(
                "/actions/pause", data=form, headers={"accept": "application/json"}
            )
            purged = await http.post(
                "/actions/purge", data=form, headers={"accept": "application/json"}
            )

        assert page.status_code == 404
        assert f"Database {database.name} holds no store" in page.text
        assert page.headers["content-type"].startswith("text/html")
        assert panels.status_code == 404
        for reply in (paused, purged):
            assert reply.status_code == 404
            assert "holds no store" in reply.json()["message"]

        assert await database.list_collection_names() == []


def _row(page: str, schedule_id: str) -> str:
    """Return the HTML of a schedule's row."""
    start = page.index(f'<tr data-schedule="{schedule_id}"')
    return page[start : page.index("</tr>", start)]


class TestActions:
    async def test_read_only_by_default(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(store)
        await _add_schedules(store, "s")
        async with browsing(Dashboard(client, database=database_name)) as http:
            await http.get("/")
            reply = await http.post("/actions/pause", data={"schedule_id": "s"})

        assert reply.status_code == 403
        assert "actions are off" in reply.text
        assert not (await store.get_schedules({"s"}))[0].paused

    async def test_pause_resume_remove_purge(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(store)
        await _add_schedules(store, "s", "t")
        dashboard = Dashboard(client, database=database_name, actions=True)
        json = {"accept": "application/json"}
        async with browsing(dashboard) as http:
            token = _token((await http.get("/")).text)
            form = {"csrf_token": token, "schedule_id": "s"}
            paused = await http.post("/actions/pause", data=form, headers=json)
            assert paused.json() == {"message": "paused schedule 's'"}
            assert (await store.get_schedules({"s"}))[0].paused
            assert 'class="resume"' in (await http.get("/panels")).text

            resumed = await http.post("/actions/resume", data=form, headers=json)
            assert resumed.json()["message"].startswith("resumed schedule 's'")
            assert not (await store.get_schedules({"s"}))[0].paused

            # A plain form (no script): redirected back to the page, which says it
            removed = await http.post("/actions/remove", data=form)
            assert removed.status_code == 303
            assert removed.headers["location"].startswith("/?said=removed")
            assert [s.id for s in await store.get_schedules()] == ["t"]

            purged = await http.post(
                "/actions/purge", data={"csrf_token": token}, headers=json
            )
            assert purged.json()["message"].startswith("ran the store's cleanup")

            missing = await http.post("/actions/pause", data=form, headers=json)
            assert missing.status_code == 404
            assert "no schedule 's'" in missing.json()["message"]

    @pytest.mark.parametrize(
        "forgery",
        ["wrong token", "no token", "no cookie", "other origin", "cross-site fetch"],
    )
    async def test_csrf_refused(
        self,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
        forgery: str,
    ) -> None:
        await add_task(store)
        await _add_schedules(store, "s")
        dashboard = Dashboard(client, database=database_name, actions=True)
        async with browsing(dashboard) as http:
            token = _token((await http.get("/")).text)
            form = {"csrf_token": token, "schedule_id": "s"}
            headers: dict[str, str] = {}
            if forgery == "wrong token":
                form["csrf_token"] = "0" * 64
            elif forgery == "no token":
                del form["csrf_token"]
            elif forgery == "no cookie":
                http.cookies.clear()
            elif forgery == "other origin":
                headers["origin"] = "https://evil.test"
            else:
                headers["sec-fetch-site"] = "cross-site"

            reply = await http.post("/actions/pause", data=form, headers=headers)

        assert reply.status_code == 403
        assert reply.text.startswith("refused: ")
        assert not (await store.get_schedules({"s"}))[0].paused

    async def test_token_from_another_dashboard_refused(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        """Tokens are signed with the dashboard's secret; a shared one works too."""
        await add_task(store)
        await _add_schedules(store, "s")
        first = Dashboard(client, database=database_name, actions=True)
        second = Dashboard(client, database=database_name, actions=True)
        shared = [
            Dashboard(client, database=database_name, actions=True, csrf_secret="k")
            for _ in range(2)
        ]
        for issuer, checker, accepted in [
            (first, second, False),
            (shared[0], shared[1], True),
        ]:
            async with browsing(issuer) as http:
                token = _token((await http.get("/")).text)
                cookies = http.cookies

            async with browsing(checker) as http:
                http.cookies = cookies
                reply = await http.post(
                    "/actions/pause", data={"csrf_token": token, "schedule_id": "s"}
                )

            assert (reply.status_code == 303) is accepted, reply.text


class TestMounting:
    async def test_behind_a_starlette_middleware(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        """The mounting example of the docs: the host app's check guards every path."""

        class OperatorsOnly(BaseHTTPMiddleware):
            async def dispatch(
                self, request: Request, call_next: RequestResponseEndpoint
            ) -> Response:
                if request.headers.get("authorization") != "Bearer operator":
                    return PlainTextResponse("login first", status_code=401)

                return await call_next(request)

        await add_task(store)
        await _add_schedules(store, "s")
        dashboard = Dashboard(client, database=database_name)
        app = Starlette(
            routes=[
                Mount(
                    "/scheduler", app=dashboard, middleware=[Middleware(OperatorsOnly)]
                )
            ]
        )
        async with dashboard:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://app.test"
            ) as http:
                for path in ("/scheduler/", "/scheduler/panels", "/scheduler/events"):
                    assert (await http.get(path)).status_code == 401

                reply = await http.get(
                    "/scheduler/", headers={"authorization": "Bearer operator"}
                )

        assert reply.status_code == 200
        assert 'data-base="/scheduler/"' in reply.text
        assert 'href="/scheduler/static/dashboard.css"' in reply.text
        assert "path=/scheduler/" in reply.headers["set-cookie"].lower()


class TestRootPath:
    """Behind a proxy that serves it under a prefix, every URL the page uses has it."""

    @pytest.mark.parametrize(
        "path",
        [
            pytest.param("/", id="prefix stripped by the proxy"),
            pytest.param("/ops/scheduler/", id="prefix passed on"),
        ],
    )
    async def test_urls_carry_the_prefix(
        self, store: MongoDBDataStore, client: Any, database_name: str, path: str
    ) -> None:
        await add_task(store)
        await _add_schedules(store, "s", "t")
        dashboard = Dashboard(
            client,
            database=database_name,
            actions=True,
            page_size=1,
            root_path="/ops/scheduler/",
        )
        async with browsing(dashboard) as http:
            reply = await http.get(path)
            page = reply.text
            form = {"csrf_token": _token(page), "schedule_id": "s"}
            # What the browser sends to the prefix, as the proxy passes it on
            cookie = f"{_csrf.COOKIE}={reply.cookies[_csrf.COOKIE]}"
            http.cookies.clear()
            paused = await http.post(
                f"{path}actions/pause", data=form, headers={"cookie": cookie}
            )
            assets = [
                await http.get(f"{path}static/dashboard.{x}") for x in ("js", "css")
            ]
            script = assets[0].text

        assert reply.status_code == 200
        # The stylesheet, the script, the event stream (the script opens it under
        # the base), the forms, the paging links, the cookie
        assert '<link rel="stylesheet" href="/ops/scheduler/static/dashboard.css">' in (
            page
        )
        assert '<script src="/ops/scheduler/static/dashboard.js" defer>' in page
        assert '<body data-base="/ops/scheduler/" ' in page
        assert 'new EventSource(base + "events")' in script
        assert "fetch(location.pathname + location.search" in script
        assert 'action="/ops/scheduler/actions/pause"' in page
        assert 'action="/ops/scheduler/actions/purge"' in page
        assert 'href="/ops/scheduler/?after=s" data-page' in page
        assert "path=/ops/scheduler/" in reply.headers["set-cookie"].lower()
        assert [asset.status_code for asset in assets] == [200, 200]
        assert paused.status_code == 303
        assert paused.headers["location"].startswith("/ops/scheduler/?said=paused")

    async def test_mounting_application_sets_it(
        self, client: Any, store: MongoDBDataStore, database_name: str
    ) -> None:
        """A ``root_path`` in the request (from a mount) takes precedence."""
        await add_task(store)
        dashboard = Dashboard(client, database=database_name, root_path="/elsewhere")
        app = Starlette(routes=[Mount("/scheduler", app=dashboard)])
        async with dashboard:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://app.test"
            ) as http:
                page = (await http.get("/scheduler/")).text

        assert 'data-base="/scheduler/"' in page
        assert "elsewhere" not in page

    @pytest.mark.parametrize("root_path", ["ops", "/ops scheduler", "/a;b", "/<x>"])
    def test_bad_root_path(self, root_path: str) -> None:
        with pytest.raises(ValueError, match="root_path must be empty or a path"):
            Dashboard("mongodb://localhost/", root_path=root_path)


#: Commands that are not the page's: the broker's polls of its collection, and the
#: driver's and the store's handshakes and clock readings
_NOT_THE_PAGE = frozenset({"hello", "isMaster", "ismaster", "ping", "endSessions"})


def _page_commands(log: CommandLog, start: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, command)
        for name, command in log.commands[start:]
        if name not in _NOT_THE_PAGE and command.get(name) != "events"
    ]


@WIRE_ONLY
class TestCost:
    async def test_commands_do_not_grow_with_schedules(
        self,
        store: MongoDBDataStore,
        logged_client: Any,
        command_log: CommandLog,
        database_name: str,
        figures: Any,
    ) -> None:
        """A page of 1,000 schedules costs the commands of a page of 10, each served
        by an index (so on a real server, time does not grow with the store)."""
        await add_task(store)
        costs: dict[int, tuple[int, float]] = {}
        added = 0
        dashboard = Dashboard(logged_client, database=database_name)
        async with browsing(dashboard) as http:
            for total in (10, 1000):
                await _add_schedules(store, *(f"s-{n:04}" for n in range(added, total)))
                added = total
                start = len(command_log.commands)
                started = time.perf_counter()
                reply = await http.get("/")
                elapsed = time.perf_counter() - started
                sent = _page_commands(command_log, start)
                costs[total] = (len(sent), elapsed)
                assert reply.status_code == 200
                assert reply.text.count("<tr data-schedule=") == min(total, 100)

        indexes = {}
        for name in ("schedules", "jobs", "tasks", "schedulers", "history"):
            cursor = await logged_client[database_name][name].list_indexes()
            indexes[name] = [
                list(index["key"].items()) for index in await cursor.to_list(None)
            ]

        queries = [
            query for name, command in sent for query in queries_of(name, command)
        ]
        unserved = [
            query
            for query in queries
            if query.filter and not served(query, indexes[query.collection])
        ]
        # Without a filter: all tasks (a few), the first page of schedules (a walk
        # of the _id index, cut at the page's size) and the count from metadata
        unfiltered = sorted(
            (query.collection, query.origin, list(query.sort))
            for query in queries
            if not query.filter
        )
        figures(
            f"page load: {costs[10][0]} commands with 10 schedules, {costs[1000][0]} "
            f"with 1,000 ({', '.join(sorted(f'{n} {c.get(n)}' for n, c in sent))}); "
            f"{costs[1000][1] * 1000:.0f} ms with 1,000 on this stand-in (which uses "
            f"no index)"
        )
        assert costs[1000][0] == costs[10][0]
        assert not unserved, unserved
        assert unfiltered == [
            ("schedules", "count", []),
            ("schedules", "find", [("_id", 1)]),
            ("tasks", "find", [("_id", 1)]),
        ], unfiltered
        assert ("count", "schedules") in {(n, c.get(n)) for n, c in sent}


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a loopback port; yield its URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
    )
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 (uvicorn sets a flag)
                await anyio.sleep(0.02)

        yield f"http://127.0.0.1:{port}/"
        server.should_exit = True


@WIRE_ONLY
class TestLive:
    async def test_change_elsewhere_announced(
        self,
        wire_uri: str,
        database_name: str,
        logger: logging.Logger,
        figures: Any,
    ) -> None:
        """A job added through another store reaches the page's event stream."""
        dashboard = Dashboard(wire_uri, database=database_name)
        async with announcing_store(wire_uri, database_name, logger) as other:
            await add_task(other)
            async with serving(dashboard) as url, httpx.AsyncClient() as http:
                async with http.stream("GET", f"{url}events") as stream:
                    assert stream.headers["content-type"].startswith(
                        "text/event-stream"
                    )
                    lines = stream.aiter_lines()
                    assert await anext(lines) == "retry: 2000"
                    started = time.perf_counter()
                    await other.add_job(Job(task_id="task", executor="async"))
                    with anyio.fail_after(5):
                        while await anext(lines) != "event: change":
                            pass

                    took = time.perf_counter() - started

                page = (await http.get(url)).text

        figures(f"a job added elsewhere was announced to the page in {took:.2f} s")
        assert '<tr data-queued="task"><td>task</td><td class="n">1</td>' in page


class TestClosing:
    async def test_event_stream_ends_when_the_dashboard_closes(
        self, client: Any, database_name: str
    ) -> None:
        dashboard = Dashboard(client, database=database_name)
        replies: list[httpx.Response] = []
        async with browsing(dashboard) as http:

            async def follow() -> None:
                replies.append(await http.get("/events"))

            with anyio.fail_after(10):
                async with anyio.create_task_group() as group:
                    group.start_soon(follow)
                    await anyio.sleep(0.5)  # the stream is open, waiting for events
                    assert not replies
                    await dashboard.aclose()

        [reply] = replies
        assert reply.status_code == 200
        assert reply.text == "retry: 2000\n\n"


@contextmanager
def dashboard_process(uri: str, database: str, *options: str) -> Iterator[str]:
    """Run ``apscheduler-mongo dashboard``; yield its URL once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apscheduler_mongo",
            "dashboard",
            "--uri",
            uri,
            "--database",
            database,
            "--port",
            str(port),
            *options,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(url, timeout=5).status_code < 500:
                    break
            except httpx.TransportError:
                pass

            assert time.monotonic() < deadline, "the dashboard did not answer"
            time.sleep(0.1)

        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, notice = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover (a hung server)
            process.kill()
            process.communicate()
            raise

    assert process.returncode == 0, notice
    assert f"on {url}" in notice
    assert "It has no login: it listens on this host only." in notice


@WIRE_ONLY
class TestCommandLine:
    def test_serves_alone_on_loopback(self, wire_uri: str, database_name: str) -> None:
        """On a database without a store (a mistyped name): it says so, creates none."""
        options = ("--root-path", "/ops/scheduler")
        with dashboard_process(wire_uri, database_name, *options) as url:
            page = httpx.get(url)
            refused = httpx.post(f"{url}actions/purge")

        assert page.status_code == 404
        assert f"Database {database_name} holds no store" in page.text
        assert 'href="/ops/scheduler/static/dashboard.css"' in page.text
        assert refused.status_code == 403
        mongo: MongoClient[Any]
        with MongoClient(wire_uri) as mongo:
            assert mongo[database_name].list_collection_names() == []

    def test_serves_metrics(self, wire_uri: str, database_name: str) -> None:
        """With the metrics extra, it serves the store's gauges at /metrics."""
        _seed(wire_uri, database_name, ["s-1"])
        with dashboard_process(wire_uri, database_name) as url:
            reply = httpx.get(f"{url}metrics")

        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/plain")
        assert "apscheduler_mongo_schedulers" in reply.text


def _seed(uri: str, database: str, ids: list[str]) -> None:
    async def seed() -> None:
        async with announcing_store(
            uri, database, logging.getLogger(__name__)
        ) as store:
            await add_task(store, max_running_jobs=2)
            await _add_schedules(store, *ids, args=("report",))

    anyio.run(seed)


def _add_job_elsewhere(uri: str, database: str) -> None:
    async def add() -> None:
        async with announcing_store(
            uri, database, logging.getLogger(__name__)
        ) as store:
            await store.add_job(Job(task_id="task", executor="async"))

    anyio.run(add)


@WIRE_ONLY
@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and its driver (Debian packages chromium, "
    "chromium-driver) for the test in a real browser",
)
class TestInABrowser:
    def test_live_page(self, wire_uri: str, database_name: str, figures: Any) -> None:
        """The page shows a live store, updates without a reload, and pauses."""
        from selenium import webdriver
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.wait import WebDriverWait

        ids = ["backup", "daily-report", "hourly-sync"]
        _seed(wire_uri, database_name, ids)
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu"):
            options.add_argument(argument)

        options.add_argument("--window-size=1280,900")
        with dashboard_process(wire_uri, database_name, "--actions") as url:
            driver = webdriver.Chrome(
                service=Service(str(CHROMEDRIVER)), options=options
            )
            try:
                # The page replaces its panels on every live update: an element
                # found just before one goes stale, and is found again
                wait = WebDriverWait(
                    driver, 10, ignored_exceptions=(StaleElementReferenceException,)
                )
                started = time.perf_counter()
                driver.get(url)
                rows = driver.find_elements(By.CSS_SELECTOR, "tr[data-schedule]")
                load = time.perf_counter() - started
                assert [row.get_attribute("data-schedule") for row in rows] == ids
                wait.until(lambda d: d.find_element(By.ID, "live").text == "live")
                driver.execute_script("window.sameDocument = 'yes'")

                # Another process adds a job: it appears without a reload
                assert not driver.find_elements(By.CSS_SELECTOR, "tr[data-queued]")
                added = time.perf_counter()
                _add_job_elsewhere(wire_uri, database_name)
                wait.until(
                    lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-queued='task']")
                )
                appeared = time.perf_counter() - added
                assert driver.execute_script("return window.sameDocument") == "yes"

                # Pause from the page
                button = driver.find_element(
                    By.CSS_SELECTOR, "tr[data-schedule='daily-report'] button.pause"
                )
                button.click()
                wait.until(
                    lambda d: (
                        d.find_element(
                            By.CSS_SELECTOR, "tr[data-schedule='daily-report'] td.state"
                        ).text
                        == "yes"
                    )
                )
                assert (
                    "paused schedule 'daily-report'"
                    in driver.find_element(By.ID, "said").text
                )
                assert driver.execute_script("return window.sameDocument") == "yes"
            finally:
                driver.quit()

        paused = _paused_in_database(wire_uri, database_name)
        figures(
            f"in Chromium: page loaded in {load * 1000:.0f} ms; a job added by "
            f"another process appeared {appeared:.2f} s later, without a reload"
        )
        assert paused == {"backup": False, "daily-report": True, "hourly-sync": False}


def _paused_in_database(uri: str, database: str) -> dict[str, bool]:
    from pymongo import MongoClient
    from pymongo.collection import Collection

    mongo: MongoClient[dict[str, Any]]
    with MongoClient(uri, serverSelectionTimeoutMS=5000) as mongo:
        schedules: Collection[dict[str, Any]] = mongo[database]["schedules"]
        documents = list(schedules.find({}, {"paused": 1}))

    return {document["_id"]: document.get("paused", False) for document in documents}


class TestServerAway:
    async def test_unreachable_server_answers_503(self) -> None:
        """Without a server, each page says so (no credentials) and a later one
        tries again."""
        password = "s3cret-in-uri"
        uri = (
            f"mongodb://ops:{password}@127.0.0.1:{free_port()}/"
            f"?serverSelectionTimeoutMS=100&connectTimeoutMS=100"
        )
        dashboard = Dashboard(uri, actions=True, timeout=0.5)
        transport = httpx.ASGITransport(app=dashboard)
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://dashboard.test"
            ) as http:
                replies = [await http.get("/"), await http.get("/panels")]
                events = await http.get("/events")

            for reply in [*replies, events]:
                assert reply.status_code == 503
                assert reply.text.startswith("The store cannot be read now: ")
                assert password not in reply.text
        finally:
            await dashboard.aclose()


def test_repr_hides_secrets() -> None:
    """The repr names hosts and database, never the password, CSRF secret or key."""
    dashboard = Dashboard(
        "mongodb://user:hunter2@db.example:27017/",
        database="ops",
        csrf_secret=b"csrf-secret-value",
        signing_key="dashboard-signing-key-0123456789",
    )
    shown = repr(dashboard)
    assert "db.example:27017" in shown and "'ops'" in shown
    for secret in ("hunter2", "csrf-secret-value", "dashboard-signing-key"):
        assert secret not in shown
