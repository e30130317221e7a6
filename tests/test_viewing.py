"""Showing stored values as text: hostile payloads run nothing, others read well."""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from time import perf_counter

import cbor2
import pytest
from apscheduler.abc import Serializer
from apscheduler.serializers.cbor import CBORSerializer
from apscheduler.serializers.json import JSONSerializer
from apscheduler.serializers.pickle import PickleSerializer
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from apscheduler_mongo._viewing import (
    LIMIT,
    MAX_SIZE,
    describe,
    describe_arguments,
    describe_error,
    shown,
    stored_text,
    unreadable,
)

from .support.hostile import (
    HUGE_INTEGER,
    cbor_naming,
    exec_gadget,
    json_naming,
    marker_module,
    popen_gadget,
    protocol_0_gadget,
    system_gadget,
)

START = datetime(2026, 11, 25, 16, 16, 20, 123456, tzinfo=timezone.utc)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A file that a payload creates if anything runs it."""
    return tmp_path / "ran"


class TestHostilePayloads:
    """A payload that runs code when deserialized is shown as text and runs nothing."""

    @pytest.mark.parametrize(
        ("gadget", "shown_as"),
        [
            pytest.param(system_gadget, f"{os.system.__module__}.system(", id="system"),
            pytest.param(exec_gadget, "builtins.exec(\"open('", id="exec"),
            pytest.param(popen_gadget, "subprocess.Popen(['touch', ", id="popen"),
            pytest.param(protocol_0_gadget, "os.system('touch ", id="protocol-0"),
        ],
    )
    def test_pickle_gadgets(
        self, marker: Path, gadget: Callable[[Path], bytes], shown_as: str
    ) -> None:
        payload = gadget(marker)
        for text in (
            describe(payload),
            describe_arguments(payload, pickle.dumps({})),
            describe_arguments(pickle.dumps(()), payload),
            describe_error(payload),
        ):
            assert shown_as in text
            assert str(marker) in text

        assert not marker.exists()

    @pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
    def test_every_pickle_protocol(self, marker: Path, protocol: int) -> None:
        """Protocols 0 to 2 write Python 2's names, shown as Python 3 knows them."""
        text = describe(system_gadget(marker, protocol))
        assert text == f"{os.system.__module__}.system('touch {marker}')"
        text = describe(pickle.dumps([IntervalTrigger(hours=1)], protocol))
        assert text.startswith("[apscheduler.triggers.interval.IntervalTrigger(")
        assert not marker.exists()

    def test_os_system_named_as_written(self, marker: Path) -> None:
        assert describe(protocol_0_gadget(marker)) == f"os.system('touch {marker}')"

    @pytest.mark.parametrize(
        "encode",
        [pytest.param(json_naming, id="json"), pytest.param(cbor_naming, id="cbor")],
    )
    def test_marshalled_object_never_imported(
        self,
        tmp_path: Path,
        marker: Path,
        monkeypatch: pytest.MonkeyPatch,
        encode: Callable[[str], bytes],
    ) -> None:
        """APScheduler's serializers import the module a marshalled object names."""
        module = marker_module(tmp_path, marker)
        monkeypatch.syspath_prepend(str(tmp_path))
        payload = encode(module)
        assert describe(payload) == f"{module}:Payload(x=1)"
        assert describe_arguments(payload, payload) == (
            f"*{module}:Payload(x=1), **{module}:Payload(x=1)"
        )
        assert describe_error(payload) == f"{module}.Payload: {{'x': 1}}"
        assert module not in sys.modules
        assert not marker.exists()

        # APScheduler's serializers would have run it
        serializer = JSONSerializer() if payload.startswith(b"{") else CBORSerializer()
        serializer.deserialize(payload)
        assert marker.exists()
        del sys.modules[module]

    def test_persistent_ids_refused(self) -> None:
        class Persisting(pickle.Pickler):
            def persistent_id(self, obj: object) -> object:
                return "an id" if obj == "elsewhere" else None

        stream = io.BytesIO()
        Persisting(stream).dump(["elsewhere"])
        text = describe(stream.getvalue())
        assert text == "(unreadable: UnpicklingError: persistent ids are refused)"


class TestBenignValues:
    """What schedules and results normally hold reads like Python."""

    @pytest.mark.parametrize(
        ("value", "text"),
        [
            pytest.param(
                (1, "a", None, 2.5, True), "(1, 'a', None, 2.5, True)", id="tuple"
            ),
            pytest.param({"to": ["ops"]}, "{'to': ['ops']}", id="dict"),
            pytest.param(START, "datetime(2026-11-25 16:16:20.123456, ", id="datetime"),
            pytest.param(date(2026, 11, 25), "date(2026-11-25)", id="date"),
            pytest.param(time(1, 2, 3), "time(01:02:03)", id="time"),
            pytest.param(timedelta(days=1), "datetime.timedelta(1, 0, 0)", id="delta"),
        ],
    )
    @pytest.mark.parametrize("protocol", [0, 2, pickle.DEFAULT_PROTOCOL])
    def test_pickled(self, value: object, text: str, protocol: int) -> None:
        assert describe(pickle.dumps(value, protocol)).startswith(text)

    @pytest.mark.parametrize(
        ("value", "text"),
        [
            pytest.param(b"\x00raw", "b'\\x00raw'", id="bytes"),
            pytest.param({1}, "{1}", id="set"),
            pytest.param(frozenset({1}), "frozenset({1})", id="frozenset"),
            pytest.param(frozenset(), "frozenset()", id="empty frozenset"),
            pytest.param(set(), "set()", id="empty set"),
            pytest.param({1: "a", (1, 2): "b"}, "{1: 'a', (1, 2): 'b'}", id="keys"),
        ],
    )
    def test_pickled_by_newer_protocols(self, value: object, text: str) -> None:
        assert describe(pickle.dumps(value, 4)) == text

    def test_pickled_trigger(self) -> None:
        trigger = IntervalTrigger(minutes=5, start_time=START)
        assert describe(PickleSerializer().serialize(trigger), 400) == (
            "apscheduler.triggers.interval.IntervalTrigger(version=1, "
            "interval=[0, 0, 0, 5, 0, 0], start_time=datetime(2026-11-25 "
            "16:16:20.123456, timezone.utc), "
            "end_time=None, last_fire_time=None)"
        )
        zoned = CronTrigger(hour=3, timezone="Europe/Paris", start_time=START)
        text = describe(PickleSerializer().serialize(zoned), 400)
        assert "timezone=ZoneInfo('Europe/Paris')" in text

    def test_json_trigger(self) -> None:
        trigger = IntervalTrigger(minutes=5, start_time=START)
        assert describe(JSONSerializer().serialize(trigger), 400) == (
            "apscheduler.triggers.interval:IntervalTrigger(version=1, "
            "interval=[0, 0, 0, 5, 0, 0], start_time='2026-11-25T16:16:20.123456"
            "+00:00', end_time=None, last_fire_time=None)"
        )

    def test_cbor_trigger(self) -> None:
        trigger = IntervalTrigger(minutes=5, start_time=START)
        text = describe(CBORSerializer().serialize(trigger), 400)
        assert text.startswith(
            "apscheduler.triggers.interval:IntervalTrigger(version=1, "
            "interval=[0, 0, 0, 5, 0, 0], start_time=datetime.datetime(2026, 11, 25"
        )
        assert describe(cbor2.dumps(cbor2.CBORTag(99, [1]))) == "CBORTag(99, [1])"

    @pytest.mark.parametrize(
        "serializer",
        [PickleSerializer(), JSONSerializer(), CBORSerializer()],
        ids=["pickle", "json", "cbor"],
    )
    def test_arguments(self, serializer: Serializer) -> None:
        args, kwargs = serializer.serialize((1, "a")), serializer.serialize({"to": 2})
        assert describe_arguments(args, kwargs) == "1, 'a', to=2"
        empty = serializer.serialize(())
        assert describe_arguments(empty, serializer.serialize({})) == ""

    def test_errors(self) -> None:
        assert describe_error(pickle.dumps(ValueError("boom"))) == "ValueError: boom"
        assert describe_error(pickle.dumps(KeyError("a", 1))) == "KeyError: ('a', 1)"
        assert describe_error(pickle.dumps(RuntimeError())) == "RuntimeError"
        # APScheduler's JSON and CBOR forms of an exception keep no message (and,
        # before Python 3.11, cannot be written at all: no object.__getstate__)
        if sys.version_info >= (3, 11):
            for serializer in (JSONSerializer(), CBORSerializer()):
                assert describe_error(serializer.serialize(OSError("x"))) == "OSError"

        assert describe_error(pickle.dumps("not an error")) == "'not an error'"

    def test_stored_fields(self) -> None:
        assert stored_text("myapp:task") == "myapp:task"
        assert stored_text(None) is None
        assert stored_text(3) == "3"
        assert stored_text({"a": [1]}) == "{'a': [1]}"


class BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class TestNeverRaises:
    """Whatever the bytes, the text says what could not be shown, and no more."""

    def test_raising_repr(self) -> None:
        assert shown(BrokenRepr()) == "(cannot be shown: RuntimeError: no repr for you)"
        assert shown(HUGE_INTEGER).startswith("(cannot be shown: ValueError: ")

    def test_value_that_cannot_be_shown_spoils_only_its_place(self) -> None:
        text = describe_arguments(pickle.dumps((1, HUGE_INTEGER, 3)), pickle.dumps({}))
        assert text.startswith("1, (cannot be shown: ValueError: Exceeds the limit")
        assert describe(pickle.dumps([HUGE_INTEGER])).startswith("[(cannot be shown")

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param(b"not a trigger", id="text"),
            pytest.param(b"", id="empty"),
            pytest.param(b"\x80\x04\x95", id="cut pickle"),
            pytest.param(b"\xff\xfe\xfd", id="noise"),
            pytest.param(b"[" * 100_000, id="deep json"),
            pytest.param(b"\x81" * 100_000 + b"\x00", id="deep cbor"),
            pytest.param(b"1" * 5000, id="huge json number"),
            pytest.param(b"\x80\x04c\x00\x00.", id="bad global"),
        ],
    )
    def test_unreadable(self, payload: bytes) -> None:
        text = describe(payload)
        assert text.startswith("(unreadable: ")
        assert unreadable(text)
        assert len(text) <= LIMIT
        assert describe_error(payload).startswith("(unreadable: ")
        assert unreadable(describe_arguments(payload, b"{}"))
        assert unreadable(describe_arguments(b"[]", payload))

    @pytest.mark.parametrize("stored", [None, "text", 3, {"a": 1}])
    def test_not_bytes(self, stored: object) -> None:
        assert describe(stored).startswith("(unreadable: TypeError: stored as ")

    def test_deep_nesting(self) -> None:
        depth = 100_000
        nested = b"(" * depth + b"l" * depth + b"."  # protocol 0: lists in lists
        text = describe(nested)
        assert text.startswith("[[[[") and "..." in text
        assert len(text) <= LIMIT

    def test_self_containing(self) -> None:
        looped: list[object] = []
        looped.append(looped)
        looped.append(looped)
        assert describe(pickle.dumps(looped)).startswith("[[[[")

    def test_huge_payloads_cut(self) -> None:
        text = describe(pickle.dumps(list(range(100_000))), 50)
        assert text.startswith("[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13")
        assert text.endswith("...")
        assert len(text) == 50
        assert len(describe(pickle.dumps("x" * (MAX_SIZE - 100)))) == LIMIT
        assert len(describe_error(pickle.dumps(ValueError("y" * 10_000)))) == LIMIT
        long_args = pickle.dumps(tuple(range(10_000)))
        assert len(describe_arguments(long_args, pickle.dumps({}))) == LIMIT


# Payloads written by hand to make showing them slow or greedy: a few hundred bytes
# that the standard library's unpickler or cbor2 would take forever on


#: Enough levels that anything exponential in them never ends
DEPTH = 60
PROTOCOL_4 = b"\x80\x04"


@contextmanager
def quick(seconds: float = 1.0) -> Iterator[None]:
    """Check that the block takes less than ``seconds``: not a benchmark (the bound
    is generous), a guard against work exponential in the payload."""
    start = perf_counter()
    yield
    assert perf_counter() - start < seconds


def pickled_dag(depth: int = DEPTH) -> bytes:
    """
    Return pickle opcodes pushing a tuple whose two items are one tuple, itself made
    so, ``depth`` levels deep: a few bytes (DUP, TUPLE2) for 2 ** depth leaves.
    Hashing it (as a dict key or set member) takes time doubling with each level.
    """
    return b"N" + b"2\x86" * depth


def pickled_memo_dag(depth: int = DEPTH) -> bytes:
    """The same as :func:`pickled_dag`, its levels shared through the memo."""
    opcodes = b"N\x94"  # memo 0
    for level in range(depth):
        opcodes += b"0h" + bytes([level]) + b"h" + bytes([level]) + b"\x86\x94"
    return opcodes


def cbor_dag(depth: int = DEPTH) -> bytes:
    """
    Return CBOR for an array whose two items are one array, itself made so, through
    shared values (tag 28 marks a value, tag 29 refers to it).
    """
    item = b"\xd8\x1c\x00"  # shareable 0, the first value marked
    for level in range(depth):
        # Marked values are numbered as they start: this one before those inside
        item = b"\xd8\x1c\x82" + item + b"\xd8\x1d" + cbor2.dumps(depth - level)
    return item


def every_text(payload: bytes) -> list[str]:
    return [
        describe(payload),
        describe(payload, 10_000),
        describe_error(payload),
        describe_arguments(payload, payload),
        describe_arguments(pickle.dumps(()), payload),
    ]


class TestBoundedWork:
    """Whatever the bytes, showing them takes little time and memory."""

    def test_payloads_are_hostile(self) -> None:
        """What the payloads are, as Python and cbor2 read them (shallow ones)."""
        assert pickle.loads(PROTOCOL_4 + pickled_dag(2) + b".") == (
            ((None, None), (None, None))
        )
        assert pickle.loads(PROTOCOL_4 + pickled_memo_dag(1) + b".") == (None, None)
        shared = cbor2.loads(cbor_dag(2))
        assert shared[0] is shared[1]
        assert shared[0] == [0, 0]

    @pytest.mark.parametrize(
        ("opcodes", "shown_as"),
        [
            pytest.param(b"}" + pickled_dag() + b"Ns", "{((((", id="SETITEM"),
            pytest.param(b"}(" + pickled_dag() + b"Nu", "{((((", id="SETITEMS"),
            pytest.param(b"(" + pickled_dag() + b"Nd", "{((((", id="DICT"),
            pytest.param(b"\x8f(" + pickled_dag() + b"\x90", "{((((", id="ADDITEMS"),
            pytest.param(
                b"(" + pickled_dag() + b"\x91", "frozenset({((((", id="FROZENSET"
            ),
            pytest.param(b"}" + pickled_memo_dag() + b"Ns", "{((((", id="memo"),
            pytest.param(
                b"cos\nsystem\n)}" + pickled_dag() + b"Ns\x92",
                "os.system((((",
                id="keyword",
            ),
            pytest.param(pickled_dag(), "((((", id="value"),
        ],
    )
    def test_pickled_dag_as_key_or_member(self, opcodes: bytes, shown_as: str) -> None:
        """Dict keys and set members are never hashed, and a value that refers to
        its parts many times is shown in part."""
        payload = PROTOCOL_4 + opcodes + b"."
        with quick():
            texts = every_text(payload)

        assert texts[0].startswith(shown_as)
        assert len(texts[0]) == LIMIT
        for text in texts:
            assert "..." in text

    def test_keywords_sharing_keywords(self) -> None:
        """A keyword that is a call whose keywords are calls (twice the same)."""
        payload = PROTOCOL_4 + b"cos\nsystem\n\x94N\x94"  # memo 0: the class
        for level in range(1, DEPTH + 1):
            key = b"h" + bytes([level])
            payload += b"h\x00)}(" + key + b"N" + key + b"Nu\x92\x94"
        with quick():
            texts = every_text(payload + b".")

        assert texts[0].startswith("os.system(os.system(os.system(")

    @pytest.mark.parametrize(
        "opcode", [b"\x82\xf1", b"\x83\xf1\x00", b"\x84\xf1\0\0\0"]
    )
    def test_extension_codes_refused(self, marker: Path, opcode: bytes) -> None:
        """With an extension registered, the standard unpickler gives the function
        itself (cached by copyreg), not what find_class gives."""
        copyreg.add_extension("os", "mkdir", 0xF1)
        try:
            assert pickle.loads(b"\x80\x02" + opcode + b".") is os.mkdir  # cached
            named = describe(b"\x80\x02" + opcode + b".")
            called = b"\x80\x02" + opcode + f"(V{marker}\ntR.".encode()
            texts = [describe(called), describe_error(called)]
        finally:
            copyreg.remove_extension("os", "mkdir", 0xF1)

        refused = "(unreadable: UnpicklingError: extension codes are refused)"
        assert named == refused
        assert texts == [refused, refused]
        assert not marker.exists()

    def test_bytearray_of_a_huge_size(self) -> None:
        """The pure-Python unpickler would allocate the size first."""
        payload = b"\x80\x05\x96" + struct.pack("<Q", 1 << 50) + b"."
        with quick():
            text = describe(payload)
        assert text.startswith("(unreadable: UnpicklingError: BYTEARRAY8 ")

    @pytest.mark.parametrize(
        ("payload", "shown_as"),
        [
            pytest.param(cbor_dag(), "tag 28, shared values", id="shared"),
            pytest.param(b"\xa1" + cbor_dag() + b"\x01", "map key", id="shared key"),
            pytest.param(
                b"\x82\xd8\x1c\x80" + b"\xd8\x1d\x00", "tag 28", id="reference"
            ),
            pytest.param(
                cbor2.dumps(cbor2.CBORTag(30, [1 << 8000, 3])), "tag 30", id="fraction"
            ),
            pytest.param(
                cbor2.dumps(["ab", "ab"], string_referencing=True), "tag 256", id="refs"
            ),
            pytest.param(cbor2.dumps({(1, 2): 3}), "map key or set member", id="key"),
            pytest.param(cbor2.dumps({(1, 2)}), "map key or set member", id="member"),
            pytest.param(cbor2.dumps(10**3000), "big number", id="bignum"),
        ],
    )
    def test_cbor_refused(self, payload: bytes, shown_as: str) -> None:
        """cbor2 decodes shared values itself (its tag_hook never sees them), hashes
        map keys and set members, and builds fractions from big integers slowly."""
        with quick():
            texts = every_text(payload)

        assert texts[0].startswith("(cannot be shown: ")
        assert shown_as in texts[0]
        assert texts[3] == f"args: {texts[0]}"
        assert not any(unreadable(text) for text in texts)

    @pytest.mark.parametrize(
        ("payload", "text"),
        [
            pytest.param(cbor2.dumps({1, 2}), "{1, 2}", id="set"),
            pytest.param(cbor2.dumps(1 << 70), str(1 << 70), id="bignum"),
            pytest.param(bytes.fromhex("9f0102ff"), "[1, 2]", id="indefinite array"),
            pytest.param(bytes.fromhex("bf616101ff"), "{'a': 1}", id="indefinite map"),
            pytest.param(bytes.fromhex("7f61616162ff"), "'ab'", id="indefinite text"),
            pytest.param(cbor2.dumps({1: [b"x", None]}), "{1: [b'x', None]}", id="map"),
        ],
    )
    def test_cbor_shown(self, payload: bytes, text: str) -> None:
        assert describe(payload) == text

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param(b"\x80\x04" + b"N" * MAX_SIZE + b".", id="pickle"),
            pytest.param(cbor2.dumps([0] * MAX_SIZE), id="cbor"),
            pytest.param(b"[" + b"0," * (MAX_SIZE // 2) + b"0]", id="json"),
        ],
    )
    def test_oversize(self, payload: bytes) -> None:
        with quick():
            texts = every_text(payload)
            shown_as = f"(too large to show: {len(payload)} bytes)"
            assert texts[0] == shown_as
            assert describe(memoryview(payload)) == shown_as
            assert describe(bytearray(payload)) == shown_as

        assert describe_error(payload) == shown_as
        assert describe_arguments(payload, b"{}") == f"args: {shown_as}"
        assert describe_arguments(b"[]", payload) == f"kwargs: {shown_as}"
        assert not any(unreadable(text) for text in texts)

    def test_shown_at_length(self) -> None:
        """A value shown at a great length is still walked in part."""
        payload = PROTOCOL_4 + pickled_dag() + b"."
        with quick():
            text = describe(payload, 1_000_000)
        assert text.startswith("((((") and "..., ..." in text
        assert len(text) < 100_000
