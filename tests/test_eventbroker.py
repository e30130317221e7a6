"""The event broker: publish, subscribe and delivery between brokers."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from anyio import CancelScope, create_memory_object_stream, fail_after
from anyio.streams.memory import MemoryObjectReceiveStream
from apscheduler import Event, ScheduleAdded, TaskAdded
from bson import ObjectId
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pymongo.errors import AutoReconnect, OperationFailure

from apscheduler_mongo import MongoDBEventBroker
from apscheduler_mongo._metrics import Metrics
from apscheduler_mongo.metrics import prometheus_meter_provider

from .support.tiers import WIRE_ONLY

pytestmark = pytest.mark.anyio


def make_broker(client: Any, database_name: str, **options: Any) -> MongoDBEventBroker:
    options.setdefault("poll_interval", 0.02)
    return MongoDBEventBroker(client, database=database_name, **options)


@pytest.fixture
async def broker(
    client: Any, database_name: str, logger: logging.Logger
) -> AsyncIterator[MongoDBEventBroker]:
    async with AsyncExitStack() as exit_stack:
        started = make_broker(client, database_name)
        await started.start(exit_stack, logger)
        yield started


@pytest.fixture
async def other_broker(
    client: Any, broker: MongoDBEventBroker, logger: logging.Logger
) -> AsyncIterator[MongoDBEventBroker]:
    """A second broker on the ``broker``'s database, as another process would have."""
    async with AsyncExitStack() as exit_stack:
        started = make_broker(client, broker.database)
        await started.start(exit_stack, logger)
        yield started


def schedule_added(schedule_id: str = "schedule1") -> ScheduleAdded:
    return ScheduleAdded(
        schedule_id=schedule_id,
        task_id="task1",
        next_fire_time=datetime(2021, 9, 11, 12, 31, 56, 254867, timezone.utc),
    )


async def first_task_added(
    receiver: MongoDBEventBroker, publisher: MongoDBEventBroker, task_id: str
) -> TaskAdded:
    """Publish a TaskAdded; return the first one ``receiver`` delivers (in 3 s)."""
    send, receive = create_memory_object_stream[Event](5)
    with send, receive:
        receiver.subscribe(send.send, {TaskAdded})
        await publisher.publish(TaskAdded(task_id=task_id))
        with fail_after(3):
            received = await receive.receive()

    assert isinstance(received, TaskAdded)
    return received


class TestPublishSubscribe:
    """Published events reach the subscribers, as APScheduler expects."""

    async def test_every_subscriber_gets_the_event(
        self, broker: MongoDBEventBroker
    ) -> None:
        send, receive = create_memory_object_stream[Event](2)
        with send, receive:
            broker.subscribe(send.send)
            broker.subscribe(send.send_nowait)
            await broker.publish(schedule_added())
            with fail_after(3):
                first = await receive.receive()
                second = await receive.receive()

        assert first == second
        assert isinstance(first, ScheduleAdded)
        assert first.schedule_id == "schedule1"
        assert first.next_fire_time == schedule_added().next_fire_time

    async def test_one_shot(self, broker: MongoDBEventBroker) -> None:
        send, receive = create_memory_object_stream[Event](2)
        with send, receive:
            broker.subscribe(send.send, one_shot=True)
            await broker.publish(schedule_added("schedule1"))
            await broker.publish(schedule_added("schedule2"))
            with fail_after(3):
                received = await receive.receive()

            with pytest.raises(TimeoutError), fail_after(0.3):
                await receive.receive()

        assert isinstance(received, ScheduleAdded)
        assert received.schedule_id == "schedule1"

    async def test_unsubscribe(self, broker: MongoDBEventBroker) -> None:
        send, receive = create_memory_object_stream[Event](2)
        with send, receive:
            subscription = broker.subscribe(send.send)
            await broker.publish(Event())
            with fail_after(3):
                await receive.receive()

            subscription.unsubscribe()
            await broker.publish(Event())
            with pytest.raises(TimeoutError), fail_after(0.3):
                await receive.receive()

    async def test_no_subscribers(
        self, broker: MongoDBEventBroker, caplog: pytest.LogCaptureFixture
    ) -> None:
        await broker.publish(Event())
        await anyio.sleep(0.1)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    async def test_failing_subscriber_does_not_stop_others(
        self, broker: MongoDBEventBroker, caplog: pytest.LogCaptureFixture
    ) -> None:
        def fail(_event: Event) -> None:
            raise RuntimeError("subscriber failed")

        timestamp = datetime.now(timezone.utc)
        send, receive = create_memory_object_stream[Event](2)
        with send, receive:
            broker.subscribe(fail)
            broker.subscribe(send.send)
            await broker.publish(Event(timestamp=timestamp))
            await broker.publish(Event(timestamp=timestamp + timedelta(seconds=1)))
            with fail_after(3):
                first = await receive.receive()
                second = await receive.receive()

        assert first.timestamp == timestamp
        assert second.timestamp == timestamp + timedelta(seconds=1)
        assert "Error delivering Event" in caplog.text


class TestBetweenBrokers:
    """Every broker on the database delivers every event once, in order."""

    async def test_exactly_once_in_order(
        self, broker: MongoDBEventBroker, other_broker: MongoDBEventBroker
    ) -> None:
        received: dict[str, list[str]] = {"one": [], "other": []}
        done = anyio.Event()

        def record(name: str) -> Any:
            def callback(event: Event) -> None:
                assert isinstance(event, TaskAdded)
                received[name].append(event.task_id)
                if all(len(ids) == 40 for ids in received.values()):
                    done.set()

            return callback

        broker.subscribe(record("one"), {TaskAdded})
        other_broker.subscribe(record("other"), {TaskAdded})

        async def publish_all(prefix: str, publisher: MongoDBEventBroker) -> None:
            for n in range(20):
                await publisher.publish(TaskAdded(task_id=f"{prefix}{n:02}"))

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(publish_all, "a", broker)
            task_group.start_soon(publish_all, "b", other_broker)

        with fail_after(5):
            await done.wait()

        await anyio.sleep(0.2)  # nothing more may arrive
        for ids in received.values():
            assert len(ids) == len(set(ids)) == 40
            for publisher in "ab":
                mine = [task_id for task_id in ids if task_id.startswith(publisher)]
                assert mine == sorted(mine)

    async def test_events_before_start_are_not_replayed(
        self,
        client: Any,
        database_name: str,
        broker: MongoDBEventBroker,
        logger: logging.Logger,
    ) -> None:
        await broker.publish(TaskAdded(task_id="old"))
        async with AsyncExitStack() as exit_stack:
            late = make_broker(client, database_name)
            await late.start(exit_stack, logger)
            received = await first_task_added(late, broker, "new")

        assert received.task_id == "new"

    async def test_malformed_documents_are_skipped(
        self,
        client: Any,
        database_name: str,
        broker: MongoDBEventBroker,
        other_broker: MongoDBEventBroker,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        events = client[database_name]["events"]
        now = datetime.now(timezone.utc)
        await events.insert_many(
            [
                {"_id": ObjectId(), "publisher": 5, "seq": "x", "at": now},
                {"_id": ObjectId(), "publisher": "p", "seq": 1, "at": now},
                {
                    "_id": ObjectId(),
                    "publisher": "q",
                    "seq": 1,
                    "type": "TaskAdded",
                    "payload": b"not json",
                    "at": now,
                },
            ]
        )
        received = await first_task_added(broker, other_broker, "fine")
        assert received.task_id == "fine"
        assert "malformed event document" in caplog.text


class TestLifecycle:
    """Starting and stopping, including under cancellation."""

    async def test_cancel_start(
        self, client: Any, database_name: str, logger: logging.Logger
    ) -> None:
        with CancelScope() as scope:
            scope.cancel()
            async with AsyncExitStack() as exit_stack:
                await make_broker(client, database_name).start(exit_stack, logger)

    async def test_cancel_stop(
        self, client: Any, database_name: str, logger: logging.Logger
    ) -> None:
        with CancelScope() as scope:
            async with AsyncExitStack() as exit_stack:
                await make_broker(client, database_name).start(exit_stack, logger)
                scope.cancel()

    async def test_stops_promptly(
        self, client: Any, database_name: str, logger: logging.Logger
    ) -> None:
        with fail_after(1):
            async with AsyncExitStack() as exit_stack:
                broker = make_broker(client, database_name, poll_interval=30)
                await broker.start(exit_stack, logger)

    @WIRE_ONLY
    async def test_change_streams_refused_clearly(
        self, client: Any, database_name: str, logger: logging.Logger
    ) -> None:
        hello = await client.admin.command("hello")
        if "setName" in hello or hello.get("msg") == "isdbgrid":
            pytest.skip("this server has change streams")

        async with AsyncExitStack() as exit_stack:
            broker = make_broker(client, database_name, mode="change_stream")
            with pytest.raises(RuntimeError, match="replica set"):
                await broker.start(exit_stack, logger)

    async def test_auto_mode_on_standalone_polls(
        self, broker: MongoDBEventBroker
    ) -> None:
        if os.environ.get("MONGODB_URI"):
            pytest.skip("MONGODB_URI may be a replica set")

        assert broker.active_mode == "polling"


class TestOptions:
    """Bad options fail at construction with a clear message."""

    @pytest.mark.parametrize(
        ("options", "error"),
        [
            pytest.param({"collection": ""}, ValueError, id="empty-collection"),
            pytest.param({"collection": "a$b"}, ValueError, id="dollar"),
            pytest.param({"collection": "system.x"}, ValueError, id="system"),
            pytest.param({"collection": 3}, TypeError, id="collection-type"),
            pytest.param({"mode": "push"}, ValueError, id="mode"),
            pytest.param({"poll_interval": 0}, ValueError, id="poll-interval"),
            pytest.param({"event_ttl": 5}, ValueError, id="ttl"),
            pytest.param({"database": "a.b"}, ValueError, id="database"),
        ],
    )
    def test_rejected(self, options: dict[str, Any], error: type[Exception]) -> None:
        with pytest.raises(error):
            MongoDBEventBroker("mongodb://127.0.0.1:1/", **options)

    def test_repr_hides_credentials(self) -> None:
        broker = MongoDBEventBroker("mongodb://user:s3cret@127.0.0.1:1/")
        assert "s3cret" not in repr(broker)
        assert "127.0.0.1:1" in repr(broker)


class FakeStream:
    """
    A change stream that plays a script, as pymongo's does on a real server.

    Each step is a change (``try_next`` returns it; an ``invalidate`` one ends the
    stream), ``None`` (an empty batch, which moves the resume token on), or an
    exception (raised). After the script, empty batches without a new token.
    """

    def __init__(self, steps: Sequence[Any], start: str = "start") -> None:
        self._steps = list(steps)
        self.resume_token: Mapping[str, Any] | None = {"_data": start}
        self.alive = True
        self.closed = False
        self._batches = 0

    async def try_next(self) -> dict[str, Any] | None:
        await anyio.sleep(0.005)  # the server waits a little for changes
        if not self._steps:
            return None

        step = self._steps.pop(0)
        if isinstance(step, BaseException):
            raise step

        if step is None:
            self._batches += 1
            self.resume_token = {"_data": f"empty-batch-{self._batches}"}
            return None

        self.resume_token = step["_id"]
        if step["operationType"] == "invalidate":
            self.alive = False

        return dict(step)

    async def close(self) -> None:
        self.closed = True
        self.alive = False


class TestChangeStreamResume:
    """The change-stream reader resumes from the driver's token, reopens after an
    invalidate and catches up from the collection when history is lost: nothing is
    lost or repeated (tested with a fake stream: the stand-ins have none)."""

    @pytest.fixture
    def tier(self) -> str:
        return "mongomock"

    def event(self, broker: MongoDBEventBroker, seq: int) -> dict[str, Any]:
        payload = broker.serializer.serialize(TaskAdded(task_id=f"t{seq}").marshal())
        return {
            "_id": ObjectId(),
            "publisher": "p",
            "seq": seq,
            "type": "TaskAdded",
            "payload": payload,
            "at": datetime.now(timezone.utc),
        }

    def change(self, broker: MongoDBEventBroker, seq: int) -> dict[str, Any]:
        return {
            "_id": {"_data": f"token{seq}"},
            "operationType": "insert",
            "fullDocument": self.event(broker, seq),
        }

    async def run_follower(
        self,
        broker: MongoDBEventBroker,
        first: FakeStream,
        reopened: list[FakeStream | BaseException],
        expected: int,
    ) -> tuple[list[str], list[tuple[Any, Any]]]:
        """
        Follow ``first``, then the streams ``reopened`` gives out in turn, until
        ``expected`` events arrived (and a little longer, for a late duplicate).

        Return the task ids received and how each reopening asked to resume.
        """
        received: list[str] = []
        requested: list[tuple[Any, Any]] = []
        done = anyio.Event()

        def record(event: Event) -> None:
            assert isinstance(event, TaskAdded)
            received.append(event.task_id)
            if len(received) == expected:
                done.set()

        async def open_stream(resume_after: Any = None, start_after: Any = None) -> Any:
            requested.append((resume_after, start_after))
            outcome = reopened.pop(0) if reopened else FakeStream([])
            if isinstance(outcome, BaseException):
                raise outcome

            return outcome

        broker.subscribe(record, {TaskAdded})
        broker._open_stream = open_stream  # type: ignore[method-assign]
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(broker._follow_stream, first)
            with fail_after(10):
                await done.wait()

            await anyio.sleep(0.2)
            task_group.cancel_scope.cancel()

        return received, requested

    async def test_resumes_after_network_error(
        self, broker: MongoDBEventBroker
    ) -> None:
        changes = [self.change(broker, seq) for seq in range(1, 5)]
        first = FakeStream([*changes[:2], AutoReconnect("connection reset")])
        # The resumed stream repeats the last change before going on
        second = FakeStream(changes[1:])
        received, requested = await self.run_follower(broker, first, [second], 4)
        assert received == ["t1", "t2", "t3", "t4"]
        assert requested[0] == ({"_data": "token2"}, None)
        assert first.closed

    async def test_resumes_from_the_token_of_an_empty_batch(
        self, broker: MongoDBEventBroker
    ) -> None:
        # The driver moves the token on after batches without changes; resuming
        # from the last change's token instead would ask the server for history it
        # may have dropped since (a quiet collection on a busy cluster)
        first = FakeStream(
            [self.change(broker, 1), None, None, AutoReconnect("connection reset")]
        )
        second = FakeStream([self.change(broker, 2)])
        received, requested = await self.run_follower(broker, first, [second], 2)
        assert received == ["t1", "t2"]
        assert requested[0] == ({"_data": "empty-batch-2"}, None)

    async def test_reopens_after_an_invalidate(
        self, broker: MongoDBEventBroker, caplog: pytest.LogCaptureFixture
    ) -> None:
        # The events collection is dropped: its indexes go with it
        await broker._events.drop()
        invalidate = {"_id": {"_data": "invalidate"}, "operationType": "invalidate"}
        first = FakeStream([self.change(broker, 1), invalidate])
        second = FakeStream([self.change(broker, 2)])
        received, requested = await self.run_follower(broker, first, [second], 2)
        assert received == ["t1", "t2"]
        # Resuming after an invalidate cannot work; starting after it does
        assert requested == [(None, {"_data": "invalidate"})]
        assert "dropped or renamed" in caplog.text
        names = {index["name"] for index in await broker._events.list_indexes()}
        assert {"at", "read_order"} <= names

    async def test_catches_up_from_the_collection_when_history_is_lost(
        self, broker: MongoDBEventBroker
    ) -> None:
        # The token fell out of the oplog while events 2 and 3 were published: the
        # reader opens a stream from now (which sees 3 and 4), then reads 2 and 3
        # from the collection; 3 is delivered once
        lost = OperationFailure("resume point lost", code=286)
        first = FakeStream([self.change(broker, 1), lost])
        missed = [self.event(broker, 2), self.event(broker, 3)]
        await broker._events.raw.insert_many(missed)
        second = FakeStream([self.change(broker, 3), self.change(broker, 4)])
        received, requested = await self.run_follower(broker, first, [second], 4)
        assert received == ["t1", "t2", "t3", "t4"]
        assert requested == [(None, None)]

    async def test_restarts_counted(self, broker: MongoDBEventBroker) -> None:
        """Each reopening after a failure is counted, by how it went on: resumed
        from its token, or caught up from the collection."""
        provider, registry = prometheus_meter_provider()
        broker._metrics = Metrics(provider)
        reset = AutoReconnect("connection reset")
        lost = OperationFailure("resume point lost", code=286)
        first = FakeStream([self.change(broker, 1), reset])
        second = FakeStream([self.change(broker, 2), lost])
        third = FakeStream([self.change(broker, 3)])
        await self.run_follower(broker, first, [second, third], 3)
        text = generate_latest(registry).decode()
        restarts = {
            sample.labels["how"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "apscheduler_mongo_stream_restarts_total"
        }
        assert restarts == {"resumed": 1, "caught_up": 1}
        outages = [
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "apscheduler_mongo_outages_total"
        ]
        assert outages == [2]  # a change went through between the two failures

    async def test_persistent_failure_logged_once_then_recovery(
        self, broker: MongoDBEventBroker, caplog: pytest.LogCaptureFixture
    ) -> None:
        refused = OperationFailure("not authorized", code=13)
        first = FakeStream([self.change(broker, 1), refused])
        second = FakeStream([self.change(broker, 2)])
        with caplog.at_level(logging.DEBUG):
            received, _ = await self.run_follower(
                broker, first, [refused, refused, second], 2
            )

        assert received == ["t1", "t2"]
        warnings = [
            r for r in caplog.records if r.getMessage().startswith("Event stream")
        ]
        assert [r.levelname for r in warnings] == ["WARNING", "DEBUG", "DEBUG", "INFO"]
        assert "after 3 failed attempt(s)" in warnings[-1].getMessage()


@asynccontextmanager
async def replica_set_client(database_name: str) -> AsyncIterator[Any]:
    """
    Yield a client of the replica set (or sharded cluster) at ``MONGODB_URI``.

    Skip the test if there is none; drop the test's database afterwards.
    """
    uri = os.environ.get("MONGODB_URI")
    if not uri:
        pytest.skip("needs MONGODB_URI pointing at a replica set")

    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[Any] = AsyncMongoClient(uri)
    try:
        hello = await client.admin.command("hello")
        if "setName" not in hello and hello.get("msg") != "isdbgrid":
            pytest.skip("MONGODB_URI is not a replica set or sharded cluster")

        yield client
    finally:
        await client.drop_database(database_name)
        await client.close()


@asynccontextmanager
async def change_stream_brokers(
    client: Any, database_name: str, logger: logging.Logger
) -> AsyncIterator[tuple[MongoDBEventBroker, MemoryObjectReceiveStream[Event]]]:
    """
    Run two brokers in change stream mode on the database.

    Yield the first, and the TaskAdded events that the second delivers.
    """
    async with AsyncExitStack() as exit_stack:
        one = make_broker(client, database_name, mode="change_stream")
        two = make_broker(client, database_name, mode="change_stream")
        await one.start(exit_stack, logger)
        await two.start(exit_stack, logger)
        send, receive = create_memory_object_stream[Event](10)
        with send, receive:
            two.subscribe(send.send, {TaskAdded})
            yield one, receive


@pytest.mark.real_server
class TestRealChangeStreams:
    """On a real replica set, change streams carry events between brokers."""

    async def test_delivery(self, logger: logging.Logger, database_name: str) -> None:
        async with replica_set_client(database_name) as client:
            brokers = change_stream_brokers(client, database_name, logger)
            async with brokers as (one, received):
                for n in range(5):
                    await one.publish(TaskAdded(task_id=str(n)))

                with fail_after(10):
                    got = [await received.receive() for _ in range(5)]

            assert [e.task_id for e in got if isinstance(e, TaskAdded)] == list("01234")

    async def test_delivery_goes_on_after_the_collection_is_dropped(
        self, logger: logging.Logger, database_name: str
    ) -> None:
        async with replica_set_client(database_name) as client:
            brokers = change_stream_brokers(client, database_name, logger)
            async with brokers as (one, received):
                await one.publish(TaskAdded(task_id="before"))
                with fail_after(10):
                    first = await received.receive()

                # An invalidate for both streams; the brokers listen on
                await client[database_name]["events"].drop()
                await anyio.sleep(1)
                for n in range(3):
                    await one.publish(TaskAdded(task_id=f"after{n}"))

                with fail_after(20):
                    after = [await received.receive() for _ in range(3)]

            got = [e.task_id for e in (first, *after) if isinstance(e, TaskAdded)]
            assert got == ["before", "after0", "after1", "after2"]
            indexes = {
                index["name"]
                async for index in await client[database_name]["events"].list_indexes()
            }
            assert {"at", "publisher_seq"} <= indexes
