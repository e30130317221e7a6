"""
Close the socket of a connect that is cancelled, in the test process.

pymongo (4.18.3 and 4.20.1, as measured) creates a socket and connects it with
``asyncio.wait_for(loop.sock_connect(...))``, closing it on a timeout or an
``OSError`` but not on a cancellation (upstream: PYTHON-5867). Closing a client
cancels its monitors, so a monitor that was connecting just then leaves its socket
to the garbage collector, which reports it as a ``ResourceWarning`` in whichever
later test it happens to run. The window is wide on Python 3.10 and 3.11, where
``wait_for`` runs the connect in a task of its own: in ``test_lifecycle``'s
outage tests, nearly every run.

The tests turn every warning into an error, to catch our own leaks; this one is
the driver's, so the tests close such sockets at once, as a fixed driver would.
Users meet at most that warning, and the file descriptor is closed by the
garbage collector all the same.
"""

from __future__ import annotations

import asyncio
import socket
from asyncio.selector_events import BaseSelectorEventLoop
from typing import Any

_original = BaseSelectorEventLoop.sock_connect


async def _sock_connect(
    self: BaseSelectorEventLoop, sock: socket.socket, address: Any
) -> None:
    try:
        await _original(self, sock, address)
    except asyncio.CancelledError:
        sock.close()  # a half-made connection is of no use to anyone
        raise


def close_cancelled_connects() -> None:
    """Make asyncio's selector loops close a socket whose connect is cancelled."""
    BaseSelectorEventLoop.sock_connect = _sock_connect  # type: ignore[method-assign, assignment]
