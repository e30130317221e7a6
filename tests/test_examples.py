"""The examples run, as their users would run them."""

from __future__ import annotations

import importlib
import io
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from apscheduler import Scheduler
from apscheduler.triggers.interval import IntervalTrigger

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker, SyncMongoDBDataStore

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
    body = b"".join(app(environ, lambda s, headers: status.append(s)))
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
