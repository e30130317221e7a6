"""
What only a real server shows, injected at the wire in front of the stand-in.

A :class:`FaultPlan` given to :class:`~tests.support.proxy.FaultyProxy` sees every
command (OP_MSG) on its way to the server and every reply on its way back. It can

* answer chosen commands itself with a chosen error (code, code name, labels), as a
  mongos with an unreachable shard or a stepping-down primary would, without the
  server seeing them;
* add a write concern error to the replies of chosen commands, which the server did
  carry out (as when a majority could not confirm a write in time);
* play an old server, which has no ``hello`` command and sends no ``helloOk`` in its
  handshake replies, or a replica set member (``setName`` in those replies);
* record each command with its write concern and read preference.

Only OP_MSG is understood: pymongo sends every command, handshakes included, as OP_MSG
to servers of wire version 9 and later; other messages pass unchanged.
"""

from __future__ import annotations

import itertools
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import attrs
import bson

#: messageLength, requestID, responseTo, opCode (little-endian)
_HEADER = struct.Struct("<iiii")
OP_MSG = 2013
#: OP_MSG's flag bit saying a CRC-32C checksum ends the message
_CHECKSUM_PRESENT = 1
#: The commands a handshake or a monitor check is made of
HANDSHAKES = frozenset({"hello", "isMaster", "ismaster"})
_request_ids = itertools.count(1_000_000)
#: A change made to a reply's body
_Change = Callable[[dict[str, Any]], None]


@attrs.frozen
class Command:
    """One command as the proxy saw it on its way to the server."""

    name: str
    database: str | None
    #: The collection named by the command, if it names one
    collection: str | None
    write_concern: Mapping[str, Any] | None
    read_preference: Mapping[str, Any] | None
    body: Mapping[str, Any]


@attrs.define
class _Rule:
    commands: frozenset[str]
    count: int
    #: The reply to send (for answers) or the error to add (for concern errors)
    document: dict[str, Any]
    where: Callable[[Mapping[str, Any]], bool] | None = None

    def takes(self, name: str, body: Mapping[str, Any]) -> bool:
        if self.count <= 0 or name not in self.commands:
            return False

        return self.where is None or self.where(body)


def parse_op_msg(message: bytes) -> tuple[int, int, int, dict[str, Any]] | None:
    """
    Return the request id, response-to id, flags and body of an OP_MSG message.

    ``None`` for other opcodes or for a message without a body section first.
    """
    length, request_id, response_to, opcode = _HEADER.unpack_from(message)
    if opcode != OP_MSG or length != len(message):
        return None

    (flags,) = struct.unpack_from("<I", message, _HEADER.size)
    position = _HEADER.size + 4
    if message[position] != 0:
        return None

    (size,) = struct.unpack_from("<i", message, position + 1)
    body = bson.decode(message[position + 1 : position + 1 + size])
    return request_id, response_to, flags, body


def op_msg(response_to: int, body: Mapping[str, Any], flags: int = 0) -> bytes:
    """Return an OP_MSG message holding ``body`` (as a reply to ``response_to``)."""
    payload = struct.pack("<I", flags & ~_CHECKSUM_PRESENT) + b"\0" + bson.encode(body)
    header = _HEADER.pack(
        _HEADER.size + len(payload), next(_request_ids), response_to, OP_MSG
    )
    return header + payload


def _rewritten(message: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Return a reply with its body changed by ``change`` (other replies unchanged)."""
    parsed = parse_op_msg(message)
    if parsed is None:
        return message

    request_id, response_to, flags, body = parsed
    change(body)
    payload = struct.pack("<I", flags & ~_CHECKSUM_PRESENT) + b"\0" + bson.encode(body)
    header = _HEADER.pack(_HEADER.size + len(payload), request_id, response_to, OP_MSG)
    return header + payload


class FaultPlan:
    """What a proxy answers or changes itself, and the commands it has seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: list[_Rule] = []
        self._concern_errors: list[_Rule] = []
        self._reply_changes: list[
            tuple[frozenset[str], Callable[[dict[str, Any]], None]]
        ]
        self._reply_changes = []
        #: Every command seen, in order
        self.commands: list[Command] = []
        #: How many commands the proxy answered itself, by command name
        self.answered: dict[str, int] = {}
        #: How many replies got a write concern error, by command name
        self.concern_errors: dict[str, int] = {}

    # Arming

    def answer(
        self,
        *commands: str,
        reply: Mapping[str, Any],
        count: int = 1,
        where: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> None:
        """
        Answer the next ``count`` of these commands with ``reply``; never forward them.

        :param where: only commands whose body it accepts (say, of one collection)
        """
        with self._lock:
            self._failures.append(_Rule(frozenset(commands), count, dict(reply), where))

    def fail(
        self,
        *commands: str,
        code: int,
        code_name: str = "",
        message: str = "injected error",
        labels: Sequence[str] = (),
        count: int = 1,
        where: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> None:
        """Answer the next ``count`` of these commands with an error (see answer())."""
        error: dict[str, Any] = {"ok": 0.0, "errmsg": message, "code": code}
        if code_name:
            error["codeName"] = code_name
        if labels:
            error["errorLabels"] = list(labels)

        self.answer(*commands, reply=error, count=count, where=where)

    def write_concern_error(
        self,
        *commands: str,
        code: int = 64,
        code_name: str = "WriteConcernFailed",
        message: str = "waiting for replication timed out",
        labels: Sequence[str] = (),
        count: int = 1,
        where: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> None:
        """Forward the next ``count`` of these commands; add a write concern error."""
        error: dict[str, Any] = {"code": code, "codeName": code_name, "errmsg": message}
        if labels:
            error["errorLabels"] = list(labels)

        with self._lock:
            self._concern_errors.append(_Rule(frozenset(commands), count, error, where))

    def old_server(self) -> None:
        """Play a server older than ``hello``: refuse it, send no ``helloOk``."""
        self.fail(
            "hello",
            code=59,
            code_name="CommandNotFound",
            message="no such command: 'hello'",
            count=1_000_000,
        )

        def no_hello_ok(body: dict[str, Any]) -> None:
            body.pop("helloOk", None)

        with self._lock:
            self._reply_changes.append(
                (frozenset({"isMaster", "ismaster"}), no_hello_ok)
            )

    def shift_clock(self, seconds: float) -> None:
        """Make the handshake replies tell a server time ``seconds`` ahead."""

        def shifted(body: dict[str, Any]) -> None:
            if isinstance(local_time := body.get("localTime"), datetime):
                body["localTime"] = local_time + timedelta(seconds=seconds)

        with self._lock:
            self._reply_changes.append((HANDSHAKES, shifted))

    def replica_set(self, name: str, me: str | None = None) -> None:
        """
        Make the handshake replies say the server is a replica set's primary.

        :param me: the member's address (``host:port``, the proxy's), for clients
            that discover the set rather than connect directly
        """

        def member(body: dict[str, Any]) -> None:
            if body.get("ok"):
                body["setName"] = name
                body["setVersion"] = 1
                if me is not None:
                    body.update(me=me, primary=me, hosts=[me])

        with self._lock:
            self._reply_changes.append((HANDSHAKES, member))

    # What the proxy calls

    def request(self, message: bytes) -> bytes | Callable[[bytes], bytes] | None:
        """
        Look at a request: return a reply to send instead of forwarding it, or a
        function that rewrites its reply, or None (forward it as it is).
        """
        parsed = parse_op_msg(message)
        if parsed is None:
            return None

        request_id, _, _, body = parsed
        name = next(iter(body), "")
        target = body.get(name)
        with self._lock:
            self.commands.append(
                Command(
                    name=name,
                    database=body.get("$db"),
                    collection=target if isinstance(target, str) else None,
                    write_concern=body.get("writeConcern"),
                    read_preference=body.get("$readPreference"),
                    body=body,
                )
            )
            for rule in self._failures:
                if rule.takes(name, body):
                    rule.count -= 1
                    self.answered[name] = self.answered.get(name, 0) + 1
                    return op_msg(request_id, rule.document)

            changes = [change for names, change in self._reply_changes if name in names]
            for rule in self._concern_errors:
                if rule.takes(name, body):
                    rule.count -= 1
                    self.concern_errors[name] = self.concern_errors.get(name, 0) + 1
                    changes.append(_adding_concern_error(rule.document))
                    break

        if not changes:
            return None

        def rewrite(reply: bytes) -> bytes:
            def change_all(body: dict[str, Any]) -> None:
                for change in changes:
                    change(body)

            return _rewritten(reply, change_all)

        return rewrite

    # Reading what was seen

    def seen(self, *names: str) -> list[Command]:
        """Return the commands seen with these names (all of them if none is named)."""
        with self._lock:
            return [c for c in self.commands if not names or c.name in names]


def _adding_concern_error(error: Mapping[str, Any]) -> Callable[[dict[str, Any]], None]:
    def add(body: dict[str, Any]) -> None:
        if body.get("ok"):
            body["writeConcernError"] = dict(error)

    return add
