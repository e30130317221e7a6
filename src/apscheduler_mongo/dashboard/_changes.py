"""
Noticing the changes that schedulers announce, without reading what they say.

The dashboard only needs to know *that* something changed, to tell its pages to
fetch their panels again. So it watches the event broker's collection for new event
documents, reading their positions (publisher, sequence number, server time) and
never their payloads: deserializing a payload would run whatever the database holds
(APScheduler's JSON serializer imports the classes it names), and starting a
:class:`~apscheduler_mongo.MongoDBEventBroker` would create the collection and its
indexes. It only reads.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from logging import Logger
from uuid import uuid4

import anyio
from pymongo.errors import PyMongoError

from .. import _events as events
from .._tools.status import Reader

#: Seconds between two reads of the events collection
POLL_INTERVAL = 0.5
#: How far behind the newest event a read looks again, for writes visible late
LOOKBACK = timedelta(seconds=2)
#: How long publishers are remembered without news of them
MEMORY = timedelta(minutes=10)


async def follow_changes(
    reader: Reader, collection: str, notify: Callable[[], None], logger: Logger
) -> None:
    """
    Call ``notify`` whenever new event documents appear in ``collection``, until
    cancelled; failed reads are tried again at the next poll.
    """
    delivered = events.Delivered(f"dashboard-{uuid4().hex}", MEMORY)
    started = failing = False
    while True:
        try:
            if not started:
                await _skip_existing(reader, collection, delivered)
                started = True
            elif await _any_new(reader, collection, delivered):
                notify()
        except PyMongoError as exc:
            if not failing:
                logger.warning(
                    "Cannot read the events collection %r (the page is not updated "
                    "live meanwhile): %s",
                    collection,
                    exc,
                )
            failing = True
        else:
            failing = False

        await anyio.sleep(POLL_INTERVAL)


async def _skip_existing(
    reader: Reader, collection: str, delivered: events.Delivered
) -> None:
    """Mark the events stored before the dashboard started as seen."""
    moment = (await reader.server_clock()).now_datetime()
    query = events.since(moment - LOOKBACK)
    positions = await reader.find(collection, query, events.POSITION_FIELDS)
    delivered.skip_until(positions, moment)


async def _any_new(
    reader: Reader, collection: str, delivered: events.Delivered
) -> bool:
    """Tell whether events were stored since the last read (positions only)."""
    documents = await reader.find(
        collection,
        delivered.unseen(LOOKBACK),
        events.POSITION_FIELDS,
        sort=events.READ_ORDER,
    )
    new = [delivered.is_new(document) for document in documents]
    delivered.forget_old()
    return any(new)
