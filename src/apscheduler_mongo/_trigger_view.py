"""
Rebuild a stored trigger from checked values, to show it in words with its next fire
times, without deserializing it.

The database is untrusted: APScheduler's serializers would unpickle the stored bytes,
or import the module that a JSON or CBOR reference names. Here the bytes are decoded
by :func:`._viewing.decode` into inert records (nothing is imported or called), the
records of APScheduler 4.0.0a6's built-in triggers are recognised by their exact class
reference, every value of their state (what each class's ``__getstate__`` writes) is
checked and bounded, and a *new* trigger is built through the public constructors
from those values, then placed where the stored one was (its last fire time), so that
its ``next()`` gives what the stored trigger's would. Anything else is not rebuilt,
and the reason says why.

The bounds keep computing fire times short: cron fields of at most
:data:`MAX_FIELD` characters, calendar intervals and dates that cannot reach the year
9999 within :data:`MAX_COUNT` fire times (APScheduler's calendar interval trigger
loops forever there), combinations at most :data:`MAX_DEPTH` deep with at most
:data:`MAX_TRIGGERS` triggers, no ``AndTrigger`` inside another, and a time limit on
the fire times computed (see :func:`next_fire_times`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import Any, Final, NoReturn, TypeVar
from zoneinfo import ZoneInfo

import attrs
from apscheduler import MaxIterationsReached
from apscheduler.abc import Trigger
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.combining import AndTrigger, BaseCombiningTrigger, OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ._viewing import (
    _as_bytes,
    _as_marshalled,
    _Dict,
    _error_text,
    _name,
    _Refused,
    _Stored,
    _zone_key,
    decode,
    shorten,
    show_value,
)

#: The built-in triggers rebuilt, by the reference their JSON and CBOR forms (and a
#: combination's state) give
CRON: Final = "apscheduler.triggers.cron:CronTrigger"
INTERVAL: Final = "apscheduler.triggers.interval:IntervalTrigger"
DATE: Final = "apscheduler.triggers.date:DateTrigger"
CALENDAR: Final = "apscheduler.triggers.calendarinterval:CalendarIntervalTrigger"
AND: Final = "apscheduler.triggers.combining:AndTrigger"
OR: Final = "apscheduler.triggers.combining:OrTrigger"
#: A cron trigger's fields, in the order its state lists them
CRON_FIELDS: Final = (
    *("year", "month", "day", "week", "day_of_week"),
    *("hour", "minute", "second"),
)
#: The longest cron field (characters), and the characters one may hold
MAX_FIELD: Final = 100
_FIELD_TEXT: Final = re.compile(r"[A-Za-z0-9*/,\- ]+\Z")
#: A time zone key: IANA names only (no dots, so no path out of the zone database)
_ZONE_KEY: Final = re.compile(r"[A-Za-z0-9_+\-]{1,32}(?:/[A-Za-z0-9_+\-]{1,32}){0,2}\Z")
#: The longest date and time as text (ISO 8601)
_MAX_MOMENT: Final = 40
#: Levels of combination, and triggers in one stored trigger (all levels)
MAX_DEPTH: Final = 3
MAX_TRIGGERS: Final = 8
#: The most ``AndTrigger.max_iterations`` rebuilt (APScheduler's default)
MAX_ITERATIONS: Final = 10_000
#: The longest interval, and AndTrigger threshold, rebuilt
MAX_SPAN: Final = timedelta(days=366 * 1000)
MAX_THRESHOLD: Final = timedelta(days=366)
#: Calendar intervals: the latest date stored, and the most of each unit (a step
#: then moves at most 8 * 10 years, a leap day included: 50 steps stay far below
#: the year 9999, past which APScheduler's calendar interval trigger never returns)
MAX_CALENDAR_YEAR: Final = 3000
_CALENDAR_UNITS: Final = (
    ("years", 10),
    ("months", 120),
    ("weeks", 520),
    ("days", 3650),
)
#: How far past its position (its last fire time, or its start) a trigger's fire
#: times are computed: the copy that computes them ends there
HORIZON: Final = timedelta(days=3653)
#: The most fire times computed, and the default time allowed for them (seconds)
MAX_COUNT: Final = 50
TIME_LIMIT: Final = 0.5

_T = TypeVar("_T", bound=Trigger)


class NotRebuiltError(ValueError):
    """A stored trigger that is not rebuilt, and why."""


def _fail(reason: str) -> NoReturn:
    raise NotRebuiltError(reason)


def _brief(value: object) -> str:
    return show_value(value, 60)


@attrs.frozen
class Rebuilt:
    """A stored trigger rebuilt (``trigger``), or why it is not (``reason``)."""

    trigger: Trigger | None
    reason: str | None = None


@attrs.frozen
class Outlook:
    """What a schedule's page shows of its trigger."""

    #: The trigger in words, ``None`` if it was not rebuilt
    words: str | None
    #: Its next fire times (empty if it was not rebuilt)
    next_times: list[datetime]
    #: Why it was not rebuilt, or why the fire times stop early; ``None`` if neither
    reason: str | None


# Values


def _state_of(value: object, keys: frozenset[str], what: str) -> dict[str, Any]:
    """Return a trigger's state (a dict, or a pickle's entries) with exactly ``keys``
    and version 1."""
    if isinstance(value, _Dict):
        entries: Sequence[tuple[Any, Any]] = value.entries
    elif isinstance(value, dict) and _as_marshalled(value) is None:
        entries = list(value.items())
    else:
        _fail(f"the state of its {what} is {_brief(value)}, not a dict")

    if len(entries) > 2 * len(keys) or not all(
        isinstance(key, str) and len(key) <= 32 for key, _ in entries
    ):
        _fail(f"the state of its {what} is malformed")

    state = dict(entries)
    version = state.get("version")
    if type(version) is not int or version != 1:
        _fail(
            f"its {what} has state version {_brief(version)}, not 1 (APScheduler 4.0)"
        )

    if state.keys() != keys:
        _fail(f"the state of its {what} holds {_brief(sorted(state))}")

    return state


def _number(value: object, what: str, bound: float) -> float:
    """Return a finite number whose size is at most ``bound`` (an int stays one)."""
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or abs(value) > bound
    ):
        _fail(f"its {what} is {_brief(value)}, not a number up to {bound:g}")

    return value


def _integer(value: object, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        _fail(f"its {what} is {_brief(value)}, not a whole number in {low}..{high}")

    return value


def _zone(value: object) -> tzinfo:
    """Return a time zone stored by key, or pickled (a ZoneInfo, a fixed offset)."""
    if isinstance(value, str):
        if not _ZONE_KEY.match(value):
            _fail(f"its time zone {_brief(value[:80])} is not an IANA time zone name")
        try:
            return ZoneInfo(value)
        except Exception:  # ZoneInfoNotFoundError, or a file that is not a zone
            _fail(f"its time zone {value!r} is unknown here")

    if isinstance(value, _Stored) and value._callee is not None:
        key = _zone_key(value._callee, value._args)
        if key is not None and len(value._args) == 2 and not value._state:
            return _zone(key)
    elif (
        isinstance(value, _Stored)
        and type(value)._name == "datetime.timezone"
        and len(value._args) in (1, 2)
        and not (value._kwargs or value._state)
    ):
        offset = _span(value._args[0], "time zone's offset", timedelta(days=1))
        try:
            return timezone(offset)
        except ValueError:
            _fail(f"its time zone's offset {offset} is out of range")

    _fail(f"its time zone is {_brief(value)}, not a time zone")


def _span(value: object, what: str, bound: timedelta) -> timedelta:
    """Return a time span stored as seconds, or pickled as a ``timedelta``."""
    if isinstance(value, _Stored):
        if (
            type(value)._name != "datetime.timedelta"
            or value._callee is not None
            or len(value._args) != 3
            or value._kwargs
            or value._state
        ):
            _fail(f"its {what} is {_brief(value)}, not a time span")
        days, seconds, micros = value._args
        span = timedelta(
            days=_integer(days, what, -bound.days, bound.days),
            seconds=_integer(seconds, what, 0, 86_399),
            microseconds=_integer(micros, what, 0, 999_999),
        )
    else:
        span = timedelta(seconds=_number(value, what, bound.total_seconds()))

    if abs(span) > bound:
        _fail(f"its {what} is over {bound}")

    return span


def _pickled_moment(value: _Stored, what: str) -> datetime:
    """Return a pickled date and time (its 10 bytes, then its time zone)."""
    args = value._args
    data = _as_bytes(args[0]) if args else None
    if (
        type(value)._name != "datetime.datetime"
        or value._callee is not None
        or len(args) != 2
        or value._kwargs
        or value._state
        or data is None
        or len(data) != 10
    ):
        _fail(f"its {what} is {_brief(value)}, not a date and time with a time zone")

    try:
        return datetime(
            data[0] * 256 + data[1],
            data[2] & 0x7F,
            data[3],
            data[4],
            data[5],
            data[6],
            (data[7] << 16) | (data[8] << 8) | data[9],
            tzinfo=_zone(args[1]),
            fold=data[2] >> 7,
        )
    except ValueError:
        _fail(f"its {what} is not a valid date and time")


def _moment(value: object, what: str) -> datetime:
    """Return a date and time with a time zone: a pickle's, text (JSON), or CBOR's."""
    if isinstance(value, _Stored):
        return _pickled_moment(value, what)

    moment: datetime | None = None
    if isinstance(value, str) and len(value) <= _MAX_MOMENT:
        text = value[:-1] + "+00:00" if value.upper().endswith("Z") else value
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            moment = None
    elif type(value) is datetime and type(value.tzinfo) in (timezone, ZoneInfo):
        moment = value  # as cbor2 decodes it

    if moment is None or moment.utcoffset() is None:
        _fail(f"its {what} is {_brief(value)}, not a date and time with a time zone")

    return moment


def _optional_moment(value: object, what: str) -> Any:
    # Typed Any: APScheduler 4.0.0a6 takes None for its end times, but does not say so
    return None if value is None else _moment(value, what)


def _day(value: object, what: str) -> date:
    """Return a date (a datetime's own date: one round trip through JSON turns a
    calendar trigger's last fire date into a date and time)."""
    if type(value) is date:
        day = value
    elif isinstance(value, _Stored) and type(value)._name == "datetime.date":
        data = _as_bytes(value._args[0]) if len(value._args) == 1 else None
        if data is None or len(data) != 4 or value._state or value._kwargs:
            _fail(f"its {what} is {_brief(value)}, not a date")
        try:
            day = date(data[0] * 256 + data[1], data[2], data[3])
        except ValueError:
            _fail(f"its {what} is not a valid date")
    elif isinstance(value, str) and len(value) <= 10:
        try:
            day = date.fromisoformat(value)
        except ValueError:
            _fail(f"its {what} is {_brief(value)}, not a date")
    else:
        day = _moment(value, what).date()

    if day.year > MAX_CALENDAR_YEAR:
        _fail(f"its {what} is after the year {MAX_CALENDAR_YEAR}")

    return day


def _placed(trigger: _T, key: str, value: object) -> _T:
    """Return ``trigger`` with one entry of its state (its position) replaced."""
    state = trigger.__getstate__()
    state[key] = value
    trigger.__setstate__(state)
    return trigger


# Triggers

_CRON_KEYS: Final = frozenset(
    {"version", "timezone", "fields", "start_time", "end_time", "last_fire_time"}
)
_INTERVAL_KEYS: Final = frozenset(
    {"version", "interval", "start_time", "end_time", "last_fire_time"}
)
_DATE_KEYS: Final = frozenset({"version", "run_time", "completed"})
_CALENDAR_KEYS: Final = frozenset(
    {"version", "interval", "time", "start_date", "end_date", "timezone"}
    | {"last_fire_date"}
)
_OR_KEYS: Final = frozenset({"version", "triggers", "next_fire_times"})
_AND_KEYS: Final = _OR_KEYS | {"threshold", "max_iterations"}


def _cron(state: dict[str, Any]) -> CronTrigger:
    fields = state["fields"]
    if type(fields) is not list or len(fields) != len(CRON_FIELDS):
        _fail("its cron trigger does not hold its 8 fields")

    for name, text in zip(CRON_FIELDS, fields, strict=True):
        if not isinstance(text, str) or len(text) > MAX_FIELD:
            _fail(f"its cron {name} field is not text of up to {MAX_FIELD} characters")
        if not _FIELD_TEXT.match(text):
            _fail(f"its cron {name} field {text!r} is not a cron expression")

    trigger = CronTrigger(
        **dict(zip(CRON_FIELDS, fields, strict=True)),
        start_time=_moment(state["start_time"], "start_time"),
        end_time=_optional_moment(state["end_time"], "end_time"),
        timezone=_zone(state["timezone"]),
    )
    last = _optional_moment(state["last_fire_time"], "last_fire_time")
    return _placed(trigger, "last_fire_time", last)


def _interval(state: dict[str, Any]) -> IntervalTrigger:
    values = state["interval"]
    if type(values) is not list or len(values) != 6:
        _fail("its interval trigger does not hold its 6 units")

    weeks, days, hours, minutes, seconds, micros = (
        _number(value, "interval", 1e12) for value in values
    )
    try:
        span = timedelta(
            weeks=weeks,
            days=days,
            hours=hours,
            minutes=minutes,
            seconds=seconds,
            microseconds=micros,
        )
    except OverflowError:
        span = MAX_SPAN * 2
    if span > MAX_SPAN:
        _fail(f"its interval is over {MAX_SPAN.days} days")

    trigger = IntervalTrigger(
        weeks=weeks,
        days=days,
        hours=hours,
        minutes=minutes,
        seconds=seconds,
        microseconds=micros,
        start_time=_moment(state["start_time"], "start_time"),
        end_time=_optional_moment(state["end_time"], "end_time"),
    )
    last = _optional_moment(state["last_fire_time"], "last_fire_time")
    return _placed(trigger, "last_fire_time", last)


def _date(state: dict[str, Any]) -> DateTrigger:
    completed = state["completed"]
    if type(completed) is not bool:
        _fail(f"its date trigger's completed is {_brief(completed)}, not True/False")

    trigger = DateTrigger(_moment(state["run_time"], "run_time"))
    return _placed(trigger, "completed", completed)


def _calendar(state: dict[str, Any]) -> CalendarIntervalTrigger:
    interval, at = state["interval"], state["time"]
    if type(interval) is not list or len(interval) != 4:
        _fail("its calendar interval trigger does not hold its 4 units")
    if type(at) is not list or len(at) != 3:
        _fail("its calendar interval trigger does not hold its time of day")

    units = {
        unit: _integer(value, unit, 0, most)
        for (unit, most), value in zip(_CALENDAR_UNITS, interval, strict=True)
    }
    end, last = state["end_date"], state["last_fire_date"]
    end_date: Any = None if end is None else _day(end, "end_date")
    trigger = CalendarIntervalTrigger(
        **units,
        hour=_integer(at[0], "hour", 0, 23),
        minute=_integer(at[1], "minute", 0, 59),
        second=_integer(at[2], "second", 0, 59),
        start_date=_day(state["start_date"], "start_date"),
        end_date=end_date,
        timezone=_zone(state["timezone"]),
    )
    last_day = None if last is None else _day(last, "last_fire_date")
    return _placed(trigger, "last_fire_date", last_day)


class _Count:
    """How many triggers have been rebuilt from one stored trigger."""

    def __init__(self) -> None:
        self.triggers = 0


def _combined(ref: str, state: dict[str, Any], depth: int, count: _Count) -> Trigger:
    if depth >= MAX_DEPTH:
        _fail(f"its combinations nest more than {MAX_DEPTH} levels deep")

    items, times = state["triggers"], state["next_fire_times"]
    if type(items) is not list or not items or len(items) > MAX_TRIGGERS:
        _fail(f"its combination does not hold 1 to {MAX_TRIGGERS} triggers")
    if type(times) is not list or len(times) not in (0, len(items)):
        _fail("its combination's next fire times do not match its triggers")

    triggers = []
    for item in items:
        if type(item) not in (list, tuple) or len(item) != 2:
            _fail(f"its combination holds {_brief(item)}, not a trigger's state")
        triggers.append(_rebuilt(item[0], item[1], depth + 1, count, ref == AND))

    fire_times = [_optional_moment(value, "next fire time") for value in times]
    combination: BaseCombiningTrigger
    if ref == AND:
        combination = AndTrigger(
            triggers,
            threshold=_span(state["threshold"], "threshold", MAX_THRESHOLD),
            max_iterations=_integer(
                state["max_iterations"], "max_iterations", 1, MAX_ITERATIONS
            ),
        )
    else:
        combination = OrTrigger(triggers)

    # Not through __setstate__, which rebuilds the triggers from class references
    combination._next_fire_times = fire_times
    return combination


#: How each leaf trigger is rebuilt from its checked state, and the keys it holds
_LEAVES: Final[
    Mapping[str, tuple[frozenset[str], Callable[[dict[str, Any]], Trigger]]]
] = {
    CRON: (_CRON_KEYS, _cron),
    INTERVAL: (_INTERVAL_KEYS, _interval),
    DATE: (_DATE_KEYS, _date),
    CALENDAR: (_CALENDAR_KEYS, _calendar),
}


def _rebuilt(
    ref: object, state: object, depth: int, count: _Count, in_and: bool = False
) -> Trigger:
    """Return the trigger that a class reference and its stored state describe."""
    if not isinstance(ref, str) or ref not in (*_LEAVES, AND, OR):
        _fail(f"a trigger of class {_name(ref)}, not one of APScheduler's")

    count.triggers += 1
    if count.triggers > MAX_TRIGGERS:
        _fail(f"it holds more than {MAX_TRIGGERS} triggers")

    what = ref.rpartition(":")[2]
    if ref in _LEAVES:
        keys, build = _LEAVES[ref]
        return build(_state_of(state, keys, what))

    if ref == AND and in_and:
        _fail("it has an AndTrigger inside an AndTrigger")

    return _combined(
        ref, _state_of(state, _AND_KEYS if ref == AND else _OR_KEYS, what), depth, count
    )


def _reference(value: object) -> tuple[object, object]:
    """Return the class reference and state of a stored object: a pickled instance
    (``module.qualname``, made ``module:qualname``), or a marshalled one."""
    if isinstance(value, _Stored):
        name, args = type(value)._name, value._args
        if (
            name == "copyreg._reconstructor"  # protocols 0 and 1
            and len(args) == 3
            and isinstance(args[0], type)
            and issubclass(args[0], _Stored)
            and args[2] is None
        ):
            name, args = args[0]._name, ()
        if (
            value._callee is None
            and not (args or value._kwargs or value._items or value._entries)
            and len(value._state) == 1
        ):
            module, _, qualname = name.rpartition(".")
            return f"{module}:{qualname}", value._state[0]

        _fail(f"it is stored as {_brief(value)}, not as a trigger")

    marshalled = _as_marshalled(value)
    if marshalled is None:
        _fail(f"it is stored as {_brief(value)}, not as a trigger")

    return marshalled.ref, marshalled.state


def rebuild_trigger(serialized: object) -> Rebuilt:
    """
    Rebuild a stored trigger from checked values, importing and calling nothing that
    the stored data names.

    :param serialized: the stored bytes, from any of APScheduler's serializers or
        those of :mod:`.serializers`
    :return: the new trigger, positioned where the stored one was; or no trigger and
        the reason (unreadable bytes, a class that is not one of APScheduler's
        built-in triggers, or a value that is malformed or out of bounds)
    """
    try:
        value = decode(serialized)
    except _Refused as exc:
        return Rebuilt(None, exc.text)
    except Exception as exc:  # whatever a decoder raises on bytes it cannot read
        return Rebuilt(None, shorten(f"it cannot be read: {_error_text(exc)}", 200))

    try:
        ref, state = _reference(value)
        return Rebuilt(_rebuilt(ref, state, 0, _Count()))
    except NotRebuiltError as exc:
        return Rebuilt(None, shorten(str(exc), 200))
    except Exception as exc:  # what APScheduler's constructors raise on the values
        reason = f"APScheduler refuses its values: {_error_text(exc)}"
        return Rebuilt(None, shorten(reason, 200))


# Words

_WEEKDAYS: Final = {
    "mon": "Monday",
    "tue": "Tuesday",
    "wed": "Wednesday",
    "thu": "Thursday",
    "fri": "Friday",
    "sat": "Saturday",
    "sun": "Sunday",
}
_MONTHS: Final = (
    *("January", "February", "March", "April", "May", "June", "July"),
    *("August", "September", "October", "November", "December"),
)
_MONTH_KEYS: Final = tuple(month[:3].lower() for month in _MONTHS)
_NUMBERS: Final = re.compile(r"\d{1,2}(?:,\d{1,2})*\Z")
_RANGE: Final = re.compile(r"\d{1,2}-\d{1,2}\Z")


def _listed(items: Sequence[str]) -> str:
    """Return ``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _zone_name(zone: tzinfo | None) -> str:
    if isinstance(zone, ZoneInfo) and zone.key:
        return zone.key

    offset = zone.utcoffset(None) if zone is not None else None
    return "UTC" if not offset else f"UTC{_offset(offset)}"


def _offset(offset: timedelta) -> str:
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(offset) // timedelta(minutes=1)
    return f"{sign}{minutes // 60:02}:{minutes % 60:02}"


def _clock(hour: int, minute: int, second: int = 0, micros: int = 0) -> str:
    text = f"{hour:02}:{minute:02}"
    if second or micros:
        text += f":{second:02}"
    return text + (f".{micros:06}" if micros else "")


def _when(moment: datetime) -> str:
    """Return ``2026-12-06 10:00 UTC`` or ``2026-12-24 18:00+01:00``."""
    clock = _clock(moment.hour, moment.minute, moment.second, moment.microsecond)
    offset = moment.utcoffset() or timedelta(0)
    return f"{moment:%Y-%m-%d} {clock}" + (_offset(offset) if offset else " UTC")


def _amount(value: float, unit: str) -> str:
    number = int(value) if float(value).is_integer() else value
    return f"{number} {unit}" + ("" if number == 1 else "s")


def _every(amounts: Sequence[tuple[float, str]]) -> str:
    """Return ``every day``, ``every 2 hours``, ``every 1 day and 2 hours``."""
    given = [(value, unit) for value, unit in amounts if value]
    if len(given) == 1 and given[0][0] == 1:
        return f"every {given[0][1]}"

    return "every " + _listed([_amount(value, unit) for value, unit in given])


def _weekdays(text: str) -> str | None:
    """Return cron's days of the week in words, or ``None``."""
    words = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        if first not in _WEEKDAYS or (last and last not in _WEEKDAYS):
            return None
        words.append(
            f"{_WEEKDAYS[first]} to {_WEEKDAYS[last]}" if last else _WEEKDAYS[first]
        )

    return _listed(words)


def _cron_days(fields: Mapping[str, str]) -> str | None:
    """Return the days a cron trigger fires on in words, or ``None``."""
    year, month, day, week, weekday = (
        fields[name] for name in ("year", "month", "day", "week", "day_of_week")
    )
    if year != "*" or week != "*":
        return None

    if month == day == "*":
        return "every day" if weekday == "*" else _weekdays(weekday)

    if weekday != "*" or not day.isdigit():
        return None

    if month == "*":
        return f"on day {int(day)} of every month"

    if month.isdigit() and 1 <= int(month) <= 12:
        return f"every year on {_MONTHS[int(month) - 1]} {int(day)}"
    if month in _MONTH_KEYS:
        return f"every year on {_MONTHS[_MONTH_KEYS.index(month)]} {int(day)}"

    return None  # ranges and lists of months: shown as the fields


def _cron_time(fields: Mapping[str, str]) -> str | None:
    """Return the times of day a cron trigger fires at in words, or ``None``."""
    hour, minute, second = fields["hour"], fields["minute"], fields["second"]
    if hour.isdigit() and minute.isdigit() and second.isdigit():
        return "at " + _clock(int(hour), int(minute), int(second))

    if second != "0":
        return None

    if hour == "*" and minute in ("*", "*/1"):
        return "every minute"

    if hour == "*" and minute.startswith("*/") and minute[2:].isdigit():
        return f"every {int(minute[2:])} minutes"

    if not _NUMBERS.match(minute):
        return None

    minutes = _listed([str(int(value)) for value in minute.split(",")])
    if hour == "*":
        return f"at minute {minutes} of every hour"

    if _NUMBERS.match(hour) or _RANGE.match(hour):
        plural = "s" if "," in hour or "-" in hour else ""
        return f"at minute {minutes} of hour{plural} {_listed(hour.split(','))}"

    return None


def _cron_words(trigger: CronTrigger) -> str:
    state = trigger.__getstate__()
    fields = dict(zip(CRON_FIELDS, state["fields"], strict=True))
    days, clock = _cron_days(fields), _cron_time(fields)
    if days is None or clock is None:
        shown = [f"{name}={text}" for name, text in fields.items() if text != "*"]
        text = "cron " + (", ".join(shown) if shown else "every second")
    elif days == "every day":
        # "every day at 09:00"; "every 5 minutes" and "at minute 0 of ..." alone
        text = f"every day {clock}" if clock[3:4].isdigit() else clock
    else:
        text = f"{clock}, {days}"

    if trigger.end_time is not None:
        text += f", until {_when(trigger.end_time)}"

    return f"{text} ({_zone_name(trigger.timezone)})"


def _interval_words(trigger: IntervalTrigger) -> str:
    units = ("week", "day", "hour", "minute", "second", "microsecond")
    values = trigger.__getstate__()["interval"]
    every = _every(list(zip(values, units, strict=True)))
    text = f"{every} from {_when(trigger.start_time)}"
    if trigger.end_time is not None:
        text += f", until {_when(trigger.end_time)}"
    return text


def _calendar_words(trigger: CalendarIntervalTrigger) -> str:
    state = trigger.__getstate__()
    units = ("year", "month", "week", "day")
    text = (
        f"{_every(list(zip(state['interval'], units, strict=True)))} "
        f"at {_clock(*state['time'])} from {trigger.start_date}"
    )
    if trigger.end_date is not None:
        text += f" until {trigger.end_date}"
    return f"{text} ({_zone_name(trigger.timezone)})"


def describe_trigger(trigger: Trigger) -> str:
    """
    Return a trigger in words: ``every day at 09:00 (Europe/Berlin)``.

    Cron expressions that are not phrased are given as their fields
    (``cron day=last, hour=9, ...``); a trigger that is not one of APScheduler's
    built-in ones is named by its class.
    """
    if type(trigger) is CronTrigger:
        return _cron_words(trigger)
    if type(trigger) is IntervalTrigger:
        return _interval_words(trigger)
    if type(trigger) is CalendarIntervalTrigger:
        return _calendar_words(trigger)
    if type(trigger) is DateTrigger:
        return f"once, at {_when(trigger.run_time)}"

    if type(trigger) in (AndTrigger, OrTrigger):
        assert isinstance(trigger, BaseCombiningTrigger)
        parts = "; ".join(
            f"[{describe_trigger(child)}]"
            if isinstance(child, BaseCombiningTrigger)
            else describe_trigger(child)
            for child in trigger.triggers
        )
        if isinstance(trigger, AndTrigger):
            seconds = _amount(trigger.threshold.total_seconds(), "second")
            return f"when all of these fire within {seconds}: {parts}"
        return f"whenever any of these fires: {parts}"

    kind = type(trigger)
    return f"a trigger of class {kind.__module__}.{kind.__qualname__}"


# Fire times


class _OutOfTime(Exception):
    """Raised when computing fire times takes longer than allowed."""


class _Timed(Trigger):
    """A combination's trigger, in a copy made to compute fire times: each ``next()``
    first checks the time allowed (an AndTrigger may ask its triggers many times for
    one fire time of its own)."""

    __slots__ = ("_deadline", "_inner")

    def __init__(self, inner: Trigger, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def next(self) -> datetime | None:
        if time.monotonic() > self._deadline:
            raise _OutOfTime
        return self._inner.next()

    def __getstate__(self) -> Any:
        return self._inner.__getstate__()

    def __setstate__(self, state: Any) -> None:
        raise NotImplementedError("a timed trigger is not restored")


def _copy(trigger: Trigger, deadline: float, clipped: list[bool]) -> Trigger:
    """Return a copy of one of APScheduler's triggers, made without class references
    (deepcopy would restore a combination through them), its combinations' triggers
    timed, and each ending within :data:`HORIZON` (noted in ``clipped``)."""
    kind = type(trigger)
    if kind in (AndTrigger, OrTrigger):
        assert isinstance(trigger, BaseCombiningTrigger)
        triggers: list[Trigger] = [
            _Timed(_copy(child, deadline, clipped), deadline)
            for child in trigger.triggers
        ]
        if isinstance(trigger, AndTrigger):
            copy: BaseCombiningTrigger = AndTrigger(
                triggers,
                threshold=trigger.threshold,
                max_iterations=trigger.max_iterations,
            )
        else:
            copy = OrTrigger(triggers)
        copy._next_fire_times = list(trigger._next_fire_times)
        return copy

    if kind not in (CronTrigger, IntervalTrigger, DateTrigger, CalendarIntervalTrigger):
        raise TypeError(f"not one of APScheduler's triggers: {kind.__qualname__}")

    leaf = kind.__new__(kind)
    leaf.__setstate__(_within_horizon(trigger.__getstate__(), clipped))
    return leaf


def _within_horizon(state: dict[str, Any], clipped: list[bool]) -> dict[str, Any]:
    """
    Return a trigger's state ending at most :data:`HORIZON` after its position.

    One ``next()`` of a cron trigger that never matches walks day by day to its end
    (to the year 9999 without one: half a minute), and APScheduler's calendar
    interval trigger never returns once past the year 9999; neither can be stopped
    from outside the call, so the copy that computes fire times ends in time.
    """
    now = datetime.now(timezone.utc)
    if "end_time" in state:  # cron, interval
        since = state["last_fire_time"] or state["start_time"]
        key, horizon = "end_time", max(since, now) + HORIZON
    elif "end_date" in state:  # calendar interval
        since = state["last_fire_date"] or state["start_date"]
        key, horizon = "end_date", max(since, now.date()) + HORIZON
    else:
        return state

    if state[key] is None or state[key] > horizon:
        clipped.append(True)
        state = {**state, key: horizon}

    return state


def _fire_times(
    trigger: Trigger, count: int, limit: float
) -> tuple[list[datetime], str | None]:
    """Return up to ``count`` fire times, and why they stop early (if they do)."""
    deadline = time.monotonic() + limit
    clipped: list[bool] = []
    copy = _copy(trigger, deadline, clipped)
    times: list[datetime] = []
    try:
        while len(times) < min(count, MAX_COUNT):
            if time.monotonic() > deadline:
                raise _OutOfTime
            moment = copy.next()
            if moment is None:
                if clipped:
                    return times, "fire times are computed up to ten years ahead"
                break
            times.append(moment)
    except _OutOfTime:
        return times, f"fire times not computed further: over {limit:g} s"
    except MaxIterationsReached:
        return times, "fire times not computed further: its AndTrigger gave up"
    except Exception as exc:  # dates past the year 9999, and the like
        return times, shorten(f"fire times not computed further: {exc!r}", 200)

    return times, None


def next_fire_times(
    trigger: Trigger, count: int = 10, limit: float = TIME_LIMIT
) -> list[datetime]:
    """
    Return the next fire times of a rebuilt trigger, computed on a copy of it.

    :param count: how many fire times, at most (never more than :data:`MAX_COUNT`)
    :param limit: the time allowed (seconds): the fire times computed by then are
        returned (checked before each ``next()`` of the trigger and, in a
        combination, of its triggers; AndTrigger stops after its ``max_iterations``)
    :return: fewer than ``count`` fire times if the trigger has no more, or if
        computing them took too long
    :raises TypeError: if ``trigger`` is not one of APScheduler's built-in triggers
    """
    return _fire_times(trigger, count, limit)[0]


def schedule_outlook(
    serialized: object,
    count: int = 10,
    *,
    next_fire_time: datetime | None = None,
    limit: float = TIME_LIMIT,
) -> Outlook:
    """
    Return what a schedule's page shows of its stored trigger: the trigger in words
    and its next fire times, never deserializing it (see :func:`rebuild_trigger`).

    :param serialized: the stored trigger
    :param count: how many fire times to show, at most
    :param next_fire_time: the schedule's stored next fire time, which the stored
        trigger already gave: shown first, before the trigger's next ones
    :param limit: the time allowed to compute the fire times (seconds)
    """
    rebuilt = rebuild_trigger(serialized)
    if rebuilt.trigger is None:
        return Outlook(None, [], rebuilt.reason)

    first = [] if next_fire_time is None or count < 1 else [next_fire_time]
    times, reason = _fire_times(rebuilt.trigger, count - len(first), limit)
    try:
        words: str | None = describe_trigger(rebuilt.trigger)
    except Exception as exc:  # a phrasing this module gets wrong: say so, show the rest
        words, reason = None, shorten(f"not put in words: {exc!r}", 200)

    return Outlook(words, first + times, reason)
