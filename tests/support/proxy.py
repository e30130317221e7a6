"""
A loopback TCP proxy that cuts connections on demand, for fault tests.

:class:`FaultyProxy` listens on a free port of 127.0.0.1 and forwards bytes both ways
to a server on 127.0.0.1. It runs its own event loop in a background thread, so that
the test (and processes connecting through it) keep running while it cuts.

It reads the MongoDB wire protocol's framing (each message starts with its length),
forwarding every message unchanged, so that it can also lose the reply to a chosen
command after the server has carried it out (:meth:`FaultyProxy.lose_reply_to`).
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

import pytest
from apscheduler import RetrySettings
from tenacity import stop_after_delay, wait_fixed

from .faults import FaultPlan

#: URI options for clients behind the proxy: fail fast while it cuts, and leave
#: retrying reads to the store and broker (pymongo would otherwise retry a failed
#: read once by itself, hiding their recovery code from the tests)
FAST_FAILURE: dict[str, str | int] = {
    "serverSelectionTimeoutMS": 2000,
    "connectTimeoutMS": 1000,
    "retryReads": "false",
}
#: Retry settings for stores and brokers behind the proxy
FAULT_RETRIES = RetrySettings(stop=stop_after_delay(30), wait=wait_fixed(0.1))

T = TypeVar("T")

#: A message header: messageLength, requestID, responseTo, opCode (little-endian)
_HEADER = struct.Struct("<iiii")
#: OP_MSG, the opcode of every command pymongo sends to a current server
OP_MSG = 2013
#: OP_MSG's flag bit saying a CRC-32C checksum ends the message
_CHECKSUM_PRESENT = 1
#: The largest message a server accepts (48 MB); longer lengths mean no framing
_MAX_MESSAGE = 48_000_000

LOOPBACK = "127.0.0.1"
#: ``mongodb://[userinfo@]127.0.0.1:PORT`` followed by the path and query string
_LOOPBACK_URI = re.compile(r"^(mongodb://(?:[^@/]*@)?)(127\.0\.0\.1|localhost):(\d+)")


def loopback_port(uri: str) -> int | None:
    """Return the port of a single-host ``mongodb://`` URI on 127.0.0.1, else None."""
    match = _LOOPBACK_URI.match(uri)
    if match is None or "," in uri.partition("?")[0]:
        return None

    return int(match.group(3))


def proxy_in_front_of(uri: str, faults: FaultPlan | None = None) -> FaultyProxy:
    """
    Return a proxy (to enter) for the one server on 127.0.0.1 that ``uri`` names.

    Skip the calling test if ``uri`` names anything else (a replica set, a remote
    host): the proxy only stands in for a single loopback server.

    :param faults: what the proxy is to answer or change itself (see
        :class:`~tests.support.faults.FaultPlan`)
    """
    port = loopback_port(uri)
    if port is None:
        pytest.skip("the proxy stands in for a single server on 127.0.0.1 only")

    return FaultyProxy(LOOPBACK, port, faults)


@contextmanager
def proxied(uri: str) -> Iterator[tuple[FaultyProxy, str]]:
    """
    Run a proxy in front of the server ``uri`` names; yield it and the URI through it.

    The URI has the :data:`FAST_FAILURE` options.
    """
    with proxy_in_front_of(uri) as proxy:
        yield proxy, proxy.uri_for(uri, **FAST_FAILURE)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection at once with a reset, as a failing network would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        except OSError:
            pass

    writer.transport.abort()


def command_name(message: bytes) -> str | None:
    """
    Return the command an OP_MSG message carries (its body's first key), else None.

    ``message`` is one whole message, header included. Other opcodes (such as
    OP_COMPRESSED, which would hide the command) and malformed messages give None.
    """
    if len(message) < _HEADER.size + 5:
        return None

    length, _, _, opcode = _HEADER.unpack_from(message)
    if opcode != OP_MSG or length != len(message):
        return None

    (flags,) = struct.unpack_from("<I", message, _HEADER.size)
    end = length - 4 if flags & _CHECKSUM_PRESENT else length
    position = _HEADER.size + 4
    while position < end:
        kind = message[position]
        position += 1
        if position + 4 > end:
            return None

        (size,) = struct.unpack_from("<i", message, position)
        if kind == 0:
            # One BSON document: int32 size, then elements (type, cstring name, …)
            name_end = message.find(b"\0", position + 5, end)
            if size <= 5 or name_end < 0:
                return None

            return message[position + 5 : name_end].decode("utf-8", "replace")

        if kind != 1 or size < 4:  # a document sequence: int32 size, name, documents
            return None

        position += size

    return None


class _Connection:
    """One client connection and its connection to the target."""

    def __init__(
        self, client: asyncio.StreamWriter, server: asyncio.StreamWriter
    ) -> None:
        self.client = client
        self.server = server
        #: Request ids whose replies are to be lost, with their command names
        self.doomed: dict[int, str] = {}
        #: Request ids whose replies are to be rewritten, with the rewriting
        self.rewrites: dict[int, Callable[[bytes], bytes]] = {}

    def close(self) -> None:
        _reset(self.client)
        _reset(self.server)


class FaultyProxy:
    """
    Forward TCP connections from 127.0.0.1 to a loopback target, cutting on demand.

    Use it as a context manager; :attr:`port` is where it listens.

    :param target_host: the host to forward to (only ``127.0.0.1`` or ``localhost``)
    :param target_port: the port to forward to
    """

    def __init__(
        self, target_host: str, target_port: int, faults: FaultPlan | None = None
    ) -> None:
        if target_host not in (LOOPBACK, "localhost"):
            raise ValueError(
                f"the proxy only forwards to {LOOPBACK}, not {target_host}"
            )

        self.target_port = target_port
        #: What the proxy answers or changes itself, and what it records
        self.faults = faults
        #: How many times :meth:`cut` (or :meth:`refuse_for`) was called
        self.cuts = 0
        #: How many open connections the cuts closed
        self.connections_cut = 0
        #: How many connections were accepted (and forwarded)
        self.connections = 0
        #: How many connections were reset at once while refusing
        self.refused = 0
        #: How many replies :meth:`lose_reply_to` made the proxy lose
        self.replies_lost = 0
        #: The commands whose replies were lost, in order
        self.lost_commands: list[str] = []
        self._lose_commands: frozenset[str] = frozenset()
        self._lose_count = 0
        self._port = 0
        self._open: set[_Connection] = set()
        #: Every connection's handler, from the moment it was accepted
        self._handlers: set[asyncio.Task[None]] = set()
        #: Every socket of every connection, either side, until it is closed
        self._transports: set[asyncio.WriteTransport] = set()
        self._refuse_until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name="FaultyProxy", daemon=True
        )

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        return self._port

    def uri_for(self, uri: str, **options: str | int) -> str:
        """
        Rewrite a single-host loopback ``mongodb://`` URI to point at the proxy.

        The path and query string are kept; ``options`` are appended to the query.

        :raises ValueError: if ``uri`` does not name one host on 127.0.0.1
        """
        if loopback_port(uri) is None:
            raise ValueError("the proxy only stands in for one server on 127.0.0.1")

        rewritten = _LOOPBACK_URI.sub(rf"\g<1>{LOOPBACK}:{self._port}", uri, count=1)
        if options:
            base, _, query = rewritten.partition("?")
            if "/" not in base[len("mongodb://") :]:
                base += "/"

            extra = "&".join(f"{key}={value}" for key, value in options.items())
            rewritten = f"{base}?{query}&{extra}" if query else f"{base}?{extra}"

        return rewritten

    def cut(self) -> int:
        """Close every open connection, both sides, at once; return how many."""
        return self._call(self._cut())

    def refuse_for(self, seconds: float) -> int:
        """Cut, then reset new connections at once for ``seconds``; return cut count."""
        return self._call(self._cut(refuse_for=seconds))

    def lose_reply_to(self, *command_names: str, count: int = 1) -> None:
        """
        Lose the replies to the next ``count`` commands named ``command_names``.

        Such a command reaches the server intact, so the server carries it out; its
        reply is never forwarded: the proxy resets the connection (both sides)
        instead, and the client sees a network error (pymongo raises
        :exc:`~pymongo.errors.AutoReconnect`) without knowing whether the command
        took effect. Each lost reply counts in :attr:`replies_lost`. Arming again
        replaces the previous arming; ``count=0`` disarms.

        Commands are recognized in OP_MSG messages only (not in compressed ones).

        :param command_names: command names as sent (``"insert"``, ``"update"``,
            ``"findAndModify"``, ``"delete"`` …)
        :param count: how many commands to lose the replies to
        :raises ValueError: if no command is named, or ``count`` is negative
        """
        if not command_names:
            raise ValueError("name at least one command")

        if count < 0:
            raise ValueError(f"count must not be negative, not {count}")

        self._call(self._arm(frozenset(command_names), count))

    async def _arm(self, command_names: frozenset[str], count: int) -> None:
        self._lose_commands = command_names
        self._lose_count = count

    def _request(self, connection: _Connection, message: bytes) -> bytes | None:
        """Return the request to forward (nothing if answered here); note doomed."""
        _, request_id, _, _ = _HEADER.unpack_from(message)
        if self.faults is not None:
            answer = self.faults.request(message)
            if isinstance(answer, bytes):
                connection.client.write(answer)
                return b""

            if answer is not None:
                connection.rewrites[request_id] = answer

        if self._lose_count > 0:
            name = command_name(message)
            if name is not None and name in self._lose_commands:
                self._lose_count -= 1
                connection.doomed[request_id] = name

        return message

    def _reply(self, connection: _Connection, message: bytes) -> bytes | None:
        """Return the reply to forward; for a doomed request, reset instead (None)."""
        _, _, response_to, _ = _HEADER.unpack_from(message)
        if rewrite := connection.rewrites.pop(response_to, None):
            message = rewrite(message)

        name = connection.doomed.pop(response_to, None)
        if name is None:
            return message

        # The server carried the command out; the client never hears so
        self.replies_lost += 1
        self.lost_commands.append(name)
        self._open.discard(connection)
        connection.close()
        return None

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start within 10 seconds")

        if self._error is not None:
            raise RuntimeError("the proxy failed to start") from self._error

        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

        self._thread.join(10)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the proxy is not running")

        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _cut(self, refuse_for: float = 0.0) -> int:
        if refuse_for:
            self._refuse_until = asyncio.get_running_loop().time() + refuse_for

        closed = self._close_all()
        self.cuts += 1
        self.connections_cut += closed
        return closed

    def _close_all(self) -> int:
        connections = list(self._open)
        self._open.clear()
        for connection in connections:
            connection.close()

        return len(connections)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accepted, LOOPBACK, 0)
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            await self._close_everything()
            await server.wait_closed()

    def _accepted(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        # Called as the connection is accepted: its socket is known from now on,
        # even if the proxy stops before the handler's first step
        if self._stop is not None and self._stop.is_set():  # accepted as it stops
            _reset(client_writer)
            return

        self._track(client_writer)
        handler = asyncio.ensure_future(self._accept(client_reader, client_writer))
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)

    def _track(self, writer: asyncio.StreamWriter) -> None:
        # Those already closing need nothing more (which keeps the set small)
        self._transports = {t for t in self._transports if not t.is_closing()}
        self._transports.add(writer.transport)

    async def _close_everything(self) -> None:
        """
        Close every connection, handled or not yet, before the proxy's loop ends.

        A socket left to the loop's end would only be closed by the garbage
        collector, with a ``ResourceWarning`` in whichever later test it happens.
        """
        self._close_all()
        for handler in list(self._handlers):
            handler.cancel()

        await asyncio.gather(*self._handlers, return_exceptions=True)
        for transport in self._transports:
            transport.abort()

        self._transports.clear()
        # Aborting closes each socket in a callback of the loop's next iteration
        await asyncio.sleep(0)

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        assert self._loop is not None
        if self._loop.time() < self._refuse_until:
            self.refused += 1
            _reset(client_writer)
            return

        try:
            server_reader, server_writer = await asyncio.open_connection(
                LOOPBACK, self.target_port
            )
        except OSError:
            _reset(client_writer)
            return
        except BaseException:  # the proxy stops (its loop cancels every task)
            _reset(client_writer)
            raise

        self._track(server_writer)
        connection = _Connection(client_writer, server_writer)
        if self._loop.time() < self._refuse_until:  # refusing began meanwhile
            self.refused += 1
            connection.close()
            return

        self._open.add(connection)
        self.connections += 1
        try:
            await asyncio.gather(
                _pump(
                    client_reader,
                    server_writer,
                    lambda message: self._request(connection, message),
                ),
                _pump(
                    server_reader,
                    client_writer,
                    lambda message: self._reply(connection, message),
                ),
            )
        finally:
            # One side closed (or was cut): close the other side too
            if connection in self._open:
                self._open.discard(connection)
                connection.close()


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    forward: Callable[[bytes], bytes | None],
) -> None:
    """
    Copy messages from ``reader`` to ``writer`` until either side closes.

    Each whole message goes to ``forward`` first, which returns what to write instead
    (the message itself, a rewritten one, or nothing at all); when it returns None,
    the message is dropped and the copying ends (closing ``writer``; the caller
    closes the rest). Bytes that are not framed as wire messages are copied as they
    come.
    """
    try:
        while header := await _read_at_most(reader, _HEADER.size):
            length = _HEADER.unpack(header)[0] if len(header) == _HEADER.size else 0
            if not _HEADER.size <= length <= _MAX_MESSAGE:
                # Not the wire protocol (or a truncated header): copy bytes blindly
                writer.write(header)
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()

                return

            try:
                body = await reader.readexactly(length - _HEADER.size)
            except asyncio.IncompleteReadError as exc:  # closed mid-message
                writer.write(header + exc.partial)
                await writer.drain()
                return

            message = forward(header + body)
            if message is None:
                return

            if message:
                writer.write(message)
                await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()


async def _read_at_most(reader: asyncio.StreamReader, size: int) -> bytes:
    """Read ``size`` bytes, or fewer if the stream ends first."""
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        return exc.partial


@contextmanager
def cutting(
    proxy: FaultyProxy, every: float, refuse_for: float = 0.0, jitter: float = 0.0
) -> Iterator[list[float]]:
    """
    Cut the proxy's connections every ``every`` seconds, from a thread, until exit.

    With ``refuse_for``, each cut also refuses new connections for that long.
    With ``jitter``, each interval is drawn at random within ``every`` plus or minus
    that fraction of it (the mean stays ``every``): pymongo works in steps of
    0.5 s (its shortest heartbeat interval, and server selection's waits), and cuts
    at a fixed period that is a multiple of it can keep in step with one client's
    reconnections, cutting each of them, so that it alone falls far behind.
    Yields the list of the cuts' times (``time.time()``), filled in as they happen.
    """
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be at least 0 and under 1, not {jitter}")

    cut_times: list[float] = []
    done = threading.Event()

    def cut_repeatedly() -> None:
        while not done.wait(every * random.uniform(1.0 - jitter, 1.0 + jitter)):
            if refuse_for:
                proxy.refuse_for(refuse_for)
            else:
                proxy.cut()

            cut_times.append(time.time())

    thread = threading.Thread(target=cut_repeatedly, name="cutter", daemon=True)
    thread.start()
    try:
        yield cut_times
    finally:
        done.set()
        thread.join(10)
