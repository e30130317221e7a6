"""
The broker's event documents, and what a broker has delivered of them.

An event document: ``_id`` (an ObjectId made by the publisher), ``publisher`` (a
random id per broker instance), ``seq`` (1, 2, 3 ... per publisher), ``type``,
``payload`` (serializer output) and ``at``, the server's clock at the insert.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
from apscheduler import _events as apscheduler_events
from bson import ObjectId

from ._layout import Document

#: The order in which events are read: by the server's stamp, then per publisher
READ_ORDER = [("at", 1), ("publisher", 1), ("seq", 1)]
#: What a broker reads of the events stored before it started
POSITION_FIELDS = {"publisher": 1, "seq": 1, "at": 1}
#: Change stream stages: the inserts, and the invalidations (drop, rename)
STREAM_PIPELINE = [{"$match": {"operationType": {"$in": ["insert", "invalidate"]}}}]


#: How far ahead of the server's clock (as estimated at start) a stamp may be
_STAMP_MARGIN = timedelta(seconds=1)


def aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def is_event_type(name: str) -> bool:
    """Tell whether ``name`` names one of APScheduler's event classes."""
    cls = getattr(apscheduler_events, name, None)
    return isinstance(cls, type) and issubclass(cls, apscheduler_events.Event)


def event_document(publisher: str, seq: int, kind: str, payload: bytes) -> Document:
    return {
        "_id": ObjectId(),
        "publisher": publisher,
        "seq": seq,
        "type": kind,
        "payload": payload,
    }


def stored_once(document: Document) -> tuple[Document, Document]:
    """
    Return the filter and update that store an event once, however often sent.

    The server stamps ``at`` with its own clock, so publishers' clocks do not matter.
    """
    return {"_id": document["_id"]}, {
        "$setOnInsert": document,
        "$currentDate": {"at": True},
    }


def since(moment: datetime) -> Document:
    return {"at": {"$gte": moment}}


@attrs.define
class Delivered:
    """
    What a broker has delivered (or skipped) of each other publisher's events.

    Events of a publisher are delivered in ``seq`` order, each once: an event at or
    below the highest ``seq`` delivered is a repetition.
    """

    #: This broker's own publisher id (its own events are delivered when published)
    own: str
    #: How long publishers and malformed documents are remembered without news
    ttl: timedelta
    #: The highest ``seq`` delivered per publisher, and when
    _last: dict[str, tuple[int, datetime]] = attrs.field(init=False, factory=dict)
    #: The malformed or refused event documents reported already (by ``repr`` of
    #: ``_id``)
    _malformed: dict[str, datetime] = attrs.field(init=False, factory=dict)
    #: The newest ``at`` stamp delivered (or seen at start), by the server's clock
    newest: datetime = attrs.field(
        init=False, factory=lambda: datetime.now(timezone.utc)
    )
    #: How far the server's clock was ahead of this host's at start
    _offset: timedelta = attrs.field(init=False, factory=timedelta)

    def skip_until(self, positions: list[Document], moment: datetime) -> None:
        """Mark the events already stored at ``moment`` (start) as delivered."""
        self.newest = aware(moment)
        self._offset = self.newest - datetime.now(timezone.utc)
        for document in positions:
            publisher, seq = document.get("publisher"), document.get("seq")
            if isinstance(publisher, str) and isinstance(seq, int):
                last = self._last.get(publisher, (0, moment))[0]
                self._last[publisher] = (max(seq, last), moment)

    def is_new(self, document: Mapping[str, Any]) -> bool | None:
        """
        Tell whether an event document is to be delivered (and note it as such).

        ``None`` for a malformed document the caller should report: the first time
        it is met (a poll meets it again until newer events move past).
        """
        publisher, seq, at = (document.get(f) for f in ("publisher", "seq", "at"))
        if not isinstance(publisher, str) or not isinstance(seq, int):
            key = repr(document.get("_id"))
            if key in self._malformed:
                return False

            self._malformed[key] = datetime.now(timezone.utc)
            return None

        last = self._last.get(publisher)
        if publisher == self.own or (last is not None and seq <= last[0]):
            return False  # ours (delivered when published), or delivered already

        moment = aware(at) if isinstance(at, datetime) else datetime.now(timezone.utc)
        if isinstance(at, datetime):
            # No stamp is from the future: one written there (``at`` is the server's,
            # outside any signature) would make the polls skip what comes meanwhile
            ceiling = datetime.now(timezone.utc) + self._offset + _STAMP_MARGIN
            self.newest = max(self.newest, min(moment, ceiling))

        self._last[publisher] = (seq, moment)
        return True

    def first_refusal(self, document: Mapping[str, Any]) -> bool:
        """Note an event document refused unread; tell whether it is the first time."""
        key = repr(document.get("_id"))
        if key in self._malformed:
            return False

        self._malformed[key] = datetime.now(timezone.utc)
        return True

    def unseen(self, lookback: timedelta) -> Document:
        """
        Match the stored events not delivered yet.

        That is: the events of each known publisher above the last ``seq``
        delivered, and those of new publishers, stamped no earlier than ``lookback``
        before the newest event seen (to catch writes that became visible late).
        """
        known = list(self._last)
        return {
            **since(self.newest - lookback),
            "$or": [
                {"publisher": publisher, "seq": {"$gt": self._last[publisher][0]}}
                for publisher in known
            ]
            + [{"publisher": {"$nin": [*known, self.own]}}],
        }

    def forget_old(self) -> None:
        """Forget publishers and malformed documents not heard of for ``ttl``."""
        horizon = self.newest - self.ttl
        for publisher, (_, at) in list(self._last.items()):
            if at < horizon:
                del self._last[publisher]

        for key, at in list(self._malformed.items()):
            if at < horizon:
                del self._malformed[key]
