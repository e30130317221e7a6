"""
The job history the dashboard charts: counted in memory, written in batches per
minute, read in one aggregation that trusts no stored number.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from apscheduler import (
    AsyncScheduler,
    Job,
    JobOutcome,
    JobResult,
    RetrySettings,
)
from apscheduler.abc import EventBroker
from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect
from tenacity import stop_after_attempt, wait_fixed

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo import _history as history
from apscheduler_mongo import _layout as layout
from apscheduler_mongo._adapters import adapter_for
from apscheduler_mongo._clock import ServerClock
from apscheduler_mongo._history import (
    LATENESS_KEYS,
    OUTCOMES,
    History,
    Recorder,
    quantile,
    read_history,
)
from apscheduler_mongo._marshalling import from_micros, to_micros
from apscheduler_mongo._retry import Attempts, retrying
from apscheduler_mongo._tools.status import Reader

from .support.commands import CommandLog
from .support.index_rules import queries_of, served
from .support.items import add_task
from .support.stores import started_store
from .support.tiers import WIRE_ONLY

pytestmark = pytest.mark.anyio

LEASE = timedelta(minutes=5)
RETRIES = RetrySettings(stop=stop_after_attempt(3), wait=wait_fixed(0))


def this_minute() -> datetime:
    """The start of the current minute (stored documents must not expire at once)."""
    now = datetime.now(timezone.utc)
    return now.replace(second=0, microsecond=0)


class Moment:
    """A host clock that the test moves (the recorder's server clock goes by it)."""

    def __init__(self, at: datetime) -> None:
        self.micros = to_micros(at)

    def __call__(self) -> int:
        return self.micros

    def move(self, delta: timedelta) -> None:
        self.micros += delta // timedelta(microseconds=1)


def aware(value: datetime) -> datetime:
    """A stored date as read back (the in-process stand-in returns naive UTC)."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def reader_of(client: Any, database: str) -> Reader:
    return Reader(adapter_for(client), database, RETRIES, logging.getLogger("test"))


def make_recorder(client: Any, database: str, moment: Moment) -> Recorder:
    adapter = adapter_for(client)
    logger = logging.getLogger("test")
    return Recorder(
        adapter.collection(database, layout.HISTORY),
        adapter.collection(database, layout.JOBS),
        ServerClock(wall=moment),
        lambda: Attempts(retrying(RETRIES, logger)),
        logger,
        1.0,
    )


@pytest.fixture
def moment() -> Moment:
    return Moment(this_minute() + timedelta(seconds=10))


@pytest.fixture
def recorder(client: Any, database_name: str, moment: Moment) -> Recorder:
    return make_recorder(client, database_name, moment)


async def stored(database: Any) -> list[dict[str, Any]]:
    cursor = database[layout.HISTORY].find({}, sort=[("minute", 1)])
    documents: list[dict[str, Any]] = await cursor.to_list(None)
    return documents


def outcome_totals(documents: list[dict[str, Any]]) -> dict[str, int]:
    """Sum the outcomes of all stored minutes (a store's run may span two, and
    a minute may hold only a queue sample)."""
    totals: dict[str, int] = {}
    for document in documents:
        for outcome, count in document.get("outcomes", {}).items():
            totals[outcome] = totals.get(outcome, 0) + count

    return totals


def bucket(
    minute: datetime,
    process: object = None,
    *,
    outcomes: Any = None,
    lateness: Any = None,
    queued: Any = None,
) -> dict[str, Any]:
    """A document as a store process writes it (or as anyone could)."""
    document: dict[str, Any] = {
        "_id": f"{minute:%Y-%m-%dT%H:%M}/{process or ObjectId()}",
        "minute": minute,
        "expires": minute + history.KEPT_FOR,
    }
    fields = {"outcomes": outcomes, "lateness": lateness, "queued": queued}
    document.update(
        (field, value) for field, value in fields.items() if value is not None
    )
    return document


def totals(read: History) -> tuple[int, int]:
    return (
        sum(point.succeeded for point in read.points),
        sum(point.failed for point in read.points),
    )


class TestRecorder:
    """Releases are counted in memory and written once per minute and flush."""

    async def test_counts_written(
        self, recorder: Recorder, moment: Moment, database: Any
    ) -> None:
        for outcome, lateness in [
            ("success", 0.001),
            ("success", 0.07),
            ("success", None),
            ("error", 1000.0),
            ("missed_start_deadline", None),
        ]:
            recorder.released(outcome, lateness)

        recorder.reaped(2)
        assert await recorder.flush() == 1

        [document] = await stored(database)
        minute = from_micros(moment()).replace(second=0, microsecond=0)
        assert aware(document["minute"]) == minute
        assert aware(document["expires"]) == minute + timedelta(hours=25)
        assert document["process"] == recorder.process
        assert document["outcomes"] == {
            "success": 3,
            "error": 1,
            "missed_start_deadline": 1,
            "abandoned": 2,
        }
        assert document["lateness"] == {"ms5": 1, "ms100": 1, "more": 1}
        assert "queued" not in document

    async def test_later_writes_add(self, recorder: Recorder, database: Any) -> None:
        recorder.released("success", None)
        await recorder.flush()
        recorder.released("success", None)
        recorder.released("cancelled", None)
        await recorder.flush()

        [document] = await stored(database)
        assert document["outcomes"] == {"success": 2, "cancelled": 1}

    async def test_one_document_per_minute(
        self, recorder: Recorder, moment: Moment, database: Any
    ) -> None:
        recorder.released("success", None)
        moment.move(timedelta(minutes=1))
        recorder.released("error", None)
        assert await recorder.flush() == 2

        first, second = await stored(database)
        assert aware(second["minute"]) - aware(first["minute"]) == timedelta(minutes=1)
        assert (first["outcomes"], second["outcomes"]) == ({"success": 1}, {"error": 1})

    async def test_nothing_new_nothing_written(self, recorder: Recorder) -> None:
        assert await recorder.flush() == 0
        recorder.released("success", None)
        assert await recorder.flush() == 1
        assert await recorder.flush() == 0

    async def test_queue_depth_sampled_once_a_minute(
        self, recorder: Recorder, moment: Moment, database: Any
    ) -> None:
        await database[layout.JOBS].insert_many(
            [{"state": layout.QUEUED} for _ in range(3)]
            + [{"state": layout.ACQUIRED}, {"state": layout.FINISHED}]
        )
        await recorder.sample()
        await database[layout.JOBS].insert_one({"state": layout.QUEUED})
        await recorder.sample()  # the same minute: not counted again
        await recorder.flush()
        moment.move(timedelta(minutes=1))
        await recorder.sample()
        await recorder.flush()

        first, second = await stored(database)
        assert (first["queued"], second["queued"]) == (3, 4)
        assert "outcomes" not in first

    async def test_retried_write_counted_once(
        self,
        recorder: Recorder,
        database: Any,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A write applied whose reply was lost is retried without counting twice,
        and what was counted meanwhile is added once."""
        write = recorder.collection.update_one
        lost = 1

        async def losing_replies(*args: Any, **kwargs: Any) -> Any:
            nonlocal lost
            result = await write(*args, **kwargs)
            if lost:
                lost -= 1
                raise AutoReconnect("reply lost by the test")

            return result

        monkeypatch.setattr(recorder.collection, "update_one", losing_replies)
        recorder.released("success", 0.2)
        with pytest.raises(AutoReconnect):
            await recorder.flush()

        recorder.released("success", 0.2)  # the same minute, after the failure
        assert await recorder.flush() == 2  # the write in doubt, then the new one

        [document] = await stored(database)
        assert document["outcomes"] == {"success": 2}
        assert document["lateness"] == {"ms250": 2}

    async def test_outage_keeps_counts_a_day(
        self, recorder: Recorder, moment: Moment, database: Any
    ) -> None:
        """Counts that would have expired by the time the server is back are
        dropped, so an outage holds a bounded amount in memory."""
        recorder.released("success", None)
        moment.move(timedelta(hours=26))
        recorder.released("error", None)
        recorder._forget_expired()
        assert await recorder.flush() == 1

        [document] = await stored(database)
        assert document["outcomes"] == {"error": 1}


@WIRE_ONLY
class TestCommands:
    """A flush sends one upsert per minute with new counts, and nothing else; a
    read sends one aggregation, served by the ``minute`` index."""

    async def test_one_upsert_per_minute_per_flush(
        self,
        logged_client: AsyncMongoClient[Any],
        command_log: CommandLog,
        database_name: str,
        moment: Moment,
    ) -> None:
        recorder = make_recorder(logged_client, database_name, moment)
        with command_log.recording() as sent:
            for _ in range(500):
                recorder.released("success", 0.01)
            moment.move(timedelta(minutes=1))
            for _ in range(200):
                recorder.released("error", None)

        assert sent == []  # counting sends nothing

        with command_log.recording() as sent:
            await recorder.flush()
            await recorder.flush()  # nothing new

        assert sent == ["update history", "update history"]
        [first, second] = [
            command for name, command in command_log.commands if name == "update"
        ]
        assert [len(command["updates"]) for command in (first, second)] == [1, 1]
        assert all(command["updates"][0]["upsert"] for command in (first, second))

        with command_log.recording() as sent:
            await recorder.sample()
            await recorder.sample()

        assert sent == ["aggregate jobs"]  # the count, once in the minute

    async def test_read_is_one_indexed_aggregation(
        self,
        logged_client: AsyncMongoClient[Any],
        command_log: CommandLog,
        database_name: str,
        moment: Moment,
    ) -> None:
        recorder = make_recorder(logged_client, database_name, moment)
        recorder.released("success", None)
        await recorder.flush()  # creates the collection
        collection = adapter_for(logged_client).collection(
            database_name, layout.HISTORY
        )
        await collection.create_indexes(layout.HISTORY_INDEXES)
        reader = reader_of(logged_client, database_name)
        with command_log.recording() as sent:
            read = await read_history(reader, from_micros(moment.micros))

        assert sent == ["aggregate history"]
        assert totals(read) == (1, 0)
        indexes = await (
            await logged_client[database_name]["history"].list_indexes()
        ).to_list(None)
        keys = [list(index["key"].items()) for index in indexes]
        [(name, command)] = [
            (name, command)
            for name, command in command_log.commands
            if name == "aggregate"
        ]
        queries = queries_of(name, command)
        assert queries
        assert all(served(query, keys) for query in queries)


class TestStore:
    """The store records its jobs' history with the ``history_interval`` option."""

    @pytest.mark.parametrize(
        ("value", "error"),
        [
            pytest.param(0.5, ValueError, id="under-a-second"),
            pytest.param(0, ValueError, id="zero"),
            pytest.param(-5, ValueError, id="negative"),
            pytest.param(math.inf, ValueError, id="infinite"),
            pytest.param(math.nan, ValueError, id="nan"),
            pytest.param(True, TypeError, id="bool"),
            pytest.param("5", TypeError, id="string"),
        ],
    )
    def test_bad_interval(self, value: Any, error: type[Exception]) -> None:
        with pytest.raises(error, match="history_interval"):
            MongoDBDataStore("mongodb://localhost", history_interval=value)

    def test_interval_options(self) -> None:
        assert MongoDBDataStore("mongodb://localhost").history_interval == 5.0
        off = MongoDBDataStore("mongodb://localhost", history_interval=None)
        assert off.history_interval is None
        assert MongoDBDataStore("mongodb://h", history_interval=1).history_interval == 1

    async def test_indexes(self, store: MongoDBDataStore) -> None:
        collection = store._history_collection()
        indexes = {index["name"]: index for index in await collection.list_indexes()}
        assert list(indexes["minute"]["key"].items()) == [("minute", 1)]
        assert list(indexes["expires"]["key"].items()) == [("expires", 1)]
        assert indexes["expires"]["expireAfterSeconds"] == 0

    async def run_one_job(self, store: MongoDBDataStore, outcome: JobOutcome) -> None:
        await add_task(store)
        await store.add_job(Job(task_id="task", executor="async"))
        [job] = await store.acquire_jobs("me", LEASE, 1)
        await store.release_job("me", job, JobResult.from_job(job, outcome))

    async def test_clean_stop_writes(
        self,
        client: Any,
        database_name: str,
        database: Any,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        async with started_store(
            client, database_name, local_broker, logger, history_interval=600
        ) as store:
            await self.run_one_job(store, JobOutcome.error)
            assert outcome_totals(await stored(database)) == {}  # not yet: in memory

        assert outcome_totals(await stored(database)) == {"error": 1}

    async def test_off(
        self,
        client: Any,
        database_name: str,
        database: Any,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        async with started_store(
            client, database_name, local_broker, logger, history_interval=None
        ) as store:
            await self.run_one_job(store, JobOutcome.success)

        assert await stored(database) == []

    async def test_start_from_scratch_drops_history(
        self,
        client: Any,
        database_name: str,
        database: Any,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        await database[layout.HISTORY].insert_one(bucket(this_minute()))
        async with started_store(
            client, database_name, local_broker, logger, start_from_scratch=True
        ):
            assert await stored(database) == []

    async def test_failed_writes_logged_once(
        self,
        client: Any,
        database_name: str,
        database: Any,
        local_broker: EventBroker,
        logger: logging.Logger,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        async with started_store(
            client, database_name, local_broker, logger, history_interval=1
        ) as store:
            recorder = store._history
            assert recorder is not None
            write = recorder.collection.update_one
            failures = 2
            written = anyio.Event()

            async def failing(*args: Any, **kwargs: Any) -> Any:
                nonlocal failures
                if failures:
                    failures -= 1
                    raise AutoReconnect("connection reset by the test")

                result = await write(*args, **kwargs)
                written.set()
                return result

            monkeypatch.setattr(recorder.collection, "update_one", failing)
            with caplog.at_level(logging.DEBUG), anyio.fail_after(10):
                await self.run_one_job(store, JobOutcome.success)
                await written.wait()

                # The retry loop says the episode is over once the write returns
                def over() -> bool:
                    return any(
                        "failed attempt(s)" in record.getMessage()
                        for record in caplog.records
                    )

                while not over():  # noqa: ASYNC110 (a log record sets no event)
                    await anyio.sleep(0.01)

            assert outcome_totals(await stored(database)) == {"success": 1}  # once

        messages = [
            (record.levelname, record.getMessage())
            for record in caplog.records
            if record.getMessage().startswith("Job history write")
        ]
        assert [level for level, _ in messages] == ["WARNING", "DEBUG", "INFO"]
        assert "after 2 failed attempt(s)" in messages[-1][1]

    async def test_failed_sample_skipped(
        self,
        client: Any,
        database_name: str,
        local_broker: EventBroker,
        logger: logging.Logger,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        async with started_store(
            client, database_name, local_broker, logger, history_interval=1
        ) as store:
            recorder = store._history
            assert recorder is not None
            tried = anyio.Event()

            async def failing(*_args: Any, **_kwargs: Any) -> Any:
                tried.set()
                raise AutoReconnect("connection reset by the test")

            monkeypatch.setattr(recorder.jobs, "count_documents", failing)
            with caplog.at_level(logging.DEBUG), anyio.fail_after(10):
                await tried.wait()

        assert any(
            record.levelname == "WARNING"
            and record.getMessage().startswith("Queue depth sample failed")
            for record in caplog.records
        )


class TestReading:
    """One point per step, summed over every store process, from checked numbers."""

    async def test_merges_processes(self, client: Any, database: Any) -> None:
        minute = this_minute()
        earlier = minute - timedelta(minutes=5)
        await database[layout.HISTORY].insert_many(
            [
                bucket(
                    minute,
                    outcomes={"success": 3},
                    lateness={"ms100": 50},
                    queued=5,
                ),
                bucket(
                    minute,
                    outcomes={"success": 4, "error": 1},
                    lateness={"ms1000": 50},
                    queued=9,
                ),
                bucket(earlier, outcomes={"cancelled": 2}),
            ]
        )
        reader = reader_of(client, database.name)
        read = await read_history(reader, minute + timedelta(seconds=30))

        assert len(read.points) == 60
        assert read.step == timedelta(minutes=1)
        assert read.start == minute - timedelta(minutes=59)
        last = read.points[-1]
        assert last.start == minute
        assert (last.succeeded, last.failed, last.queued) == (7, 1, 9)
        assert last.outcomes["error"] == 1
        assert set(last.outcomes) == set(OUTCOMES)
        assert last.lateness_p50 == pytest.approx(0.1)
        assert last.lateness_p95 == pytest.approx(0.95)
        five_ago = read.points[-6]
        assert five_ago.start == earlier
        assert (five_ago.succeeded, five_ago.failed) == (0, 2)
        assert five_ago.queued is None and five_ago.lateness_p50 is None
        empty = read.points[0]
        assert (empty.succeeded, empty.failed, empty.queued) == (0, 0, None)

    async def test_steps_of_a_day(self, client: Any, database: Any) -> None:
        minute = this_minute()
        await database[layout.HISTORY].insert_many(
            [
                bucket(minute - timedelta(minutes=n), outcomes={"success": 1})
                for n in range(30)
            ]
            # Older than the span: not read
            + [bucket(minute - timedelta(hours=25), outcomes={"success": 100})]
        )
        reader = reader_of(client, database.name)
        read = await read_history(
            reader, minute, span=timedelta(days=1), step=timedelta(minutes=10)
        )

        assert len(read.points) == 144
        assert all(
            later.start - earlier.start == timedelta(minutes=10)
            for earlier, later in zip(read.points, read.points[1:], strict=False)
        )
        assert read.points[-1].start <= minute < read.points[-1].start + read.step
        assert totals(read) == (30, 0)
        # Aligned on ten minutes: the 30 minutes fall into three or four steps
        assert 3 <= sum(1 for point in read.points if point.succeeded) <= 4

    @pytest.mark.parametrize(
        ("span", "step"),
        [
            pytest.param(timedelta(hours=1), timedelta(seconds=30), id="sub-minute"),
            pytest.param(timedelta(hours=1), timedelta(seconds=90), id="odd-step"),
            pytest.param(timedelta(minutes=25), timedelta(minutes=10), id="ragged"),
            pytest.param(timedelta(days=2), timedelta(minutes=10), id="too-long"),
            pytest.param(timedelta(0), timedelta(minutes=1), id="empty"),
        ],
    )
    async def test_bad_span(
        self, client: Any, database_name: str, span: timedelta, step: timedelta
    ) -> None:
        with pytest.raises(ValueError):
            await read_history(
                reader_of(client, database_name), this_minute(), span, step
            )

    async def test_naive_now_refused(self, client: Any, database_name: str) -> None:
        with pytest.raises(ValueError, match="aware"):
            await read_history(reader_of(client, database_name), datetime.now())

    async def test_hostile_documents(self, client: Any, database: Any) -> None:
        """Junk of every kind is neither an error nor shown."""
        minute = this_minute()
        many = {f"outcome{n}": n for n in range(10_000)}
        junk: list[Any] = [
            "7",
            True,
            math.nan,
            math.inf,
            -math.inf,
            -3,
            10**18,
            1e300,
            2.5e13,
            None,
            [5],
            {"nested": {"deeper": [1, 2]}},
            ObjectId(),
            minute,
        ]
        documents = [
            bucket(minute, outcomes={"success": 2}, lateness={"ms5": 2}, queued=4),
            bucket(minute, outcomes=many, queued="99"),
            bucket(minute, outcomes=[{"success": 1000}], lateness="junk"),
            bucket(minute, outcomes="success", queued=[1000]),
            {"_id": "no minute", "outcomes": {"success": 1000}},
            {"_id": "text minute", "minute": "now", "outcomes": {"success": 1000}},
            {"_id": "number minute", "minute": 12, "outcomes": {"success": 1000}},
            {"_id": 5, "minute": [minute], "outcomes": {"success": 1000}},
        ]
        for n, value in enumerate(junk):
            documents.append(
                {
                    "_id": f"junk {n}",
                    "minute": minute,
                    "outcomes": dict.fromkeys(OUTCOMES, value),
                    "lateness": dict.fromkeys(LATENESS_KEYS, value),
                    "queued": value,
                }
            )

        await database[layout.HISTORY].insert_many(documents)
        read = await read_history(reader_of(client, database.name), minute)

        last = read.points[-1]
        assert (last.succeeded, last.failed, last.queued) == (2, 0, 4)
        assert set(last.outcomes) == set(OUTCOMES)
        assert last.lateness_p50 == pytest.approx(0.0025)
        assert totals(read) == (2, 0)
        assert all(point.queued is None for point in read.points[:-1])

    @pytest.mark.parametrize(
        ("value", "count"),
        [
            (3, 3),
            (3.0, 3),
            (0, 0),
            (True, None),
            (2.5, None),
            (-1, None),
            (math.nan, None),
            (math.inf, None),
            (10**13, None),
            ("3", None),
            (None, None),
            ([3], None),
        ],
    )
    def test_counts_checked(self, value: object, count: int | None) -> None:
        assert history._count(value) == count


class TestQuantiles:
    """Percentiles are estimated from the merged histogram's buckets."""

    def buckets(self, **counts: int) -> list[int]:
        return [counts.get(key, 0) for key in LATENESS_KEYS]

    def test_empty(self) -> None:
        assert quantile(self.buckets(), 0.5) is None

    def test_interpolated_within_a_bucket(self) -> None:
        buckets = self.buckets(ms100=50, ms1000=50)
        assert quantile(buckets, 0.5) == pytest.approx(0.1)
        assert quantile(buckets, 0.95) == pytest.approx(0.95)
        assert quantile(self.buckets(ms5=10), 0.5) == pytest.approx(0.0025)

    def test_beyond_the_last_bound(self) -> None:
        assert quantile(self.buckets(more=3), 0.5) == 300.0
        assert quantile(self.buckets(ms5=90, more=10), 0.95) == 300.0

    async def test_early_and_on_the_bound(self, recorder: Recorder) -> None:
        recorder.released("success", -2.0)  # started early: the first bucket
        recorder.released("success", 0.005)  # on a bound: that bucket
        recorder.released("success", math.nan)  # not a lateness
        [counts] = recorder._pending.values()
        assert counts.lateness == self.buckets(ms5=2)


def fail() -> None:
    raise RuntimeError("failed on purpose by the test")


class TestEndToEnd:
    """Jobs a real scheduler ran show in the history read afterwards."""

    async def test_scheduler(
        self,
        client: Any,
        database_name: str,
        logger: logging.Logger,
        local_broker: EventBroker,
    ) -> None:
        store = MongoDBDataStore(client, database=database_name, history_interval=1)
        async with AsyncScheduler(store, local_broker, logger=logger) as scheduler:
            await scheduler.start_in_background()
            with anyio.fail_after(20):
                job_ids = [
                    await scheduler.add_job(
                        len, args=["abc"], result_expiration_time=60
                    )
                    for _ in range(3)
                ] + [
                    await scheduler.add_job(fail, result_expiration_time=60)
                    for _ in range(2)
                ]
                outcomes = [
                    result.outcome
                    for job_id in job_ids
                    if (result := await scheduler.get_job_result(job_id)) is not None
                ]
                assert outcomes.count(JobOutcome.success) == 3
                assert outcomes.count(JobOutcome.error) == 2
                await anyio.sleep(1.5)  # a write from the store's own task

                reader = reader_of(client, database_name)
                clock = await reader.server_clock()
                read = await read_history(reader, clock.now_datetime())
                assert totals(read) == (3, 2)

        # Stopped: the last write added nothing more
        read = await read_history(reader, clock.now_datetime())
        assert totals(read) == (3, 2)
        assert sum(point.outcomes["error"] for point in read.points) == 2
        assert any(point.queued is not None for point in read.points)
