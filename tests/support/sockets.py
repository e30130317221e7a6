"""
The driver's socket leaks, kept apart from ours in the test process.

The tests turn every warning into an error, to catch our own leaks. Our package opens
no socket itself: every socket in the test process is pymongo's, the proxy's, or a
test client's. pymongo (4.18.3 and 4.20.1, as measured) leaves sockets to the garbage
collector when closing a client cancels a monitor in the middle of making a
connection (upstream: PYTHON-5867): the garbage collector then reports them as a
``ResourceWarning`` in whichever later test it happens to run.

- It does not close the socket of a connect that is cancelled:
  :func:`close_cancelled_connects` makes asyncio close it, as a fixed driver would.
- On Python 3.10 and 3.11, where :func:`asyncio.wait_for` runs what it waits for in
  a task of its own, the monitors' connection set-up has more such windows (the
  transport, the handshake, the pool's lock on the way out), and one of their
  sockets, by its shape from such a later step, failed a full run on 3.10 after the
  cancelled connects were closed. :data:`DRIVER_LEAK_FILTERS` lets
  those sockets go unreported on those Pythons only: on 3.12 and later, which run the
  same tests over the same code, an unclosed socket or transport stays an error, and
  so does an unclosed client (pymongo's own ``Unclosed AsyncMongoClient``) everywhere.

Users meet at most that warning; the garbage collector closes the socket.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from asyncio.selector_events import BaseSelectorEventLoop
from typing import Any

_original = BaseSelectorEventLoop.sock_connect

#: ``filterwarnings`` lines for the tests, on the Pythons where the driver's leaks
#: cannot be kept apart from others (the messages of a socket's and a transport's
#: finalizer; neither matches pymongo's ``Unclosed AsyncMongoClient``)
DRIVER_LEAK_FILTERS = (
    [
        r"ignore:unclosed <socket\.socket:ResourceWarning",
        r"ignore:unclosed transport <_SelectorSocketTransport:ResourceWarning",
    ]
    if sys.version_info < (3, 12)
    else []
)


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
