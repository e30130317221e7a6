"""
The audit trail of the dashboard's actions: who asked for what, when, and how it
ended, in the ``audit`` collection, deleted by the server once old (TTL).

An action is recorded before it is made, and refused if that record cannot be
written: no change goes unrecorded. Its outcome is added after. The records are
shown on the audit page like everything else read from the database: as text,
each field checked, nothing deserialized.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from logging import Logger
from typing import Any

import attrs
from apscheduler import RetrySettings
from bson import ObjectId
from pymongo.errors import DuplicateKeyError

from .. import _layout as layout
from .._adapters import Adapter, Collection
from .._indexes import ensure_indexes
from .._retry import retrying
from .._tools.status import Reader
from .._viewing import stored_text

#: How many of the newest records the audit page shows
SHOWN = 200
#: The longest text kept of who acted, what on, and the outcome's message
MAX_TEXT = 1_000


@attrs.frozen
class Entry:
    """One action as the audit page shows it, each stored field checked."""

    at: datetime | None
    who: str | None
    address: str | None
    action: str | None
    target: str | None
    outcome: str | None
    message: str | None


def _bounded(text: str | None) -> str | None:
    return None if text is None else text[:MAX_TEXT]


@attrs.define
class Trail:
    """
    Where one dashboard records its actions.

    :param adapter: the dashboard's client
    :param database: the store's database
    :param retention: how long records are kept
    """

    adapter: Adapter
    database: str
    retention: timedelta
    retry_settings: RetrySettings
    logger: Logger
    #: Whether its indexes were made (once per client)
    _indexed: bool = attrs.field(init=False, default=False)

    def _collection(self) -> Collection:
        return self.adapter.collection(self.database, layout.AUDIT)

    async def _index(self) -> None:
        """Make the collection's indexes (its TTL) before its first record."""
        if not self._indexed:
            async for attempt in retrying(self.retry_settings, self.logger, "Audit"):
                with attempt:
                    await ensure_indexes(self._collection(), layout.AUDIT_INDEXES)

            self._indexed = True

    async def begin(
        self,
        now: datetime,
        who: str | None,
        address: str | None,
        action: str,
        target: str | None,
    ) -> ObjectId:
        """
        Record that an action is about to be made; return the record's id.

        :raises pymongo.errors.PyMongoError: if it cannot be recorded (then the
            action must not be made)
        """
        await self._index()
        record_id = ObjectId()
        document = layout.audit_record(
            record_id,
            now,
            now + self.retention,
            who=_bounded(who),
            address=_bounded(address),
            action=action,
            target=_bounded(target),
        )
        async for attempt in retrying(self.retry_settings, self.logger, "Audit"):
            with attempt:
                try:
                    await self._collection().insert_one(document)
                except DuplicateKeyError:
                    pass  # an attempt whose reply was lost wrote it

        return record_id

    async def end(self, record_id: ObjectId, outcome: str, message: str) -> None:
        """Record how an action ended; a failure is logged, the action stays made."""
        try:
            async for attempt in retrying(self.retry_settings, self.logger, "Audit"):
                with attempt:
                    await self._collection().update_one(
                        layout.by_id(record_id),
                        layout.audit_outcome(outcome, _bounded(message) or ""),
                    )
        except Exception as exc:
            self.logger.warning(
                "Could not record the outcome of dashboard action %s in the audit "
                "collection: %s",
                record_id,
                exc,
            )


def _entry(document: Mapping[str, Any]) -> Entry:
    at = document.get("at")
    if isinstance(at, datetime) and at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)  # BSON dates are UTC

    return Entry(
        at=at if isinstance(at, datetime) else None,
        who=stored_text(document.get("who"), MAX_TEXT),
        address=stored_text(document.get("address"), 200),
        action=stored_text(document.get("action"), 40),
        target=stored_text(document.get("target"), MAX_TEXT),
        outcome=stored_text(document.get("outcome"), 40),
        message=stored_text(document.get("message"), MAX_TEXT),
    )


async def newest(reader: Reader) -> list[Entry]:
    """Return the newest records, newest first: one query, served by ``newest``."""
    documents = await reader.find(
        layout.AUDIT, {}, layout.AUDIT_FIELDS, sort=layout.AUDIT_ORDER, limit=SHOWN
    )
    return [_entry(document) for document in documents]
