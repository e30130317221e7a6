"""
Contract tests of :class:`~apscheduler_mongo.MongoDBDataStore`.

They check, on every tier, the behaviour that APScheduler expects of any data store:
tasks, schedules and jobs are stored and handed out under leases, results are kept
until fetched, and abandoned or finished items are cleaned up.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeVar
from unittest.mock import Mock
from uuid import UUID
from zoneinfo import ZoneInfo

import anyio
import attrs
import pytest
from apscheduler import (
    CoalescePolicy,
    ConflictingIdError,
    ConflictPolicy,
    DeserializationError,
    Event,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobResult,
    Schedule,
    ScheduleAdded,
    ScheduleRemoved,
    ScheduleUpdated,
    Task,
    TaskAdded,
    TaskLookupError,
    TaskRemoved,
    TaskUpdated,
)
from apscheduler.abc import EventBroker, Serializer
from apscheduler.triggers.date import DateTrigger

from apscheduler_mongo import MongoDBDataStore

from .support.items import processed

if TYPE_CHECKING:
    from pytest_mock import MockerFixture
    from time_machine import TimeMachineFixture

pytestmark = [
    pytest.mark.anyio,
    # mongomock calls datetime.utcnow() when it applies a TTL index (the store's job
    # collection has one); that is mongomock's deprecation, not ours
    pytest.mark.filterwarnings(
        "ignore:datetime.datetime.utcnow:DeprecationWarning:mongomock.*"
    ),
]

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
INDIA = timezone(timedelta(hours=5, minutes=30))
LEASE = timedelta(seconds=30)
EventT = TypeVar("EventT", bound=Event)
#: How long a test waits for an event before failing
EVENT_TIMEOUT = 5


# Helpers


class EventRecorder:
    """Collect the events a broker delivers, and wait until enough have arrived."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._arrived = anyio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.set()

    async def wait_for(self, count: int) -> list[Event]:
        """Wait (at most :data:`EVENT_TIMEOUT` seconds) for ``count`` events."""
        with anyio.fail_after(EVENT_TIMEOUT):
            while len(self.events) < count:
                self._arrived = anyio.Event()
                await self._arrived.wait()

        return list(self.events)


@asynccontextmanager
async def recording(
    store: MongoDBDataStore, *event_types: type[Event]
) -> AsyncIterator[EventRecorder]:
    """Record the events of the given types that the store publishes meanwhile."""
    recorder = EventRecorder()
    subscription = store._event_broker.subscribe(recorder, event_types or None)
    try:
        yield recorder
    finally:
        subscription.unsubscribe()


async def assert_silent(
    store: MongoDBDataStore, recorder: EventRecorder, expected: int = 0
) -> None:
    """
    Check that the recorder got exactly ``expected`` events so far.

    Events are delivered asynchronously but in publish order, so a marker task added
    (and its event awaited) afterwards proves that nothing else is still on its way.
    """
    async with recording(store, TaskAdded) as markers:
        await store.add_task(Task(id="~marker", func=None, job_executor="async"))
        await markers.wait_for(1)

    assert len(recorder.events) == expected, recorder.events


def of_type(cls: type[EventT], events: Iterable[Event]) -> list[EventT]:
    """Return the events, checking that each is a ``cls``."""
    typed: list[EventT] = []
    for event in events:
        assert isinstance(event, cls), event
        typed.append(event)

    return typed


def describe(event: Event, *names: str) -> tuple[Any, ...]:
    """Return the event's type and the values of the named attributes."""
    return (type(event), *(getattr(event, name) for name in names))


def make_task(task_id: str = "task1", **kwargs: Any) -> Task:
    kwargs.setdefault("func", "contextlib:asynccontextmanager")
    return Task(id=task_id, job_executor="async", **kwargs)


def make_schedule(
    schedule_id: str, run_time: datetime, task_id: str = "task1", **kwargs: Any
) -> Schedule:
    """Return a one-shot schedule whose next fire time is ``run_time``."""
    trigger = DateTrigger(run_time)
    schedule = Schedule(
        id=schedule_id, task_id=task_id, job_executor="async", trigger=trigger, **kwargs
    )
    schedule.next_fire_time = trigger.next()
    return schedule


def make_job(task_id: str = "task1", **kwargs: Any) -> Job:
    kwargs.setdefault("result_expiration_time", timedelta(minutes=1))
    return Job(task_id=task_id, executor="async", **kwargs)


def three_schedules() -> list[Schedule]:
    """Return schedules ``s1``, ``s2`` (of ``task2``) and ``s3``, a day apart."""
    return [
        make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC)),
        make_schedule("s2", datetime(2020, 9, 14, tzinfo=UTC), "task2"),
        make_schedule("s3", datetime(2020, 9, 15, tzinfo=UTC)),
    ]


async def add_schedules(store: MongoDBDataStore, *schedules: Schedule) -> None:
    for schedule in schedules:
        await store.add_schedule(schedule, ConflictPolicy.exception)


async def add_jobs(store: MongoDBDataStore, count: int, **kwargs: Any) -> list[Job]:
    """Add ``count`` jobs of ``task1`` (adding the task too); return them in order."""
    await store.add_task(
        make_task(max_running_jobs=kwargs.pop("max_running_jobs", None))
    )
    jobs = [make_job(**kwargs) for _ in range(count)]
    for job in jobs:
        await store.add_job(job)

    return jobs


def ids(items: Iterable[Schedule | Job]) -> list[Any]:
    return [item.id for item in items]


def require_object_round_trip(serializer: Serializer) -> None:
    """Skip the test if the serializer cannot read back a trigger it wrote."""
    probe = DateTrigger(datetime(2020, 9, 13, tzinfo=UTC))
    try:
        serializer.deserialize(serializer.serialize(probe))
    except DeserializationError:
        pytest.skip(
            f"{type(serializer).__name__} cannot read back a trigger in this "
            f"environment (APScheduler 4.0.0a6's CBORSerializer needs cbor2 < 6)"
        )


def freeze_now(time_machine: TimeMachineFixture) -> datetime:
    """Stop the clock at the current time (so lease boundaries are exact)."""
    now = datetime.now(UTC)
    time_machine.move_to(now, tick=False)
    return now


def assert_same_datetime(actual: object, expected: object, name: str) -> None:
    assert actual == expected, name
    if isinstance(expected, datetime):
        assert isinstance(actual, datetime), name
        assert actual.utcoffset() == expected.utcoffset(), name


def assert_same_fields(
    actual: object, expected: Any, *, skip: Iterable[str] = ()
) -> None:
    """Compare two attrs instances field by field (their ``__eq__`` compares ids)."""
    for field in attrs.fields(type(expected)):
        if field.name not in skip:
            assert_same_datetime(
                getattr(actual, field.name), getattr(expected, field.name), field.name
            )


@asynccontextmanager
async def serializing_store(
    client: Any,
    database_name: str,
    serializer: Serializer,
    broker: EventBroker,
    logger: logging.Logger,
) -> AsyncIterator[MongoDBDataStore]:
    """Start a store that uses the given serializer."""
    store = MongoDBDataStore(
        client, database=database_name, serializer=serializer, start_from_scratch=True
    )
    async with AsyncExitStack() as exit_stack:
        await broker.start(exit_stack, logger)
        await store.start(exit_stack, broker, logger)
        yield store


# Tests


class TestTasks:
    """Tasks are upserted by id, listed in id order, and removable."""

    async def test_add_then_replace(self, store: MongoDBDataStore) -> None:
        async with recording(store, TaskAdded, TaskUpdated) as recorder:
            await store.add_task(make_task("alpha", func="builtins:print"))
            await store.add_task(make_task("beta", func="math:ceil"))
            await store.add_task(make_task("alpha", func="builtins:repr"))
            events = await recorder.wait_for(3)

        assert [describe(event, "task_id") for event in events] == [
            (TaskAdded, "alpha"),
            (TaskAdded, "beta"),
            (TaskUpdated, "alpha"),
        ]
        tasks = await store.get_tasks()
        assert [(task.id, task.func) for task in tasks] == [
            ("alpha", "builtins:repr"),
            ("beta", "math:ceil"),
        ]

    async def test_replace_keeps_running_jobs(self, store: MongoDBDataStore) -> None:
        await add_jobs(store, 2, max_running_jobs=3)
        assert len(await store.acquire_jobs("worker", LEASE, 1)) == 1

        await store.add_task(make_task(func="builtins:repr", max_running_jobs=3))
        task = await store.get_task("task1")
        assert task.func == "builtins:repr"
        assert task.running_jobs == 1

        # The replaced task still counts the held slot: only two more can start
        assert len(await store.acquire_jobs("worker", LEASE, 5)) == 1
        assert (await store.get_task("task1")).running_jobs == 2

    async def test_cap_added_while_running(self, store: MongoDBDataStore) -> None:
        await add_jobs(store, 2)
        assert len(await store.acquire_jobs("worker", LEASE, 1)) == 1

        # The job already running fills the single slot the replacement allows
        await store.add_task(make_task(max_running_jobs=1))
        assert (await store.get_task("task1")).running_jobs == 1
        assert await store.acquire_jobs("worker", LEASE, 5) == []
        assert (await store.get_task("task1")).running_jobs == 1

    async def test_get_tasks_sorted_by_id(self, store: MongoDBDataStore) -> None:
        for task_id in ("charlie", "alpha", "bravo"):
            await store.add_task(make_task(task_id))

        assert [task.id for task in await store.get_tasks()] == [
            "alpha",
            "bravo",
            "charlie",
        ]

    async def test_get_task(self, store: MongoDBDataStore) -> None:
        await store.add_task(make_task("task1", max_running_jobs=4, metadata={"a": 1}))
        task = await store.get_task("task1")
        assert task.id == "task1"
        assert task.func == "contextlib:asynccontextmanager"
        assert task.job_executor == "async"
        assert task.max_running_jobs == 4
        assert task.metadata == {"a": 1}
        assert task.running_jobs == 0

    async def test_get_unknown_task(self, store: MongoDBDataStore) -> None:
        await store.add_task(make_task("task1"))
        with pytest.raises(TaskLookupError):
            await store.get_task("nonexistent")

    async def test_remove_task(self, store: MongoDBDataStore) -> None:
        await store.add_task(make_task("task1"))
        await store.add_task(make_task("task2"))
        async with recording(store, TaskRemoved) as recorder:
            await store.remove_task("task1")
            [event] = await recorder.wait_for(1)

        assert isinstance(event, TaskRemoved)
        assert event.task_id == "task1"
        assert [task.id for task in await store.get_tasks()] == ["task2"]
        with pytest.raises(TaskLookupError):
            await store.get_task("task1")

    async def test_remove_unknown_task(self, store: MongoDBDataStore) -> None:
        with pytest.raises(TaskLookupError):
            await store.remove_task("nonexistent")


class TestAddSchedule:
    """Adding a schedule obeys the conflict policy and announces what changed."""

    async def test_added_events(self, store: MongoDBDataStore) -> None:
        schedules = [
            make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC)),
            make_schedule("s2", datetime(2020, 9, 14, tzinfo=UTC), task_id="task2"),
        ]
        async with recording(store, ScheduleAdded) as recorder:
            await add_schedules(store, *schedules)
            events = await recorder.wait_for(2)

        for event, schedule in zip(events, schedules, strict=True):
            assert isinstance(event, ScheduleAdded)
            assert event.schedule_id == schedule.id
            assert event.task_id == schedule.task_id
            assert event.next_fire_time == schedule.next_fire_time

    async def test_exception_policy(self, store: MongoDBDataStore) -> None:
        original = make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC))
        await store.add_schedule(original, ConflictPolicy.exception)
        duplicate = make_schedule("s1", datetime(2021, 1, 1, tzinfo=UTC), "task2")
        with pytest.raises(ConflictingIdError):
            await store.add_schedule(duplicate, ConflictPolicy.exception)

        [stored] = await store.get_schedules()
        assert stored.task_id == "task1"
        assert stored.next_fire_time == original.next_fire_time

    async def test_do_nothing_policy(self, store: MongoDBDataStore) -> None:
        original = make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC))
        await store.add_schedule(original, ConflictPolicy.exception)
        async with recording(store, ScheduleAdded, ScheduleUpdated) as recorder:
            duplicate = make_schedule("s1", datetime(2021, 1, 1, tzinfo=UTC), "task2")
            await store.add_schedule(duplicate, ConflictPolicy.do_nothing)
            await assert_silent(store, recorder)

        [stored] = await store.get_schedules()
        assert stored.task_id == "task1"
        assert stored.next_fire_time == original.next_fire_time

    async def test_replace_policy(self, store: MongoDBDataStore) -> None:
        await add_schedules(
            store,
            make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC), args=(1,)),
            make_schedule("s2", datetime(2020, 9, 14, tzinfo=UTC)),
        )
        replacement = make_schedule(
            "s1",
            datetime(2020, 9, 16, tzinfo=UTC),
            task_id="other",
            kwargs={"x": 1},
            coalesce=CoalescePolicy.earliest,
            misfire_grace_time=None,
            paused=True,
        )
        async with recording(store, ScheduleAdded, ScheduleUpdated) as recorder:
            await store.add_schedule(replacement, ConflictPolicy.replace)
            [event] = await recorder.wait_for(1)
            await assert_silent(store, recorder, expected=1)

        assert isinstance(event, ScheduleUpdated)
        assert event.schedule_id == "s1"
        assert event.task_id == "other"
        assert event.next_fire_time == datetime(2020, 9, 16, tzinfo=UTC)

        [stored] = await store.get_schedules({"s1"})
        assert stored.task_id == "other"
        assert stored.trigger == DateTrigger(datetime(2020, 9, 16, tzinfo=UTC))
        assert stored.next_fire_time == datetime(2020, 9, 16, tzinfo=UTC)
        assert stored.args == ()
        assert stored.kwargs == {"x": 1}
        assert stored.coalesce is CoalescePolicy.earliest
        assert stored.misfire_grace_time is None
        assert stored.paused


class TestGetSchedules:
    """Schedules are listed in id order, all of them or those asked for."""

    @pytest.fixture
    async def schedules(self, store: MongoDBDataStore) -> list[Schedule]:
        schedules = three_schedules()
        await add_schedules(store, schedules[2], schedules[0], schedules[1])
        return schedules

    async def test_all(
        self, store: MongoDBDataStore, schedules: list[Schedule]
    ) -> None:
        stored = await store.get_schedules()
        assert ids(stored) == ["s1", "s2", "s3"]
        for actual, expected in zip(stored, schedules, strict=True):
            assert actual.task_id == expected.task_id
            assert actual.trigger == expected.trigger
            assert actual.next_fire_time == expected.next_fire_time

    @pytest.mark.usefixtures("schedules")
    async def test_by_ids(self, store: MongoDBDataStore) -> None:
        assert ids(await store.get_schedules({"s3", "s1"})) == ["s1", "s3"]
        assert ids(await store.get_schedules({"s2"})) == ["s2"]
        assert ids(await store.get_schedules({"s2", "unknown"})) == ["s2"]
        assert await store.get_schedules(set()) == []


class TestRemoveSchedules:
    """Removing schedules announces exactly those that existed."""

    async def test_remove(self, store: MongoDBDataStore) -> None:
        await add_schedules(store, *three_schedules())
        async with recording(store, ScheduleRemoved) as recorder:
            await store.remove_schedules(["s1", "s2", "unknown"])
            events = await recorder.wait_for(2)
            await assert_silent(store, recorder, expected=2)

        assert sorted(
            describe(event, "schedule_id", "task_id", "finished") for event in events
        ) == [
            (ScheduleRemoved, "s1", "task1", False),
            (ScheduleRemoved, "s2", "task2", False),
        ]
        assert ids(await store.get_schedules()) == ["s3"]


class TestAcquireSchedules:
    """Due, unpaused, unleased schedules are handed out earliest first."""

    async def test_only_due(self, store: MongoDBDataStore) -> None:
        future = datetime.now(UTC) + timedelta(hours=1)
        await add_schedules(
            store,
            make_schedule("past", datetime(2020, 9, 13, tzinfo=UTC)),
            make_schedule("future", future),
        )
        acquired = await store.acquire_schedules("scheduler", LEASE, 10)
        assert ids(acquired) == ["past"]

    async def test_earliest_first(self, store: MongoDBDataStore) -> None:
        await add_schedules(
            store,
            make_schedule("a", datetime(2020, 9, 15, tzinfo=UTC)),
            make_schedule("b", datetime(2020, 9, 13, tzinfo=UTC)),
            make_schedule("c", datetime(2020, 9, 14, tzinfo=UTC)),
        )
        acquired = await store.acquire_schedules("scheduler", LEASE, 10)
        assert ids(acquired) == ["b", "c", "a"]

    async def test_limit(self, store: MongoDBDataStore) -> None:
        await add_schedules(
            store,
            *(
                make_schedule(f"s{day}", datetime(2020, 9, day, tzinfo=UTC))
                for day in range(1, 5)
            ),
        )
        assert ids(await store.acquire_schedules("scheduler", LEASE, 3)) == [
            "s1",
            "s2",
            "s3",
        ]

    async def test_lease_recorded(self, store: MongoDBDataStore) -> None:
        await add_schedules(
            store, make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC))
        )
        before = datetime.now(UTC)
        [schedule] = await store.acquire_schedules("scheduler", LEASE, 1)
        assert schedule.acquired_by == "scheduler"
        assert schedule.acquired_until is not None
        assert before + LEASE <= schedule.acquired_until <= datetime.now(UTC) + LEASE

    async def test_other_schedulers_get_the_rest(self, store: MongoDBDataStore) -> None:
        await add_schedules(
            store,
            make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC)),
            make_schedule("s2", datetime(2020, 9, 14, tzinfo=UTC)),
            make_schedule("s3", datetime(2020, 9, 15, tzinfo=UTC)),
        )
        assert ids(await store.acquire_schedules("scheduler1", LEASE, 2)) == [
            "s1",
            "s2",
        ]
        assert ids(await store.acquire_schedules("scheduler2", LEASE, 5)) == ["s3"]
        assert await store.acquire_schedules("scheduler3", LEASE, 5) == []

    async def test_paused_skipped(self, store: MongoDBDataStore) -> None:
        await add_schedules(
            store,
            make_schedule("paused", datetime(2020, 9, 13, tzinfo=UTC), paused=True),
            make_schedule("active", datetime(2020, 9, 14, tzinfo=UTC)),
        )
        assert ids(await store.acquire_schedules("scheduler", LEASE, 10)) == ["active"]

    async def test_without_next_fire_time_skipped(
        self, store: MongoDBDataStore
    ) -> None:
        finished = make_schedule("finished", datetime(2020, 9, 13, tzinfo=UTC))
        finished.next_fire_time = None
        await add_schedules(
            store, finished, make_schedule("active", datetime(2020, 9, 14, tzinfo=UTC))
        )
        assert ids(await store.acquire_schedules("scheduler", LEASE, 10)) == ["active"]


class TestReleaseSchedules:
    """Releasing schedules stores their new fire times and frees their leases."""

    async def test_release(self, store: MongoDBDataStore) -> None:
        await add_schedules(store, *three_schedules())
        [s1] = await store.acquire_schedules("scheduler1", LEASE, 1)
        [s2] = await store.acquire_schedules("scheduler2", LEASE, 1)
        fired = datetime(2020, 9, 14, tzinfo=UTC)
        next_time = datetime(2020, 9, 15, 12, tzinfo=UTC)
        async with recording(store, ScheduleUpdated, ScheduleRemoved) as recorder:
            await store.release_schedules("scheduler1", [processed(s1, None, fired)])
            await store.release_schedules(
                "scheduler2", [processed(s2, next_time, fired)]
            )
            events = await recorder.wait_for(2)
            await assert_silent(store, recorder, expected=2)

        assert [
            describe(event, "schedule_id", "task_id", "next_fire_time")
            for event in events
        ] == [
            (ScheduleUpdated, "s1", "task1", None),
            (ScheduleUpdated, "s2", "task2", next_time),
        ]

        stored = await store.get_schedules()
        assert ids(stored) == ["s1", "s2", "s3"]
        assert (stored[0].last_fire_time, stored[0].next_fire_time) == (fired, None)
        assert (stored[1].last_fire_time, stored[1].next_fire_time) == (
            fired,
            next_time,
        )
        assert (stored[2].last_fire_time, stored[2].next_fire_time) == (
            None,
            datetime(2020, 9, 15, tzinfo=UTC),
        )
        for schedule in stored:
            assert schedule.acquired_by is None
            assert schedule.acquired_until is None

    async def test_released_schedule_acquirable_again(
        self, store: MongoDBDataStore
    ) -> None:
        await add_schedules(
            store, make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC))
        )
        [schedule] = await store.acquire_schedules("scheduler1", LEASE, 1)
        next_time = datetime(2020, 9, 14, tzinfo=UTC)
        await store.release_schedules(
            "scheduler1",
            [processed(schedule, next_time, datetime(2020, 9, 13, tzinfo=UTC))],
        )
        [again] = await store.acquire_schedules("scheduler2", LEASE, 1)
        assert again.id == "s1"
        assert again.next_fire_time == next_time
        assert again.acquired_by == "scheduler2"

    async def test_two_identical_fire_times(self, store: MongoDBDataStore) -> None:
        """Regression test for APScheduler #616."""
        same_time = datetime(2020, 9, 13, tzinfo=UTC)
        await add_schedules(
            store, make_schedule("s1", same_time), make_schedule("s2", same_time)
        )
        acquired = await store.acquire_schedules("scheduler", LEASE, 3)
        assert ids(acquired) == ["s1", "s2"]
        next_time = datetime(2020, 9, 20, tzinfo=UTC)
        await store.release_schedules(
            "scheduler",
            [processed(schedule, next_time, same_time) for schedule in acquired],
        )

        stored = await store.get_schedules()
        assert [(s.id, s.next_fire_time, s.acquired_by) for s in stored] == [
            ("s1", next_time, None),
            ("s2", next_time, None),
        ]

    async def test_release_one_of_two(self, store: MongoDBDataStore) -> None:
        """Regression test for APScheduler #621."""
        same_time = datetime(2020, 9, 13, tzinfo=UTC)
        await add_schedules(
            store, make_schedule("s1", same_time), make_schedule("s2", same_time)
        )
        first, second = await store.acquire_schedules("scheduler", LEASE, 3)
        await store.release_schedules(
            "scheduler", [processed(first, None, datetime(2020, 9, 10, tzinfo=UTC))]
        )

        stored = await store.get_schedules({first.id, second.id})
        assert ids(stored) == [first.id, second.id]
        assert stored[0].next_fire_time is None
        assert stored[0].acquired_by is None
        assert stored[1].next_fire_time == same_time
        assert stored[1].acquired_by == "scheduler"
        assert stored[1].acquired_until == second.acquired_until


class TestScheduleLeases:
    """A schedule's lease keeps other schedulers out until it runs out."""

    async def test_lease_lapses(
        self, store: MongoDBDataStore, time_machine: TimeMachineFixture
    ) -> None:
        freeze_now(time_machine)
        await add_schedules(
            store, make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC))
        )
        assert ids(await store.acquire_schedules("scheduler1", LEASE, 1)) == ["s1"]

        time_machine.shift(LEASE)  # now == acquired_until: still leased
        assert await store.acquire_schedules("scheduler2", LEASE, 1) == []

        time_machine.shift(1)
        [taken] = await store.acquire_schedules("scheduler2", LEASE, 1)
        assert taken.id == "s1"
        assert taken.acquired_by == "scheduler2"

    async def test_extend_leases(
        self, store: MongoDBDataStore, time_machine: TimeMachineFixture
    ) -> None:
        freeze_now(time_machine)
        await add_schedules(
            store, make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC))
        )
        assert ids(await store.acquire_schedules("scheduler1", LEASE, 1)) == ["s1"]

        time_machine.shift(20)
        await store.extend_acquired_schedule_leases("scheduler1", {"s1"}, LEASE)
        assert await store.acquire_schedules("scheduler2", LEASE, 1) == []

        time_machine.shift(20)  # past the original lease, within the extended one
        assert await store.acquire_schedules("scheduler2", LEASE, 1) == []

        time_machine.shift(20)  # past the extended lease
        assert ids(await store.acquire_schedules("scheduler2", LEASE, 1)) == ["s1"]

    async def test_extend_only_own_leases(
        self, store: MongoDBDataStore, time_machine: TimeMachineFixture
    ) -> None:
        freeze_now(time_machine)
        await add_schedules(
            store, make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC))
        )
        [schedule] = await store.acquire_schedules("scheduler1", LEASE, 1)

        time_machine.shift(20)
        await store.extend_acquired_schedule_leases("intruder", {"s1"}, LEASE)
        [stored] = await store.get_schedules({"s1"})
        assert stored.acquired_by == "scheduler1"
        assert stored.acquired_until == schedule.acquired_until


class TestNextScheduleRunTime:
    """The next run time is that of the earliest schedule due."""

    async def test_empty(self, store: MongoDBDataStore) -> None:
        assert await store.get_next_schedule_run_time() is None

    async def test_earliest(self, store: MongoDBDataStore) -> None:
        await add_schedules(
            store,
            make_schedule("s2", datetime(2020, 9, 14, tzinfo=UTC)),
            make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC)),
            make_schedule("s3", datetime(2020, 9, 15, tzinfo=UTC)),
        )
        assert await store.get_next_schedule_run_time() == datetime(
            2020, 9, 13, tzinfo=UTC
        )


class TestAddJobs:
    """Added jobs are announced and listed in creation order."""

    async def test_add(self, store: MongoDBDataStore) -> None:
        await store.add_task(make_task())
        job = make_job(schedule_id="s1", args=(1, 2), kwargs={"x": "y"})
        async with recording(store, JobAdded) as recorder:
            await store.add_job(job)
            [event] = await recorder.wait_for(1)

        assert isinstance(event, JobAdded)
        assert (event.job_id, event.task_id, event.schedule_id) == (
            job.id,
            "task1",
            "s1",
        )
        [stored] = await store.get_jobs()
        assert stored.id == job.id
        assert stored.args == (1, 2)
        assert stored.kwargs == {"x": "y"}
        assert stored.acquired_by is None

    async def test_get_all(self, store: MongoDBDataStore) -> None:
        jobs = await add_jobs(store, 4)
        assert ids(await store.get_jobs()) == ids(jobs)

    async def test_get_by_ids(self, store: MongoDBDataStore) -> None:
        jobs = await add_jobs(store, 4)
        wanted = {jobs[3].id, jobs[1].id, UUID(int=7)}
        assert ids(await store.get_jobs(wanted)) == [jobs[1].id, jobs[3].id]
        assert await store.get_jobs([]) == []


class TestAcquireJobs:
    """Queued jobs are handed out in order, each to one worker, within task limits."""

    async def test_queue_order(self, store: MongoDBDataStore) -> None:
        jobs = await add_jobs(store, 3)
        async with recording(store, JobAcquired) as recorder:
            acquired = await store.acquire_jobs("worker", LEASE, None)
            events = await recorder.wait_for(3)

        assert ids(acquired) == ids(jobs)
        assert [event.job_id for event in of_type(JobAcquired, events)] == ids(jobs)
        for job in acquired:
            assert job.acquired_by == "worker"
            assert job.acquired_until is not None

    async def test_limit(self, store: MongoDBDataStore) -> None:
        jobs = await add_jobs(store, 3)
        assert ids(await store.acquire_jobs("worker", LEASE, 2)) == ids(jobs[:2])
        assert ids(await store.acquire_jobs("worker", LEASE, 2)) == ids(jobs[2:])

    async def test_several_workers(self, store: MongoDBDataStore) -> None:
        jobs = await add_jobs(store, 2)
        assert ids(await store.acquire_jobs("worker1", LEASE, 1)) == [jobs[0].id]
        assert ids(await store.acquire_jobs("worker2", LEASE, 1)) == [jobs[1].id]
        assert await store.acquire_jobs("worker3", LEASE, 1) == []

    async def test_lease_lapses(
        self, store: MongoDBDataStore, time_machine: TimeMachineFixture
    ) -> None:
        [job] = await add_jobs(store, 1)
        freeze_now(time_machine)
        assert ids(await store.acquire_jobs("worker1", LEASE, 1)) == [job.id]

        time_machine.shift(LEASE)  # now == acquired_until: still leased
        assert await store.acquire_jobs("worker2", LEASE, 1) == []

        time_machine.shift(1)
        [taken] = await store.acquire_jobs("worker2", LEASE, 1)
        assert taken.id == job.id
        assert taken.acquired_by == "worker2"
        assert (await store.get_task("task1")).running_jobs == 1

    async def test_max_running_jobs(self, store: MongoDBDataStore) -> None:
        jobs = await add_jobs(store, 3, max_running_jobs=2)
        assert (await store.get_task("task1")).running_jobs == 0

        acquired = await store.acquire_jobs("worker", LEASE, 3)
        assert ids(acquired) == ids(jobs[:2])
        assert (await store.get_task("task1")).running_jobs == 2
        assert await store.acquire_jobs("worker", LEASE, 3) == []
        assert await store.acquire_jobs("other", LEASE, 3) == []

        await store.release_job(
            "worker", acquired[0], JobResult.from_job(acquired[0], JobOutcome.success)
        )
        assert (await store.get_task("task1")).running_jobs == 1
        assert ids(await store.get_jobs()) == ids(jobs[1:])

        assert ids(await store.acquire_jobs("worker", LEASE, 3)) == [jobs[2].id]
        assert (await store.get_task("task1")).running_jobs == 2

    async def test_undeserializable(
        self, store: MongoDBDataStore, mocker: MockerFixture
    ) -> None:
        [job] = await add_jobs(store, 1, result_expiration_time=timedelta(seconds=30))
        failing = Mock(Serializer)
        failing.deserialize.side_effect = DeserializationError
        mocker.patch.object(store, "serializer", failing)
        async with recording(store, JobReleased) as recorder:
            assert await store.acquire_jobs("worker", LEASE, 1) == []
            [event] = await recorder.wait_for(1)

        mocker.stopall()
        assert isinstance(event, JobReleased)
        assert event.job_id == job.id
        assert event.outcome is JobOutcome.deserialization_failed
        assert await store.get_jobs() == []
        result = await store.get_job_result(job.id)
        assert result is not None
        assert result.outcome is JobOutcome.deserialization_failed
        assert (await store.get_task("task1")).running_jobs == 0

    async def test_missed_start_deadline(self, store: MongoDBDataStore) -> None:
        past = datetime.now(UTC) - timedelta(seconds=1)
        [late] = await add_jobs(store, 1, start_deadline=past)
        timely = make_job(start_deadline=datetime.now(UTC) + timedelta(hours=1))
        await store.add_job(timely)

        assert ids(await store.acquire_jobs("worker", LEASE, 5)) == [timely.id]
        assert ids(await store.get_jobs()) == [timely.id]
        result = await store.get_job_result(late.id)
        assert result is not None
        assert result.outcome is JobOutcome.missed_start_deadline


def _success(job: Job) -> JobResult:
    return JobResult.from_job(job, JobOutcome.success, return_value="foo")


def _error(job: Job) -> JobResult:
    return JobResult.from_job(job, JobOutcome.error, exception=ValueError("foo"))


def _missed(job: Job) -> JobResult:
    return JobResult.from_job(job, JobOutcome.missed_start_deadline)


def _cancelled(job: Job) -> JobResult:
    return JobResult.from_job(job, JobOutcome.cancelled)


class TestReleaseJob:
    """A released job leaves the queue and its result can be fetched once."""

    @pytest.mark.parametrize(
        "make_result",
        [
            pytest.param(_success, id="success"),
            pytest.param(_error, id="error"),
            pytest.param(_missed, id="missed_start_deadline"),
            pytest.param(_cancelled, id="cancelled"),
        ],
    )
    async def test_outcome(self, store: MongoDBDataStore, make_result: Any) -> None:
        [job] = await add_jobs(store, 1)
        [acquired] = await store.acquire_jobs("worker", LEASE, 2)
        assert acquired.id == job.id
        expected: JobResult = make_result(acquired)
        async with recording(store, JobReleased) as recorder:
            await store.release_job("worker", acquired, expected)
            [event] = await recorder.wait_for(1)

        assert isinstance(event, JobReleased)
        assert (event.job_id, event.outcome, event.scheduler_id) == (
            job.id,
            expected.outcome,
            "worker",
        )

        result = await store.get_job_result(job.id)
        assert result is not None
        assert result.job_id == job.id
        assert result.outcome is expected.outcome
        assert result.return_value == expected.return_value
        if expected.exception is None:
            assert result.exception is None
        else:
            assert isinstance(result.exception, ValueError)
            assert result.exception.args == ("foo",)

        assert await store.get_jobs({job.id}) == []
        assert await store.get_job_result(job.id) is None
        assert (await store.get_task("task1")).running_jobs == 0

    async def test_no_result_kept(self, store: MongoDBDataStore) -> None:
        [job] = await add_jobs(store, 1, result_expiration_time=timedelta(0))
        [acquired] = await store.acquire_jobs("worker", LEASE, 1)
        await store.release_job("worker", acquired, _success(acquired))

        assert await store.get_jobs() == []
        assert await store.get_job_result(job.id) is None

    async def test_unknown_job_result(self, store: MongoDBDataStore) -> None:
        [job] = await add_jobs(store, 1)
        assert await store.get_job_result(UUID(int=1)) is None
        assert await store.get_job_result(job.id) is None  # not finished yet


class TestJobLeases:
    """A job whose lease is extended survives cleanup; a lapsed one is abandoned."""

    async def test_extend_then_lapse(
        self, store: MongoDBDataStore, time_machine: TimeMachineFixture
    ) -> None:
        freeze_now(time_machine)
        [job] = await add_jobs(store, 1, result_expiration_time=timedelta(seconds=30))
        assert ids(await store.acquire_jobs("scheduler1", LEASE, 1)) == [job.id]

        time_machine.shift(20)
        await store.extend_acquired_job_leases("scheduler1", {job.id}, LEASE)
        assert await store.acquire_jobs("scheduler2", LEASE, 1) == []

        time_machine.shift(20)  # past the original lease, within the extended one
        await store.cleanup()
        assert ids(await store.get_jobs({job.id})) == [job.id]

        time_machine.shift(20)  # past the extended lease
        async with recording(store, JobReleased) as recorder:
            await store.cleanup()
            [event] = await recorder.wait_for(1)

        assert isinstance(event, JobReleased)
        assert event.job_id == job.id
        assert event.outcome is JobOutcome.abandoned
        assert await store.get_jobs({job.id}) == []
        result = await store.get_job_result(job.id)
        assert result is not None
        assert result.outcome is JobOutcome.abandoned
        assert (await store.get_task("task1")).running_jobs == 0


class TestReapAbandonedJobs:
    """A scheduler that restarts finishes the jobs it held as abandoned."""

    async def test_reap(self, store: MongoDBDataStore) -> None:
        jobs = await add_jobs(store, 2, result_expiration_time=timedelta(seconds=30))
        await store.reap_abandoned_jobs("scheduler1")  # nothing held: no change
        assert ids(await store.get_jobs()) == ids(jobs)

        [mine] = await store.acquire_jobs("scheduler1", LEASE, 1)
        [theirs] = await store.acquire_jobs("scheduler2", LEASE, 1)
        assert (await store.get_task("task1")).running_jobs == 2

        await store.reap_abandoned_jobs("scheduler1")
        assert ids(await store.get_jobs()) == [theirs.id]
        assert (await store.get_task("task1")).running_jobs == 1
        result = await store.get_job_result(mine.id)
        assert result is not None
        assert result.outcome is JobOutcome.abandoned

        await store.reap_abandoned_jobs("scheduler2")
        assert await store.get_jobs() == []
        assert (await store.get_task("task1")).running_jobs == 0


class TestCleanup:
    """Cleanup removes finished schedules once no job of theirs is left."""

    async def test_finished_schedules(self, store: MongoDBDataStore) -> None:
        await store.add_task(make_task())
        fire_time = datetime(2020, 9, 13, tzinfo=UTC)
        await add_schedules(
            store, make_schedule("s1", fire_time), make_schedule("s2", fire_time)
        )
        s1, s2 = await store.acquire_schedules("scheduler", LEASE, 2)
        job = make_job(
            schedule_id="s2",
            scheduled_fire_time=fire_time,
            result_expiration_time=timedelta(0),
        )
        await store.add_job(job)
        await store.release_schedules(
            "scheduler",
            [processed(s1, None, fire_time), processed(s2, None, fire_time)],
        )

        async with recording(store, ScheduleRemoved) as recorder:
            await store.cleanup()
            [first] = await recorder.wait_for(1)
            assert describe(first, "schedule_id", "finished") == (
                ScheduleRemoved,
                "s1",
                True,
            )
            await assert_silent(store, recorder, expected=1)
            assert ids(await store.get_schedules()) == ["s2"]

            # Once its last job is done, the other one goes too
            [acquired] = await store.acquire_jobs("worker", LEASE, 1)
            await store.release_job("worker", acquired, _success(acquired))
            await store.cleanup()
            events = await recorder.wait_for(2)

        assert [
            describe(event, "schedule_id", "task_id", "finished") for event in events
        ] == [
            (ScheduleRemoved, "s1", "task1", True),
            (ScheduleRemoved, "s2", "task1", True),
        ]
        assert await store.get_schedules() == []

    async def test_keeps_unfinished_schedules(self, store: MongoDBDataStore) -> None:
        await add_schedules(
            store,
            make_schedule("due", datetime(2020, 9, 13, tzinfo=UTC)),
            make_schedule("later", datetime.now(UTC) + timedelta(days=1)),
        )
        await store.cleanup()
        assert ids(await store.get_schedules()) == ["due", "later"]


class TestCancellation:
    """Cancelling a store's start-up neither hangs nor raises anything else."""

    async def test_cancel_before_start(
        self,
        raw_store: MongoDBDataStore,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        with anyio.fail_after(10):
            with anyio.CancelScope() as scope:
                scope.cancel()
                async with AsyncExitStack() as exit_stack:
                    await raw_store.start(exit_stack, local_broker, logger)

        assert scope.cancel_called
        await self._assert_usable(raw_store, local_broker, logger)

    async def test_cancel_after_start(
        self,
        raw_store: MongoDBDataStore,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        with anyio.fail_after(10):
            with anyio.CancelScope() as scope:
                async with AsyncExitStack() as exit_stack:
                    await raw_store.start(exit_stack, local_broker, logger)
                    scope.cancel()

        assert scope.cancel_called
        await self._assert_usable(raw_store, local_broker, logger)

    @staticmethod
    async def _assert_usable(
        store: MongoDBDataStore, broker: EventBroker, logger: logging.Logger
    ) -> None:
        """The client we gave the store is still open: the store starts again."""
        with anyio.fail_after(10):
            async with AsyncExitStack() as exit_stack:
                await broker.start(exit_stack, logger)
                await store.start(exit_stack, broker, logger)
                await store.add_task(make_task())
                assert [task.id for task in await store.get_tasks()] == ["task1"]


class TestUnreadableData:
    """Documents the serializer cannot read are skipped with a telling warning."""

    @staticmethod
    def _break_serializer(store: MongoDBDataStore, mocker: MockerFixture) -> None:
        failing = Mock(Serializer)
        failing.deserialize.side_effect = DeserializationError
        mocker.patch.object(store, "serializer", failing)

    @staticmethod
    def _assert_logged(caplog: pytest.LogCaptureFixture, *names: str) -> None:
        """Each item named has one warning, which says why it was skipped."""
        messages = [record.getMessage() for record in caplog.records]
        for name in names:
            matching = [r for r in caplog.records if name in r.getMessage()]
            assert len(matching) == 1, f"no single warning names {name}: {messages}"
            [record] = matching
            assert record.levelno == logging.WARNING
            assert (
                "DeserializationError" in record.getMessage()
                or record.exc_info is not None
            ), record.getMessage()

    async def test_schedules(
        self,
        store: MongoDBDataStore,
        mocker: MockerFixture,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        await add_schedules(
            store,
            make_schedule("s1", datetime(2020, 9, 13, tzinfo=UTC)),
            make_schedule("s2", datetime(2020, 9, 14, tzinfo=UTC)),
        )
        self._break_serializer(store, mocker)
        with caplog.at_level(logging.WARNING):
            assert await store.get_schedules() == []

        self._assert_logged(caplog, "'s1'", "'s2'")

    async def test_jobs(
        self,
        store: MongoDBDataStore,
        mocker: MockerFixture,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        jobs = await add_jobs(store, 2)
        self._break_serializer(store, mocker)
        with caplog.at_level(logging.WARNING):
            assert await store.get_jobs() == []

        mocker.stopall()
        self._assert_logged(caplog, *(str(job.id) for job in jobs))
        assert ids(await store.get_jobs()) == ids(jobs)


class TestRoundTrip:
    """Stored values come back unchanged, to the microsecond and UTC offset."""

    @pytest.fixture
    async def serialized_store(
        self,
        client: Any,
        database_name: str,
        serializer: Serializer,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> AsyncIterator[MongoDBDataStore]:
        async with serializing_store(
            client, database_name, serializer, local_broker, logger
        ) as store:
            yield store

    async def test_schedule(self, serialized_store: MongoDBDataStore) -> None:
        require_object_round_trip(serialized_store.serializer)
        run_time = datetime(2031, 3, 30, 1, 2, 3, 456789, tzinfo=BERLIN)
        # (passed as a dict: mypy cannot follow the converters of args and kwargs)
        values: dict[str, Any] = {
            "id": "round-trip",
            "task_id": "task1",
            "trigger": DateTrigger(run_time),
            "args": (1, "two"),
            "kwargs": {"three": 3.5},
            "paused": True,
            "coalesce": CoalescePolicy.all,
            "misfire_grace_time": timedelta(seconds=5, microseconds=7),
            "max_jitter": timedelta(microseconds=123),
            "job_executor": "threadpool",
            "job_result_expiration_time": timedelta(minutes=2, microseconds=1),
            "metadata": {"key": "value", "nested": {"n": 1}},
            "next_fire_time": datetime(2031, 3, 30, 5, 32, 3, 456789, tzinfo=INDIA),
            "last_fire_time": datetime(2030, 7, 1, 12, 0, 0, 1, tzinfo=BERLIN),
        }
        schedule = Schedule(**values)
        await serialized_store.add_schedule(schedule, ConflictPolicy.exception)

        [stored] = await serialized_store.get_schedules({schedule.id})
        assert_same_fields(stored, schedule, skip={"trigger"})
        assert isinstance(stored.trigger, DateTrigger)
        assert_same_datetime(stored.trigger.run_time, run_time, "run_time")

    async def test_job(self, serialized_store: MongoDBDataStore) -> None:
        await serialized_store.add_task(make_task())
        values: dict[str, Any] = {
            "task_id": "task1",
            "args": (1, "two"),
            "kwargs": {"three": [3]},
            "schedule_id": "round-trip",
            "scheduled_fire_time": datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=INDIA),
            "executor": "threadpool",
            "jitter": timedelta(microseconds=250),
            "start_deadline": datetime(2031, 1, 2, 0, 0, 0, 999999, tzinfo=BERLIN),
            "result_expiration_time": timedelta(hours=1, microseconds=3),
            "metadata": {"key": "value"},
            "created_at": datetime(2030, 12, 31, 23, 59, 59, 5, tzinfo=BERLIN),
        }
        job = Job(**values)
        await serialized_store.add_job(job)

        [stored] = await serialized_store.get_jobs()
        assert_same_fields(stored, job)

    async def test_result(self, serialized_store: MongoDBDataStore) -> None:
        [job] = await add_jobs(
            serialized_store, 1, result_expiration_time=timedelta(hours=1)
        )
        [acquired] = await serialized_store.acquire_jobs("worker", LEASE, 1)
        finished_at = datetime.now(BERLIN).replace(microsecond=654321)
        result = JobResult(
            job_id=job.id,
            outcome=JobOutcome.success,
            started_at=(finished_at - timedelta(microseconds=1500)).astimezone(INDIA),
            finished_at=finished_at,
            expires_at=(finished_at + timedelta(hours=1)).astimezone(INDIA),
            return_value={"answer": 42, "items": ["a", "b"]},
        )
        await serialized_store.release_job("worker", acquired, result)

        stored = await serialized_store.get_job_result(job.id)
        assert stored is not None
        assert_same_fields(stored, result)


class TestRepr:
    """The store's repr names the database (and no credentials)."""

    async def test_given_client(
        self, raw_store: MongoDBDataStore, database_name: str
    ) -> None:
        assert repr(raw_store).startswith("MongoDBDataStore(")
        assert repr(database_name) in repr(raw_store)

    async def test_uri_with_credentials(self) -> None:
        store = MongoDBDataStore(
            "mongodb://admin:s3cret@db1.example:27017,db2.example/?replicaSet=rs0",
            database="jobs",
        )
        text = repr(store)
        assert "db1.example" in text
        assert "db2.example" in text
        assert "'jobs'" in text
        assert "s3cret" not in text
        assert "admin" not in text
