"""The estimate of the server's clock (pure: fake clocks, no server)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import attrs
import pytest

from apscheduler_mongo._clock import TOLERANCE, WINDOW, ServerClock
from apscheduler_mongo._marshalling import from_micros, to_micros

START = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
SECOND = 1_000_000


@attrs.define
class FakeHost:
    """A host's two clocks: a monotonic one (seconds) and a wall clock (micros)."""

    monotonic: float = 1000.0
    wall: int = to_micros(START)

    def pass_time(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += round(seconds * SECOND)

    def clock(self) -> ServerClock:
        return ServerClock(monotonic=lambda: self.monotonic, wall=lambda: self.wall)


def server_at(host: FakeHost, offset: float, later: float = 0.0) -> datetime:
    """The server's clock reading ``later`` seconds from now, ``offset`` ahead."""
    return from_micros(host.wall + round((offset + later) * SECOND))


def round_trip(
    clock: ServerClock,
    host: FakeHost,
    offset: float,
    out: float = 0.002,
    back: float = 0.002,
) -> None:
    """A hello whose request takes ``out`` seconds and reply ``back``."""
    sent = host.monotonic
    read = server_at(host, offset, out)  # the server reads its clock on arrival
    host.pass_time(out + back)
    clock.observe(sent, host.monotonic, read)


class TestWithoutEstimate:
    """Until a round trip tells the server's time, the host's clock is used."""

    def test_host_clock_exactly(self) -> None:
        host = FakeHost()
        clock = host.clock()
        assert clock.now_micros() == host.wall
        assert clock.offset() == 0.0
        assert clock.measured_offset() is None
        assert clock.on_host_clock(START) is START


class TestEstimate:
    """The server's clock is estimated from round trips, to within half of one."""

    @pytest.mark.parametrize("offset", [20.0, -20.0, 3600.0])
    def test_offset(self, offset: float) -> None:
        host = FakeHost()
        clock = host.clock()
        round_trip(clock, host, offset)
        host.pass_time(5)
        assert abs(clock.now_micros() - (host.wall + offset * SECOND)) <= 2_000
        assert clock.offset() == pytest.approx(offset, abs=0.002)
        later = clock.on_host_clock(START)
        assert abs((START - later).total_seconds() - offset) <= 0.002

    def test_asymmetric_round_trips(self) -> None:
        # A quick request and a slow reply make the server's time look early by
        # half the difference; the shortest round trip bounds the error best
        host = FakeHost()
        clock = host.clock()
        round_trip(clock, host, 20.0, out=0.001, back=0.800)
        skewed = clock.offset()
        assert skewed == pytest.approx(20.0 - 0.3995, abs=0.001)
        round_trip(clock, host, 20.0, out=0.001, back=0.003)
        assert clock.offset() == pytest.approx(20.0, abs=0.002)
        round_trip(clock, host, 20.0, out=0.5, back=0.001)  # worse: not chosen
        assert clock.offset() == pytest.approx(20.0, abs=0.002)
        assert clock.bound() == pytest.approx(0.003, abs=0.0001)

    def test_window_keeps_the_recent_ones(self) -> None:
        host = FakeHost()
        clock = host.clock()
        round_trip(clock, host, 5.0, out=0.0001, back=0.0001)  # the best, but old
        for _ in range(WINDOW):
            round_trip(clock, host, 5.0, out=0.01, back=0.01)

        assert clock.bound() == pytest.approx(0.011, abs=0.0001)

    def test_host_within_tolerance_uses_its_own_clock(self) -> None:
        host = FakeHost()
        clock = host.clock()
        round_trip(clock, host, TOLERANCE / SECOND / 2)
        host.pass_time(1.234567)
        assert clock.now_micros() == host.wall  # exactly, as read
        assert clock.offset() == 0.0
        assert clock.measured_offset() == pytest.approx(
            TOLERANCE / SECOND / 2, abs=0.002
        )


class TestJumps:
    """A jump of the host's wall clock changes nothing; one of the server's is
    followed at once."""

    def test_host_wall_clock_jumps(self) -> None:
        host = FakeHost()
        clock = host.clock()
        round_trip(clock, host, 0.0)
        before = clock.now_micros()
        host.wall += 60 * SECOND  # an NTP step, a resumed VM: not the server
        host.pass_time(1)
        assert clock.now_micros() - before == pytest.approx(SECOND, abs=3_000)
        assert clock.offset() == pytest.approx(-60.0, abs=0.01)

    def test_server_clock_jumps(self) -> None:
        host = FakeHost()
        clock = host.clock()
        for _ in range(3):
            round_trip(clock, host, 0.0, out=0.0005, back=0.0005)

        round_trip(clock, host, 30.0, out=0.01, back=0.01)  # a worse round trip
        assert clock.offset() == pytest.approx(30.0, abs=0.02)


class TestWarning:
    """A host off by more than a second is warned about once per episode."""

    def test_once_per_episode(self, caplog: pytest.LogCaptureFixture) -> None:
        logger = logging.getLogger("apscheduler_mongo.tests.clock")
        host = FakeHost()
        clock = host.clock()
        with caplog.at_level(logging.INFO, logger.name):
            round_trip(clock, host, 20.0)
            for _ in range(3):
                clock.warn_if_off(logger)

            host.wall += 20 * SECOND  # the host is corrected (NTP)
            round_trip(clock, host, 0.0)
            clock.warn_if_off(logger)
            host.wall -= 5 * SECOND
            clock.warn_if_off(logger)

        messages = [(r.levelname, r.getMessage()) for r in caplog.records]
        assert [level for level, _ in messages] == ["WARNING", "INFO", "WARNING"]
        assert "20.0 s behind the MongoDB server's" in messages[0][1]
        assert "5.0 s behind" in messages[2][1]

    def test_server_far_off(self, caplog: pytest.LogCaptureFixture) -> None:
        # Every host would say so: the deployment then runs by the server's clock
        logger = logging.getLogger("apscheduler_mongo.tests.clock")
        host = FakeHost()
        clock = host.clock()
        round_trip(clock, host, -7200.0)
        clock.warn_if_off(logger)
        assert "7200.0 s ahead of the MongoDB server's" in caplog.text
        host.pass_time(10)
        assert clock.now_datetime() == from_micros(host.wall) - timedelta(hours=2)
