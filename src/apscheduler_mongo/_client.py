"""Everything about the MongoDB client: checking, creating, describing, closing."""

from __future__ import annotations

import asyncio
import inspect
import re
import sys
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, contextmanager
from logging import Logger
from typing import Any, TypeVar, cast

import anyio
from pymongo import AsyncMongoClient, MongoClient, ReadPreference, WriteConcern
from pymongo.driver_info import DriverInfo
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    ConnectionFailure,
    OperationFailure,
    ProtocolError,
    ServerSelectionTimeoutError,
)
from pymongo.results import BulkWriteResult
from pymongo.uri_parser import parse_uri

from ._version import __version__

T = TypeVar("T")

SCHEME = "mongodb://"
SRV_SCHEME = "mongodb+srv://"
#: "user:password@" after anything that looks like a URI scheme
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*:/*)[^@/\s]+@")

#: Oldest server we accept: MongoDB 4.2 (wire version 8)
MIN_WIRE_VERSION = 8
MIN_SERVER_VERSION = "4.2"
_COMMAND_NOT_FOUND = 59


#: Python versions whose asyncio.wait_for() waits in a task of its own
_WAIT_FOR_IN_A_TASK = sys.version_info < (3, 12)


async def insulated(awaitable: Awaitable[T]) -> T:
    """
    Await a pymongo call so that no cancellation reaches pymongo inside it.

    On Python 3.10 and 3.11, pymongo's server selection waits through
    :func:`asyncio.wait_for`, which there waits in a task of its own; AnyIO cancels
    again and again until a cancelled task gives up, and such repeated cancellations
    can leave pymongo's topology lock held by nobody: the cancelled call raises
    ``RuntimeError: Lock is not acquired``, and every later call on the client
    (closing it included, and so the end of ``asyncio.run()``) waits forever. Seen
    with pymongo 4.20.1 when stopping a scheduler while the server was unreachable.

    So on those Pythons the call runs in a task of its own, which a cancellation of
    the caller leaves running: the caller is cancelled at once, and the call ends by
    itself (with its result, or with the driver's server selection timeout), its
    outcome discarded, like a request whose reply was lost. Elsewhere it is awaited
    as it is.
    """
    if not _WAIT_FOR_IN_A_TASK:
        return await awaitable

    call = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        _abandoned.add(call)
        call.add_done_callback(_discard_outcome)
        raise


#: The calls that :func:`insulated` left running when their callers were cancelled
_abandoned: set[asyncio.Future[Any]] = set()


def _discard_outcome(call: asyncio.Future[Any]) -> None:
    _abandoned.discard(call)
    if not call.cancelled():
        call.exception()  # retrieved, so that asyncio does not report it


def redact(text: str) -> str:
    """Remove the user name and password from any MongoDB URI inside ``text``."""
    return _USERINFO.sub(r"\1***@", text)


def _motor_client_class() -> type | None:
    try:
        from motor.motor_asyncio import AsyncIOMotorClient
    except ImportError:
        return None

    return AsyncIOMotorClient


def is_mongomock(client: object) -> bool:
    """Tell whether ``client`` is a mongomock-motor client (an in-process fake)."""
    return type(client).__module__.startswith("mongomock_motor") or any(
        cls.__module__.startswith("mongomock_motor") for cls in type(client).__mro__
    )


def validate_client_or_uri(value: object) -> AsyncMongoClient[Any] | str | Any:
    """
    Return ``value`` if it is a usable client or a well-formed MongoDB URI.

    No network access happens here: ``mongodb+srv://`` URIs are only checked for
    their shape, since resolving them needs DNS.

    :raises TypeError: if ``value`` is neither a string nor an asynchronous client
    :raises ValueError: if ``value`` is a malformed URI
    """
    if isinstance(value, str):
        _validate_uri(value)
        return value

    motor_class = _motor_client_class()
    if isinstance(value, AsyncMongoClient) or (
        motor_class is not None and isinstance(value, motor_class)
    ):
        return value

    if isinstance(value, MongoClient):
        raise TypeError(
            "client_or_uri is a synchronous pymongo.MongoClient; pass a "
            "pymongo.AsyncMongoClient (or a URI string) instead"
        )

    raise TypeError(
        "client_or_uri must be a MongoDB URI string, a pymongo.AsyncMongoClient or a "
        f"Motor AsyncIOMotorClient, not {type(value).__qualname__}"
    )


def client_or_uri_validator(instance: object, attribute: object, value: object) -> None:
    """Attrs validator running :func:`validate_client_or_uri`."""
    validate_client_or_uri(value)


async def open_client(
    client_or_uri: Any, exit_stack: AsyncExitStack, logger: Logger | None = None
) -> Any:
    """
    Return the client to use: the one given, or a new one for a URI.

    A client created here belongs to the running event loop and is closed when
    ``exit_stack`` closes; a client that was given is never closed.
    """
    if not isinstance(client_or_uri, str):
        return client_or_uri

    client = create_client(client_or_uri)
    exit_stack.push_async_callback(close_client, client, logger)
    return client


def _validate_uri(uri: str) -> None:
    if uri.startswith(SRV_SCHEME):
        hosts = uri[len(SRV_SCHEME) :].rpartition("@")[2].partition("/")[0]
        if not hosts or "," in hosts or ":" in hosts:
            raise ValueError(
                "a mongodb+srv:// URI must name exactly one host name, without a port"
            )
        return

    if not uri.startswith(SCHEME):
        raise ValueError(f"client_or_uri must start with {SCHEME!r} or {SRV_SCHEME!r}")

    try:
        parse_uri(uri)
    except (ConfigurationError, ValueError) as exc:
        raise ValueError(
            f"client_or_uri is not a valid MongoDB URI: {redact(str(exc))}"
        ) from None


def describe_hosts(client_or_uri: object) -> list[str]:
    """Return the seed hosts of a client or URI as ``host:port`` strings."""
    if isinstance(client_or_uri, str):
        if client_or_uri.startswith(SRV_SCHEME):
            rest = client_or_uri[len(SRV_SCHEME) :].rpartition("@")[2]
            return [rest.partition("/")[0].partition("?")[0]]

        try:
            nodes = parse_uri(client_or_uri)["nodelist"]
        except (ConfigurationError, ValueError):  # pragma: no cover (validated first)
            return []

        return [f"{host}:{port}" for host, port in nodes]

    if is_mongomock(client_or_uri):
        return ["mongomock"]

    descriptions = _server_descriptions(client_or_uri)
    return [f"{host}:{port}" for host, port in descriptions]


def _server_descriptions(client: object) -> dict[tuple[str, int | None], Any]:
    """Return what the client knows of each server, by address."""
    motor_class = _motor_client_class()
    if motor_class is not None and isinstance(client, motor_class):
        client = cast(Any, client).delegate  # Motor wraps a pymongo client

    descriptions: dict[tuple[str, int | None], Any]
    descriptions = cast(Any, client).topology_description.server_descriptions()
    return descriptions


@contextmanager
def explaining_unreachable_servers(client: object) -> Iterator[None]:
    """
    Make a server selection timeout say why no server at the client's hosts would do.

    When every server the client knows of failed to answer like MongoDB, the
    :exc:`~pymongo.errors.ServerSelectionTimeoutError` raised in the block is replaced
    by one (of the same type, chained to it) naming those servers and saying either
    that something there answered in another protocol, or that nothing could be
    connected to. Any other timeout (say, a replica set without a primary) is left as
    the driver raised it. Use it around the retries of ``start()``: the retries stay
    the same, only the last error changes.

    :raises pymongo.errors.ServerSelectionTimeoutError: with the clearer message
    """
    try:
        yield
    except ServerSelectionTimeoutError as exc:
        if is_mongomock(client):  # pragma: no cover (mongomock never selects)
            raise

        descriptions = _server_descriptions(client)
        errors = {
            f"{host}:{port}": description.error
            for (host, port), description in descriptions.items()
        }
        strangers = {
            address: error
            for address, error in errors.items()
            if isinstance(error, ProtocolError)
        }
        if strangers:
            addresses, reasons = _listed(strangers)
            subject = "the server at" if len(strangers) == 1 else "the servers at"
            verb = "does" if len(strangers) == 1 else "do"
            raise ServerSelectionTimeoutError(
                f"{subject} {addresses} {verb} not speak the MongoDB wire protocol "
                f"(pymongo: {reasons}); is it really a MongoDB server, and is the "
                f"port right?"
            ) from exc

        if errors and all(
            isinstance(error, ConnectionFailure) for error in errors.values()
        ):
            addresses, reasons = _listed(errors)
            raise ServerSelectionTimeoutError(
                f"could not connect to a MongoDB server at {addresses} ({reasons}); "
                f"is the server running, and are the host, port and TLS options "
                f"right?"
            ) from exc

        raise


def _listed(errors: Mapping[str, Any]) -> tuple[str, str]:
    """Return the addresses and the (redacted) errors of ``errors``, as text."""
    return ", ".join(errors), "; ".join(redact(str(e)) for e in errors.values())


def create_client(uri: str) -> AsyncMongoClient[Any]:
    """Create a client for ``uri``; call this in the event loop that will use it."""
    return AsyncMongoClient(
        uri, driver=DriverInfo("apscheduler-mongo", __version__), tz_aware=True
    )


#: How long closing a client we created may take (it ends the client's sessions on
#: the server, which waits for server selection when the server is away)
CLOSE_TIMEOUT = 5.0


async def close_client(client: Any, logger: Logger | None = None) -> None:
    """
    Close a client we created, even when the stopping task was cancelled.

    Closing gives up after :data:`CLOSE_TIMEOUT` seconds, with a warning: with the
    server unreachable, pymongo would wait for it (on Python 3.10 and 3.11, a client
    whose server selection was cancelled can even wait forever), and a scheduler
    must be able to stop.
    """
    with anyio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
        if abandoned := [call for call in _abandoned if not call.done()]:
            # Let the calls cancelled callers left behind end first (they end at
            # the latest when their server selection times out)
            await asyncio.wait(abandoned)

        result = client.close()
        if inspect.isawaitable(result):  # pymongo's close() is a coroutine
            await insulated(result)

    if scope.cancelled_caught and logger is not None:
        logger.warning(
            "Gave up closing the MongoDB client after %s s (is the server "
            "unreachable?)",
            CLOSE_TIMEOUT,
        )


async def check_server(database: Any) -> dict[str, Any]:
    """
    Ask the server who it is and refuse servers we cannot work with.

    It asks with ``hello``, or with ``isMaster`` on servers older than ``hello``
    (MongoDB 4.4.2, 4.2.10 and 4.0.21 introduced it), which answers the same.

    :return: the reply
    :raises RuntimeError: if the server is too old, or knows neither command
    :raises pymongo.errors.OperationFailure: if the server refuses us (for example,
        authentication failed)
    """
    reply: dict[str, Any]
    try:
        reply = await database.command("hello")
    except OperationFailure as exc:
        if exc.code != _COMMAND_NOT_FOUND:
            raise  # e.g. authentication failed: the driver's error says it best

        try:
            reply = await database.command("isMaster")
        except OperationFailure as legacy:
            if legacy.code != _COMMAND_NOT_FOUND:
                raise

            raise RuntimeError(
                "the server knows neither 'hello' nor 'isMaster'; is it MongoDB "
                f"{MIN_SERVER_VERSION} or later?"
            ) from exc

    wire_version = reply.get("maxWireVersion")
    if not isinstance(wire_version, int) or wire_version < MIN_WIRE_VERSION:
        raise RuntimeError(
            f"MongoDB {MIN_SERVER_VERSION} or later is required (the server reports "
            f"wire version {wire_version!r})"
        )

    return reply


#: What the store's and the broker's writes wait for, unless the client or its URI
#: sets a write concern: a majority of the replica set, so that no write a scheduler
#: was told about is rolled back at a failover; for at most 10 s, after which the
#: write counts as a temporary failure and is retried (its outcome settled then)
MAJORITY = WriteConcern("majority", wtimeout=10_000)


def durable_collection(database: Any, name: str) -> Any:
    """
    Return a collection of ``database`` for the store's or the broker's own use.

    Its writes wait for a majority (:data:`MAJORITY`), unless the client sets a write
    concern of its own (then that one holds), and its reads go to the primary, whatever
    the client's read preference: the store reads back its own claims, which a
    secondary may not have yet.
    """
    options: dict[str, Any] = {"read_preference": ReadPreference.PRIMARY}
    if is_mongomock(database.client) or database.client.write_concern.is_server_default:
        options["write_concern"] = MAJORITY

    return database.get_collection(name, **options)


async def list_indexes(collection: Any) -> list[dict[str, Any]]:
    """Return the descriptions of a collection's indexes (none if it does not exist)."""
    cursor = collection.list_indexes()
    if inspect.isawaitable(cursor):  # pymongo's is a coroutine; Motor's is not
        cursor = await cursor

    return list(await cursor.to_list(None))


async def aggregate(
    collection: Any, pipeline: Sequence[Mapping[str, Any]]
) -> list[Any]:
    """Run an aggregation pipeline and return all its documents."""
    cursor = collection.aggregate(pipeline)
    if inspect.isawaitable(cursor):  # pymongo's is a coroutine; Motor's is not
        cursor = await cursor

    return list(await cursor.to_list(None))


async def bulk_write(
    collection: Any, requests: Sequence[Any], *, one_by_one: bool
) -> BulkWriteResult:
    """
    Run ``requests`` as one unordered bulk write.

    With ``one_by_one`` (used for mongomock-motor, whose ``bulk_write()`` cannot take
    pymongo's current ``UpdateOne``), run them as separate writes and build the same
    result, raising :exc:`~pymongo.errors.BulkWriteError` with every write error.
    """
    if not one_by_one:
        result: BulkWriteResult = await collection.bulk_write(requests, ordered=False)
        return result

    counts = {"nMatched": 0, "nModified": 0, "nRemoved": 0, "nInserted": 0}
    errors: list[dict[str, Any]] = []
    for index, request in enumerate(requests):
        kind = type(request).__name__
        try:
            if kind == "UpdateOne":
                outcome = await collection.update_one(request._filter, request._doc)
                counts["nMatched"] += outcome.matched_count
                counts["nModified"] += outcome.modified_count
            elif kind == "DeleteOne":
                outcome = await collection.delete_one(request._filter)
                counts["nRemoved"] += outcome.deleted_count
            else:  # pragma: no cover (we send no other kind)
                raise TypeError(f"unsupported request {kind}")
        except OperationFailure as exc:
            errors.append({**(exc.details or {}), "index": index, "code": exc.code})

    document = {**counts, "writeErrors": errors, "upserted": [], "nUpserted": 0}
    if errors:
        raise BulkWriteError(document)

    return BulkWriteResult(document, acknowledged=True)


def require_asyncio(owner: object) -> None:
    """
    Refuse to run outside asyncio, which pymongo's asynchronous API needs.

    :raises RuntimeError: if no asyncio event loop is running (e.g. under Trio)
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            f"{type(owner).__name__} needs asyncio (pymongo's asynchronous API runs "
            f"on asyncio only), not trio or any other event loop; start it under "
            f"anyio's asyncio backend"
        ) from None
