"""
The registry of live schedulers: one record per started store, in the ``schedulers``
collection.

A store writes its record when it starts, refreshes it every heartbeat interval (one
small upsert, off the hot path: no job or schedule operation waits for it), and
deletes it when it stops cleanly, after giving back what it held. A store that dies
(SIGKILL, a lost host) leaves its record, which readers show as gone quiet once its
heartbeat is :data:`QUIET_AFTER` intervals old, with when its leases lapse; the
record's ``expires`` field (a BSON date, under a TTL index) then lets the server
delete it. Readers never show a record past its ``expires``, since the server's TTL
monitor runs only about once a minute.

Records are read by viewers as untrusted input: nothing in them is deserialized, and
each field is checked for its type before it is shown (see ``_tools.status``).
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Set
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from logging import Logger

import anyio
import attrs
import pymongo
from bson import ObjectId
from pymongo.errors import PyMongoError

from ._adapters import Collection
from ._clock import ServerClock
from ._layout import Document
from ._leases import Leases
from ._marshalling import from_micros
from ._retry import Trouble
from ._version import __version__

#: A record is shown as gone quiet when its heartbeat is this many intervals old
QUIET_AFTER = 3
#: ... and kept this many intervals after its last heartbeat (at least as long as
#: the leases its store held), for operators to see which scheduler went away
KEPT_FOR = 30
#: At most this many scheduler ids are recorded per store
MAX_SCHEDULER_IDS = 20

_SECOND = 1_000_000


def _version_of(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def _software() -> Document:
    return {
        "python": platform.python_version(),
        "apscheduler": _version_of("apscheduler"),
        "apscheduler_mongo": __version__,
        "pymongo": pymongo.version,
    }


@attrs.define
class Registry:
    """
    This store's record among the live schedulers.

    :param collection: the ``schedulers`` collection
    :param clock: the server's clock (the record's times are on it)
    :param leases: what the store holds, shown in the record
    :param claimants: the ids of the schedulers that claimed through the store
    :param logger: where to report a heartbeat that could not be written
    :param interval: seconds between heartbeats
    """

    collection: Collection
    clock: ServerClock
    leases: Leases
    claimants: Set[str]
    logger: Logger
    interval: float
    #: This store's record, one per start
    record_id: ObjectId = attrs.field(init=False, factory=ObjectId)
    #: Held while a heartbeat is written: the record is deleted after the last one
    _writing: anyio.Lock = attrs.field(init=False, factory=anyio.Lock)
    _deregistered: bool = attrs.field(init=False, default=False)

    def _update(self) -> Document:
        now = self.clock.now_micros()
        holding = self.leases.holding()
        kept = now + int(KEPT_FOR * self.interval * _SECOND)
        return {
            "$set": {
                "schedulers": sorted(self.claimants)[:MAX_SCHEDULER_IDS],
                "heartbeat": now,
                "interval": self.interval,
                "clock_offset": self.clock.measured_offset(),
                "schedules_held": holding.schedules,
                "jobs_held": holding.jobs,
                "leases_until": holding.until,
                "expires": from_micros(max(kept, holding.until or 0)),
            },
            "$setOnInsert": {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": now,
                "software": _software(),
            },
        }

    async def beat(self) -> None:
        """Write this store's record (creating it the first time)."""
        async with self._writing:
            if not self._deregistered:
                await self.collection.update_one(
                    {"_id": self.record_id}, self._update(), upsert=True
                )

    async def run(self) -> None:
        """
        Keep the record fresh: one heartbeat every interval. A failure is logged
        once per episode (a warning: meanwhile the scheduler shows as gone quiet),
        and its end too; the next heartbeat is the retry.
        """
        trouble = Trouble(self.logger, "Scheduler heartbeat")
        while True:
            await anyio.sleep(self.interval)
            try:
                await self.beat()
            except (PyMongoError, RuntimeError) as exc:
                trouble.failed(exc)
            else:
                trouble.over()

    async def deregister(self) -> None:
        """
        Delete this store's record: it stopped, and holds nothing any more. A
        heartbeat being written is waited for, and none is written after.
        """
        self._deregistered = True
        async with self._writing:
            await self.collection.delete_one({"_id": self.record_id})


def quiet_after(interval: float) -> timedelta:
    """Return how old a heartbeat is when its scheduler is shown as gone quiet."""
    return timedelta(seconds=QUIET_AFTER * interval)
