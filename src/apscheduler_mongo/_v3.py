"""
Read the jobs of APScheduler 3's ``MongoDBJobStore``, and convert them to schedules.

A 3.x document is ``{_id, next_run_time, job_state}``, where ``job_state`` pickles
the job's state: a dict of plain values and a 3.x trigger object. APScheduler 3
cannot be installed beside APScheduler 4 (they share the package name), and a
pickle read with :func:`pickle.loads` runs whatever it names, so the pickles are
read here by an unpickler that builds *records* of 3.x's classes (their pickled
state, and nothing of their behaviour), pytz's time zones as :class:`ZoneInfo`,
the value types that :mod:`.serializers` allows, and the user's classes named in
``allowed_types``; anything else is refused. Nothing stored is imported or called.

Each record is then checked field by field and converted to APScheduler 4's own
trigger, with its fire times positioned where 3.x left them: the converted trigger's
next fire time must be 3.x's next run time, or the job is not converted.
"""

from __future__ import annotations

import io
import math
import pickle
import reprlib
import types
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import Any, Final, NoReturn
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
from apscheduler import CoalescePolicy, DeserializationError, Schedule, Task
from apscheduler.abc import Trigger
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.combining import AndTrigger, BaseCombiningTrigger, OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .serializers import (
    _AllowList,
    _check_allowed_types,
    _is_ref,
    _modern_name,
    _refuse_extensions,
    _SafeUnpickler,
)

#: The 3.x trigger classes that are converted, by reference
CRON = "apscheduler.triggers.cron:CronTrigger"
INTERVAL = "apscheduler.triggers.interval:IntervalTrigger"
DATE = "apscheduler.triggers.date:DateTrigger"
CALENDAR = "apscheduler.triggers.calendarinterval:CalendarIntervalTrigger"
AND = "apscheduler.triggers.combining:AndTrigger"
OR = "apscheduler.triggers.combining:OrTrigger"
TRIGGERS: Final = frozenset({CRON, INTERVAL, DATE, CALENDAR, AND, OR})
#: The classes a 3.x cron trigger's state holds: its fields and their expressions
_FIELDS = "apscheduler.triggers.cron.fields:"
_EXPRESSIONS = "apscheduler.triggers.cron.expressions:"
PARTS: Final = frozenset(
    {
        *(
            _FIELDS + name
            for name in (
                "BaseField",
                "WeekField",
                "DayOfMonthField",
                "DayOfWeekField",
                "MonthField",
            )
        ),
        *(
            _EXPRESSIONS + name
            for name in (
                "AllExpression",
                "RangeExpression",
                "MonthRangeExpression",
                "WeekdayRangeExpression",
                "WeekdayPositionExpression",
                "LastDayOfMonthExpression",
            )
        ),
    }
)
#: The order of a 3.x cron trigger's fields, which is also APScheduler 4's
CRON_FIELDS: Final = (
    "year",
    "month",
    "day",
    "week",
    "day_of_week",
    "hour",
    "minute",
    "second",
)
_WEEKDAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_MONTHS: Final = (
    *("jan", "feb", "mar", "apr", "may", "jun"),
    *("jul", "aug", "sep", "oct", "nov", "dec"),
)
_POSITIONS: Final = ("1st", "2nd", "3rd", "4th", "5th", "last")
#: How many fire times a calendar interval trigger is stepped through at most to
#: reach 3.x's next run time (a daily one started 27 years before)
MAX_STEPS: Final = 10_000
#: Bounds on what one document may hold, so that a crafted one cannot keep the
#: import busy: expressions in a cron field, triggers in a combination (all levels),
#: levels of combination, levels of containers in the arguments, and seconds
MAX_EXPRESSIONS: Final = 64
MAX_TRIGGERS: Final = 16
MAX_DEPTH: Final = 3
MAX_NESTING: Final = 100
MAX_SECONDS: Final = 10**9
#: APScheduler 3's default executor is a thread pool (AsyncIOScheduler's is not:
#: map "default" to "async" for its coroutine functions)
DEFAULT_EXECUTORS: Final[Mapping[str, str]] = {
    "default": "threadpool",
    "threadpool": "threadpool",
    "processpool": "processpool",
}


class NotConvertibleError(ValueError):
    """A 3.x job that cannot be converted, and why."""


def _fail(reason: str) -> NoReturn:
    raise NotConvertibleError(reason)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60


def brief(value: object) -> str:
    """Return a short repr of ``value``, however big or deep it is."""
    return _REPR.repr(value)


class Stored:
    """A 3.x object, as the record of what its pickle holds; it has no behaviour."""

    __slots__ = ("args", "state")
    args: tuple[object, ...]
    state: object
    #: The ``"module:qualname"`` of the 3.x class
    ref: str = ""

    def __new__(cls, *args: object, **_kwargs: object) -> Stored:
        record = object.__new__(cls)
        record.args = args
        record.state = None
        return record

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        self.state = state


#: One record class per 3.x class the unpickler builds
_RECORDS: Final[Mapping[str, type[Stored]]] = {
    ref: type(ref.rpartition(":")[2], (Stored,), {"__slots__": (), "ref": ref})
    for ref in TRIGGERS | PARTS
}


def _zone(name: object) -> tzinfo:
    if not isinstance(name, str):
        raise pickle.UnpicklingError(f"malformed time zone name {brief(name)}")

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise pickle.UnpicklingError(f"unknown time zone {brief(name)}") from None


def _pytz_zone(*args: object) -> tzinfo:
    # pytz pickles a zone (localized or not) as pytz._p(name, ...); the date time
    # that holds it keeps its wall time, which ZoneInfo maps to the same instant
    if not args:
        raise pickle.UnpicklingError("pytz time zone without a name")

    return _zone(args[0])


def _pytz_fixed(minutes: object) -> tzinfo:
    if not isinstance(minutes, int) or isinstance(minutes, bool):
        raise pickle.UnpicklingError(f"malformed fixed offset {brief(minutes)}")

    try:
        return timezone(timedelta(minutes=minutes))
    except ValueError as exc:
        raise pickle.UnpicklingError(f"bad fixed offset: {exc}") from None


#: pytz's pickle helpers, read as time zones of the standard library
_PYTZ: Final[Mapping[str, Callable[..., tzinfo]]] = {
    "pytz:_p": _pytz_zone,
    "pytz:_UTC": lambda: timezone.utc,
    "pytz:FixedOffset": _pytz_fixed,
}


def _fresh(function: Callable[..., tzinfo]) -> Callable[..., tzinfo]:
    """Return a new function calling ``function``: BUILD may change its attributes."""

    def call(*args: object) -> tzinfo:
        return function(*args)

    return call


class _V3Unpickler(_SafeUnpickler):
    """Unpickle a 3.x job's state into records, refusing what is not allowed."""

    def __init__(self, file: io.BytesIO, allow_list: _AllowList) -> None:
        super().__init__(file, allow_list)
        # New functions for each document, as the base class's helpers are: what
        # pickle's BUILD sets on them dies with the unpickler
        self._pytz = {ref: _fresh(function) for ref, function in _PYTZ.items()}

    def find_class(self, module_name: str, global_name: str, /) -> Any:
        module_name, global_name = _modern_name(module_name, global_name)
        ref = f"{module_name}:{global_name}"
        if ref in _RECORDS:
            return _RECORDS[ref]

        if ref in self._pytz:
            return self._pytz[ref]

        if module_name.partition(".")[0] in ("apscheduler", "pytz"):
            raise pickle.UnpicklingError(
                f"refusing to rebuild {ref!r}: not one of the APScheduler 3 classes "
                "that can be converted"
            )

        return super().find_class(module_name, global_name)


@attrs.frozen
class V3Job:
    """The state of one 3.x job, checked."""

    id: str
    func: str
    trigger: tuple[str, Mapping[str, Any]]
    executor: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    name: str | None
    misfire_grace_time: timedelta | None
    coalesce: bool
    max_instances: int
    next_run_time: datetime | None


def read_job(
    document: Mapping[str, Any], allowed_types: Iterable[type | str] = ()
) -> V3Job:
    """
    Read one 3.x document, running nothing it names.

    :param document: a document of 3.x's ``MongoDBJobStore``
    :param allowed_types: the user's classes that the job's arguments may hold
    :raises NotConvertibleError: if the document is not a 3.x job this can read
    """
    state = _unpickle(document.get("job_state"), allowed_types)
    if state.get("version") != 1:
        _fail(f"its state has version {brief(state.get('version'))}, not 1")

    job_id = _typed(state, "id", str)
    if document.get("_id") != job_id:
        _fail(f"its _id differs from the id in its state ({brief(job_id)})")

    func = _typed(state, "func", str)
    if not _is_ref(func):
        _fail(f"its function {brief(func)} is not a 'module:qualname' reference")

    trigger = state.get("trigger")
    if not isinstance(trigger, Stored) or trigger.ref not in TRIGGERS:
        kind = trigger.ref if isinstance(trigger, Stored) else type(trigger).__name__
        _fail(f"its trigger {kind!r} is not one of APScheduler 3's")

    args, kwargs = state.get("args"), state.get("kwargs")
    if not isinstance(args, (tuple, list)):
        _fail("its args are not a tuple")

    if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        _fail("its kwargs are not a dict of names")

    _check_values(args, 0)
    _check_values(kwargs, 0)

    grace = state.get("misfire_grace_time")
    if grace is not None and not _is_number(grace):
        _fail(f"its misfire_grace_time {brief(grace)} is not a number of seconds")

    max_instances = _typed(state, "max_instances", int)
    if max_instances < 1:
        _fail(f"its max_instances {max_instances} is less than 1")

    name = state.get("name")
    next_run_time = state.get("next_run_time")
    if next_run_time is not None:
        next_run_time = _aware(next_run_time, "next_run_time")

    return V3Job(
        id=job_id,
        func=func,
        trigger=(trigger.ref, _state(trigger)),
        executor=_typed(state, "executor", str),
        args=tuple(args),
        kwargs=kwargs,
        name=name if isinstance(name, str) else None,
        misfire_grace_time=None if grace is None else timedelta(seconds=grace),
        coalesce=_typed(state, "coalesce", bool),
        max_instances=max_instances,
        next_run_time=next_run_time,
    )


def _unpickle(blob: object, allowed_types: Iterable[type | str]) -> dict[str, Any]:
    """Return the job state that ``blob`` pickles, building records of 3.x's classes."""
    if not isinstance(blob, bytes):
        _fail("it has no job_state holding a pickle")

    allow_list = _AllowList.build(_check_allowed_types(allowed_types))
    try:
        _refuse_extensions(blob)
        state = _V3Unpickler(io.BytesIO(blob), allow_list).load()
    except DeserializationError as exc:
        _fail(f"its pickle cannot be read: {exc}")
    except Exception as exc:
        _fail(f"its pickle cannot be read: {exc}")

    if not isinstance(state, dict):
        _fail(f"its state is a {type(state).__qualname__}, not a dict")

    return state


_CALLABLES: Final = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
)


def _check_values(value: object, depth: int) -> None:
    """Refuse arguments that hold 3.x's records, classes or functions, or nest deep."""
    if depth > MAX_NESTING:
        _fail(f"its arguments nest more than {MAX_NESTING} levels deep")

    if isinstance(value, Stored) or isinstance(value, _CALLABLES):
        _fail(f"its arguments hold {brief(value)}, which is not a value")

    if isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, depth + 1)
            _check_values(item, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _check_values(item, depth + 1)


def _typed(state: Mapping[str, Any], key: str, kind: type) -> Any:
    value = state.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _fail(f"its {key} is {brief(value)}, not a {kind.__name__}")

    return value


def _is_number(value: object) -> bool:
    """Tell whether ``value`` is a finite number of seconds, up to MAX_SECONDS."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= MAX_SECONDS
    )


def _aware(value: object, what: str) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        _fail(f"its {what} {brief(value)} is not a date and time with a time zone")

    return value


def _state(record: Stored) -> Mapping[str, Any]:
    # 3.0's triggers pickled (None, state) tuples; later ones pickle the dict
    state = record.state
    if isinstance(state, tuple) and len(state) == 2:
        state = state[1]

    if not isinstance(state, dict):
        _fail(f"the state of its {record.ref.rpartition(':')[2]} is not a dict")

    return state


def _seconds(state: Mapping[str, Any], key: str) -> timedelta | None:
    value = state.get(key)
    if value is None:
        return None

    if not _is_number(value):
        _fail(f"its trigger's {key} {brief(value)} is not a number of seconds")

    return timedelta(seconds=value)


def _optional_time(state: Mapping[str, Any], key: str) -> datetime | None:
    value = state.get(key)
    return None if value is None else _aware(value, f"trigger's {key}")


def _timezone(state: Mapping[str, Any]) -> tzinfo:
    value = state.get("timezone")
    if not isinstance(value, tzinfo):
        _fail(f"its trigger's time zone {brief(value)} is not a time zone")

    return value


def _untyped(value: object) -> Any:
    # APScheduler 4.0.0a6 takes None for these options, but does not say so in types
    return value


def _int(value: object, low: int, high: int) -> int:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not low <= value <= high
    ):
        _fail(f"a cron expression holds {brief(value)}, not a number in {low}..{high}")

    return value


def _step(expression: Mapping[str, Any]) -> str:
    step = expression.get("step")
    return "" if step is None else f"/{_int(step, 1, 10_000)}"


def _expression(record: object, field: str) -> str:
    """
    Return the cron text of one 3.x cron expression, as 3.x's ``str()`` gives it.

    Except for numbers in the day of the week: 3.x counts them from Monday (0), and
    APScheduler 4 as cron does, from Sunday. They are written as names.
    """
    if not isinstance(record, Stored) or not record.ref.startswith(_EXPRESSIONS):
        _fail("a cron field holds something else than an expression")

    state = record.state
    if isinstance(state, tuple) and len(state) == 2:
        state = state[1]

    if not isinstance(state, dict):
        _fail("a cron expression has no state")

    kind = record.ref.partition(":")[2]
    if field == "day_of_week" and (
        kind == "RangeExpression" or (kind == "AllExpression" and state.get("step"))
    ):
        return _weekdays(state, kind)

    if kind == "AllExpression":
        return "*" + _step(state)

    if kind == "LastDayOfMonthExpression":
        return "last"

    if kind == "WeekdayPositionExpression":
        position = _POSITIONS[_int(state.get("option_num"), 0, len(_POSITIONS) - 1)]
        return f"{position} {_WEEKDAYS[_int(state.get('weekday'), 0, 6)]}"

    first, last = state.get("first"), state.get("last")
    names: tuple[str, ...]
    if kind == "MonthRangeExpression":
        low, high, names = 1, 12, _MONTHS
    elif kind == "WeekdayRangeExpression":
        low, high, names = 0, 6, _WEEKDAYS
    else:
        low, high, names = 0, 9999, ()

    def name(value: object) -> str:
        number = _int(value, low, high)
        return names[number - low] if names else str(number)

    text = (
        name(first) if last is None or last == first else f"{name(first)}-{name(last)}"
    )
    return text + _step(state)


def _weekdays(state: Mapping[str, Any], kind: str) -> str:
    """Return the days of the week of 3.x's numeric expression, by name."""
    given = state.get("step")
    step = 1 if given is None else _int(given, 1, 6)
    if kind == "AllExpression":
        first, last = 0, 6
    else:
        first = _int(state.get("first"), 0, 6)
        end = state.get("last")
        # 3.x reads "3/2" as from Thursday to Sunday, every other day
        last = (6 if given is not None else first) if end is None else _int(end, 0, 6)

    days = [_WEEKDAYS[day] for day in range(first, last + 1, step)]
    if not days:
        _fail("a day of the week expression holds no day")

    return ",".join(days)


def _cron(state: Mapping[str, Any], since: datetime) -> CronTrigger:
    fields = state.get("fields")
    if not isinstance(fields, list) or len(fields) != len(CRON_FIELDS):
        _fail("its cron trigger does not hold its 8 fields")

    texts: dict[str, str] = {}
    for name, field in zip(CRON_FIELDS, fields, strict=True):
        field_state = field.state if isinstance(field, Stored) else None
        if (
            not isinstance(field, Stored)
            or not field.ref.startswith(_FIELDS)
            or not isinstance(field_state, dict)
            or field_state.get("name") != name
            or not isinstance(field_state.get("expressions"), list)
            or not field_state["expressions"]
            or len(field_state["expressions"]) > MAX_EXPRESSIONS
        ):
            _fail(f"its cron trigger's {name} field is malformed")

        texts[name] = ",".join(
            _expression(item, name) for item in field_state["expressions"]
        )

    return CronTrigger(
        **texts,
        # 3.x's cron trigger without a start date has no lower bound
        start_time=_optional_time(state, "start_date") or since,
        end_time=_untyped(_optional_time(state, "end_date")),
        timezone=_timezone(state),
    )


def _interval(state: Mapping[str, Any]) -> IntervalTrigger:
    interval = state.get("interval")
    if not isinstance(interval, timedelta) or interval <= timedelta(0):
        _fail(f"its interval {brief(interval)} is not a positive time span")

    start = _aware(state.get("start_date"), "trigger's start_date")
    end = _optional_time(state, "end_date")
    # 3.x adds the interval to timestamps: in UTC, APScheduler 4 does the same
    return IntervalTrigger(
        days=interval.days,
        seconds=interval.seconds,
        microseconds=interval.microseconds,
        start_time=start.astimezone(timezone.utc),
        end_time=_untyped(None if end is None else end.astimezone(timezone.utc)),
    )


def _calendar(state: Mapping[str, Any]) -> CalendarIntervalTrigger:
    interval, at = state.get("interval"), state.get("time")
    if (
        not isinstance(interval, list)
        or len(interval) != 4
        or not isinstance(at, list)
        or len(at) != 3
    ):
        _fail("its calendar interval trigger is malformed")

    start, end = state.get("start_date"), state.get("end_date")
    if not isinstance(start, date) or not (end is None or isinstance(end, date)):
        _fail("its calendar interval trigger's dates are malformed")

    years, months, weeks, days = (_int(value, 0, 10_000) for value in interval)
    return CalendarIntervalTrigger(
        years=years,
        months=months,
        weeks=weeks,
        days=days,
        hour=_int(at[0], 0, 23),
        minute=_int(at[1], 0, 59),
        second=_int(at[2], 0, 59),
        start_date=start,
        end_date=_untyped(end),
        timezone=_timezone(state),
    )


def _combined(state: Mapping[str, Any], since: datetime) -> list[Trigger]:
    items = state.get("triggers")
    if not isinstance(items, list) or not items:
        _fail("its combining trigger holds no triggers")

    triggers = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            _fail("its combining trigger is malformed")

        ref, child = item
        if not isinstance(ref, str) or ref not in TRIGGERS:
            _fail(f"its combining trigger holds a {brief(ref)}, not one of 3.x's")

        if ref in (INTERVAL, CALENDAR):
            # 3.x asks each of them for its time after the combination's previous
            # fire time, so they fire on another grid than on their own
            _fail(
                "its combining trigger holds an interval trigger, whose fire times "
                "3.x computes from the combination's, unlike APScheduler 4"
            )

        if not isinstance(child, dict):
            _fail("its combining trigger holds a trigger without state")

        if _seconds(child, "jitter"):
            _fail("a trigger inside its combining trigger has a jitter of its own")

        triggers.append(convert_trigger(ref, child, since))

    return triggers


def _check_tree(
    ref: str, state: Mapping[str, Any], depth: int = 0, in_and: bool = False
) -> int:
    """
    Return how many triggers a 3.x trigger holds, itself included.

    :raises NotConvertibleError: if combinations nest deeper than MAX_DEPTH, an
        AndTrigger is inside another (APScheduler 4 would try up to 10,000 times
        10,000 fire times), or it holds more than MAX_TRIGGERS triggers
    """
    if ref not in (AND, OR):
        return 1

    if depth >= MAX_DEPTH:
        _fail(f"its combining triggers nest more than {MAX_DEPTH} levels deep")

    if ref == AND and in_and:
        _fail("its trigger has an AndTrigger inside an AndTrigger")

    count = 1
    items = state.get("triggers")
    for item in items if isinstance(items, list) else ():
        if isinstance(item, (tuple, list)) and len(item) == 2:
            child_ref, child = item
            if isinstance(child_ref, str) and isinstance(child, dict):
                count += _check_tree(child_ref, child, depth + 1, in_and or ref == AND)

        if count > MAX_TRIGGERS:
            _fail(f"its trigger holds more than {MAX_TRIGGERS} triggers")

    return count


def convert_trigger(ref: str, state: Mapping[str, Any], since: datetime) -> Trigger:
    """
    Return the APScheduler 4 trigger equal to a 3.x trigger (jitter aside).

    :param ref: the 3.x trigger class's ``"module:qualname"``
    :param state: the 3.x trigger's pickled state
    :param since: the start time of a cron trigger that has no start date
    :raises NotConvertibleError: if it has no equal, or its state is malformed
    """
    _check_tree(ref, state)
    try:
        if ref == CRON:
            return _cron(state, since)
        if ref == INTERVAL:
            return _interval(state)
        if ref == DATE:
            return DateTrigger(_aware(state.get("run_date"), "trigger's run_date"))
        if ref == CALENDAR:
            return _calendar(state)
        if ref == AND:
            # 3.x fires only when all its triggers' fire times are equal
            return AndTrigger(_combined(state, since), threshold=0)
        if ref == OR:
            return OrTrigger(_combined(state, since))
    except NotConvertibleError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        _fail(f"APScheduler 4 refuses its trigger: {exc}")

    _fail(f"its trigger {ref!r} is not one of APScheduler 3's")


def position(trigger: Trigger, not_before: datetime) -> None:
    """
    Make ``trigger.next()`` return its first fire time at or after ``not_before``.

    This puts an APScheduler 4 trigger where a 3.x job's trigger was: the scheduler
    calls ``next()`` to find the fire time after the schedule's next one.

    :raises NotConvertibleError: if a calendar interval trigger would have to be
        stepped more than :data:`MAX_STEPS` times
    """
    if isinstance(trigger, CronTrigger):
        # Its next() starts one second after the last fire time (a whole second)
        if not_before > trigger.start_time:
            # One second before, as an instant: in a DST fold, wall time goes back
            last = not_before.astimezone(timezone.utc) - timedelta(seconds=1)
            state = trigger.__getstate__()
            state["last_fire_time"] = last.astimezone(trigger.timezone)
            trigger.__setstate__(state)
    elif isinstance(trigger, IntervalTrigger):
        if not_before > trigger.start_time:
            step = timedelta(
                weeks=trigger.weeks,
                days=trigger.days,
                hours=trigger.hours,
                minutes=trigger.minutes,
                seconds=trigger.seconds,
                microseconds=trigger.microseconds,
            )
            steps = -((trigger.start_time - not_before) // step)
            state = trigger.__getstate__()
            state["last_fire_time"] = trigger.start_time + (steps - 1) * step
            trigger.__setstate__(state)
    elif isinstance(trigger, DateTrigger):
        if trigger.run_time < not_before:
            trigger.next()  # a combination's date that passed
    elif isinstance(trigger, BaseCombiningTrigger):
        for child in trigger.triggers:
            position(child, not_before)
    elif isinstance(trigger, CalendarIntervalTrigger):
        fresh = trigger.__getstate__()
        for _ in range(MAX_STEPS):
            state = trigger.__getstate__()
            fire_time = trigger.next()
            if fire_time is None or fire_time >= not_before:
                trigger.__setstate__(state)
                return

        trigger.__setstate__(fresh)
        _fail(f"its calendar interval trigger would need over {MAX_STEPS} steps")


@attrs.frozen
class Converted:
    """What one 3.x job becomes: a schedule, of a task."""

    task: Task
    schedule: Schedule


def task_id_of(job: V3Job, max_instances: Mapping[str, int]) -> str:
    """
    Return the id of the task that runs ``job``.

    A task is named by its function's reference, as APScheduler 4 names the tasks it
    creates. 3.x's ``max_instances`` belongs to a job and APScheduler 4's
    ``max_running_jobs`` to a task, so jobs of one function whose ``max_instances``
    differ from the most common one (``max_instances``, by function) get a task
    each, named after their limit.
    """
    if max_instances.get(job.func, job.max_instances) == job.max_instances:
        return job.func

    return f"{job.func} (max_instances={job.max_instances})"


def _positioned(
    ref: str, state: Mapping[str, Any], when: datetime, jitter: timedelta | None
) -> tuple[Trigger, datetime | None]:
    """
    Return the converted trigger having just returned its fire time at ``when``.

    With jitter, ``when`` is 3.x's jittered time, which comes at most ``jitter``
    after the fire time it was made from: the last fire time at or before ``when``.
    Found by counting, then replayed on a new trigger (a trigger's state cannot be
    copied back whole).
    """
    since = when - (jitter or timedelta(0))
    trigger = convert_trigger(ref, state, since)
    position(trigger, since)
    first = trigger.next()
    if not jitter or first is None:
        return trigger, first

    steps = 1
    while steps <= MAX_STEPS:
        following = trigger.next()
        if following is None or following > when:
            break

        steps += 1

    trigger = convert_trigger(ref, state, since)
    position(trigger, since)
    for _ in range(steps):
        first = trigger.next()

    return trigger, first


def convert_job(
    job: V3Job,
    task_id: str,
    now: datetime,
    executors: Mapping[str, str] = DEFAULT_EXECUTORS,
) -> Converted:
    """
    Return the task and schedule that do what a 3.x job did.

    The schedule keeps the job's id, and its next fire time is 3.x's next run time.
    The trigger is positioned there, so that the fire times after it are those 3.x
    would have computed; for a trigger with jitter, at the unjittered time the
    jitter may have moved. A paused job (no next run time) becomes a paused
    schedule whose next fire time is the trigger's first one from ``now``.

    :param now: the time from which a paused job's next fire time is computed
    :param executors: APScheduler 4's executor for each 3.x executor name
    :raises NotConvertibleError: if it cannot be converted, saying why
    """
    executor = executors.get(job.executor)
    if executor is None:
        _fail(
            f"its executor {brief(job.executor)} has no APScheduler 4 executor "
            "(map it with --executor NAME=EXECUTOR)"
        )

    ref, state = job.trigger
    jitter = _seconds(state, "jitter")
    target = job.next_run_time
    try:
        trigger, first = _positioned(ref, state, target or now, jitter)
    except NotConvertibleError:
        raise
    except Exception as exc:  # whatever the data makes APScheduler 4 raise
        _fail(f"APScheduler 4 cannot compute its fire times: {brief(exc)}")

    if first is None:
        _fail("its trigger has no fire time left")

    if target is not None and not jitter and first.timestamp() != target.timestamp():
        _fail(
            f"APScheduler 4 computes its next fire time as {first.isoformat()}, "
            f"not 3.x's {target.isoformat()}"
        )

    metadata: dict[str, Any] = {"apscheduler3_job": job.id}
    if job.name is not None:
        metadata["name"] = job.name

    task = Task(
        id=task_id,
        func=job.func,
        job_executor=executor,
        max_running_jobs=job.max_instances,
    )
    schedule = Schedule(
        id=job.id,
        task_id=task_id,
        trigger=trigger,
        args=job.args,
        kwargs=job.kwargs,
        paused=target is None,
        coalesce=CoalescePolicy.latest if job.coalesce else CoalescePolicy.all,
        misfire_grace_time=_untyped(job.misfire_grace_time),
        max_jitter=_untyped(jitter),
        job_executor=executor,
        metadata=metadata,
        # With jitter, the time 3.x jittered: APScheduler 4 jitters it anew
        next_fire_time=first if jitter else target or first,
    )
    return Converted(task, schedule)
