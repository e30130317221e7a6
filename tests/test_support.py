"""The test tooling's own promises, where a broken one would hide a failure."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
import warnings

import pytest

from .support.broker_workers import PublishTimes, counting_logger
from .support.proxy import LOOPBACK, FaultyProxy, cutting

pytestmark = pytest.mark.anyio


async def test_a_cancelled_connect_closes_its_socket() -> None:
    """The stand-in for PYTHON-5867's fix (see ``support.sockets``) closes the
    socket whose connect was cancelled, rather than leaving it to the garbage
    collector."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    waiting: list[socket.socket] = []
    try:
        loop = asyncio.get_running_loop()
        # A listener whose queue is full drops the next handshake, so that
        # connect stays pending until it is cancelled
        for _ in range(8):
            sock = socket.socket()
            sock.setblocking(False)
            waiting.append(sock)
            connect = asyncio.ensure_future(
                loop.sock_connect(sock, listener.getsockname())
            )
            await asyncio.sleep(0.1)
            if not connect.done():
                break

            connect.result()
        else:
            pytest.fail("every connect completed: the queue never filled")

        connect.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connect

        assert sock.fileno() == -1
    finally:
        for sock in waiting:
            sock.close()

        listener.close()


def _reported(message: str) -> bool:
    """Whether a ``ResourceWarning`` with ``message`` fails the test it is in."""
    try:
        warnings.warn(message, ResourceWarning, stacklevel=2)
    except ResourceWarning:
        return True

    return False


def test_only_the_drivers_socket_leaks_go_unreported() -> None:
    """Before 3.12 the driver's unclosed sockets are not reported (see
    ``support.sockets``); an unclosed client is, everywhere, and so is any
    unclosed socket from 3.12 on."""
    leaks = [
        "unclosed <socket.socket fd=9, family=2, type=1, proto=6>",
        "unclosed transport <_SelectorSocketTransport fd=9>",
    ]
    client = "Unclosed AsyncMongoClient opened at:"
    reported = [m for m in [*leaks, client] if _reported(m)]

    if sys.version_info < (3, 12):
        assert reported == [client]
    else:
        assert reported == [*leaks, client]


def test_a_slow_publish_is_reported_with_its_retries() -> None:
    """A publisher's report says which publishes were slow and what was retried
    meanwhile, so a worker late at the barrier says where its time went."""
    logger, counter = counting_logger("test_support")
    times = PublishTimes(counter, slow=0.05)
    with times.timed(0):
        logger.warning("Temporary MongoDB error (attempt 1): before")

    with times.timed(1):
        logger.warning("Temporary MongoDB error (attempt 1): connection reset")
        time.sleep(0.1)

    report = times.report()
    assert report["seconds"] >= 0.1
    [(number, _, seconds, retries)] = report["slow"]
    assert (number, seconds >= 0.1) == (1, True)
    assert len(retries) == 1
    assert retries[0].endswith("connection reset")


def test_cutting_refuses_a_jitter_out_of_range() -> None:
    """A jitter of 1 or more would allow intervals of zero or less: refused."""
    proxy = FaultyProxy(LOOPBACK, 27017)
    for jitter in (-0.1, 1.0):
        with pytest.raises(ValueError, match="jitter"):
            with cutting(proxy, every=0.5, jitter=jitter):
                pass  # pragma: no cover
