from __future__ import annotations

import copyreg
import io
import json
import os
import pickle
import struct
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import cbor2
import pytest
from apscheduler.abc import Serializer, Trigger
from apscheduler.serializers.cbor import CBORSerializer
from apscheduler.serializers.json import JSONSerializer
from apscheduler.serializers.pickle import PickleSerializer
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.combining import AndTrigger, OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from apscheduler_mongo._trigger_view import (
    MAX_COUNT,
    MAX_TRIGGERS,
    Outlook,
    describe_trigger,
    next_fire_times,
    rebuild_trigger,
    schedule_outlook,
)
from apscheduler_mongo.serializers import (
    SafeCBORSerializer,
    SafeJSONSerializer,
    SafePickleSerializer,
)

from .support.hostile import (
    cbor_naming,
    exec_gadget,
    json_naming,
    marker_module,
    popen_gadget,
    protocol_0_gadget,
    system_gadget,
)

BERLIN = ZoneInfo("Europe/Berlin")
START = datetime(2026, 3, 20, 10, 0, tzinfo=BERLIN)
UTC_START = datetime(2026, 12, 6, 10, 0, tzinfo=timezone.utc)


def _cron() -> Trigger:
    return CronTrigger(hour=9, minute=0, start_time=START, timezone="Europe/Berlin")


def _office_hours() -> Trigger:
    return CronTrigger(
        day_of_week="mon-fri",
        hour="9-17",
        minute="0,30",
        start_time=START,
        timezone="UTC",
    )


def _cron_last_day() -> Trigger:
    return CronTrigger(day="last", hour=23, start_time=START, timezone="Asia/Tokyo")


def _cron_fixed_offset() -> Trigger:
    offset = timezone(timedelta(hours=-3))
    return CronTrigger(minute="*/20", start_time=START, timezone=offset)


def _interval() -> Trigger:
    return IntervalTrigger(hours=2, start_time=START)


def _interval_over_dst() -> Trigger:
    # Across the change to summer time (2026-03-29) in UTC: same in every format
    return IntervalTrigger(
        days=1, minutes=30, start_time=START.astimezone(timezone.utc)
    )


def _interval_until() -> Trigger:
    return IntervalTrigger(
        minutes=45, start_time=UTC_START, end_time=UTC_START + timedelta(hours=6)
    )


def _date() -> Trigger:
    return DateTrigger(START)


def _calendar() -> Trigger:
    return CalendarIntervalTrigger(
        months=1, hour=9, start_date=date(2026, 1, 31), timezone="Europe/Berlin"
    )


def _calendar_weeks() -> Trigger:
    return CalendarIntervalTrigger(
        weeks=2,
        hour=6,
        minute=30,
        start_date=date(2026, 1, 5),
        end_date=date(2026, 9, 1),
        timezone="America/New_York",
    )


def _or() -> Trigger:
    return OrTrigger([_cron(), DateTrigger(datetime(2026, 4, 1, tzinfo=timezone.utc))])


def _and() -> Trigger:
    every_quarter = CronTrigger(minute="*/15", start_time=START, timezone="UTC")
    return AndTrigger([every_quarter, IntervalTrigger(minutes=10, start_time=START)])


def _nested() -> Trigger:
    return OrTrigger([_and(), _calendar(), OrTrigger([_interval(), _date()])])


TRIGGERS: dict[str, Callable[[], Trigger]] = {
    "cron": _cron,
    "cron-office-hours": _office_hours,
    "cron-last-day": _cron_last_day,
    "cron-fixed-offset": _cron_fixed_offset,
    "interval": _interval,
    "interval-over-dst": _interval_over_dst,
    "interval-until": _interval_until,
    "date": _date,
    "calendar": _calendar,
    "calendar-weeks": _calendar_weeks,
    "or": _or,
    "and": _and,
    "nested": _nested,
}
#: Triggers the JSON and CBOR forms cannot hold (a fixed offset as a time zone)
PICKLE_ONLY = {"cron-fixed-offset"}
SERIALIZERS: dict[str, Callable[[], Serializer]] = {
    **{
        f"pickle-{protocol}": partial(PickleSerializer, protocol=protocol)
        for protocol in range(6)
    },
    "json": JSONSerializer,
    "cbor": CBORSerializer,
    "safe-pickle": SafePickleSerializer,
    "safe-json": SafeJSONSerializer,
    "safe-cbor": SafeCBORSerializer,
}


def _trusted(serializer: str) -> Serializer:
    """Return a serializer that reads back what one of SERIALIZERS writes, as the
    scheduler does (trusted in these tests)."""
    if "json" in serializer:
        return SafeJSONSerializer()
    if "cbor" in serializer:
        return SafeCBORSerializer()
    return SafePickleSerializer()


def _fired(make: Callable[[], Trigger], times: int) -> Trigger:
    trigger = make()
    for _ in range(times):
        trigger.next()
    return trigger


def _following(trigger: Trigger, count: int = 10) -> list[datetime]:
    times: list[datetime] = []
    while len(times) < count and (moment := trigger.next()) is not None:
        times.append(moment)
    return times


def _rebuilt(serialized: bytes) -> Trigger:
    rebuilt = rebuild_trigger(serialized)
    assert rebuilt.reason is None
    assert rebuilt.trigger is not None
    return rebuilt.trigger


class TestRoundTrips:
    """A stored built-in trigger that has fired is rebuilt where it was: its fire
    times are the stored trigger's own next ones, in every serializer's form."""

    @pytest.mark.parametrize("fired", [0, 1, 2])
    @pytest.mark.parametrize("kind", TRIGGERS)
    @pytest.mark.parametrize("serializer", SERIALIZERS)
    def test_same_fire_times(self, serializer: str, kind: str, fired: int) -> None:
        if kind in PICKLE_ONLY and "pickle" not in serializer:
            pytest.skip("APScheduler's JSON and CBOR hold time zones by name only")

        original = _fired(TRIGGERS[kind], fired)
        stored = SERIALIZERS[serializer]().serialize(original)
        expected = _following(_trusted(serializer).deserialize(stored))
        got = next_fire_times(_rebuilt(stored))
        # The same instants as the original gives, and as the stored form gives them
        assert got == _following(original)
        assert [moment.isoformat() for moment in got] == [
            moment.isoformat() for moment in expected
        ]

    @pytest.mark.parametrize("serializer", SERIALIZERS)
    def test_copy_leaves_the_trigger(self, serializer: str) -> None:
        original = _fired(_nested, 2)
        trigger = _rebuilt(SERIALIZERS[serializer]().serialize(original))
        first = next_fire_times(trigger, 5)
        assert next_fire_times(trigger, 5) == first
        assert first == _following(original, 5)

    def test_finished_date_trigger(self) -> None:
        trigger = _rebuilt(JSONSerializer().serialize(_fired(_date, 1)))
        assert next_fire_times(trigger) == []

    def test_interval_keeps_zone_in_pickles(self) -> None:
        # Python adds a time span to a ZoneInfo date and time in wall time
        original = IntervalTrigger(days=1, start_time=START)
        trigger = _rebuilt(PickleSerializer().serialize(original))
        assert next_fire_times(trigger) == _following(original)
        assert next_fire_times(trigger)[9].isoformat() == "2026-03-29T10:00:00+02:00"


class TestWords:
    """The trigger in words, for a table of cases."""

    @pytest.mark.parametrize(
        ("trigger", "words"),
        [
            pytest.param(_cron(), "every day at 09:00 (Europe/Berlin)", id="daily"),
            pytest.param(
                _office_hours(),
                "at minute 0 and 30 of hours 9-17, Monday to Friday (UTC)",
                id="office-hours",
            ),
            pytest.param(
                CronTrigger(
                    day_of_week="mon,wed,fri",
                    hour=7,
                    minute=15,
                    second=30,
                    timezone="UTC",
                ),
                "at 07:15:30, Monday, Wednesday and Friday (UTC)",
                id="weekdays",
            ),
            pytest.param(
                CronTrigger(minute="*/5", timezone="UTC"),
                "every 5 minutes (UTC)",
                id="every-5-minutes",
            ),
            pytest.param(
                CronTrigger(minute=0, timezone="UTC"),
                "at minute 0 of every hour (UTC)",
                id="hourly",
            ),
            pytest.param(
                CronTrigger(hour="8,12", minute=5, timezone="UTC"),
                "at minute 5 of hours 8 and 12 (UTC)",
                id="two-hours",
            ),
            pytest.param(
                CronTrigger(day=15, hour=12, minute=0, timezone="UTC"),
                "at 12:00, on day 15 of every month (UTC)",
                id="monthly",
            ),
            pytest.param(
                CronTrigger(month="dec", day=24, hour=18, timezone="Europe/Berlin"),
                "at 18:00, every year on December 24 (Europe/Berlin)",
                id="yearly",
            ),
            pytest.param(
                _cron_last_day(),
                "cron day=last, hour=23, minute=0, second=0 (Asia/Tokyo)",
                id="fallback",
            ),
            pytest.param(
                CronTrigger(
                    hour=9, timezone="UTC", end_time=datetime(2027, 1, 1, tzinfo=BERLIN)
                ),
                "every day at 09:00, until 2027-01-01 00:00+01:00 (UTC)",
                id="until",
            ),
            pytest.param(
                _cron_fixed_offset(), "every 20 minutes (UTC-03:00)", id="offset"
            ),
            pytest.param(
                IntervalTrigger(hours=2, start_time=UTC_START),
                "every 2 hours from 2026-12-06 10:00 UTC",
                id="interval",
            ),
            pytest.param(
                IntervalTrigger(hours=1, start_time=UTC_START),
                "every hour from 2026-12-06 10:00 UTC",
                id="hour",
            ),
            pytest.param(
                IntervalTrigger(days=1, hours=2, minutes=30, start_time=START),
                "every 1 day, 2 hours and 30 minutes from 2026-03-20 10:00+01:00",
                id="interval-parts",
            ),
            pytest.param(
                IntervalTrigger(seconds=1.5, start_time=UTC_START),
                "every 1.5 seconds from 2026-12-06 10:00 UTC",
                id="fraction",
            ),
            pytest.param(
                DateTrigger(datetime(2026, 12, 24, 18, 0, tzinfo=BERLIN)),
                "once, at 2026-12-24 18:00+01:00",
                id="date",
            ),
            pytest.param(
                _calendar(),
                "every month at 09:00 from 2026-01-31 (Europe/Berlin)",
                id="calendar",
            ),
            pytest.param(
                _calendar_weeks(),
                "every 2 weeks at 06:30 from 2026-01-05 until 2026-09-01 "
                "(America/New_York)",
                id="calendar-until",
            ),
            pytest.param(
                _or(),
                "whenever any of these fires: every day at 09:00 (Europe/Berlin); "
                "once, at 2026-04-01 00:00 UTC",
                id="or",
            ),
            pytest.param(
                _and(),
                "when all of these fire within 1 second: every 15 minutes (UTC); "
                "every 10 minutes from 2026-03-20 10:00+01:00",
                id="and",
            ),
            pytest.param(
                OrTrigger([_date(), OrTrigger([_date()])]),
                "whenever any of these fires: once, at 2026-03-20 10:00+01:00; "
                "[whenever any of these fires: once, at 2026-03-20 10:00+01:00]",
                id="nested",
            ),
        ],
    )
    def test_words(self, trigger: Trigger, words: str) -> None:
        assert describe_trigger(trigger) == words

    def test_rebuilt_words(self) -> None:
        trigger = _rebuilt(JSONSerializer().serialize(_fired(_office_hours, 1)))
        assert describe_trigger(trigger) == describe_trigger(_office_hours())

    def test_other_trigger(self) -> None:
        assert describe_trigger(_Mine()) == f"a trigger of class {__name__}._Mine"


class _Mine(Trigger):
    """A user's trigger class."""

    def next(self) -> datetime | None:
        return None

    def __getstate__(self) -> dict[str, Any]:
        return {"version": 1}

    def __setstate__(self, state: dict[str, Any]) -> None:
        pass


class _Call:
    """Pickles as a call of ``function`` (what a gadget is)."""

    def __init__(self, function: Any, *arguments: Any) -> None:
        self.function, self.arguments = function, arguments

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.function, self.arguments


def _forged(trigger: Trigger, state: object) -> bytes:
    """Return a pickle of ``trigger`` holding ``state`` instead of its own."""

    class Forger(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if obj is trigger:
                # typeshed leaves out copyreg.__newobj__, which pickle writes as NEWOBJ
                newobj = copyreg.__newobj__  # type: ignore[attr-defined]
                return newobj, (type(obj),), state
            return NotImplemented

    buffer = io.BytesIO()
    Forger(buffer, 4).dump(trigger)
    return buffer.getvalue()


def _cron_state(**changes: object) -> dict[str, object]:
    state: dict[str, object] = _cron().__getstate__()
    state.update(changes)
    return state


def _json(ref: str, state: object) -> bytes:
    return json.dumps({"_apscheduler_json": [ref, state]}).encode()


def _json_state(make: Callable[[], Trigger], **changes: object) -> bytes:
    document = json.loads(JSONSerializer().serialize(make()))
    document["_apscheduler_json"][1].update(changes)
    return json.dumps(document).encode()


def _nested_pickle(levels: int) -> bytes:
    """Return a protocol 2 pickle of OrTriggers nested ``levels`` deep (written
    opcode by opcode: pickle's own pickler would run out of stack)."""

    def text(value: str) -> bytes:
        return b"X" + struct.pack("<I", len(value)) + value.encode()

    level = b"}(" + text("version") + b"K\x01" + text("triggers") + b"](" + text(OR_REF)
    end = b"\x86e" + text("next_fire_times") + b"]u"
    leaf = (
        b"}("
        + text("version")
        + b"K\x01"
        + text("run_time")
        + b"N"
        + text("completed")
        + b"\x89u"
    )
    return (
        b"\x80\x02capscheduler.triggers.combining\nOrTrigger\n)\x81"
        + level * levels
        + leaf
        + end * levels
        + b"b."
    )


OR_REF = "apscheduler.triggers.combining:OrTrigger"


def _nested_json(levels: int) -> bytes:
    leaf = json.dumps(["apscheduler.triggers.date:DateTrigger", {"version": 1}])
    opening = f'["{OR_REF}", {{"version": 1, "next_fire_times": [], "triggers": ['
    inner = opening * levels + leaf + "]}]" * levels
    return ('{"_apscheduler_json": ' + inner + "}").encode()


class TestRefused:
    """Anything but APScheduler's built-in triggers with sane values is not rebuilt:
    no trigger, a reason, and nothing the data names is imported or called."""

    @pytest.fixture
    def marker(self, tmp_path: Path) -> Path:
        return tmp_path / "ran"

    def _refused(self, serialized: object, marker: Path | None = None) -> str:
        rebuilt = rebuild_trigger(serialized)
        assert rebuilt.trigger is None
        assert rebuilt.reason
        assert len(rebuilt.reason) <= 200
        if marker is not None:
            assert not marker.exists()
        return rebuilt.reason

    @pytest.mark.parametrize(
        "gadget", [system_gadget, exec_gadget, popen_gadget, protocol_0_gadget]
    )
    def test_gadget(self, marker: Path, gadget: Callable[[Path], bytes]) -> None:
        reason = self._refused(gadget(marker), marker)
        assert "not as a trigger" in reason

    def test_gadget_in_state(self, marker: Path) -> None:
        state = _cron_state(timezone=_Call(os.system, f"touch {marker}"))
        reason = self._refused(_forged(_cron(), state), marker)
        assert reason.startswith("its time zone is posix.system(")

    def test_gadget_as_time(self, marker: Path) -> None:
        state = _cron_state(last_fire_time=_Call(os.system, f"touch {marker}"))
        reason = self._refused(_forged(_cron(), state), marker)
        assert "not a date and time" in reason

    def test_json_naming_os_system(self) -> None:
        reason = self._refused(_json("os:system", {"version": 1}))
        assert reason == "a trigger of class os:system, not one of APScheduler's"

    def test_cbor_naming_os_system(self) -> None:
        data = cbor2.dumps(cbor2.CBORTag(4664, ["os:system", {"version": 1}]))
        assert "os:system" in self._refused(data)

    @pytest.mark.parametrize("form", [json_naming, cbor_naming])
    def test_planted_module(
        self,
        form: Callable[[str], bytes],
        tmp_path: Path,
        marker: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.syspath_prepend(str(tmp_path))
        name = marker_module(tmp_path, marker)
        assert f"{name}:Payload" in self._refused(form(name), marker)

    def test_user_class(self) -> None:
        reason = self._refused(_json("tests.x:MyTrigger", {"version": 1}))
        assert (
            reason == "a trigger of class tests.x:MyTrigger, not one of APScheduler's"
        )

    def test_pickled_user_class(self) -> None:
        reason = self._refused(_forged(_Mine(), {"version": 1}))
        assert reason == (
            f"a trigger of class {__name__}:_Mine, not one of APScheduler's"
        )

    def test_user_class_in_combination(self) -> None:
        state = {
            "version": 1,
            "triggers": [["tests.x:MyTrigger", {"version": 1}]],
            "next_fire_times": [],
        }
        assert "tests.x:MyTrigger" in self._refused(_json(OR_REF, state))

    def test_huge_cron_field(self) -> None:
        fields = ["*"] * 5 + ["1," * 50_000 + "1", "0", "0"]
        reason = self._refused(_json_state(_cron, fields=fields))
        assert reason == "its cron hour field is not text of up to 100 characters"

    def test_bad_cron_field(self) -> None:
        fields = ["*"] * 5 + ["99", "0", "0"]
        reason = self._refused(_json_state(_cron, fields=fields))
        assert reason.startswith("APScheduler refuses its values: ValueError: ")

    @pytest.mark.parametrize(
        "zone", ["../../etc/passwd", "/etc/passwd", "Europe/../../x", "Nowhere/Land"]
    )
    def test_bad_time_zone(self, zone: str) -> None:
        assert "time zone" in self._refused(_json_state(_cron, timezone=zone))

    @pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300, True])
    def test_bad_interval(self, value: float) -> None:
        data = _json_state(_interval, interval=[0, 0, value, 0, 0, 0])
        assert "its interval is" in self._refused(data)

    def test_zero_interval(self) -> None:
        data = _json_state(_interval, interval=[0, 0, 0, 0, 0, 0])
        assert self._refused(data) == (
            "APScheduler refuses its values: ValueError: "
            "The time interval must be positive"
        )

    @pytest.mark.parametrize("levels", [4, 10_000])
    def test_deep_combination_pickle(self, levels: int) -> None:
        reason = self._refused(_nested_pickle(levels))
        assert reason == "its combinations nest more than 3 levels deep"

    def test_deep_combination_json(self) -> None:
        assert "nest more than 3" in self._refused(_nested_json(4))
        reason = self._refused(_nested_json(10_000))  # too deep for json itself
        assert reason.startswith("it cannot be read: RecursionError")

    def test_too_many_triggers(self) -> None:
        state = json.loads(JSONSerializer().serialize(OrTrigger([_date()])))
        state["_apscheduler_json"][1]["triggers"] *= MAX_TRIGGERS + 1
        reason = self._refused(json.dumps(state).encode())
        assert "1 to 8 triggers" in reason

    def test_and_inside_and(self) -> None:
        data = PickleSerializer().serialize(AndTrigger([_and(), _cron()]))
        assert self._refused(data) == "it has an AndTrigger inside an AndTrigger"

    def test_newer_version(self) -> None:
        reason = self._refused(_json_state(_cron, version=2))
        assert "state version 2" in reason

    def test_extra_key(self) -> None:
        assert "holds" in self._refused(_json_state(_cron, command="rm -rf /"))

    def test_naive_time(self) -> None:
        data = _json_state(_cron, start_time="2026-01-01T00:00:00")
        assert "not a date and time with a time zone" in self._refused(data)

    def test_far_calendar(self) -> None:
        data = _json_state(_calendar, last_fire_date="9999-12-01")
        assert "after the year 3000" in self._refused(data)

    def test_long_calendar_interval(self) -> None:
        data = _json_state(_calendar, interval=[1000, 0, 0, 0])
        assert "not a whole number in 0..10" in self._refused(data)

    @pytest.mark.parametrize(
        "stored",
        [
            pytest.param(b"", id="empty"),
            pytest.param(b"not a trigger", id="text"),
            pytest.param("a string", id="not-bytes"),
            pytest.param(b"\x80\x04K\x01.", id="an-integer"),
            pytest.param(b'{"version": 1}', id="a-dict"),
            pytest.param(b"\x00" * (2 << 20), id="too-large"),
        ],
    )
    def test_not_a_trigger(self, stored: object) -> None:
        self._refused(stored)


class TestFireTimes:
    """Fire times are computed on a copy, up to a count and within a time limit."""

    def test_count(self) -> None:
        trigger = _rebuilt(PickleSerializer().serialize(_interval()))
        assert len(next_fire_times(trigger, 3)) == 3
        assert len(next_fire_times(trigger, 1000)) == MAX_COUNT

    def test_time_limit(self) -> None:
        trigger = _rebuilt(PickleSerializer().serialize(_nested()))
        assert next_fire_times(trigger, limit=-1) == []  # already past

    def test_and_that_never_agrees(self) -> None:
        # Even hours and odd hours never fire together: the AndTrigger gives up
        never = AndTrigger(
            [
                IntervalTrigger(hours=2, start_time=UTC_START),
                IntervalTrigger(hours=2, start_time=UTC_START + timedelta(hours=1)),
            ],
            threshold=0,
        )
        outlook = schedule_outlook(JSONSerializer().serialize(never))
        assert outlook.next_times == []
        assert (
            outlook.reason == "fire times not computed further: its AndTrigger gave up"
        )

    def test_not_a_builtin(self) -> None:
        with pytest.raises(TypeError):
            next_fire_times(_Mine())


class TestOutlook:
    """The one call the dashboard makes."""

    def test_outlook(self) -> None:
        original = _fired(_cron, 1)
        stored = JSONSerializer().serialize(original)
        outlook = schedule_outlook(stored, 3)
        assert outlook == Outlook(
            "every day at 09:00 (Europe/Berlin)", _following(original, 3), None
        )

    def test_next_fire_time_first(self) -> None:
        original = _cron()
        first = original.next()
        outlook = schedule_outlook(
            PickleSerializer().serialize(original), 3, next_fire_time=first
        )
        assert outlook.next_times == [first, *_following(original, 2)]

    def test_refused(self) -> None:
        outlook = schedule_outlook(_json("os:system", {}))
        assert outlook == Outlook(
            None, [], "a trigger of class os:system, not one of APScheduler's"
        )


class TestBoundedWork:
    """Fire times that would take APScheduler's triggers minutes, or forever, to
    find are cut at the horizon, within the time allowed: the page still answers.
    Each case below hung or took half a minute before the horizon."""

    @pytest.mark.parametrize(
        "trigger",
        [
            pytest.param(
                AndTrigger(
                    [
                        CalendarIntervalTrigger(
                            years=10, start_date=date(2024, 1, 1), timezone="UTC"
                        ),
                        DateTrigger(datetime(9999, 12, 31, tzinfo=timezone.utc)),
                    ],
                    threshold=0,
                    max_iterations=10_000,
                ),
                id="calendar past the year 9999 in an AndTrigger",
            ),
            pytest.param(
                CronTrigger(week="53", month="2-11", timezone="UTC"),
                id="cron that never fires",
            ),
        ],
    )
    def test_cut_at_the_horizon(self, trigger: Trigger) -> None:
        started = time.monotonic()
        outlook = schedule_outlook(pickle.dumps(trigger), 10, limit=0.5)
        took = time.monotonic() - started

        assert outlook.next_times == []
        assert outlook.reason == "fire times are computed up to ten years ahead"
        assert took < 5  # the horizon, not the time limit, ends it: about 0.1 s

    def test_month_ranges_in_words(self) -> None:
        """Month ranges and lists are shown as the fields (they once raised)."""
        for month in ("1-3", "1,6"):
            trigger = CronTrigger(month=month, day="1", hour="9", timezone="UTC")
            outlook = schedule_outlook(pickle.dumps(trigger), 3)
            assert outlook.words is not None and f"month={month}" in outlook.words
            assert len(outlook.next_times) == 3
