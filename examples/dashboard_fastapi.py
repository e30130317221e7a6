"""
The dashboard mounted in a FastAPI application, behind the application's own check.

FastAPI's dependencies do not reach a mounted application, so an HTTP middleware
guards the mount with the same check that the application's routes depend on. Here
the check is a bearer token per operator, from ``DASHBOARD_OPERATORS``
(``alice=<token>,bob=<token>``); use your own (a session, your identity provider, a
header your proxy sets). The dashboard records who made each action in its audit
trail, through ``identify``.

Run it (``pip install "apscheduler-mongo[dashboard]" fastapi uvicorn``) from the
repository root with ``MONGODB_URI``, ``DASHBOARD_OPERATORS`` and
``DASHBOARD_CSRF_SECRET`` set, and ``uvicorn examples.dashboard_fastapi:app``; then
open http://127.0.0.1:8000/scheduler/ with an ``Authorization: Bearer <token>``
header (a browser extension, or your proxy, adds it).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse

from apscheduler_mongo.dashboard import Dashboard


def parse_operators(text: str) -> dict[str, str]:
    """Return each operator's token from ``name=token,name=token``."""
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {name.strip(): token.strip() for name, token in pairs if token.strip()}


def create_app(
    source: object = None,
    database: str | None = None,
    operators: Mapping[str, str] | None = None,
    csrf_secret: str | None = None,
) -> FastAPI:
    """
    Return the application; without arguments, its settings come from the
    environment when it is created.

    :param source: a MongoDB URI or client (default: ``MONGODB_URI``)
    :param operators: each operator's bearer token
    """
    tokens = dict(
        operators or parse_operators(os.environ.get("DASHBOARD_OPERATORS", ""))
    )

    def operator_of(request: Request) -> str | None:
        """Your authentication: here, whose bearer token the request carries."""
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None

        for name, token in tokens.items():
            if secrets.compare_digest(given.encode(), token.encode()):
                return name

        return None

    def require_operator(request: Request) -> str:
        operator = operator_of(request)
        if operator is None:
            raise HTTPException(status_code=401, detail="login first")

        return operator

    dashboard = Dashboard(
        source or os.environ.get("MONGODB_URI", "mongodb://127.0.0.1:27017/"),
        database=database or os.environ.get("APSCHEDULER_DATABASE", "apscheduler"),
        actions=True,
        # The same secret in every process behind one address (from your secrets
        # store); a random one is right for a single process
        csrf_secret=csrf_secret or os.environ.get("DASHBOARD_CSRF_SECRET"),
        identify=operator_of,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with dashboard:  # opens its client; closes it at shutdown
            yield

    app = FastAPI(lifespan=lifespan)
    app.mount("/scheduler", dashboard)

    @app.middleware("http")
    async def operators_only(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if path == "/scheduler" or path.startswith("/scheduler/"):
            try:
                require_operator(request)
            except HTTPException as exc:
                return PlainTextResponse("login first", status_code=exc.status_code)

        return await call_next(request)

    @app.get("/api/whoami")
    async def whoami(operator: str = Depends(require_operator)) -> dict[str, str]:
        """A route of the application itself, behind the same check."""
        return {"operator": operator}

    return app


#: The application, for ``uvicorn examples.dashboard_fastapi:app``
app = create_app()
