"""
Stored data written by an attacker: payloads that run code when deserialized.

Each gadget creates a marker file if anything runs it, so a test can check that
showing the data ran nothing: the marker must never exist.
"""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

#: An integer whose ``repr`` raises (more digits than Python converts to text)
HUGE_INTEGER = 10**5000


class _Reduces:
    """Pickles as a call of ``function`` with ``arguments`` (what a gadget is)."""

    def __init__(self, function: Any, *arguments: Any) -> None:
        self.function = function
        self.arguments = arguments

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.function, self.arguments


def system_gadget(marker: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    """Return a pickle whose loading runs ``os.system('touch <marker>')``."""
    return pickle.dumps(_Reduces(os.system, f"touch {marker}"), protocol)


def exec_gadget(marker: Path) -> bytes:
    """Return a pickle whose loading runs ``exec()`` on code creating the marker."""
    code = f"open({str(marker)!r}, 'w').close()"
    return pickle.dumps(_Reduces(builtins.exec, code))


def popen_gadget(marker: Path) -> bytes:
    """Return a pickle whose loading starts ``touch <marker>``."""
    return pickle.dumps(_Reduces(subprocess.Popen, ["touch", str(marker)]))


def protocol_0_gadget(marker: Path) -> bytes:
    """Return a hand-written protocol 0 pickle: ``GLOBAL os system`` called."""
    return f"cos\nsystem\n(V{'touch ' + str(marker)}\ntR.".encode()


def marker_module(directory: Path, marker: Path, name: str = "planted") -> str:
    """
    Write a module into ``directory`` that creates ``marker`` when imported, and
    return its name (put ``directory`` on ``sys.path`` to make it importable).
    """
    source = (
        f"open({str(marker)!r}, 'w').close()\n\n\n"
        "class Payload:\n"
        "    def __setstate__(self, state):\n"
        "        self.__dict__.update(state)\n"
    )
    (directory / f"{name}.py").write_text(source)
    return name


def json_naming(module: str) -> bytes:
    """Return APScheduler's JSON form of an object of a class of ``module``."""
    return b'{"_apscheduler_json": ["' + module.encode() + b':Payload", {"x": 1}]}'


def cbor_naming(module: str) -> bytes:
    """Return APScheduler's CBOR form (tag 4664) of an object of ``module``."""
    import cbor2

    return cbor2.dumps(cbor2.CBORTag(4664, [f"{module}:Payload", {"x": 1}]))
