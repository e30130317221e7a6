"""
The dashboard: an ASGI application over a store, live through the schedulers' events.

It only reads to show a store (see :mod:`.._tools.status`): nothing stored is
deserialized, imported or called, and nothing is created, so a page of a mistyped
database says so and leaves it as it was. Only the actions (off by default) go
through the store's API, on a database that holds a store.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote

import anyio
import attrs
import jinja2
from apscheduler import AsyncScheduler, RetrySettings, ScheduleLookupError
from apscheduler.abc import Serializer
from apscheduler.serializers.pickle import PickleSerializer
from attrs.validators import ge, instance_of
from pymongo.errors import PyMongoError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send
from tenacity import stop_after_delay, wait_exponential

from .._adapters import Adapter
from .._client import describe_hosts, open_client, redact, validate_client_or_uri
from .._datastore import MongoDBDataStore
from .._names import validate_database_name
from .._options import to_signer
from .._signing import Signer
from .._tools import actions
from .._tools.status import (
    NotFoundError,
    Reader,
    clock_note,
    holds,
    offset_text,
    or_dash,
    paused,
    problem,
    require_store,
    scheduler_state,
    when,
)
from . import _audit, _csrf, _pages
from ._changes import follow_changes
from ._finding import FilterError

if TYPE_CHECKING:
    from ..metrics import MetricsEndpoint

#: Seconds between comments that keep an idle event stream open through proxies
KEEP_ALIVE = 15.0
#: Seconds to gather a burst of events into one notice to the page
COALESCE = 0.25
#: The header with which the page's script asks for a page's panels only
FRAGMENT_HEADER = "x-dashboard-fragment"
#: The largest action form accepted (bytes)
MAX_FORM = 16 * 1024
#: What every response says to the browser: only this site's own assets, no framing
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' "
        b"data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
        b"frame-ancestors 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]
#: The actions the dashboard offers (when ``actions`` is on)
ACTIONS = frozenset(
    {"pause", "resume", "remove", "purge", "run-now", "retry", "cancel"}
)
#: A root path: empty, or path segments of characters that need no quoting anywhere
#: the page puts it (attributes, a cookie's path, a redirect)
_ROOT_PATH = re.compile(r"(/[A-Za-z0-9._~%+@:=-]+)*/?")

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("apscheduler_mongo.dashboard", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _seconds_text(value: timedelta | None) -> str:
    """Show a duration in seconds (``-`` when unknown)."""
    return "-" if value is None else f"{value.total_seconds():.3f} s"


_templates.globals.update(
    seconds=_seconds_text,
    when=when,
    or_dash=or_dash,
    paused=paused,
    problem=problem,
    clock_note=clock_note,
    offset_text=offset_text,
    holds=holds,
    scheduler_state=scheduler_state,
)


@attrs.frozen
class _Connection:
    """The dashboard's client and reader, open until the dashboard closes."""

    adapter: Adapter
    reader: Reader
    #: Where the actions are recorded
    trail: _audit.Trail
    #: Set when the dashboard closes them
    closed: asyncio.Event


def _source_options(
    source: object, database: str | None, serializer: Serializer | None
) -> tuple[object, str, Serializer]:
    """Return the client or URI, database and serializer to read ``source`` with."""
    if isinstance(source, MongoDBDataStore):
        return (
            source.client_or_uri,
            database or source.database,
            serializer or source.serializer,
        )

    validate_client_or_uri(source)
    return source, database or "apscheduler", serializer or PickleSerializer()


def _as_bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _root_path(value: str) -> str:
    """Return a root path without its trailing slash (``""`` for none)."""
    if not isinstance(value, str):
        raise TypeError(f"root_path must be a string, not {type(value).__name__}")

    if not _ROOT_PATH.fullmatch(value):
        raise ValueError(
            f"root_path must be empty or a path such as '/ops/scheduler', not {value!r}"
        )

    return value.rstrip("/")


@attrs.define(eq=False, repr=False)
class Dashboard:
    """
    A live web dashboard of a :class:`~apscheduler_mongo.MongoDBDataStore`: an ASGI
    application (Starlette) to mount in a web app, or to serve alone.

    It shows tasks, schedules (a page at a time), queued and running jobs and
    recent results, and updates the page whenever any process's scheduler announces
    a change on the :class:`~apscheduler_mongo.MongoDBEventBroker`. It has no login
    of its own: mount it behind the host application's authentication.

    It shows the documents as stored, without deserializing them: no code stored in
    the database runs in the dashboard's process, whatever the database holds.
    Looking writes nothing: a database that holds no store is reported as such,
    never created.

    It opens its client when the host application's lifespan enters ``async with
    dashboard``, or else at the first request, on asyncio; it closes it when the
    lifespan ends or at :meth:`aclose`. Served alone (``uvicorn`` on the dashboard
    itself), it handles the lifespan by itself.

    :param source: the store to show (its client or URI, database and serializer
        are used), or a MongoDB URI or client
    :param database: the store's database (default: the store's, or
        ``apscheduler``)
    :param serializer: the store's serializer (default: the store's, or pickle),
        used by the actions only: the page never deserializes anything
    :param signing_key: the store's signing key(s) (default: the store's), used by
        the actions only, which rewrite the schedule they change (see
        :doc:`security`)
    :param accept_unsigned: the store's ``accept_unsigned`` (or the store's)
    :param events_collection: the collection of the schedulers' event broker
    :param actions: allow pausing, resuming, removing and running schedules now,
        retrying failed jobs, cancelling queued ones, and purging (POST only, with
        CSRF protection, each recorded in the ``audit`` collection); off by
        default: the dashboard is read-only
    :param csrf_secret: the key that signs CSRF tokens; give the same one to every
        process serving the dashboard behind one address (default: random, for
        this process only)
    :param page_size: how many schedules (and running jobs) a page shows
    :param results: how many of the newest results to show
    :param timeout: seconds a request may take before it fails (retrying
        temporary failures until then)
    :param metrics: a :class:`~apscheduler_mongo.metrics.MetricsEndpoint` to serve
        at ``/metrics`` (its gauges of jobs read through the dashboard's client)
    :param identify: a function that returns who made a request (their user
        name), recorded in the audit trail of each action (default: the
        authenticated user that Starlette's ``AuthenticationMiddleware`` sets, if
        any)
    :param audit_retention: how long the ``audit`` collection keeps the record of
        an action (seconds or a :class:`~datetime.timedelta`, at least a minute;
        default 90 days)
    :param root_path: the path prefix under which a reverse proxy serves the
        dashboard (``/ops/scheduler``), put before every URL the page uses; a
        ``root_path`` in the request (an application that mounts the dashboard
        sets it, and so does ``uvicorn --root-path``) takes precedence
    """

    source: object
    database: str | None = attrs.field(default=None, kw_only=True)
    serializer: Serializer | None = attrs.field(default=None, kw_only=True)
    signing_key: Signer | None = attrs.field(
        default=None, kw_only=True, converter=to_signer
    )
    accept_unsigned: bool = attrs.field(
        default=False, kw_only=True, validator=instance_of(bool)
    )
    events_collection: str = attrs.field(
        default="events", kw_only=True, validator=instance_of(str)
    )
    actions: bool = attrs.field(
        default=False, kw_only=True, validator=instance_of(bool)
    )
    csrf_secret: bytes | None = attrs.field(
        default=None, kw_only=True, converter=_as_bytes
    )
    page_size: int = attrs.field(default=100, kw_only=True, validator=[ge(1)])
    results: int = attrs.field(default=20, kw_only=True, validator=[ge(0)])
    timeout: float = attrs.field(default=10.0, kw_only=True, validator=[ge(0.1)])
    root_path: str = attrs.field(default="", kw_only=True, converter=_root_path)
    metrics: MetricsEndpoint | None = attrs.field(default=None, kw_only=True)
    identify: Callable[[Request], str | None] | None = attrs.field(
        default=None, kw_only=True
    )
    audit_retention: float = attrs.field(
        default=90 * 86_400.0,
        kw_only=True,
        converter=_seconds,
        validator=[ge(60.0)],
    )
    _client_or_uri: object = attrs.field(init=False)
    _database: str = attrs.field(init=False)
    _serializer: Serializer = attrs.field(init=False)
    _secret: bytes = attrs.field(init=False)
    _app: Starlette = attrs.field(init=False)
    _logger: logging.Logger = attrs.field(
        init=False, factory=lambda: logging.getLogger("apscheduler_mongo.dashboard")
    )
    _started: asyncio.Future[_Connection] | None = attrs.field(init=False, default=None)
    _holder: asyncio.Task[None] | None = attrs.field(init=False, default=None)
    _stop: asyncio.Event | None = attrs.field(init=False, default=None)
    _streams: set[asyncio.Event] = attrs.field(init=False, factory=set)

    def __repr__(self) -> str:
        # Never the URI (credentials), the CSRF secret or the keys
        return (
            f"{type(self).__name__}(hosts={describe_hosts(self._client_or_uri)!r}, "
            f"database={self._database!r}, actions={self.actions!r})"
        )

    def __attrs_post_init__(self) -> None:
        self._client_or_uri, database, self._serializer = _source_options(
            self.source, self.database, self.serializer
        )
        self._database = validate_database_name(database)
        self._secret = self.csrf_secret or secrets.token_bytes(32)
        if isinstance(self.source, MongoDBDataStore):
            self.signing_key = self.signing_key or self.source.signing_key
            self.accept_unsigned = self.accept_unsigned or self.source.accept_unsigned
        self._app = Starlette(
            routes=[
                Route("/", self._page(_pages.overview), methods=["GET"]),
                Route("/panels", self._panels, methods=["GET"]),
                Route("/schedulers", self._page(_pages.schedulers), methods=["GET"]),
                Route("/jobs", self._page(_pages.jobs), methods=["GET"]),
                Route("/audit", self._page(_pages.audit), methods=["GET"]),
                # By query string: a stored id is never a path a browser resolves
                Route("/job", self._page(_pages.job), methods=["GET"]),
                Route("/schedule", self._page(_pages.schedule), methods=["GET"]),
                Route("/events", self._events, methods=["GET"]),
                Route("/actions/{name}", self._action, methods=["POST"]),
                Route("/metrics", self._metrics, methods=["GET"]),
                Mount(
                    "/static",
                    app=StaticFiles(
                        packages=[("apscheduler_mongo.dashboard", "static")]
                    ),
                ),
            ],
            lifespan=self._lifespan,
        )

    # ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        prefix = self.root_path
        path = str(scope.get("path", ""))
        passed_on = path == prefix or path.startswith(f"{prefix}/")
        if prefix and not scope.get("root_path") and passed_on:
            # A proxy that passed the prefix on: route what follows it
            scope = {**scope, "root_path": prefix}

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]

            await send(message)

        await self._app(scope, receive, send_secured)

    @asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        async with self:
            yield

    # The client

    async def __aenter__(self) -> Dashboard:
        await self._connection()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the dashboard's client, and end its event streams."""
        if self._stop is not None:
            self._stop.set()  # ends the streams of this client, once they wake

        for stream in self._streams:
            stream.set()

        if self._holder is not None:
            await asyncio.shield(self._holder)

        self._started = self._holder = self._stop = None

    async def _connection(self) -> _Connection:
        """Return the open client and reader, opening them if they are not."""
        started = self._started
        if started is None or (
            started.done() and (started.cancelled() or started.exception() is not None)
        ):
            loop = asyncio.get_running_loop()
            started = self._started = loop.create_future()
            self._stop = asyncio.Event()
            self._holder = loop.create_task(self._hold(started, self._stop))

        return await asyncio.shield(started)

    def _retry_settings(self) -> RetrySettings:
        return RetrySettings(
            stop=stop_after_delay(self.timeout),
            wait=wait_exponential(multiplier=0.25, max=2),
        )

    async def _hold(
        self, started: asyncio.Future[_Connection], stop: asyncio.Event
    ) -> None:
        """Open the client, follow the announced changes until ``stop``, close."""
        try:
            async with AsyncExitStack() as exit_stack:
                adapter = await open_client(
                    self._client_or_uri, exit_stack, self._logger
                )
                reader = Reader(
                    adapter, self._database, self._retry_settings(), self._logger
                )
                async with anyio.create_task_group() as group:
                    group.start_soon(
                        follow_changes,
                        reader,
                        self.events_collection,
                        self._changed,
                        self._logger,
                    )
                    trail = _audit.Trail(
                        adapter,
                        self._database,
                        timedelta(seconds=self.audit_retention),
                        self._retry_settings(),
                        self._logger,
                    )
                    started.set_result(_Connection(adapter, reader, trail, stop))
                    await stop.wait()
                    group.cancel_scope.cancel()
        except Exception as exc:
            if started.done():
                raise

            started.set_exception(actions.innermost(exc))

    def _changed(self) -> None:
        """Tell the open event streams that the schedulers announced a change."""
        for stream in self._streams:
            stream.set()

    # Pages

    def _base(self, request: Request) -> str:
        """Return the URL path the page's own URLs start with (ending in ``/``)."""
        root_path = str(request.scope.get("root_path") or self.root_path)
        return root_path.rstrip("/") + "/"

    def _page(
        self, page: _pages.PageFunction
    ) -> Callable[[Request], Awaitable[Response]]:
        """Return the endpoint of a page: whole, or its panels for the page's script."""

        async def endpoint(request: Request) -> Response:
            fragment = request.headers.get(FRAGMENT_HEADER) == "1"
            return await self._show(request, page, fragment=fragment)

        return endpoint

    async def _panels(self, request: Request) -> Response:
        """The overview's panels (what the page's script fetched before 0.x)."""
        return await self._show(request, _pages.overview, fragment=True)

    async def _show(
        self, request: Request, page: _pages.PageFunction, *, fragment: bool
    ) -> Response:
        """Read and render a page, or only its panels; set the CSRF cookie."""
        nonce = request.cookies.get(_csrf.COOKIE) or ""
        if fragment:
            return await self._render(request, page, nonce, fragment=True)

        nonce = nonce or _csrf.new_nonce()
        response = await self._render(request, page, nonce, fragment=False)
        if request.cookies.get(_csrf.COOKIE) != nonce:
            response.set_cookie(
                _csrf.COOKIE,
                nonce,
                path=self._base(request),
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )

        return response

    async def _render(
        self,
        request: Request,
        page: _pages.PageFunction,
        nonce: str,
        *,
        fragment: bool,
    ) -> Response:
        try:
            connection = await self._connection()
            view = _pages.View(
                connection.reader,
                {key: request.query_params[key] for key in request.query_params},
                self.page_size,
                self.results,
            )
            with anyio.fail_after(self.timeout):
                shown = await page(view)
        except NotFoundError as exc:
            return self._no_store(request, fragment, exc)
        except FilterError as exc:
            return PlainTextResponse(f"Cannot show that: {exc}", status_code=400)
        except _SERVER_TROUBLE as exc:
            return _unavailable(exc)

        context = {
            **shown.context,
            "base": self._base(request),
            "token": _csrf.token_for(self._secret, nonce),
            "actions": self.actions,
        }
        if fragment:
            body = _templates.get_template(shown.template).render(context)
        else:
            body = _templates.get_template("page.html").render(
                context,
                template=shown.template,
                title=shown.title,
                database=self._database,
                hosts=connection.reader.adapter.hosts(),
                said=self._said(request),
            )

        return HTMLResponse(
            body,
            status_code=shown.status_code,
            headers={"cache-control": "no-store", "vary": FRAGMENT_HEADER},
        )

    def _said(self, request: Request) -> str:
        """Return what the dashboard said after a plain form's action, if it did."""
        message = request.query_params.get("said", "")
        signature = request.query_params.get("sig", "")
        return message if _csrf.said_by_us(self._secret, message, signature) else ""

    def _no_store(
        self, request: Request, fragment: bool, exc: NotFoundError
    ) -> Response:
        """Answer a page of a database that holds no store: it says so (404)."""
        if fragment:
            return PlainTextResponse(str(exc), status_code=404)

        body = _templates.get_template("nostore.html").render(
            database=self._database, base=self._base(request)
        )
        return HTMLResponse(
            body, status_code=404, headers={"cache-control": "no-store"}
        )

    # Live updates

    async def _metrics(self, _request: Request) -> Response:
        if self.metrics is None:
            return PlainTextResponse("Not Found\n", status_code=404)

        try:
            reader = (await self._connection()).reader
        except (PyMongoError, OSError) as exc:
            self._logger.warning("Could not count the jobs for a scrape: %s", exc)
            reader = None

        return Response(
            await self.metrics.body(reader),
            headers={"Cache-Control": "no-store"},
            media_type=self.metrics.content_type,
        )

    async def _events(self, _request: Request) -> Response:
        try:
            connection = await self._connection()
            with anyio.fail_after(self.timeout):
                await connection.reader.server_clock()  # it answers: worth waiting
        except _SERVER_TROUBLE as exc:
            return _unavailable(exc)

        closed = connection.closed
        changed = asyncio.Event()
        self._streams.add(changed)

        async def notices() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                while not closed.is_set():
                    with anyio.move_on_after(KEEP_ALIVE) as idle:
                        await changed.wait()

                    if idle.cancelled_caught:
                        yield ": still here\n\n"
                        continue

                    await anyio.sleep(COALESCE)  # one notice for a burst of events
                    changed.clear()
                    if not closed.is_set():
                        yield "event: change\ndata: {}\n\n"
            finally:
                self._streams.discard(changed)

        return StreamingResponse(
            notices(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    # Actions

    async def _action(self, request: Request) -> Response:
        if not self.actions:
            return self._reply(
                request, 403, "actions are off (the host application can turn them on)"
            )

        form = await _read_form(request)
        if form is None:
            return self._reply(request, 413, "the form is too large")

        origin = f"{request.url.scheme}://{request.headers.get('host', '')}"
        refusal = _csrf.refusal(
            self._secret,
            request.cookies.get(_csrf.COOKIE),
            form.get(_csrf.FIELD),
            request.headers,
            origin,
        )
        if refusal is not None:
            return self._reply(request, 403, f"refused: {refusal}")

        name = request.path_params["name"]
        if name not in ACTIONS:
            return self._reply(request, 404, f"no action {name!r}")

        return await self._act(request, name, form)

    def _who(self, request: Request) -> str | None:
        """Return who asks for an action, as the host application knows them."""
        if self.identify is not None:
            return self.identify(request)

        user = request.scope.get("user")
        if user is not None and getattr(user, "is_authenticated", False):
            return str(getattr(user, "display_name", "") or user)

        return None

    async def _act(self, request: Request, name: str, form: dict[str, str]) -> Response:
        try:
            connection = await self._connection()
        except _SERVER_TROUBLE as exc:
            return self._reply(request, 503, _unavailable_text(exc))

        try:
            who, address = self._who(request), _address(request)
            with anyio.fail_after(self.timeout):
                message = await self._change(connection, name, form, who, address)
        except TimeoutError:
            return self._reply(
                request,
                504,
                "no answer from MongoDB in time (the change may or may not have "
                "been made)",
            )
        except Exception as exc:
            error = actions.innermost(exc)  # not the groups task groups wrap it in
            if isinstance(error, (NotFoundError, ScheduleLookupError)):
                return self._reply(request, 404, str(error))

            if isinstance(error, actions.RefusedError):
                return self._reply(request, 409, str(error))

            if isinstance(error, (PyMongoError, RuntimeError)):
                return self._reply(request, 503, redact(str(error)))

            raise

        return self._reply(request, 200, message)

    async def _change(
        self,
        connection: _Connection,
        name: str,
        form: dict[str, str],
        who: str | None,
        address: str | None,
    ) -> str:
        """
        Make one change through the store, on a database that holds a store, and
        record it in the audit trail: first what is asked (or nothing is made),
        then how it ended.
        """
        reader = connection.reader
        await require_store(reader)
        scheduler = actions.action_scheduler(
            connection.adapter.client,
            self._database,
            self._serializer,
            self.events_collection,
            self._retry_settings(),
            self._logger,
            signing_key=self.signing_key,
            accept_unsigned=self.accept_unsigned,
        )
        schedule_id, job_id = form.get("schedule_id", ""), form.get("job_id", "")
        changes: dict[str, Callable[[], Awaitable[str]]] = {
            "pause": lambda: actions.pause(scheduler, reader, schedule_id),
            "resume": lambda: actions.resume(
                scheduler, reader, schedule_id, now=form.get("from") == "now"
            ),
            "remove": lambda: actions.remove(scheduler, reader, schedule_id),
            "purge": lambda: _purge(scheduler, reader),
            "run-now": lambda: actions.run_now(scheduler, reader, schedule_id),
            "retry": lambda: actions.retry(scheduler, reader, job_id),
            "cancel": lambda: actions.cancel(scheduler, reader, job_id),
        }
        trail = connection.trail
        # What the action acts on, as it reads it: nothing else in the form
        target = {"retry": job_id, "cancel": job_id, "purge": ""}.get(name, schedule_id)
        async with scheduler:
            now = (await reader.server_clock()).now_datetime()
            record = await trail.begin(now, who, address, name, target or None)
            try:
                message = await changes[name]()
            except BaseException as exc:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await trail.end(
                        record, "failed", redact(str(actions.innermost(exc)))
                    )
                raise

            await trail.end(record, "done", message)
            return message

    def _reply(self, request: Request, status: int, message: str) -> Response:
        """Answer the page's script in JSON, a plain form with a redirect."""
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"message": message}, status_code=status)

        if status != 200:
            return PlainTextResponse(message, status_code=status)

        signature = _csrf.said_signature(self._secret, message)
        return RedirectResponse(
            f"{self._base(request)}?said={quote(message)}&sig={signature}",
            status_code=303,
        )


#: What makes the store unreadable for now: the server, or no answer in time
_SERVER_TROUBLE = (TimeoutError, PyMongoError)


def _unavailable_text(exc: BaseException) -> str:
    """Say that the store cannot be reached now, and why (without credentials)."""
    reason = "no answer in time" if isinstance(exc, TimeoutError) else exc
    return redact(f"The store cannot be read now: {reason}")


def _unavailable(exc: BaseException) -> PlainTextResponse:
    return PlainTextResponse(_unavailable_text(exc), status_code=503)


def _address(request: Request) -> str | None:
    """Return the address a request came from (the proxy's, behind one)."""
    return request.client.host if request.client is not None else None


async def _purge(scheduler: AsyncScheduler, reader: Reader) -> str:
    purged = await actions.purge(scheduler, reader)
    return f"ran the store's cleanup: {purged.summary()}"


async def _read_form(request: Request) -> dict[str, str] | None:
    """Return an urlencoded form's fields (the first value of each), or ``None``."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            return None

    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[0] for key, values in fields.items()}
