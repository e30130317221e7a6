"""
The dashboard beside a WSGI application (Flask, Django...), as a process of its own.

The dashboard needs an event loop for its live stream, so a WSGI application does
not host it in-process. Serve this module with uvicorn beside the application, on
loopback, and let the reverse proxy that fronts the application route
``/scheduler/`` to it, behind the proxy's (or the application's) authentication::

    MONGODB_URI=... uvicorn examples.dashboard_wsgi:dashboard --host 127.0.0.1 \\
        --port 8765

With nginx::

    location /scheduler/ {
        auth_request /auth;              # your application's check
        proxy_pass http://127.0.0.1:8765;  # passes the prefix on
        proxy_buffering off;             # the live event stream
        proxy_set_header X-Forwarded-User $remote_user;
    }

Whether the proxy passes the ``/scheduler`` prefix on (as here) or strips it, the
dashboard answers, because it knows its ``root_path``. It trusts the user name the
proxy sets (``X-Forwarded-User``) for its audit trail only: the proxy must set it
on every request (overwriting any the client sent), and nothing but the proxy may
reach the port.
"""

from __future__ import annotations

import os

from starlette.requests import Request

from apscheduler_mongo.dashboard import Dashboard


def forwarded_user(request: Request) -> str | None:
    """Return the user the proxy authenticated (it sets the header on each request)."""
    return request.headers.get("x-forwarded-user") or None


#: The dashboard, for ``uvicorn examples.dashboard_wsgi:dashboard`` (served alone,
#: it handles its lifespan itself)
dashboard = Dashboard(
    os.environ.get("MONGODB_URI", "mongodb://127.0.0.1:27017/"),
    database=os.environ.get("APSCHEDULER_DATABASE", "apscheduler"),
    actions=os.environ.get("DASHBOARD_ACTIONS") == "1",
    csrf_secret=os.environ.get("DASHBOARD_CSRF_SECRET"),
    root_path="/scheduler",
    identify=forwarded_user,
)
