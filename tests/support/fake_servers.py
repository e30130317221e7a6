"""
Loopback TCP servers that are not the MongoDB a store or broker expects.

:class:`FakeServer` listens on a free port of 127.0.0.1 in the running event loop and
hands every connection to a handler. The handlers here play an old MongoDB (just
enough of the wire protocol to answer the handshake), a web server, a server that
hangs up at once, and one that answers with noise; :func:`free_port` finds a port
where no server listens at all.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import bson

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

LOOPBACK = "127.0.0.1"

OP_REPLY = 1
OP_QUERY = 2004
OP_MSG = 2013
_HEADER = struct.Struct("<iiii")  # length, request id, response to, opcode
_HELLO_COMMANDS = {"hello", "ismaster", "isMaster"}
_COMMAND_NOT_FOUND = 59


def free_port() -> int:
    """Return a loopback port that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]

    return port


class FakeServer:
    """
    Serve ``handler`` on a free loopback port while the context is open.

    :param handler: called with the reader and writer of each accepted connection
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        #: How many connections were accepted
        self.connections = 0

    @property
    def port(self) -> int:
        """The port the server listens (or listened) on."""
        assert self._port, "the server was never started"
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as the drivers and our messages spell it."""
        return f"{LOOPBACK}:{self.port}"

    async def __aenter__(self) -> FakeServer:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

        await self._server.wait_closed()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            await self._handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client hung up first
        finally:
            self._writers.discard(writer)
            writer.close()


# Just enough of MongoDB


def hello_reply(max_wire_version: int, min_wire_version: int = 0) -> dict[str, Any]:
    """Return what a standalone MongoDB of ``max_wire_version`` says to ``hello``."""
    return {
        "ismaster": True,
        "helloOk": True,
        "maxBsonObjectSize": 16 * 1024 * 1024,
        "maxMessageSizeBytes": 48_000_000,
        "maxWriteBatchSize": 100_000,
        "localTime": datetime.now(timezone.utc),
        "minWireVersion": min_wire_version,
        "maxWireVersion": max_wire_version,
        "readOnly": False,
        "ok": 1.0,
    }


def _answer(command: dict[str, Any], max_wire_version: int) -> dict[str, Any]:
    name = next(iter(command), "")
    if name in _HELLO_COMMANDS:
        return hello_reply(max_wire_version)

    if name == "endSessions":
        return {"ok": 1.0}

    return {
        "ok": 0.0,
        "errmsg": f"no such command: '{name}'",
        "code": _COMMAND_NOT_FOUND,
        "codeName": "CommandNotFound",
    }


def _read_op_query(body: bytes) -> dict[str, Any]:
    # flags, full collection name (a C string), skip, limit, then the query
    name_end = body.index(b"\x00", 4)
    document = body[name_end + 1 + 8 :]
    (size,) = struct.unpack_from("<i", document)
    return bson.decode(document[:size])


def _read_op_msg(body: bytes) -> dict[str, Any]:
    # flag bits, then sections; the command is the kind-0 section
    offset = 4
    while offset < len(body):
        kind = body[offset]
        offset += 1
        (size,) = struct.unpack_from("<i", body, offset)
        if kind == 0:
            return bson.decode(body[offset : offset + size])

        offset += size

    raise ValueError("OP_MSG without a body section")


def _op_reply(request_id: int, document: dict[str, Any]) -> bytes:
    payload = struct.pack("<iqii", 0, 0, 0, 1) + bson.encode(document)
    return _HEADER.pack(_HEADER.size + len(payload), 0, request_id, OP_REPLY) + payload


def _op_msg(request_id: int, document: dict[str, Any]) -> bytes:
    payload = struct.pack("<I", 0) + b"\x00" + bson.encode(document)
    return _HEADER.pack(_HEADER.size + len(payload), 0, request_id, OP_MSG) + payload


def old_mongodb(max_wire_version: int) -> Handler:
    """
    Return a handler that plays a standalone MongoDB of ``max_wire_version``.

    It answers the handshake (``OP_QUERY`` or ``OP_MSG``) and ``hello``; every
    other command fails with *CommandNotFound*.
    """

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            header = await reader.readexactly(_HEADER.size)
            length, request_id, _, opcode = _HEADER.unpack(header)
            body = await reader.readexactly(length - _HEADER.size)
            if opcode == OP_QUERY:
                command = _read_op_query(body)
                writer.write(_op_reply(request_id, _answer(command, max_wire_version)))
            elif opcode == OP_MSG:
                command = _read_op_msg(body)
                writer.write(_op_msg(request_id, _answer(command, max_wire_version)))
            else:
                return  # nothing else is spoken here: hang up

            await writer.drain()

    return handle


# Not MongoDB at all


async def http_server(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer whatever comes first as a web server would, then hang up."""
    await reader.read(65536)
    body = b"This is not a MongoDB server\n"
    writer.write(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close every connection as soon as it is accepted."""


async def noise(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer whatever comes first with (seeded, so repeatable) random bytes."""
    await reader.read(65536)
    writer.write(random.Random(2013).randbytes(256))
    await writer.drain()
