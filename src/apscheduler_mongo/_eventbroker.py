"""The MongoDB event broker: events carried between processes through a collection."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from logging import Logger
from typing import Any, Literal
from uuid import uuid4

import anyio
import attrs
from apscheduler import RetrySettings
from apscheduler._events import Event
from apscheduler.abc import Serializer
from apscheduler.eventbrokers.base import BaseExternalEventBroker
from apscheduler.serializers.json import JSONSerializer
from attrs.validators import ge, in_, instance_of
from bson import ObjectId
from pymongo import ASCENDING, IndexModel
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError
from tenacity import AsyncRetrying

from ._client import (
    check_server,
    client_or_uri_validator,
    describe_hosts,
    explaining_unreachable_servers,
    is_mongomock,
    open_client,
    redact,
    require_asyncio,
)
from ._names import database_validator, validate_collection_name
from ._retry import is_temporary_failure, retrying

Mode = Literal["auto", "change_stream", "polling"]

#: Errors meaning a change stream's resume token is no longer in the oplog
_HISTORY_LOST = {280, 286}


def _validate_collection(
    instance: MongoDBEventBroker, attribute: object, value: object
) -> None:
    validate_collection_name(value, instance.database)


def _as_seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


@attrs.define(eq=False, repr=False)
class MongoDBEventBroker(BaseExternalEventBroker):
    """
    Carry APScheduler's events between processes through a MongoDB collection.

    Publishing stores each event as a document; every broker on the same database
    delivers it to its local subscribers once, in publish order per publisher (the
    publishing broker delivers it to its own subscribers as soon as it is stored).
    Each broker reads the other brokers' events with one listener:

    * on a replica set or sharded cluster, a change stream on the collection, which
      resumes from its last resume token after network errors and failovers;
    * on a standalone server (or a test stand-in), an ordered polling reader every
      ``poll_interval``.

    :param client_or_uri: a MongoDB URI (the broker then creates its client when it
        starts and closes it when it stops), or a :class:`pymongo.AsyncMongoClient`
        or Motor ``AsyncIOMotorClient`` (never closed by the broker)
    :param database: the database holding the events collection
    :param collection: name of the events collection
    :param serializer: the serializer for event payloads
    :param retry_settings: how to retry after temporary failures
    :param mode: ``"auto"`` (change streams where the server has them, polling
        elsewhere), ``"change_stream"`` or ``"polling"``
    :param poll_interval: seconds (or a timedelta) between polls in polling mode
    :param event_ttl: how long event documents are kept (a TTL index removes them)
    :param lookback: how far behind the newest event a poll looks again, to catch
        writes that became visible late (polling mode)

    .. note:: Runs on asyncio only, like pymongo's asynchronous API.
    """

    client_or_uri: Any = attrs.field(validator=client_or_uri_validator)
    database: str = attrs.field(
        default="apscheduler", kw_only=True, validator=database_validator
    )
    collection: str = attrs.field(
        default="events", kw_only=True, validator=_validate_collection
    )
    serializer: Serializer = attrs.field(
        factory=JSONSerializer,
        kw_only=True,
        validator=instance_of(Serializer),  # type: ignore[type-abstract]
    )
    retry_settings: RetrySettings = attrs.field(
        factory=RetrySettings, kw_only=True, validator=instance_of(RetrySettings)
    )
    mode: Mode = attrs.field(
        default="auto",
        kw_only=True,
        validator=in_(("auto", "change_stream", "polling")),
    )
    poll_interval: float = attrs.field(
        default=0.2, kw_only=True, converter=_as_seconds, validator=ge(0.001)
    )
    event_ttl: float = attrs.field(
        default=600.0,
        kw_only=True,
        converter=_as_seconds,
        validator=ge(60),
    )
    lookback: float = attrs.field(
        default=2.0, kw_only=True, converter=_as_seconds, validator=ge(0)
    )

    _client: Any = attrs.field(init=False, default=None)
    _events: Any = attrs.field(init=False, default=None)
    _publisher: str = attrs.field(init=False, factory=lambda: uuid4().hex)
    _sequence: int = attrs.field(init=False, default=0)
    _publish_lock: anyio.Lock = attrs.field(init=False, factory=anyio.Lock)
    _last_seen: dict[str, tuple[int, datetime]] = attrs.field(init=False, factory=dict)
    #: malformed event documents already reported (by ``repr`` of ``_id``), and when
    _malformed: dict[str, datetime] = attrs.field(init=False, factory=dict)
    _active_mode: str = attrs.field(init=False, default="")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(hosts={describe_hosts(self.client_or_uri)!r}, "
            f"database={self.database!r}, collection={self.collection!r})"
        )

    def _retry(self) -> AsyncRetrying:
        return retrying(self.retry_settings, self._logger, " in the event broker")

    @property
    def active_mode(self) -> str:
        """The delivery mode in use once started: ``change_stream`` or ``polling``."""
        return self._active_mode

    async def start(self, exit_stack: AsyncExitStack, logger: Logger) -> None:
        require_asyncio(self)

        await super().start(exit_stack, logger)
        self._client = await open_client(self.client_or_uri, exit_stack)

        database = self._client[self.database]
        self._events = database[self.collection]
        hello: dict[str, Any] = {}
        with explaining_unreachable_servers(self._client):
            async for attempt in self._retry():
                with attempt:
                    if not is_mongomock(self._client):
                        hello = await check_server(database)

                    await self._events.create_indexes(
                        [
                            IndexModel(
                                [("at", ASCENDING)],
                                name="at",
                                expireAfterSeconds=int(self.event_ttl),
                            ),
                            IndexModel(
                                [("publisher", ASCENDING), ("seq", ASCENDING)],
                                name="publisher_seq",
                            ),
                        ]
                    )

        replicated = "setName" in hello or hello.get("msg") == "isdbgrid"
        mode = self.mode
        if mode == "auto":
            mode = "change_stream" if replicated else "polling"

        self._active_mode = mode
        server_time = hello.get("localTime")
        if not isinstance(server_time, datetime):
            server_time = datetime.now(timezone.utc)
        elif server_time.tzinfo is None:
            server_time = server_time.replace(tzinfo=timezone.utc)

        if mode == "change_stream":
            try:
                stream = await self._open_stream(None)
            except OperationFailure as exc:
                if is_temporary_failure(exc):
                    raise

                raise RuntimeError(
                    "this server cannot open a change stream (it needs a replica set "
                    "or a sharded cluster); use mode='auto' or mode='polling' "
                    f"({redact(str(exc))})"
                ) from exc

        # Open the stream before anything that needs undoing: a refusal is then a
        # plain error
        task_group = await exit_stack.enter_async_context(anyio.create_task_group())
        exit_stack.callback(task_group.cancel_scope.cancel)
        if mode == "change_stream":
            task_group.start_soon(self._follow_stream, stream)
        else:
            await self._skip_existing(server_time)
            task_group.start_soon(self._poll, server_time)

        self._logger.info("MongoDB event broker started (%s)", mode)

    # Publishing

    async def publish(self, event: Event) -> None:
        payload = self.serializer.serialize(event.marshal())
        async with self._publish_lock:  # one at a time: visible in publish order
            self._sequence += 1
            document = {
                "_id": ObjectId(),
                "publisher": self._publisher,
                "seq": self._sequence,
                "type": type(event).__name__,
                "payload": payload,
            }
            async for attempt in self._retry():
                with attempt:
                    try:
                        # The server stamps "at" with its own clock
                        await self._events.update_one(
                            {"_id": document["_id"]},
                            {"$setOnInsert": document, "$currentDate": {"at": True}},
                            upsert=True,
                        )
                    except DuplicateKeyError:
                        pass  # our own write, retried after a lost reply

            # Our own subscribers hear it now; the readers skip our own documents
            await self.publish_local(event)

    # Reading

    async def _deliver(self, document: Mapping[str, Any]) -> None:
        """Deliver one event document locally, unless it was delivered already."""
        publisher = document.get("publisher")
        seq = document.get("seq")
        at = document.get("at")
        if not isinstance(publisher, str) or not isinstance(seq, int):
            # A poll meets it again until newer events move past: name it once
            key = repr(document.get("_id"))
            if key not in self._malformed:
                self._malformed[key] = datetime.now(timezone.utc)
                self._logger.warning("Ignoring a malformed event document %r", document)

            return

        last = self._last_seen.get(publisher)
        if publisher == self._publisher or (last is not None and seq <= last[0]):
            return  # ours (delivered when published), or delivered already

        self._last_seen[publisher] = (
            seq,
            at if isinstance(at, datetime) else datetime.now(timezone.utc),
        )
        payload = document.get("payload")
        if not isinstance(payload, bytes):
            self._logger.warning("Ignoring event %s: no payload", document.get("_id"))
            return

        event = self._reconstitute_event(str(document.get("type")), payload)
        if event is None:
            self._logger.warning(
                "Ignoring event %s: it cannot be read", document.get("_id")
            )
        else:
            await self.publish_local(event)

    def _forget_old_publishers(self, now: datetime) -> None:
        horizon = now - timedelta(seconds=self.event_ttl)
        for publisher, (_, at) in list(self._last_seen.items()):
            if _aware(at) < horizon:
                del self._last_seen[publisher]

        for key, at in list(self._malformed.items()):
            if at < horizon:
                del self._malformed[key]

    async def _skip_existing(self, since: datetime) -> None:
        """Mark the events already visible at start as seen: they are not ours."""
        async for attempt in self._retry():
            with attempt:
                cursor = self._events.find(
                    {"at": {"$gte": since - timedelta(seconds=self.lookback)}},
                    {"publisher": 1, "seq": 1, "at": 1},
                )
                for document in await cursor.to_list(None):
                    publisher, seq = document.get("publisher"), document.get("seq")
                    if isinstance(publisher, str) and isinstance(seq, int):
                        last = self._last_seen.get(publisher, (0, since))[0]
                        self._last_seen[publisher] = (max(seq, last), since)

    async def _poll(self, since: datetime) -> None:
        """Read new events in order, every ``poll_interval``."""
        newest = since
        while True:
            query: dict[str, Any] = {
                "at": {"$gte": newest - timedelta(seconds=self.lookback)},
            }
            known = list(self._last_seen)
            query["$or"] = [
                {"publisher": publisher, "seq": {"$gt": self._last_seen[publisher][0]}}
                for publisher in known
            ] + [{"publisher": {"$nin": [*known, self._publisher]}}]
            try:
                cursor = self._events.find(
                    query,
                    sort=[("at", ASCENDING), ("publisher", ASCENDING), ("seq", 1)],
                )
                documents = list(await cursor.to_list(None))
            except PyMongoError as exc:
                if not is_temporary_failure(exc):
                    self._logger.exception("Event broker poll failed")
                else:
                    self._logger.warning(
                        "Event broker poll failed, retrying: %s", redact(str(exc))
                    )
                await anyio.sleep(max(self.poll_interval, 1.0))
                continue

            for document in documents:
                await self._deliver(document)
                at = document.get("at")
                if isinstance(at, datetime) and _aware(at) > newest:
                    newest = _aware(at)

            self._forget_old_publishers(newest)
            await anyio.sleep(self.poll_interval)

    async def _open_stream(self, resume_token: Mapping[str, Any] | None) -> Any:
        stream = self._events.watch(
            [{"$match": {"operationType": "insert"}}], resume_after=resume_token
        )
        if inspect.isawaitable(stream):  # pymongo opens it with await, Motor not
            stream = await stream

        return stream

    async def _follow_stream(self, stream: Any) -> None:
        """Deliver events from a change stream, resuming after failures."""
        # The token of the stream's starting point: resuming from it loses nothing
        resume_token: Mapping[str, Any] | None = stream.resume_token
        while True:
            try:
                if stream is None:
                    stream = await self._open_stream(resume_token)

                async for change in stream:
                    await self._deliver(change.get("fullDocument") or {})
                    resume_token = stream.resume_token
            except OperationFailure as exc:
                if exc.code in _HISTORY_LOST:
                    self._logger.warning(
                        "The event stream's resume point fell out of the oplog; "
                        "events published meanwhile are lost. Restarting from now."
                    )
                    resume_token = None
                elif not is_temporary_failure(exc):
                    self._logger.exception("Event stream failed; reopening it")
                else:
                    self._logger.warning(
                        "Event stream interrupted, resuming: %s", redact(str(exc))
                    )
            except PyMongoError as exc:
                self._logger.warning(
                    "Event stream interrupted, resuming: %s", redact(str(exc))
                )

            await _close_quietly(stream)
            stream = None
            await anyio.sleep(0.5)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


async def _close_quietly(stream: Any) -> None:
    if stream is None:
        return

    try:
        result = stream.close()
        if inspect.isawaitable(result):
            await result
    except PyMongoError:
        pass
