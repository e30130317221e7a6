"""Test servers: where the wire tier finds a MongoDB to talk to."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

WIRE_SERVER_SCRIPT = Path(__file__).with_name("mongoeco_server.py")
#: A Python (>= 3.13, with ``mongoeco[wire]``) to run the wire server under; ``nox -s
#: tests`` sets it for the sessions whose own Python is older
WIRE_PYTHON_VARIABLE = "APSCHEDULER_MONGO_WIRE_PYTHON"
#: Newer Pythons that may be on PATH under these names (mongoeco needs 3.13 or later)
_NEWER_PYTHONS = [f"python3.{minor}" for minor in range(13, 20)]
#: Prints the Python's and mongoeco's versions, or fails where mongoeco cannot run
_DESCRIBE_MONGOECO = """
import sys
from importlib.metadata import version
import mongoeco.wire
if sys.version_info < (3, 13):
    sys.exit(1)
print(f"Python {sys.version.split()[0]}, mongoeco {version('mongoeco')}")
"""


@functools.cache
def _mongoeco_under(python: str) -> str | None:
    """Return the versions of ``python`` and its mongoeco, if it can run the server."""
    try:
        check = subprocess.run(
            [python, "-c", _DESCRIBE_MONGOECO],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None

    return check.stdout.strip() if check.returncode == 0 else None


@functools.cache
def wire_python() -> str | None:
    """
    Return the Python that runs the mongoeco wire server here, or ``None``.

    It is the one ``APSCHEDULER_MONGO_WIRE_PYTHON`` names if that is set (and only
    that one), otherwise this Python if it can, otherwise the first ``python3.13``,
    ``python3.14`` ... on ``PATH`` that has mongoeco. The server runs in a process of
    its own, so the tests may run on any Python.
    """
    if configured := os.environ.get(WIRE_PYTHON_VARIABLE):
        return configured if _mongoeco_under(configured) else None

    found = (shutil.which(name) for name in _NEWER_PYTHONS)
    for python in [sys.executable, *(path for path in found if path)]:
        if _mongoeco_under(python):
            return python

    return None


def wire_unavailable_reason() -> str | None:
    """Return why the wire tier cannot run here, or ``None`` if it can."""
    if os.environ.get("MONGODB_URI") or wire_python() is not None:
        return None

    if configured := os.environ.get(WIRE_PYTHON_VARIABLE):
        return (
            f"{WIRE_PYTHON_VARIABLE} names {configured!r}, which is no Python >= 3.13 "
            f"with mongoeco[wire] installed"
        )

    return (
        "no MONGODB_URI is set, and no Python >= 3.13 with mongoeco[wire] was found "
        "to run the mongoeco wire server (run the tests with 'nox -s tests', which "
        f"provides one, or set {WIRE_PYTHON_VARIABLE} to such a Python)"
    )


def describe_wire_server() -> str:
    """Say what the wire tier talks to, without any URI (it may hold credentials)."""
    if os.environ.get("MONGODB_URI"):
        return "the server at MONGODB_URI"

    python = wire_python()
    if python is None:
        return "no server"

    return f"a mongoeco wire server started by the tests ({_mongoeco_under(python)})"


@contextmanager
def mongoeco_process(auth: tuple[str, str] | None = None) -> Iterator[int]:
    """
    Start the mongoeco wire server on a free loopback port; yield the port.

    :param auth: a user name and password the server then requires
    :raises RuntimeError: if no Python here can run the server, or it did not start
    """
    python = wire_python()
    if python is None:
        raise RuntimeError(wire_unavailable_reason())

    process = subprocess.Popen(
        [python, str(WIRE_SERVER_SCRIPT), "0", *(auth or ())],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"the mongoeco server did not start: {line!r}")

        yield int(line.split()[1])
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()
            process.wait()

        if process.stdout is not None:
            process.stdout.close()


@contextmanager
def mongoeco_server() -> Iterator[str]:
    """Start the mongoeco wire server on a free loopback port; yield its URI."""
    with mongoeco_process() as port:
        yield f"mongodb://127.0.0.1:{port}/?directConnection=true"


@contextmanager
def wire_server_uri() -> Iterator[str]:
    """Yield ``MONGODB_URI`` if set, otherwise the URI of a fresh mongoeco server."""
    if uri := os.environ.get("MONGODB_URI"):
        yield uri
    else:
        with mongoeco_server() as uri:
            yield uri


#: Skip a test that starts a mongoeco server of its own (one that requires
#: authentication, say) where no Python can run one, even with ``MONGODB_URI`` set
needs_mongoeco = pytest.mark.skipif(
    wire_python() is None,
    reason="starts a mongoeco server of its own, and no Python >= 3.13 with "
    "mongoeco[wire] was found",
)
