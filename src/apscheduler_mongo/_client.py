"""Everything about the MongoDB client: checking, creating, describing, closing."""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, contextmanager
from typing import Any, cast

import anyio
from pymongo import AsyncMongoClient, MongoClient
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

SCHEME = "mongodb://"
SRV_SCHEME = "mongodb+srv://"
#: "user:password@" after anything that looks like a URI scheme
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*:/*)[^@/\s]+@")

#: Oldest server we accept: MongoDB 4.2 (wire version 8)
MIN_WIRE_VERSION = 8
MIN_SERVER_VERSION = "4.2"
_COMMAND_NOT_FOUND = 59


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


async def open_client(client_or_uri: Any, exit_stack: AsyncExitStack) -> Any:
    """
    Return the client to use: the one given, or a new one for a URI.

    A client created here belongs to the running event loop and is closed when
    ``exit_stack`` closes; a client that was given is never closed.
    """
    if not isinstance(client_or_uri, str):
        return client_or_uri

    client = create_client(client_or_uri)
    exit_stack.push_async_callback(close_client, client)
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


async def close_client(client: Any) -> None:
    """Close a client we created, even when the stopping task was cancelled."""
    with anyio.CancelScope(shield=True):
        result = client.close()
        if inspect.isawaitable(result):  # pymongo's close() is a coroutine
            await result


async def check_server(database: Any) -> dict[str, Any]:
    """
    Ask the server who it is with ``hello`` and refuse servers we cannot work with.

    :return: the ``hello`` reply
    :raises RuntimeError: if the server is too old or does not know ``hello``
    :raises pymongo.errors.OperationFailure: if the server refuses us (for example,
        authentication failed)
    """
    try:
        reply: dict[str, Any] = await database.command("hello")
    except OperationFailure as exc:
        if exc.code != _COMMAND_NOT_FOUND:
            raise  # e.g. authentication failed: the driver's error says it best

        raise RuntimeError(
            "the server does not know the 'hello' command; is it MongoDB "
            f"{MIN_SERVER_VERSION} or later?"
        ) from exc

    wire_version = reply.get("maxWireVersion")
    if not isinstance(wire_version, int) or wire_version < MIN_WIRE_VERSION:
        raise RuntimeError(
            f"MongoDB {MIN_SERVER_VERSION} or later is required (the server reports "
            f"wire version {wire_version!r})"
        )

    return reply


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
