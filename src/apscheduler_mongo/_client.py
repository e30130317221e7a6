"""Everything about the MongoDB client: checking, creating, describing, closing."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager
from logging import Logger
from typing import Any

import anyio
from pymongo import AsyncMongoClient, MongoClient
from pymongo.driver_info import DriverInfo
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    OperationFailure,
    ProtocolError,
    ServerSelectionTimeoutError,
)
from pymongo.uri_parser import parse_uri

from ._adapters import Adapter, abandoned_calls_ended, adapter_for, motor_client_class
from ._layout import Document
from ._version import __version__

SCHEME = "mongodb://"
SRV_SCHEME = "mongodb+srv://"
#: "user:password@" after anything that looks like a URI scheme
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*:/*)[^@/\s]+@")

#: Oldest server we accept: MongoDB 4.2 (wire version 8)
MIN_WIRE_VERSION = 8
MIN_SERVER_VERSION = "4.2"
_COMMAND_NOT_FOUND = 59
#: How long closing a client we created may take (it ends the client's sessions on
#: the server, which waits for server selection when the server is away)
CLOSE_TIMEOUT = 5.0
#: How much of it goes to letting abandoned calls end before the client is closed
#: under them (with the server away, they would wait for server selection)
ABANDONED_CALLS_WAIT = 1.0


def redact(text: str) -> str:
    """Remove the user name and password from any MongoDB URI inside ``text``."""
    return _USERINFO.sub(r"\1***@", text)


def validate_client_or_uri(value: object) -> object:
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

    motor_class = motor_client_class()
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


def client_or_uri_validator(
    _instance: object, _attribute: object, value: object
) -> None:
    """Attrs validator running :func:`validate_client_or_uri`."""
    validate_client_or_uri(value)


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
    if not isinstance(client_or_uri, str):
        return adapter_for(client_or_uri).hosts()

    if client_or_uri.startswith(SRV_SCHEME):
        rest = client_or_uri[len(SRV_SCHEME) :].rpartition("@")[2]
        return [rest.partition("/")[0].partition("?")[0]]

    try:
        nodes = parse_uri(client_or_uri)["nodelist"]
    except (ConfigurationError, ValueError):  # pragma: no cover (validated first)
        return []

    return [f"{host}:{port}" for host, port in nodes]


def create_client(uri: str) -> AsyncMongoClient[Document]:
    """Create a client for ``uri``; call this in the event loop that will use it."""
    return AsyncMongoClient(
        uri, driver=DriverInfo("apscheduler-mongo", __version__), tz_aware=True
    )


async def open_client(
    client_or_uri: object, exit_stack: AsyncExitStack, logger: Logger | None = None
) -> Adapter:
    """
    Return the adapter of the client to use: the one given, or a new one for a URI.

    A client created here belongs to the running event loop and is closed when
    ``exit_stack`` closes; a client that was given is never closed.
    """
    if not isinstance(client_or_uri, str):
        return adapter_for(client_or_uri)

    adapter = adapter_for(create_client(client_or_uri))
    exit_stack.push_async_callback(close_client, adapter, logger)
    return adapter


async def close_client(adapter: Adapter, logger: Logger | None = None) -> None:
    """
    Close a client we created, even when the stopping task was cancelled.

    It first lets the calls that cancelled callers left running end (see
    :func:`~._adapters.insulated`), for at most :data:`ABANDONED_CALLS_WAIT`
    seconds: with the server away they would wait for server selection, and the
    client must be closed all the same. Closing gives up after :data:`CLOSE_TIMEOUT`
    seconds, with a warning: with the server unreachable, pymongo would wait for it,
    and a scheduler must be able to stop.
    """
    with anyio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
        with anyio.move_on_after(ABANDONED_CALLS_WAIT):
            await abandoned_calls_ended()

        await adapter.close()

    if scope.cancelled_caught and logger is not None:
        logger.warning(
            "Gave up closing the MongoDB client after %s s (is the server "
            "unreachable?)",
            CLOSE_TIMEOUT,
        )


async def check_server(adapter: Adapter, database: str) -> Document:
    """
    Ask the server who it is and refuse servers we cannot work with.

    It asks with ``hello``, or with ``isMaster`` on servers older than ``hello``
    (MongoDB 4.4.2, 4.2.10 and 4.0.21 introduced it), which answers the same.

    :return: the reply (empty for an in-process fake, which has no server)
    :raises RuntimeError: if the server is too old, or knows neither command
    :raises pymongo.errors.OperationFailure: if the server refuses us (for example,
        authentication failed)
    """
    try:
        reply = await adapter.command(database, "hello")
    except OperationFailure as exc:
        if exc.code != _COMMAND_NOT_FOUND:
            raise  # e.g. authentication failed: the driver's error says it best

        try:
            reply = await adapter.command(database, "isMaster")
        except OperationFailure as legacy:
            if legacy.code != _COMMAND_NOT_FOUND:
                raise

            raise RuntimeError(
                "the server knows neither 'hello' nor 'isMaster'; is it MongoDB "
                f"{MIN_SERVER_VERSION} or later?"
            ) from exc

    if reply is None:
        return {}

    wire_version = reply.get("maxWireVersion")
    if not isinstance(wire_version, int) or wire_version < MIN_WIRE_VERSION:
        raise RuntimeError(
            f"MongoDB {MIN_SERVER_VERSION} or later is required (the server reports "
            f"wire version {wire_version!r})"
        )

    return reply


@contextmanager
def explaining_unreachable_servers(adapter: Adapter) -> Iterator[None]:
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
        errors = {
            f"{host}:{port}": description.error
            for (host, port), description in adapter.server_descriptions().items()
        }
        if strangers := {
            address: error
            for address, error in errors.items()
            if isinstance(error, ProtocolError)
        }:
            raise ServerSelectionTimeoutError(_strangers_message(strangers)) from exc

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


def _strangers_message(strangers: Mapping[str, Any]) -> str:
    addresses, reasons = _listed(strangers)
    subject = "the server at" if len(strangers) == 1 else "the servers at"
    verb = "does" if len(strangers) == 1 else "do"
    return (
        f"{subject} {addresses} {verb} not speak the MongoDB wire protocol "
        f"(pymongo: {reasons}); is it really a MongoDB server, and is the port right?"
    )


def _listed(errors: Mapping[str, Any]) -> tuple[str, str]:
    """Return the addresses and the (redacted) errors of ``errors``, as text."""
    return ", ".join(errors), "; ".join(redact(str(e)) for e in errors.values())


def server_errors(adapter: Adapter) -> list[str]:
    """Return what the driver last met at each server that failed (names it)."""
    return [
        str(description.error)
        for description in adapter.server_descriptions().values()
        if description.error is not None
    ]


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
