"""
The changes an operator makes to a store: pause, resume and remove a schedule, purge.

The command line and the dashboard both make them through here, on a scheduler
(never started) whose event broker announces each change to the schedulers.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from apscheduler import AsyncScheduler, Schedule

from .._layout import ACQUIRED, FINISHED
from .status import Reader


class NotFoundError(LookupError):
    """Raised when a command names a schedule or a store that it cannot act on."""


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
    documents = await reader.find("schedules", {"_id": schedule_id}, {"quarantine": 1})
    if not documents:
        raise NotFoundError(
            f"no schedule {schedule_id!r} in database {reader.database_name!r}"
        )

    if quarantine := documents[0].get("quarantine"):
        reason = quarantine.get("reason") if isinstance(quarantine, Mapping) else None
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
    if schedule.paused:
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
    if not schedule.paused:
        return f"schedule {schedule.id!r} is not paused"

    await scheduler.unpause_schedule(schedule.id, resume_from="now" if now else None)
    resumed = await scheduler.get_schedule(schedule.id)
    next_time = resumed.next_fire_time
    when = next_time.isoformat(sep=" ", timespec="seconds") if next_time else "none"
    return f"resumed schedule {schedule.id!r}; next fire time: {when}"


async def remove(scheduler: AsyncScheduler, reader: Reader, schedule_id: str) -> str:
    """Remove a schedule (quarantined or unreadable ones too); return what was done."""
    if not await reader.find("schedules", {"_id": schedule_id}, {"_id": 1}):
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
        await reader.count("jobs", {"state": FINISHED, "result": {"$exists": True}}),
        await reader.count("jobs", {"state": ACQUIRED}),
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
