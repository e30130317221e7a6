"""
The server's clock, as this process estimates it: the one clock the store goes by.

Each estimate comes from a round trip that brings the server's time (``localTime`` in
the reply to ``hello``): the server read its clock somewhere between the request and
the reply, so at the middle of the round trip, give or take half of it. Among the
recent estimates the one with the shortest round trip (the tightest bound) wins,
which keeps an asymmetric delay (a slow reply after a quick request) from skewing the
result. The elapsed time since that estimate is measured with this host's monotonic
clock, so a jump of the host's wall clock (an NTP step, a VM resumed from suspend)
changes nothing; an estimate that contradicts the current one beyond both bounds
means the server's clock jumped, and starts afresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from logging import Logger

import anyio
import attrs
from pymongo.errors import PyMongoError

from ._adapters import Adapter
from ._client import check_server
from ._layout import Document
from ._marshalling import from_micros, to_micros

#: How many recent estimates are kept to choose from
WINDOW = 8
#: The precision of the server's ``localTime`` (a BSON date: milliseconds), in
#: microseconds
_RESOLUTION = 1_000
#: How far estimates may disagree, beyond their bounds, before it counts as a jump
#: (microseconds)
_JUMP_MARGIN = 50_000
#: A host this far off the server's clock is warned about (seconds) ...
WARN_OFFSET = 1.0
#: ... until it comes back within this
CALM_OFFSET = 0.5


@attrs.frozen
class Sample:
    """One estimate: the server's time at a moment of this host's monotonic clock."""

    #: The monotonic clock at the middle of the round trip (seconds)
    monotonic: float
    #: The server's clock then (microseconds since the epoch)
    server: int
    #: Half the round trip, plus the server clock's resolution (microseconds)
    error: int


def _elapsed_clock() -> float:
    """A clock that counts time without jumps, a host's suspension included."""
    return time.clock_gettime(_ELAPSED)


def _wall_clock() -> int:
    return to_micros(datetime.now(timezone.utc))


#: Linux's boot time clock counts the time a host was suspended, which its monotonic
#: clock does not (a resumed VM must not think that no time passed)
_ELAPSED = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
#: Within this (plus the estimate's error), this host is taken to agree with the
#: server: its own clock is used, exactly as read (microseconds)
TOLERANCE = 50_000
_SECOND = 1_000_000


@attrs.define
class ServerClock:
    """
    The server's clock, estimated from round trips; the host's until one arrives.

    While the estimate agrees with this host's clock within :data:`TOLERANCE` (and
    its own error), the host's clock is used as it is. Times are microseconds since
    the epoch.

    :param monotonic: a clock without jumps (seconds)
    :param wall: this host's wall clock (microseconds since the epoch)
    """

    monotonic: Callable[[], float] = _elapsed_clock
    wall: Callable[[], int] = _wall_clock
    _samples: list[Sample] = attrs.field(factory=list)
    _warned: bool = False

    def observe(self, sent: float, received: float, server_time: datetime) -> None:
        """
        Take an estimate from a round trip.

        :param sent: the monotonic clock when the request left
        :param received: the monotonic clock when the reply arrived
        :param server_time: the server's clock, as the reply says
        """
        error = round((received - sent) / 2 * _SECOND) + _RESOLUTION
        sample = Sample((sent + received) / 2, to_micros(_aware(server_time)), error)
        best = self.best
        if best is not None:
            predicted = best.server + round(
                (sample.monotonic - best.monotonic) * _SECOND
            )
            if (
                abs(predicted - sample.server)
                > best.error + sample.error + _JUMP_MARGIN
            ):
                self._samples.clear()  # the server's clock jumped

        self._samples = [*self._samples, sample][-WINDOW:]

    @property
    def best(self) -> Sample | None:
        """The estimate with the tightest bound, if any."""
        return min(self._samples, key=lambda sample: sample.error, default=None)

    def _estimate(self) -> tuple[int, int]:
        """Return this host's clock and the server's as estimated."""
        wall = self.wall()
        best = self.best
        if best is None:
            return wall, wall

        return wall, best.server + round((self.monotonic() - best.monotonic) * _SECOND)

    def _agrees(self, offset: int) -> bool:
        best = self.best
        return best is None or abs(offset) <= TOLERANCE + best.error

    def now_micros(self) -> int:
        """Return the server's clock now."""
        wall, server = self._estimate()
        return wall if self._agrees(server - wall) else server

    def now_datetime(self) -> datetime:
        return from_micros(self.now_micros())

    def offset_micros(self) -> int:
        """Return how far the server's clock is ahead of this host's (0: agreed)."""
        wall, server = self._estimate()
        return 0 if self._agrees(server - wall) else server - wall

    def offset(self) -> float:
        """Return how far the server's clock is ahead of this host's (seconds)."""
        return self.offset_micros() / _SECOND

    def measured_offset(self) -> float | None:
        """Return the offset as estimated, however small, if there is an estimate."""
        wall, server = self._estimate()
        return None if self.best is None else (server - wall) / _SECOND

    def bound(self) -> float | None:
        """Return how far off the estimate may be (seconds), if there is one."""
        best = self.best
        return None if best is None else best.error / _SECOND

    def on_host_clock(self, server_time: datetime) -> datetime:
        """Return the time this host's clock will show when the server's shows this."""
        offset = self.offset_micros()
        return server_time - timedelta(microseconds=offset) if offset else server_time

    def seconds_until(self, server_time: datetime) -> float:
        """Return how long until the server's clock shows ``server_time``."""
        return (to_micros(server_time) - self.now_micros()) / _SECOND

    def warn_if_off(self, logger: Logger) -> None:
        """Warn once per episode when this host is off the server's clock by > 1 s."""
        offset = self.offset()
        if not self._warned and abs(offset) > WARN_OFFSET:
            self._warned = True
            logger.warning(
                "This host's clock is %.1f s %s the MongoDB server's; the store goes "
                "by the server's clock (leases, due times, expiry), but APScheduler "
                "decides some things by this host's: synchronize it (NTP)",
                abs(offset),
                "behind" if offset > 0 else "ahead of",
            )
        elif self._warned and abs(offset) < CALM_OFFSET:
            self._warned = False
            logger.info(
                "This host's clock is within %.1f s of the MongoDB server's again",
                CALM_OFFSET,
            )


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


async def timed_hello(adapter: Adapter, database: str, clock: ServerClock) -> Document:
    """Ask the server who it is (see ``check_server``), and take the time it tells."""
    sent = clock.monotonic()
    reply = await check_server(adapter, database)
    received = clock.monotonic()
    if isinstance(server_time := reply.get("localTime"), datetime):
        clock.observe(sent, received, server_time)

    return reply


@attrs.define
class Timekeeper:
    """
    Keep a store's estimate of the server's clock fresh: every ``interval``, and soon
    after a failure (a reconnection may reach another server, or a server that was
    away for a while); warn once per episode when this host is off by over 1 s.
    """

    adapter: Adapter
    database: str
    clock: ServerClock
    logger: Logger
    interval: float = 30.0
    #: Told each new estimate of how far the server's clock is ahead (seconds)
    on_measured: Callable[[float], None] | None = attrs.field(
        default=None, kw_only=True
    )
    _due: anyio.Event = attrs.field(init=False, factory=anyio.Event)

    def measured(self) -> None:
        """Tell ``on_measured`` the latest estimate, if there is one."""
        offset = self.clock.measured_offset()
        if self.on_measured is not None and offset is not None:
            self.on_measured(offset)

    def soon(self) -> None:
        """Take the next estimate now rather than at the end of the interval."""
        self._due.set()

    async def run(self) -> None:
        while True:
            with anyio.move_on_after(self.interval):
                await self._due.wait()
                await anyio.sleep(1)  # let a reconnection settle

            self._due = anyio.Event()
            try:
                await timed_hello(self.adapter, self.database, self.clock)
            except (PyMongoError, RuntimeError) as exc:
                self.logger.debug("Could not read the server's clock: %s", exc)
            else:
                self.clock.warn_if_off(self.logger)
                self.measured()
