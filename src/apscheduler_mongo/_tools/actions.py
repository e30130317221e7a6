"""
The changes an operator makes to a store: pause, resume and remove a schedule, purge.

The command line and the dashboard both make them through here, on a scheduler
(never started) whose event broker announces each change to the schedulers. Unlike
looking at a store, changing it goes through the store's API, which deserializes
the schedule it changes with the store's serializer.
"""

from __future__ import annotations

from logging import Logger

import attrs
from apscheduler import AsyncScheduler, RetrySettings, Schedule
from apscheduler.abc import Serializer
from apscheduler.serializers.json import JSONSerializer
from apscheduler.serializers.pickle import PickleSerializer

from .. import _layout as layout
from .._datastore import MongoDBDataStore
from .._eventbroker import MongoDBEventBroker
from .._layout import ACQUIRED
from .._signing import Signer
from ..serializers import SafeCBORSerializer, SafeJSONSerializer, SafePickleSerializer
from .status import NotFoundError, Reader, quarantine_reason


def action_scheduler(
    client: object,
    database: str,
    serializer: Serializer,
    events_collection: str,
    retry_settings: RetrySettings,
    logger: Logger,
    *,
    signing_key: Signer | None = None,
    accept_unsigned: bool = False,
) -> AsyncScheduler:
    """
    Return a scheduler (never started processing) on the store, to make changes.

    It announces each change through a :class:`MongoDBEventBroker` on the same
    database, so that schedulers in other processes see it at once (one whose
    schedules are all paused sleeps until an event wakes it). The broker polls,
    and seldom: it only publishes (a change stream needs privileges).

    Start it (``async with``) only on a database that holds a store (see
    :func:`.status.require_store`): starting the store creates its collections.
    A store whose schedulers sign needs the key here too: a change rewrites the
    schedule, which must stay signed (and is checked before it is read). Without
    a key, nothing read can be authenticated: the schedule is read with the safe
    counterpart of ``serializer`` (:func:`restricted`), so that a change made
    from an operator's host runs no stored code, whatever the database holds.

    :raises ValueError: if an option has a bad value
    """
    store = MongoDBDataStore(
        client,
        database=database,
        serializer=serializer if signing_key is not None else restricted(serializer),
        retry_settings=retry_settings,
        signing_key=signing_key,
        accept_unsigned=accept_unsigned,
    )
    broker = MongoDBEventBroker(
        client,
        database=database,
        collection=events_collection,
        retry_settings=retry_settings,
        mode="polling",
        poll_interval=3600,
        signing_key=signing_key,
        accept_unsigned=accept_unsigned,
    )
    return AsyncScheduler(store, broker, logger=logger)


def restricted(serializer: Serializer) -> Serializer:
    """
    Return the counterpart of one of APScheduler's serializers that rebuilds only
    allowed classes (:mod:`apscheduler_mongo.serializers`); others as they are.

    It writes the same bytes: a schedule changed through it reads back the same.
    """
    if isinstance(serializer, (SafePickleSerializer, SafeJSONSerializer)):
        return serializer

    if isinstance(serializer, PickleSerializer):
        return SafePickleSerializer(protocol=serializer.protocol)

    if isinstance(serializer, JSONSerializer):
        return SafeJSONSerializer(magic_key=serializer.magic_key)

    # Told by name: its module needs cbor2, an optional dependency
    if type(serializer).__name__ == "CBORSerializer" and not isinstance(
        serializer, SafeCBORSerializer
    ):
        return SafeCBORSerializer(type_tag=getattr(serializer, "type_tag", 4664))

    return serializer


def innermost(exc: BaseException) -> BaseException:
    """Return the error inside the exception groups that task groups wrap it in."""
    while isinstance(inner := getattr(exc, "exceptions", None), tuple) and inner:
        exc = inner[0]

    return exc


async def schedule_to_change(
    scheduler: AsyncScheduler, reader: Reader, schedule_id: str
) -> Schedule:
    """
    Return the schedule to pause or resume.

    :raises NotFoundError: if it does not exist, is quarantined, or cannot be read
    """
    documents = await reader.find(
        layout.SCHEDULES, layout.by_id(schedule_id), {layout.QUARANTINE: 1}
    )
    if not documents:
        raise NotFoundError(
            f"no schedule {schedule_id!r} in database {reader.database_name!r}"
        )

    if (reason := quarantine_reason(documents[0])) is not None:
        raise NotFoundError(
            f"schedule {schedule_id!r} is quarantined ({reason}); pausing or "
            f"resuming it would lift the quarantine: remove it, or add it again "
            f"from your application"
        )

    schedules = await scheduler.data_store.get_schedules({schedule_id})
    if not schedules:
        raise NotFoundError(
            f"schedule {schedule_id!r} cannot be read here (see the warning); is "
            f"the serializer (--serializer) right, and can this Python import what "
            f"its trigger and arguments use?"
        )

    return schedules[0]


async def pause(scheduler: AsyncScheduler, reader: Reader, schedule_id: str) -> str:
    """Pause a schedule; return what was done."""
    schedule = await schedule_to_change(scheduler, reader, schedule_id)
    # As the schedulers' queries have it: only true pauses ("true" from a hand edit
    # does not)
    if schedule.paused is True:
        return f"schedule {schedule.id!r} is already paused"

    await scheduler.pause_schedule(schedule.id)
    return f"paused schedule {schedule.id!r}"


async def resume(
    scheduler: AsyncScheduler, reader: Reader, schedule_id: str, *, now: bool = False
) -> str:
    """
    Resume a paused schedule; return what was done.

    :param now: resume from now, skipping the fire times it missed while paused
    """
    schedule = await schedule_to_change(scheduler, reader, schedule_id)
    if schedule.paused is not True:
        return f"schedule {schedule.id!r} is not paused"

    await scheduler.unpause_schedule(schedule.id, resume_from="now" if now else None)
    resumed = await scheduler.get_schedule(schedule.id)
    next_time = resumed.next_fire_time
    when = next_time.isoformat(sep=" ", timespec="seconds") if next_time else "none"
    return f"resumed schedule {schedule.id!r}; next fire time: {when}"


async def remove(scheduler: AsyncScheduler, reader: Reader, schedule_id: str) -> str:
    """Remove a schedule (quarantined or unreadable ones too); return what was done."""
    if not await reader.find(layout.SCHEDULES, layout.by_id(schedule_id), {"_id": 1}):
        raise NotFoundError(
            f"no schedule {schedule_id!r} in database {reader.database_name!r}"
        )

    await scheduler.remove_schedule(schedule_id)
    return f"removed schedule {schedule_id!r}"


@attrs.frozen
class Purged:
    """What the store held before and after its cleanup."""

    #: The names of the counts, and each count before and after
    counts: list[tuple[str, int, int]]

    def summary(self) -> str:
        return "; ".join(
            f"{name}: {before} -> {after}" for name, before, after in self.counts
        )


async def _purge_counts(reader: Reader) -> list[int]:
    return [
        await reader.count(layout.JOBS, layout.STORED_RESULTS),
        await reader.count(layout.JOBS, layout.in_state(ACQUIRED)),
        await reader.count("jobs", {}),
        await reader.count("schedules", {}),
    ]


async def purge(scheduler: AsyncScheduler, reader: Reader) -> Purged:
    """Run the store's cleanup (expired results, finished schedules, dead owners)."""
    before = await _purge_counts(reader)
    await scheduler.cleanup()
    after = await _purge_counts(reader)
    names = ["stored results", "running jobs", "job documents", "schedules"]
    return Purged(list(zip(names, before, after, strict=True)))
