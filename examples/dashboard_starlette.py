"""
The dashboard mounted in a Starlette application, behind the application's check.

A ``Mount`` takes middleware of its own, which guards every path under it: here a
bearer token per operator, from ``DASHBOARD_OPERATORS`` (``alice=<token>``), as in
``dashboard_fastapi.py``. Use your own authentication; the dashboard records who
made each action through ``identify``.

Run it with ``MONGODB_URI`` and ``DASHBOARD_OPERATORS`` set:
``uvicorn examples.dashboard_starlette:app``, then open
http://127.0.0.1:8000/scheduler/ with an ``Authorization: Bearer <token>`` header.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount

from apscheduler_mongo.dashboard import Dashboard


def create_app(
    source: object = None,
    database: str | None = None,
    operators: Mapping[str, str] | None = None,
) -> Starlette:
    """Return the application (settings from the environment by default)."""
    tokens = dict(operators or {})
    for item in os.environ.get("DASHBOARD_OPERATORS", "").split(","):
        name, _, token = item.partition("=")
        if token.strip():
            tokens.setdefault(name.strip(), token.strip())

    def operator_of(request: Request) -> str | None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None

        for name, token in tokens.items():
            if secrets.compare_digest(given.encode(), token.encode()):
                return name

        return None

    class OperatorsOnly(BaseHTTPMiddleware):
        async def dispatch(
            self, request: Request, call_next: RequestResponseEndpoint
        ) -> Response:
            if operator_of(request) is None:
                return PlainTextResponse("login first", status_code=401)

            return await call_next(request)

    dashboard = Dashboard(
        source or os.environ.get("MONGODB_URI", "mongodb://127.0.0.1:27017/"),
        database=database or os.environ.get("APSCHEDULER_DATABASE", "apscheduler"),
        actions=True,
        csrf_secret=os.environ.get("DASHBOARD_CSRF_SECRET"),
        identify=operator_of,
    )

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with dashboard:
            yield

    return Starlette(
        routes=[
            Mount("/scheduler", app=dashboard, middleware=[Middleware(OperatorsOnly)])
        ],
        lifespan=lifespan,
    )


#: The application, for ``uvicorn examples.dashboard_starlette:app``
app = create_app()
