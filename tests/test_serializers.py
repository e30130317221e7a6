"""Tests of the serializers that rebuild only the classes they are allowed to."""

from __future__ import annotations

import copyreg
import os
import pickle
import shlex
import subprocess
import sys
import textwrap
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterator
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import attrs
import cbor2
import pytest
from apscheduler import (
    CoalescePolicy,
    ConflictPolicy,
    DeserializationError,
    JobOutcome,
)
from apscheduler.abc import Serializer, Trigger
from apscheduler.serializers.cbor import CBORSerializer
from apscheduler.serializers.json import JSONSerializer
from apscheduler.serializers.pickle import PickleSerializer
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.combining import AndTrigger, OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from apscheduler_mongo.serializers import (
    BUILTIN_ALLOWED_TYPES,
    SafeCBORSerializer,
    SafeJSONSerializer,
    SafePickleSerializer,
)

HELSINKI = ZoneInfo("Europe/Helsinki")
START = datetime(2024, 3, 30, 22, 15, tzinfo=HELSINKI)
END = START + timedelta(days=60)
MAGIC_KEY = "_apscheduler_json"
TYPE_TAG = 4664
AND_TRIGGER = "apscheduler.triggers.combining:AndTrigger"
#: A pickle calling the object registered as extension code 240 (EXT1 240,
#: EMPTY_TUPLE, REDUCE, STOP)
EXT_CALL = b"\x80\x04\x82\xf0)R."

SAFE = [
    pytest.param(SafeJSONSerializer, id="json"),
    pytest.param(SafeCBORSerializer, id="cbor"),
    pytest.param(SafePickleSerializer, id="pickle"),
]
#: Each safe serializer, with APScheduler's serializer of the same format
PAIRS = [
    pytest.param(SafeJSONSerializer, JSONSerializer, id="json"),
    pytest.param(SafeCBORSerializer, CBORSerializer, id="cbor"),
    pytest.param(SafePickleSerializer, PickleSerializer, id="pickle"),
]
TRIGGERS = [
    pytest.param(lambda: DateTrigger(START), id="date"),
    pytest.param(
        lambda: IntervalTrigger(hours=5, start_time=START, end_time=END),
        id="interval",
    ),
    pytest.param(
        lambda: CalendarIntervalTrigger(
            months=1, hour=3, start_date=date(2024, 1, 31), timezone=HELSINKI
        ),
        id="calendar-interval",
    ),
    pytest.param(
        lambda: CronTrigger(
            day_of_week="mon-fri",
            hour="1-3",
            minute="*/20",
            start_time=START,
            end_time=END,
            timezone=HELSINKI,
        ),
        id="cron",
    ),
    pytest.param(
        lambda: AndTrigger(
            [
                IntervalTrigger(hours=1, start_time=START.replace(minute=0)),
                CronTrigger(hour="*/2", start_time=START, timezone=HELSINKI),
            ]
        ),
        id="and",
    ),
    pytest.param(
        lambda: OrTrigger(
            [
                DateTrigger(START + timedelta(minutes=5)),
                CronTrigger(day="1", start_time=START, timezone=HELSINKI),
            ]
        ),
        id="or",
    ),
    pytest.param(
        lambda: OrTrigger(
            [
                AndTrigger(
                    [
                        IntervalTrigger(days=1, start_time=START),
                        CronTrigger(hour=22, start_time=START, timezone=HELSINKI),
                    ],
                    threshold=3600,
                ),
                IntervalTrigger(weeks=1, start_time=START, end_time=END),
            ]
        ),
        id="or-of-and",
    ),
]


#: Before Python 3.11, objects without a __getstate__() of their own (bytes, Decimal,
#: exceptions) cannot be written by APScheduler's JSON and CBOR serializers at all
NEEDS_GETSTATE = pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="before Python 3.11, APScheduler's JSON and CBOR serializers cannot write "
    "bytes, Decimal or exceptions (no object.__getstate__)",
)


class Point:
    """A user class that the safe serializers must not rebuild unless told to."""

    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (other.x, other.y) == (self.x, self.y)

    def __getstate__(self) -> dict[str, int]:
        return {"x": self.x, "y": self.y}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.x = state["x"]
        self.y = state["y"]


PointAlias = Point
POINT_REF = f"{Point.__module__}:{Point.__qualname__}"


def fire_times(trigger: Trigger, count: int = 4) -> list[datetime | None]:
    """Return the next ``count`` fire times of ``trigger`` (None once it is done)."""
    return [trigger.next() for _ in range(count)]


def marshalled(serializer_class: object, ref: str, state: Any) -> bytes:
    """Return a payload of ``serializer_class``'s format rebuilding ``ref``."""
    if serializer_class is SafeJSONSerializer:
        return JSONSerializer().serialize({MAGIC_KEY: [ref, state]})

    return CBORSerializer().serialize(cbor2.CBORTag(TYPE_TAG, [ref, state]))


def refusal(ref: str) -> str:
    """Return a pattern matching the refusal to rebuild ``ref``."""
    return f"refusing to rebuild '{ref}'"


#: Job arguments of JSON's types
PLAIN: Any = (
    [1, -(2**40), 1.5, "text", "ünïcödé", True, None, [1, [2, "x"]]],
    {"a": 1, "b": {"c": [None, "d"]}, "e": []},
)
#: Job arguments that JSON cannot carry
RICH: Any = [
    b"\x00bytes\xff",
    datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=HELSINKI),
    datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=-3))),
    UUID("12345678-1234-5678-1234-567812345678"),
    Decimal("3.14159265358979323846"),
]


class TestTriggers:
    """Every APScheduler trigger round-trips, and reads back what APScheduler wrote."""

    @pytest.mark.parametrize("make_trigger", TRIGGERS)
    @pytest.mark.parametrize(("safe_class", "aps_class"), PAIRS)
    def test_round_trip(
        self,
        safe_class: Callable[[], Serializer],
        aps_class: Callable[[], Serializer],
        make_trigger: Callable[[], Trigger],
    ) -> None:
        trigger = make_trigger()
        serializer = safe_class()
        copy = serializer.deserialize(serializer.serialize(trigger))
        assert type(copy) is type(trigger)
        assert copy.__getstate__() == trigger.__getstate__()
        # JSON and CBOR keep a datetime's UTC offset, not its ZoneInfo, so past a
        # change of daylight saving time the copy fires as APScheduler's own copy does
        aps_serializer = aps_class()
        aps_copy = aps_serializer.deserialize(aps_serializer.serialize(trigger))
        assert fire_times(copy) == fire_times(aps_copy)

    @pytest.mark.parametrize("make_trigger", TRIGGERS)
    @pytest.mark.parametrize(("safe_class", "aps_class"), PAIRS)
    def test_reads_what_apscheduler_wrote(
        self,
        safe_class: Callable[[], Serializer],
        aps_class: Callable[[], Serializer],
        make_trigger: Callable[[], Trigger],
    ) -> None:
        trigger = make_trigger()
        trigger.next()  # a state with a last fire time
        written = aps_class().serialize(trigger)
        copy = safe_class().deserialize(written)
        # Read as APScheduler reads it (its JSON turns the calendar interval trigger's
        # last fire date into a datetime)
        aps_copy = aps_class().deserialize(written)
        assert type(copy) is type(trigger)
        assert copy.__getstate__() == aps_copy.__getstate__()
        assert fire_times(copy) == fire_times(aps_copy)

    @pytest.mark.parametrize("make_trigger", TRIGGERS)
    @pytest.mark.parametrize(("safe_class", "aps_class"), PAIRS)
    def test_writes_what_apscheduler_writes(
        self,
        safe_class: Callable[[], Serializer],
        aps_class: Callable[[], Serializer],
        make_trigger: Callable[[], Trigger],
    ) -> None:
        trigger = make_trigger()
        written = safe_class().serialize(trigger)
        assert written == aps_class().serialize(trigger)
        copy = aps_class().deserialize(written)
        assert copy.__getstate__() == trigger.__getstate__()

    @pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
    @pytest.mark.parametrize("make_trigger", TRIGGERS)
    def test_every_pickle_protocol(
        self, make_trigger: Callable[[], Trigger], protocol: int
    ) -> None:
        trigger = make_trigger()
        serializer = SafePickleSerializer(protocol=protocol)
        copy = serializer.deserialize(serializer.serialize(trigger))
        assert type(copy) is type(trigger)
        assert copy.__getstate__() == trigger.__getstate__()
        assert fire_times(copy) == fire_times(trigger)


class TestArguments:
    """Typical job arguments round-trip, as far as the format can carry them."""

    @pytest.mark.parametrize("safe_class", SAFE)
    def test_plain_values(self, safe_class: Callable[[], Serializer]) -> None:
        serializer = safe_class()
        args, kwargs = PLAIN
        assert serializer.deserialize(serializer.serialize(args)) == args
        assert serializer.deserialize(serializer.serialize(kwargs)) == kwargs

    @pytest.mark.parametrize(
        "safe_class",
        [
            pytest.param(SafeCBORSerializer, id="cbor"),
            pytest.param(SafePickleSerializer, id="pickle"),
        ],
    )
    def test_rich_values(self, safe_class: Callable[[], Serializer]) -> None:
        serializer = safe_class()
        copy = serializer.deserialize(serializer.serialize(RICH))
        assert copy == RICH
        assert [type(value) for value in copy] == [type(v) for v in RICH]

    @pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
    def test_pickle_keeps_types_and_time_zones(self, protocol: int) -> None:
        values = [
            *RICH,
            ZoneInfo.no_cache("Europe/Paris"),
            b"",
            bytearray(b"ab"),
            (1, "tuple"),
            {1, 2},
            frozenset({3}),
            1 + 2j,
            range(2, 9, 3),
            slice(1, None, 2),
            Fraction(22, 7),
            OrderedDict(a=1, b=2),
            deque([1, 2], maxlen=5),
            date(2024, 2, 29),
            time(23, 59, 59, 999999, tzinfo=timezone.utc),
            timedelta(days=-1, microseconds=1),
            timezone.utc,
            CoalescePolicy.latest,
            ConflictPolicy.replace,
            JobOutcome.success,
        ]
        serializer = SafePickleSerializer(protocol=protocol)
        copy = serializer.deserialize(serializer.serialize(values))
        assert [type(value) for value in copy] == [type(value) for value in values]
        assert copy[5].key == "Europe/Paris"
        assert copy[1].tzinfo is HELSINKI
        assert copy[:5] == values[:5]
        assert copy[6:] == values[6:]

    def test_json_writes_datetimes_and_uuids_as_text(self) -> None:
        serializer = SafeJSONSerializer()
        when, uid = RICH[1], RICH[3]
        copy = serializer.deserialize(serializer.serialize([when, uid]))
        assert copy == [when.isoformat(), str(uid)]

    @NEEDS_GETSTATE
    @pytest.mark.parametrize(
        "value",
        [pytest.param(b"x", id="bytes"), pytest.param(Decimal(1), id="decimal")],
    )
    def test_json_cannot_carry_bytes_or_decimals(self, value: object) -> None:
        # Nor can APScheduler's: they have no __setstate__() to rebuild them with
        written = SafeJSONSerializer().serialize(value)
        with pytest.raises(DeserializationError):
            JSONSerializer().deserialize(written)

        with pytest.raises(DeserializationError, match="refusing to rebuild"):
            SafeJSONSerializer().deserialize(written)


class TestExceptions:
    """A job's stored exception reads back as well as the format allows."""

    @pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
    @pytest.mark.parametrize(
        "exception",
        [
            pytest.param(ValueError("boom"), id="value-error"),
            pytest.param(KeyError("key"), id="key-error"),
            pytest.param(FileNotFoundError(2, "gone", "/x"), id="os-error"),
            pytest.param(
                UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), id="unicode-error"
            ),
        ],
    )
    def test_pickle_keeps_the_arguments(
        self, exception: BaseException, protocol: int
    ) -> None:
        serializer = SafePickleSerializer(protocol=protocol)
        copy = serializer.deserialize(serializer.serialize(exception))
        assert type(copy) is type(exception)
        assert copy.args == exception.args
        assert str(copy) == str(exception)

    @NEEDS_GETSTATE
    @pytest.mark.parametrize(("safe_class", "aps_class"), PAIRS[:2])
    def test_json_and_cbor_keep_only_the_class(
        self,
        safe_class: Callable[[], Serializer],
        aps_class: Callable[[], Serializer],
    ) -> None:
        # APScheduler marshals an exception as its class and __getstate__() (None),
        # so the arguments are lost; the safe serializers read back the same
        written = safe_class().serialize(ValueError("boom"))
        copy = safe_class().deserialize(written)
        assert type(copy) is ValueError
        assert copy.args == ()
        assert type(aps_class().deserialize(written)) is ValueError

    @NEEDS_GETSTATE
    @pytest.mark.parametrize("safe_class", SAFE)
    def test_exception_attributes_read_back(
        self, safe_class: Callable[[], Serializer]
    ) -> None:
        exception = ValueError("boom")
        exception.__dict__["detail"] = "a detail"
        serializer = safe_class()
        copy = serializer.deserialize(serializer.serialize(exception))
        assert copy.detail == "a detail"


class TestUserClasses:
    """A user class is refused unless allowed, as a class or as a reference."""

    @pytest.mark.parametrize("safe_class", SAFE)
    def test_refused_by_default(self, safe_class: Callable[[], Serializer]) -> None:
        serializer = safe_class()
        written = serializer.serialize(Point(1, 2))
        with pytest.raises(DeserializationError, match=refusal(POINT_REF)):
            serializer.deserialize(written)

    @pytest.mark.parametrize(
        "allowed",
        [pytest.param(Point, id="class"), pytest.param(POINT_REF, id="reference")],
    )
    @pytest.mark.parametrize("safe_class", SAFE)
    def test_allowed(
        self, safe_class: Callable[..., Serializer], allowed: type | str
    ) -> None:
        serializer = safe_class(allowed_types=[allowed])
        copy = serializer.deserialize(serializer.serialize([Point(1, 2)]))
        assert copy == [Point(1, 2)]
        assert type(copy[0]) is Point

    @pytest.mark.parametrize("safe_class", SAFE)
    def test_allowed_inside_a_combining_trigger_only_if_a_trigger(
        self, safe_class: Callable[..., Serializer]
    ) -> None:
        trigger = AndTrigger([DateTrigger(START)])
        state = trigger.__getstate__()
        state["triggers"] = [(POINT_REF, {"x": 1, "y": 2})]
        serializer = safe_class(allowed_types=[Point])
        if safe_class is SafePickleSerializer:
            written = combining_pickle(state)
        else:
            written = marshalled(safe_class, AND_TRIGGER, state)

        with pytest.raises(DeserializationError, match="not a trigger class"):
            serializer.deserialize(written)

    @pytest.mark.parametrize("safe_class", SAFE)
    def test_reference_must_name_the_class_itself(
        self, safe_class: Callable[..., Serializer]
    ) -> None:
        alias = f"{__name__}:PointAlias"
        serializer = safe_class(allowed_types=[alias])
        if safe_class is SafePickleSerializer:
            written = f"c{__name__}\nPointAlias\n)\x81}}b.".encode()
        else:
            written = marshalled(safe_class, alias, {"x": 1, "y": 2})

        with pytest.raises(
            DeserializationError, match=f"names the class '{POINT_REF}'"
        ):
            serializer.deserialize(written)

    @pytest.mark.parametrize("safe_class", SAFE)
    def test_reference_to_a_function_is_refused(
        self, safe_class: Callable[..., Serializer], tmp_path: Path
    ) -> None:
        marker = tmp_path / "ran"
        serializer = safe_class(allowed_types=["os:system"])
        command = f"touch {shlex.quote(str(marker))}"
        if safe_class is SafePickleSerializer:
            written = b"cos\nsystem\n(V" + command.encode() + b"\ntR."
        else:
            written = marshalled(safe_class, "os:system", command)

        with pytest.raises(DeserializationError, match=refusal("os:system")):
            serializer.deserialize(written)

        assert not marker.exists()


@attrs.define
class Reduce:
    """An object that pickles as a call of ``func`` with ``args`` (and ``state``)."""

    func: Callable[..., object]
    args: tuple[object, ...]
    state: object = None

    def __reduce__(self) -> tuple[object, ...]:
        if self.state is None:
            return self.func, self.args

        return self.func, self.args, self.state


def op_global(module: str, name: str) -> bytes:
    """Return the protocol 0 GLOBAL opcode pushing ``module.name``."""
    return f"c{module}\n{name}\n".encode()


def op_str(text: str) -> bytes:
    """Return the protocol 0 opcode pushing the string ``text``."""
    return b"V" + text.encode("raw_unicode_escape") + b"\n"


def op_call(func: bytes, *args: bytes) -> bytes:
    """Return the opcodes calling what ``func`` pushes with what ``args`` push."""
    return func + b"(" + b"".join(args) + b"tR"


def getattr_gadget(command: str) -> bytes:
    """Return a pickle reaching os.system through getattr() from an allowed class."""
    get = op_global("builtins", "getattr")
    new = op_call(get, op_global("fractions", "Fraction"), op_str("__new__"))
    module_globals = op_call(get, new, op_str("__globals__"))
    sys_module = op_call(op_call(get, module_globals, op_str("get")), op_str("sys"))
    modules = op_call(get, sys_module, op_str("modules"))
    os_module = op_call(op_call(get, modules, op_str("get")), op_str("os"))
    system = op_call(get, os_module, op_str("system"))
    return op_call(system, op_str(command)) + b"."


def combining_pickle(state: dict[str, Any]) -> bytes:
    """Return a pickle of an AndTrigger with the state ``state``."""
    return (
        b"\x80\x02"
        + op_global("apscheduler.triggers.combining", "AndTrigger")
        + b")\x81"  # EMPTY_TUPLE, NEWOBJ
        + pickle.dumps(state, 0)[:-1]
        + b"b."  # BUILD
    )


def double_build_gadget(module_name: str) -> bytes:
    """Return a pickle building an AndTrigger twice, the second time with a bad ref."""
    good = AndTrigger([DateTrigger(START)]).__getstate__()
    bad = {**good, "triggers": [(f"{module_name}:Thing", {})]}
    return (
        b"\x80\x02"
        + op_global("apscheduler.triggers.combining", "AndTrigger")
        + b")\x81"  # EMPTY_TUPLE, NEWOBJ
        + pickle.dumps(good, 0)[:-1]
        + b"b"  # BUILD
        + pickle.dumps(bad, 0)[:-1]
        + b"b."
    )


def touch_command(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def write_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


#: Pickles that would create the marker file given to them
PICKLE_ATTACKS = [
    pytest.param(
        lambda m: pickle.dumps(Reduce(os.system, (touch_command(m),)), 4),
        "posix:system" if os.name == "posix" else "nt:system",
        id="os-system",
    ),
    pytest.param(
        lambda m: op_call(op_global("os", "system"), op_str(touch_command(m))) + b".",
        "os:system",
        id="global-os-system-protocol-0",
    ),
    pytest.param(
        lambda m: pickle.dumps(Reduce(exec, (write_code(m),)), 2),
        "builtins:exec",
        id="builtins-exec",
    ),
    pytest.param(
        lambda m: pickle.dumps(Reduce(eval, (write_code(m),)), 4),
        "builtins:eval",
        id="builtins-eval",
    ),
    pytest.param(
        lambda m: pickle.dumps(Reduce(subprocess.Popen, (["touch", str(m)],)), 5),
        "subprocess:Popen",
        id="subprocess-popen",
    ),
    pytest.param(
        lambda m: getattr_gadget(touch_command(m)),
        "builtins:getattr",
        id="getattr-chain",
    ),
    pytest.param(
        lambda m: (
            op_call(
                op_global("copy_reg", "_reconstructor"),
                op_global("subprocess", "Popen"),
                op_global("subprocess", "Popen"),
                b"(" + op_str("touch") + op_str(str(m)) + b"l",
            )
            + b"."
        ),
        "subprocess:Popen",
        id="copyreg-reconstructor",
    ),
]


class TestPickleAttacks:
    """Pickles that run code are refused, and their code does not run."""

    @pytest.mark.parametrize(("make_payload", "ref"), PICKLE_ATTACKS)
    def test_refused(
        self, make_payload: Callable[[Path], bytes], ref: str, tmp_path: Path
    ) -> None:
        marker = tmp_path / "ran"
        payload = make_payload(marker)
        with pytest.raises(DeserializationError, match=refusal(ref)):
            SafePickleSerializer().deserialize(payload)

        assert not marker.exists()

    @pytest.mark.parametrize(("make_payload", "ref"), PICKLE_ATTACKS)
    def test_the_attack_is_real(
        self, make_payload: Callable[[Path], bytes], ref: str, tmp_path: Path
    ) -> None:
        # What the test above refuses does run its code with plain pickle
        del ref
        marker = tmp_path / "ran"
        result = pickle.loads(make_payload(marker))
        if isinstance(result, subprocess.Popen):
            result.wait()

        assert marker.exists()

    def test_persistent_id(self) -> None:
        payload = b"Pfile\n."  # PERSID
        with pytest.raises(DeserializationError, match="refusing persistent id"):
            SafePickleSerializer().deserialize(payload)

    def test_binary_persistent_id(self) -> None:
        payload = b"\x80\x04" + op_str("os:system") + b"Q."  # BINPERSID
        with pytest.raises(DeserializationError, match="refusing persistent id"):
            SafePickleSerializer().deserialize(payload)

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param(
                op_call(
                    op_global("copy_reg", "_reconstructor"),
                    op_global("uuid", "UUID"),
                    op_global("datetime", "datetime"),
                    op_str("x"),
                )
                + b".",
                id="unrelated-base",
            ),
            pytest.param(
                op_call(
                    op_global("copyreg", "_reconstructor"),
                    op_global("fractions", "Fraction"),
                    op_global("builtins", "object"),
                    b"N",
                )
                + b".",
                id="not-a-class",
            ),
        ],
    )
    def test_reconstructor_only_for_allowed_classes(self, payload: bytes) -> None:
        with pytest.raises(DeserializationError, match="copyreg:_reconstructor"):
            SafePickleSerializer().deserialize(payload)

    def test_getattr_only_for_zoneinfo(self) -> None:
        payload = (
            op_call(
                op_global("builtins", "getattr"),
                op_global("zoneinfo", "ZoneInfo"),
                op_str("clear_cache"),
            )
            + b"."
        )
        with pytest.raises(DeserializationError, match="'clear_cache'"):
            SafePickleSerializer().deserialize(payload)

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param(
                op_call(op_global("_codecs", "encode"), op_str("x"), op_str("rot13"))
                + b".",
                id="codecs-encode",
            ),
            pytest.param(
                op_call(op_global("builtins", "bytes"), op_str("x"), op_str("idna"))
                + b".",
                id="bytes",
            ),
            pytest.param(
                op_call(
                    op_global("__builtin__", "bytearray"), op_str("x"), op_str("utf-7")
                )
                + b".",
                id="bytearray",
            ),
        ],
    )
    def test_no_codec_is_looked_up(self, payload: bytes) -> None:
        with pytest.raises(DeserializationError, match="refusing"):
            SafePickleSerializer().deserialize(payload)

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param(op_global("builtins", "__import__"), id="import"),
            pytest.param(op_global("builtins", "open"), id="open"),
            pytest.param(op_global("functools", "partial"), id="partial"),
            pytest.param(op_global("operator", "attrgetter"), id="attrgetter"),
            pytest.param(op_global("operator", "methodcaller"), id="methodcaller"),
            pytest.param(op_global("copyreg", "__newobj__"), id="newobj"),
            pytest.param(op_global("collections", "defaultdict"), id="defaultdict"),
            pytest.param(op_global("builtins", "type"), id="type"),
            pytest.param(op_global("types", "FunctionType"), id="function-type"),
            pytest.param(op_global("importlib", "import_module"), id="importlib"),
            pytest.param(op_global("sys", "modules"), id="sys"),
            pytest.param(op_global("pickle", "loads"), id="pickle"),
            pytest.param(op_global("codecs", "encode"), id="codecs"),
            pytest.param(op_global("__builtin__", "intern"), id="python-2-name"),
        ],
    )
    def test_dangerous_names_are_refused(self, payload: bytes) -> None:
        with pytest.raises(DeserializationError, match="refusing to rebuild"):
            SafePickleSerializer().deserialize(payload + b".")

    def test_extension_registry(self) -> None:
        copyreg.add_extension("os", "system", 240)
        try:
            with pytest.raises(DeserializationError, match="refusing the EXT1 opcode"):
                SafePickleSerializer().deserialize(b"\x80\x02\x82\xf0.")  # EXT1
        finally:
            copyreg.remove_extension("os", "system", 240)
            copyreg.clear_extension_cache()

    @pytest.mark.parametrize(
        ("payload", "opcode"),
        [
            pytest.param(EXT_CALL, "EXT1", id="ext1"),
            pytest.param(b"\x80\x04\x83\xf0\x00)R.", "EXT2", id="ext2"),
            pytest.param(b"\x80\x04\x84\xf0\x00\x00\x00)R.", "EXT4", id="ext4"),
        ],
    )
    def test_cached_extension_is_refused(
        self, payload: bytes, opcode: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Once plain pickle has loaded an extension, the C unpickler hands out the
        # cached object without calling find_class()
        calls: list[object] = []
        monkeypatch.setattr(os, "getcwd", lambda: calls.append("called"))
        copyreg.add_extension("os", "getcwd", 240)
        try:
            pickle.loads(b"\x80\x04\x82\xf0.")  # fills copyreg._extension_cache
            assert vars(copyreg)["_extension_cache"]
            with pytest.raises(DeserializationError, match=f"refusing the {opcode} "):
                SafePickleSerializer().deserialize(payload)
        finally:
            copyreg.remove_extension("os", "getcwd", 240)
            copyreg.clear_extension_cache()

        assert calls == []

    def test_registered_extension_is_refused(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls: list[object] = []
        monkeypatch.setattr(os, "getcwd", lambda: calls.append("called"))
        copyreg.add_extension("os", "getcwd", 240)
        try:
            with pytest.raises(DeserializationError, match="refusing the EXT1 opcode"):
                SafePickleSerializer().deserialize(EXT_CALL)
        finally:
            copyreg.remove_extension("os", "getcwd", 240)
            copyreg.clear_extension_cache()

        assert calls == []

    def test_unregistered_extension_is_refused(self) -> None:
        # With an empty registry nothing is scanned: pickle itself fails
        assert not vars(copyreg)["_extension_registry"]
        with pytest.raises(
            DeserializationError, match="unregistered extension code 240"
        ):
            SafePickleSerializer().deserialize(EXT_CALL)

    def test_allowed_pickle_reads_while_an_extension_is_registered(self) -> None:
        serializer = SafePickleSerializer()
        copyreg.add_extension("os", "getcwd", 240)
        try:
            assert serializer.deserialize(serializer.serialize(START)) == START
        finally:
            copyreg.remove_extension("os", "getcwd", 240)
            copyreg.clear_extension_cache()

    def test_combining_trigger_built_twice(self, evil_module: EvilModule) -> None:
        payload = double_build_gadget(evil_module.name)
        with pytest.raises(DeserializationError, match=refusal(evil_module.ref)):
            SafePickleSerializer(allowed_types=[evil_module.ref]).deserialize(payload)

        evil_module.assert_not_imported()
        pickle.loads(payload)  # plain pickle imports it
        assert evil_module.marker.exists()

    @pytest.mark.parametrize(
        "cls", sorted(BUILTIN_ALLOWED_TYPES, key=str), ids=lambda cls: cls.__name__
    )
    def test_allowed_classes_cannot_be_changed(self, cls: type) -> None:
        # BUILD with a (dict, slots) state sets attributes of the object it is given
        payload = op_global(cls.__module__, cls.__qualname__)
        payload += b"(N(d" + op_str("zz_changed") + b"I1\nstb."
        try:
            SafePickleSerializer().deserialize(payload)
        except DeserializationError:
            pass

        assert "zz_changed" not in vars(cls)


class EvilModule:
    """A module on sys.path that creates its marker file when imported."""

    def __init__(self, directory: Path) -> None:
        self.name = f"apscheduler_mongo_evil_{uuid.uuid4().hex}"
        self.ref = f"{self.name}:Thing"
        self.marker = directory / "imported"
        code = f"""\
            import pathlib

            pathlib.Path({str(self.marker)!r}).touch()


            class Thing:
                def __setstate__(self, state):
                    pass
            """
        (directory / f"{self.name}.py").write_text(textwrap.dedent(code))

    def assert_not_imported(self) -> None:
        assert not self.marker.exists()
        assert self.name not in sys.modules


@pytest.fixture
def evil_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[EvilModule]:
    module = EvilModule(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield module
    finally:
        sys.modules.pop(module.name, None)


class TestUnimportedModules:
    """A reference to a module that is not imported yet never imports it."""

    @pytest.mark.parametrize(
        "allowed",
        [pytest.param(False, id="not-allowed"), pytest.param(True, id="allowed")],
    )
    @pytest.mark.parametrize("safe_class", SAFE)
    def test_top_level(
        self,
        safe_class: Callable[..., Serializer],
        allowed: bool,
        evil_module: EvilModule,
    ) -> None:
        if safe_class is SafePickleSerializer:
            payload = op_global(evil_module.name, "Thing") + b")\x81}b."
        else:
            payload = marshalled(safe_class, evil_module.ref, {})

        serializer = safe_class(allowed_types=[evil_module.ref] if allowed else [])
        reason = "has not been imported" if allowed else "not an allowed type"
        with pytest.raises(DeserializationError, match=reason):
            serializer.deserialize(payload)

        evil_module.assert_not_imported()

    @pytest.mark.parametrize("safe_class", SAFE)
    def test_inside_a_combining_trigger(
        self, safe_class: Callable[..., Serializer], evil_module: EvilModule
    ) -> None:
        # AndTrigger.__setstate__() imports what its state names
        state = AndTrigger([DateTrigger(START)]).__getstate__()
        state["triggers"] = [(evil_module.ref, {})]
        if safe_class is SafePickleSerializer:
            payload = combining_pickle(state)
        else:
            payload = marshalled(safe_class, AND_TRIGGER, state)

        serializer = safe_class(allowed_types=[evil_module.ref])
        with pytest.raises(DeserializationError, match=refusal(evil_module.ref)):
            serializer.deserialize(payload)

        evil_module.assert_not_imported()

    @pytest.mark.parametrize(("safe_class", "aps_class"), PAIRS)
    def test_apscheduler_imports_it(
        self,
        safe_class: Callable[..., Serializer],
        aps_class: Callable[[], Serializer],
        evil_module: EvilModule,
    ) -> None:
        # The payloads above are real: APScheduler's serializers import the module
        state = AndTrigger([DateTrigger(START)]).__getstate__()
        state["triggers"] = [(evil_module.ref, {})]
        if safe_class is SafePickleSerializer:
            payload = combining_pickle(state)
        else:
            payload = marshalled(safe_class, AND_TRIGGER, state)

        try:
            aps_class().deserialize(payload)
        except DeserializationError:
            pass

        assert evil_module.marker.exists()


class TestMarshalledAttacks:
    """JSON and CBOR payloads naming what is not allowed are refused before import."""

    @pytest.mark.parametrize("safe_class", SAFE[:2])
    def test_os_system(
        self, safe_class: Callable[[], Serializer], tmp_path: Path
    ) -> None:
        marker = tmp_path / "ran"
        payload = marshalled(safe_class, "os:system", touch_command(marker))
        with pytest.raises(DeserializationError, match=refusal("os:system")):
            safe_class().deserialize(payload)

        assert not marker.exists()

    @pytest.mark.parametrize("safe_class", SAFE[:2])
    @pytest.mark.parametrize(
        "ref",
        [
            "subprocess:Popen",
            "builtins:eval",
            "collections:defaultdict",
            "builtins:type",
            "os.path:join",
        ],
    )
    def test_other_names(self, safe_class: Callable[[], Serializer], ref: str) -> None:
        with pytest.raises(DeserializationError, match=refusal(ref)):
            safe_class().deserialize(marshalled(safe_class, ref, None))

    @pytest.mark.parametrize("safe_class", SAFE[:2])
    @pytest.mark.parametrize(
        "value",
        [
            pytest.param("os:system", id="not-a-pair"),
            pytest.param(["os:system"], id="one-item"),
            pytest.param([1, {}], id="not-a-string"),
        ],
    )
    def test_malformed(self, safe_class: Callable[[], Serializer], value: Any) -> None:
        if safe_class is SafeJSONSerializer:
            payload = JSONSerializer().serialize({MAGIC_KEY: value})
        else:
            payload = cbor2.dumps(cbor2.CBORTag(TYPE_TAG, value))

        with pytest.raises(DeserializationError, match="malformed"):
            safe_class().deserialize(payload)

    def test_other_cbor_tags_are_kept(self) -> None:
        payload = cbor2.dumps(cbor2.CBORTag(4665, ["os:system", "x"]))
        assert SafeCBORSerializer().deserialize(payload) == cbor2.CBORTag(
            4665, ["os:system", "x"]
        )

    @pytest.mark.parametrize("safe_class", SAFE)
    def test_not_the_format(self, safe_class: Callable[[], Serializer]) -> None:
        with pytest.raises(DeserializationError):
            safe_class().deserialize(b"")


class TestConstructors:
    """Bad constructor arguments raise clear errors."""

    @pytest.mark.parametrize("safe_class", SAFE)
    @pytest.mark.parametrize(
        ("allowed_types", "error", "message"),
        [
            pytest.param(POINT_REF, TypeError, "iterable", id="bare-string"),
            pytest.param(42, TypeError, "iterable", id="not-iterable"),
            pytest.param([42], TypeError, "neither a class", id="number"),
            pytest.param([os.system], TypeError, "neither a class", id="function"),
            pytest.param([Point(1, 2)], TypeError, "neither a class", id="instance"),
            pytest.param(["Point"], ValueError, "not a 'module:qualname'", id="name"),
            pytest.param(["tests:"], ValueError, "not a 'module:qualname'", id="empty"),
            pytest.param(
                ["os:system()"], ValueError, "not a 'module:qualname'", id="code"
            ),
            pytest.param(
                ["a..b:C"], ValueError, "not a 'module:qualname'", id="bad-module"
            ),
        ],
    )
    def test_bad_allowed_types(
        self,
        safe_class: Callable[..., Serializer],
        allowed_types: Any,
        error: type[Exception],
        message: str,
    ) -> None:
        with pytest.raises(error, match=message):
            safe_class(allowed_types=allowed_types)

    @pytest.mark.parametrize("safe_class", SAFE)
    def test_any_iterable(self, safe_class: Callable[..., Any]) -> None:
        serializer = safe_class(allowed_types=(item for item in [Point, "a.b:C.D"]))
        assert serializer.allowed_types == (Point, "a.b:C.D")

    def test_cbor_tag_hook_is_refused(self) -> None:
        with pytest.raises(ValueError, match="tag_hook"):
            SafeCBORSerializer(load_options={"tag_hook": lambda _decoder, tag: tag})

    def test_without_cbor2(self) -> None:
        code = """\
            import sys

            sys.modules["cbor2"] = None
            from apscheduler_mongo.serializers import (
                SafeCBORSerializer,
                SafeJSONSerializer,
            )

            assert SafeJSONSerializer().deserialize(b"[1]") == [1]
            try:
                SafeCBORSerializer()
            except ImportError as exc:
                print(exc)
            """
        completed = subprocess.run(
            [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "needs the cbor2 package" in completed.stdout


class TestBuiltinAllowList:
    """The built-in allow list holds what APScheduler's data needs, and no more."""

    def test_holds_the_triggers_enums_and_exceptions(self) -> None:
        assert {
            DateTrigger,
            IntervalTrigger,
            CalendarIntervalTrigger,
            CronTrigger,
            AndTrigger,
            OrTrigger,
            CoalescePolicy,
            JobOutcome,
            ValueError,
            KeyError,
            OSError,
            ZoneInfo,
            datetime,
        } <= BUILTIN_ALLOWED_TYPES

    def test_holds_nothing_that_calls_what_it_is_given(self) -> None:
        assert not {defaultdict, type, object, bytes, str} & BUILTIN_ALLOWED_TYPES

    @pytest.mark.parametrize(
        "cls", sorted(BUILTIN_ALLOWED_TYPES, key=str), ids=lambda cls: cls.__name__
    )
    def test_references_name_the_class(self, cls: type) -> None:
        # Pickle and APScheduler name a class by its module and qualified name
        assert getattr(sys.modules[cls.__module__], cls.__qualname__) is cls


class TestFraction:
    """A Fraction is rebuilt from what pickle writes, and from nothing else."""

    @pytest.mark.parametrize(
        "blob",
        [
            # Python 3.12 and later: Fraction(numerator, denominator)
            pytest.param(b"\x80\x02cfractions\nFraction\nK\x03K\x07\x86R.", id="ints"),
            # Python 3.11 and earlier: Fraction(str(self))
            pytest.param(
                b"\x80\x02cfractions\nFraction\nX\x03\x00\x00\x003/7\x85R.", id="text"
            ),
        ],
    )
    def test_what_pickle_writes(self, blob: bytes) -> None:
        assert SafePickleSerializer().deserialize(blob) == Fraction(3, 7)

    @pytest.mark.parametrize(
        "argument",
        ["1e10000000", "0.5", " 3/7", "3/7\n", "9" * 5000],
        ids=["exponent", "decimal", "space", "newline", "5000-digits"],
    )
    def test_other_text_is_refused(self, argument: str) -> None:
        # Fraction's own parser takes exponents: "1e10000000" alone takes seconds
        text = argument.encode()
        blob = b"\x80\x02cfractions\nFraction\nX" + len(text).to_bytes(4, "little")
        blob += text + b"\x85R."
        with pytest.raises(DeserializationError, match="fractions:Fraction"):
            SafePickleSerializer().deserialize(blob)
