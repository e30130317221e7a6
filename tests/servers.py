"""Test servers: where the wire tier finds a MongoDB to talk to."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WIRE_SERVER_SCRIPT = Path(__file__).with_name("mongoeco_server.py")


def mongoeco_available() -> bool:
    return (
        sys.version_info >= (3, 13) and importlib.util.find_spec("mongoeco") is not None
    )


def wire_unavailable_reason() -> str | None:
    """Return why the wire tier cannot run here, or ``None`` if it can."""
    if os.environ.get("MONGODB_URI") or mongoeco_available():
        return None

    return (
        "no MONGODB_URI is set and the mongoeco wire server needs Python >= 3.13 "
        "with mongoeco[wire] installed"
    )


@contextmanager
def mongoeco_process(auth: tuple[str, str] | None = None) -> Iterator[int]:
    """
    Start the mongoeco wire server on a free loopback port; yield the port.

    :param auth: a user name and password the server then requires
    """
    process = subprocess.Popen(
        [sys.executable, str(WIRE_SERVER_SCRIPT), "0", *(auth or ())],
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
