"""
A threaded WSGI application with a scheduler and an admin view.

APScheduler's synchronous ``Scheduler`` runs the jobs in the background, on
``MongoDBDataStore`` and ``MongoDBEventBroker``; the web views read and change
schedules through ``SyncMongoDBDataStore`` from the server's request threads.

Run it with ``MONGODB_URI=mongodb://127.0.0.1:27017/ python examples/wsgi_admin.py``
and open http://127.0.0.1:8000/schedules. ``POST /schedules/<id>/pause`` and
``POST /schedules/<id>/resume`` pause and resume a schedule. The same application
object works under any WSGI server (gunicorn, waitress, mod_wsgi, Flask's or Django's
own), since the views are plain blocking code.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from apscheduler import ConflictPolicy, Scheduler
from apscheduler.triggers.interval import IntervalTrigger

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker, SyncMongoDBDataStore

StartResponse = Callable[..., Any]
DATABASE = "apscheduler_wsgi_example"
logger = logging.getLogger(__name__)


def heartbeat() -> None:
    """The job the scheduler runs: log that the application is alive."""
    logger.info("heartbeat at %s", datetime.now(timezone.utc))


def make_app(
    admin: SyncMongoDBDataStore,
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """Return the WSGI application: JSON views over the schedules."""

    def respond(start_response: StartResponse, status: str, body: Any) -> list[bytes]:
        payload = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json")])
        return [payload]

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        parts = [part for part in environ.get("PATH_INFO", "").split("/") if part]
        if method == "GET" and parts == ["schedules"]:
            return respond(
                start_response,
                "200 OK",
                [
                    {
                        "id": schedule.id,
                        "task": schedule.task_id,
                        "paused": schedule.paused,
                        "next_fire_time": str(schedule.next_fire_time),
                    }
                    for schedule in admin.get_schedules()
                ],
            )

        if method == "POST" and len(parts) == 3 and parts[0] == "schedules":
            schedule_id, action = parts[1], parts[2]
            if action in ("pause", "resume"):
                found = admin.get_schedules({schedule_id})
                if not found:
                    return respond(
                        start_response, "404 Not Found", {"error": "no such schedule"}
                    )

                schedule = found[0]
                schedule.paused = action == "pause"
                admin.add_schedule(schedule, ConflictPolicy.replace)
                return respond(
                    start_response,
                    "200 OK",
                    {"id": schedule_id, "paused": schedule.paused},
                )

        return respond(start_response, "404 Not Found", {"error": "not found"})

    return app


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server, answering each request in its own thread."""

    daemon_threads = True


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    uri = os.environ.get("MONGODB_URI", "mongodb://127.0.0.1:27017/")
    store = MongoDBDataStore(uri, database=DATABASE)
    broker = MongoDBEventBroker(uri, database=DATABASE)
    with Scheduler(data_store=store, event_broker=broker) as scheduler:
        scheduler.add_schedule(
            heartbeat,
            IntervalTrigger(seconds=10),
            id="heartbeat",
            conflict_policy=ConflictPolicy.replace,
        )
        scheduler.start_in_background()
        with SyncMongoDBDataStore(uri, database=DATABASE) as admin:
            server = make_server(
                "127.0.0.1", 8000, make_app(admin), server_class=ThreadingWSGIServer
            )
            print("Serving on http://127.0.0.1:8000/schedules")  # noqa: T201
            server.serve_forever()


if __name__ == "__main__":
    main()
