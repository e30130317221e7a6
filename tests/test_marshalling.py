"""Unit tests of the conversions between Python values and stored fields."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import pytest
from bson import Binary
from bson.binary import UuidRepresentation

from apscheduler_mongo._layout import fire_key, slot_key, slot_number
from apscheduler_mongo._marshalling import (
    MalformedDocumentError,
    duration_from_micros,
    duration_to_micros,
    from_micros,
    get_datetime,
    put_datetime,
    to_micros,
    uuid_from_bson,
    uuid_to_bson,
)

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NAIVE = [
    pytest.param(datetime(2024, 1, 1, 12, 0), id="naive"),
    pytest.param(datetime(1960, 1, 1, 0, 0, 0, 1), id="naive-pre-1970"),
]


def _offset_seconds(value: datetime) -> int:
    offset = value.utcoffset()
    assert offset is not None
    return int(offset.total_seconds())


class TestInstants:
    """Instants become integer microseconds since the epoch and come back exactly."""

    @pytest.mark.parametrize(
        ("value", "micros"),
        [
            pytest.param(datetime(1970, 1, 1, tzinfo=UTC), 0, id="epoch"),
            pytest.param(
                datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC), 1, id="one-microsecond"
            ),
            pytest.param(
                datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
                -1,
                id="one-microsecond-before-epoch",
            ),
            pytest.param(
                datetime(2024, 2, 29, 12, 34, 56, 789_012, tzinfo=UTC),
                1_709_210_096_789_012,
                id="leap-day",
            ),
            pytest.param(
                datetime(
                    2024,
                    2,
                    29,
                    18,
                    4,
                    56,
                    789_012,
                    tzinfo=timezone(timedelta(hours=5, minutes=30)),
                ),
                1_709_210_096_789_012,
                id="same-instant-at-plus-0530",
            ),
        ],
    )
    def test_to_micros(self, value: datetime, micros: int) -> None:
        assert to_micros(value) == micros

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param(
                datetime(2024, 2, 29, 12, 34, 56, 789_012, tzinfo=UTC), id="utc"
            ),
            pytest.param(
                datetime(1969, 7, 20, 20, 17, 40, 123_457, tzinfo=UTC), id="pre-1970"
            ),
            pytest.param(datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=UTC), id="year-1900"),
            pytest.param(datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC), id="year-1"),
            pytest.param(
                datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), id="year-9999"
            ),
            pytest.param(
                datetime(
                    2024,
                    3,
                    1,
                    9,
                    0,
                    0,
                    999_999,
                    tzinfo=timezone(timedelta(hours=5, minutes=30)),
                ),
                id="plus-0530",
            ),
            pytest.param(
                datetime(1955, 11, 5, 6, 0, 0, 7, tzinfo=timezone(timedelta(hours=-3))),
                id="minus-0300-pre-1970",
            ),
            pytest.param(
                datetime(2024, 7, 1, 12, 0, 0, 654_321, tzinfo=BERLIN),
                id="berlin-summer",
            ),
            pytest.param(
                datetime(2024, 1, 15, 12, 0, 0, 654_321, tzinfo=BERLIN),
                id="berlin-winter",
            ),
            pytest.param(
                datetime(2024, 10, 27, 2, 30, 0, 1, tzinfo=BERLIN, fold=0),
                id="berlin-ambiguous-first",
            ),
            pytest.param(
                datetime(2024, 10, 27, 2, 30, 0, 1, tzinfo=BERLIN, fold=1),
                id="berlin-ambiguous-second",
            ),
        ],
    )
    def test_round_trip(self, value: datetime) -> None:
        document: dict[str, Any] = {}
        put_datetime(document, "when", value)
        assert isinstance(document["when"], int)
        assert document["when_offset"] == _offset_seconds(value)

        restored = get_datetime(document, "when")
        assert restored is not None
        # Subtract rather than compare: Python never calls an instant in a DST fold
        # equal to one in another zone (PEP 495)
        assert restored - value == timedelta(0)
        assert restored.utcoffset() == value.utcoffset()
        # Same wall-clock reading, to the microsecond, in the same offset
        assert restored.replace(tzinfo=None) == value.replace(tzinfo=None)
        assert restored.microsecond == value.microsecond

        direct = from_micros(to_micros(value), _offset_seconds(value))
        assert direct - value == timedelta(0)
        assert direct.utcoffset() == value.utcoffset()

    def test_ambiguous_berlin_times_stay_apart(self) -> None:
        first = datetime(2024, 10, 27, 2, 30, tzinfo=BERLIN, fold=0)
        second = datetime(2024, 10, 27, 2, 30, tzinfo=BERLIN, fold=1)
        assert to_micros(second) - to_micros(first) == 3_600_000_000
        assert _offset_seconds(first) == 7200
        assert _offset_seconds(second) == 3600

    def test_order_is_preserved(self) -> None:
        values = [
            datetime(1969, 12, 31, 23, 59, 59, 999_998, tzinfo=UTC),
            datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
            datetime(1970, 1, 1, tzinfo=UTC),
            datetime(
                1970, 1, 1, 5, 30, 0, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))
            ),
        ]
        micros = [to_micros(value) for value in values]
        assert micros == sorted(micros)
        assert len(set(micros)) == len(micros)

    @pytest.mark.parametrize(
        "offset",
        [pytest.param(None, id="missing-offset"), pytest.param(0, id="zero-offset")],
    )
    def test_no_offset_means_utc(self, offset: int | None) -> None:
        restored = from_micros(1_000_001, offset)
        assert restored == datetime(1970, 1, 1, 0, 0, 1, 1, tzinfo=UTC)
        assert restored.utcoffset() == timedelta(0)

    @pytest.mark.parametrize("value", NAIVE)
    def test_naive_datetime_rejected(self, value: datetime) -> None:
        with pytest.raises(ValueError, match="naive datetime"):
            to_micros(value)

    @pytest.mark.parametrize("value", NAIVE)
    def test_naive_datetime_rejected_when_stored(self, value: datetime) -> None:
        document: dict[str, Any] = {}
        with pytest.raises(ValueError, match="naive datetime"):
            put_datetime(document, "when", value)

        assert document == {}

    def test_none_round_trips(self) -> None:
        document: dict[str, Any] = {}
        put_datetime(document, "when", None)
        assert document == {"when": None, "when_offset": None}
        assert get_datetime(document, "when") is None
        assert get_datetime({}, "when") is None

    @pytest.mark.parametrize(
        "stored",
        [
            pytest.param("2024-01-01T00:00:00Z", id="string"),
            pytest.param(1.5, id="float"),
            pytest.param(datetime(2024, 1, 1, tzinfo=UTC), id="bson-date"),
        ],
    )
    def test_wrong_stored_type(self, stored: object) -> None:
        with pytest.raises(MalformedDocumentError, match="'when'"):
            get_datetime({"when": stored, "when_offset": 0}, "when")


class TestDurations:
    """Durations become integer microseconds and come back exactly."""

    @pytest.mark.parametrize(
        ("value", "micros"),
        [
            pytest.param(timedelta(0), 0, id="zero"),
            pytest.param(timedelta(microseconds=1), 1, id="one-microsecond"),
            pytest.param(
                timedelta(days=1, seconds=1, microseconds=1),
                86_401_000_001,
                id="day-second-microsecond",
            ),
            pytest.param(timedelta(microseconds=-1), -1, id="negative"),
            pytest.param(
                timedelta(days=999_999_999, microseconds=999_999),
                86_399_999_913_600_999_999,
                id="maximum",
            ),
        ],
    )
    def test_round_trip(self, value: timedelta, micros: int) -> None:
        assert duration_to_micros(value) == micros
        assert duration_from_micros(micros) == value

    def test_none(self) -> None:
        assert duration_to_micros(None) is None
        assert duration_from_micros(None) is None


class TestUUIDs:
    """UUIDs are stored as BSON binary subtype 4; anything else is malformed."""

    def test_to_bson(self) -> None:
        value = UUID("12345678-1234-5678-1234-567812345678")
        stored = uuid_to_bson(value)
        assert isinstance(stored, Binary)
        assert stored.subtype == 4
        assert bytes(stored) == value.bytes

    def test_round_trip(self) -> None:
        value = uuid4()
        assert uuid_from_bson(uuid_to_bson(value)) == value

    def test_decoded_uuid_passes_through(self) -> None:
        value = uuid4()
        assert uuid_from_bson(value) is value

    @pytest.mark.parametrize(
        "stored",
        [
            pytest.param(
                Binary.from_uuid(
                    UUID("12345678-1234-5678-1234-567812345678"),
                    UuidRepresentation.PYTHON_LEGACY,
                ),
                id="legacy-subtype-3",
            ),
            pytest.param(Binary(b"\x00" * 16, 0), id="generic-subtype-0"),
            pytest.param(Binary(b"odd", 4), id="subtype-4-too-short"),
            pytest.param(b"\x00" * 16, id="bytes"),
            pytest.param("12345678-1234-5678-1234-567812345678", id="string"),
            pytest.param(42, id="int"),
            pytest.param(None, id="none"),
        ],
    )
    def test_wrong_type(self, stored: object) -> None:
        with pytest.raises(MalformedDocumentError, match="is not a UUID"):
            uuid_from_bson(stored)

    def test_malformed_document_error_is_a_value_error(self) -> None:
        assert issubclass(MalformedDocumentError, ValueError)


class TestKeys:
    """Fire keys and slot keys are unique per pair and slot numbers parse back."""

    def test_fire_key(self) -> None:
        assert fire_key("daily", 1_700_000_000_000_001) == "1700000000000001/daily"
        assert fire_key("daily", -5) == "-5/daily"

    @pytest.mark.parametrize(
        ("first", "second"),
        [
            pytest.param(("2/a", 1), ("a", 12), id="slash-in-schedule-id"),
            pytest.param(("a", 1), ("a", 10), id="same-schedule"),
            pytest.param(("a", 1), ("b", 1), id="same-time"),
            pytest.param(("1/a", -1), ("a", -11), id="negative-times"),
        ],
    )
    def test_fire_keys_are_distinct(
        self, first: tuple[str, int], second: tuple[str, int]
    ) -> None:
        assert fire_key(*first) != fire_key(*second)

    @pytest.mark.parametrize(
        ("task_id", "slot"),
        [
            pytest.param("task", 0, id="first-slot"),
            pytest.param("task", 17, id="two-digit-slot"),
            pytest.param("module:func/with/slashes", 3, id="slashes-in-task-id"),
            pytest.param("", 2, id="empty-task-id"),
        ],
    )
    def test_slot_round_trip(self, task_id: str, slot: int) -> None:
        key = slot_key(task_id, slot)
        assert slot_number(key) == slot
        assert key.endswith(task_id)

    def test_slot_keys_are_distinct(self) -> None:
        keys = {
            slot_key(task, slot) for task in ("a", "1/a", "b") for slot in range(12)
        }
        assert len(keys) == 36
