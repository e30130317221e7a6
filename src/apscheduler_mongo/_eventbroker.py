"""The MongoDB event broker: events carried between processes through a collection."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from logging import Logger
from typing import Any, Literal
from uuid import uuid4

import anyio
import attrs
from apscheduler._events import Event
from apscheduler.abc import Serializer
from apscheduler.eventbrokers.base import BaseExternalEventBroker
from attrs.validators import ge, in_, instance_of
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError
from tenacity import AsyncRetrying

from . import _events as events
from ._adapters import ChangeStream, Collection
from ._client import (
    check_server,
    describe_hosts,
    explaining_unreachable_servers,
    open_client,
    redact,
    require_asyncio,
)
from ._events import Delivered
from ._indexes import ensure_indexes
from ._layout import EVENTS, RETIRED_EVENT_INDEXES, Document, event_indexes
from ._metrics import Metrics
from ._names import validate_collection_name
from ._options import ConnectionOptions, SigningOptions
from ._retry import Attempts, Trouble, is_temporary_failure, retrying
from ._signing import Codec, UnverifiedDataError
from .serializers import SafeJSONSerializer

Mode = Literal["auto", "change_stream", "polling"]


def _validate_collection(
    instance: MongoDBEventBroker, _attribute: object, value: object
) -> None:
    validate_collection_name(value, instance.database)


def _as_seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


@attrs.define(eq=False, repr=False)
class MongoDBEventBroker(ConnectionOptions, SigningOptions, BaseExternalEventBroker):
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
    :param serializer: the serializer for event payloads (by default one that
        rebuilds no object a payload names: events carry plain data)
    :param retry_settings: how to retry after temporary failures
    :param signing_key: a key, or a sequence of keys of which the first signs and
        all verify: events are signed when published, and an event read without a
        valid signature is dropped unread (see :doc:`security`)
    :param accept_unsigned: while rolling signing out, also deliver events that
        carry no signature at all
    :param mode: ``"auto"`` (change streams where the server has them, polling
        elsewhere), ``"change_stream"`` or ``"polling"``
    :param poll_interval: seconds (or a timedelta) between polls in polling mode
    :param event_ttl: how long event documents are kept (a TTL index removes them)
    :param lookback: how far behind the newest event a poll looks again, to catch
        writes that became visible late (polling mode)
    :param meter_provider: the OpenTelemetry ``MeterProvider`` the broker counts
        events with (default: the global one; see :doc:`operations`)

    .. note:: Runs on asyncio only, like pymongo's asynchronous API.
    """

    collection: str = attrs.field(
        default="events", kw_only=True, validator=_validate_collection
    )
    serializer: Serializer = attrs.field(
        factory=SafeJSONSerializer,
        kw_only=True,
        validator=instance_of(Serializer),  # type: ignore[type-abstract]
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
    meter_provider: Any = attrs.field(default=None, kw_only=True)

    _events: Collection = attrs.field(init=False)
    _publisher: str = attrs.field(init=False, factory=lambda: uuid4().hex)
    _sequence: int = attrs.field(init=False, default=0)
    _publish_lock: anyio.Lock = attrs.field(init=False, factory=anyio.Lock)
    _delivered: Delivered = attrs.field(init=False)
    _active_mode: str = attrs.field(init=False, default="")
    _metrics: Metrics = attrs.field(init=False)
    #: Whether the last event read failed its signature check (one warning each
    #: episode of such events)
    _refusing: bool = attrs.field(init=False, default=False)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(hosts={describe_hosts(self.client_or_uri)!r}, "
            f"database={self.database!r}, collection={self.collection!r})"
        )

    def _retry(self) -> AsyncRetrying:
        """Return the loop that retries this broker's temporary failures."""
        return retrying(
            self.retry_settings,
            self._logger,
            " in the event broker",
            metrics=self._metrics,
        )

    def _attempts(self) -> Attempts:
        """Return the attempts of :meth:`_retry`'s loop; a success ends an outage."""
        return Attempts(self._retry(), self._metrics.recovered)

    @property
    def _codec(self) -> Codec:
        """How this broker signs and checks event documents."""
        return Codec(
            self.serializer, self.signing_key, self.accept_unsigned, scope=self.database
        )

    @property
    def active_mode(self) -> str:
        """The delivery mode in use once started: ``change_stream`` or ``polling``."""
        return self._active_mode

    async def start(self, exit_stack: AsyncExitStack, logger: Logger) -> None:
        require_asyncio(self)
        await super().start(exit_stack, logger)
        self._metrics = Metrics(self.meter_provider)
        adapter = await open_client(self.client_or_uri, exit_stack, logger)
        self._events = adapter.collection(self.database, self.collection)
        self._delivered = Delivered(self._publisher, timedelta(seconds=self.event_ttl))
        with explaining_unreachable_servers(adapter):
            async for attempt in self._attempts():
                with attempt:
                    hello = await check_server(adapter, self.database)
                    await self._prepare_collection()

        # The events stored before the start are not for us (nor replayed later)
        await self._skip_existing(hello.get("localTime"))
        mode = self.mode
        if mode == "auto":
            replicated = "setName" in hello or hello.get("msg") == "isdbgrid"
            mode = "change_stream" if replicated else "polling"

        stream = await self._first_stream() if mode == "change_stream" else None
        self._active_mode = "polling" if stream is None else mode
        # The stream opened before anything that needs undoing: a refusal is then a
        # plain error
        task_group = await exit_stack.enter_async_context(anyio.create_task_group())
        exit_stack.callback(task_group.cancel_scope.cancel)
        if stream is not None:
            task_group.start_soon(self._follow_stream, stream)
        else:
            task_group.start_soon(self._poll)

        self._warn_if_unsigned_accepted(self._logger, "The event broker")
        self._logger.info("MongoDB event broker started (%s)", self._active_mode)

    async def _prepare_collection(self) -> None:
        """Create the events collection's indexes, or bring them up to date."""
        await ensure_indexes(
            self._events, event_indexes(int(self.event_ttl)), RETIRED_EVENT_INDEXES
        )

    async def _skip_existing(self, server_time: object) -> None:
        """Mark the events already visible at start as seen: they are not ours."""
        moment = (
            events.aware(server_time)
            if isinstance(server_time, datetime)
            else datetime.now(timezone.utc)
        )
        query = events.since(moment - timedelta(seconds=self.lookback))
        async for attempt in self._attempts():
            with attempt:
                positions = await self._events.find(query, events.POSITION_FIELDS)

        self._delivered.skip_until(positions, moment)

    async def _first_stream(self) -> ChangeStream | None:
        """
        Open the change stream the broker starts with, retrying temporary failures.

        :return: the stream, or ``None`` if the server refused one and ``mode`` is
            ``"auto"`` (a replica set with change streams turned off, as Amazon
            DocumentDB has by default): the broker then polls
        :raises RuntimeError: if the server refused one and ``mode`` is
            ``"change_stream"``
        """
        try:
            async for attempt in self._attempts():
                with attempt:
                    return await self._open_stream()
        except OperationFailure as exc:
            if is_temporary_failure(exc):
                raise

            if self.mode == "change_stream":
                raise RuntimeError(
                    "this server cannot open a change stream (it needs a replica set "
                    "or a sharded cluster, with change streams enabled); use "
                    f"mode='auto' or mode='polling' ({redact(str(exc))})"
                ) from exc

            self._logger.warning(
                "The server refused a change stream (%s); the event broker polls "
                "the events collection instead",
                redact(str(exc)),
            )

        return None

    # Publishing

    async def publish(self, event: Event) -> None:
        payload = self.serializer.serialize(event.marshal())
        async with self._publish_lock:  # one at a time: visible in publish order
            self._sequence += 1
            document = events.event_document(
                self._publisher, self._sequence, type(event).__name__, payload
            )
            self._codec.sign(EVENTS, document)
            query, update = events.stored_once(document)
            async for attempt in self._attempts():
                with attempt:
                    try:
                        await self._events.update_one(query, update, upsert=True)
                    except DuplicateKeyError:
                        pass  # our own write, retried after a lost reply

            self._metrics.published(type(event).__name__)
            # Our own subscribers hear it now; the readers skip our own documents
            await self.publish_local(event)

    # Reading

    async def _deliver(self, document: Mapping[str, Any]) -> None:
        """
        Deliver one event document locally, unless it was delivered already.

        Its signature is checked first: what a broker notes as delivered (the
        publisher, its sequence number, the time) must not come from a forged
        document, which could make it skip the events to come.
        """
        if not self._passes_check(document):
            return

        new = self._delivered.is_new(document)
        if new is None:
            self._logger.warning("Ignoring a malformed event document %r", document)
        elif new:
            await self._publish_read(document)

    def _passes_check(self, document: Mapping[str, Any]) -> bool:
        """Check an event's signature; warn once for each run of those that fail."""
        try:
            self._codec.check(EVENTS, document, "payload")
        except UnverifiedDataError as exc:
            # A poll meets a dropped document again until newer events move past
            if self._delivered.first_refusal(document):
                if not self._refusing:
                    self._logger.warning(
                        "Dropping event %s, and those after it until one passes the "
                        "check: %s",
                        document.get("_id"),
                        exc,
                    )
                self._refusing = True

            return False

        self._refusing = False
        return True

    async def _publish_read(self, document: Mapping[str, Any]) -> None:
        payload = document.get("payload")
        if not isinstance(payload, bytes):
            self._logger.warning("Ignoring event %s: no payload", document.get("_id"))
            return

        kind = document.get("type")
        if not isinstance(kind, str) or not events.is_event_type(kind):
            self._logger.warning(
                "Ignoring event %s: %r is no APScheduler event type",
                document.get("_id"),
                kind,
            )
            return

        event = self._reconstitute_event(kind, payload)
        if event is None:
            self._logger.warning(
                "Ignoring event %s: it cannot be read", document.get("_id")
            )
        else:
            lag = (datetime.now(timezone.utc) - event.timestamp).total_seconds()
            self._metrics.delivered(kind, lag)
            await self.publish_local(event)

    async def _read_unseen(self) -> None:
        """Deliver, in order, the stored events not delivered yet."""
        query = self._delivered.unseen(timedelta(seconds=self.lookback))
        for document in await self._events.find(query, sort=events.READ_ORDER):
            await self._deliver(document)

        self._delivered.forget_old()

    async def _poll(self) -> None:
        """Read new events in order, every ``poll_interval``."""
        trouble = Trouble(self._logger, "Event broker poll", metrics=self._metrics)
        while True:
            try:
                await self._read_unseen()
            except PyMongoError as exc:
                await anyio.sleep(max(self.poll_interval, trouble.failed(exc)))
                continue

            trouble.over()
            await anyio.sleep(self.poll_interval)

    async def _open_stream(
        self,
        resume_after: Mapping[str, Any] | None = None,
        start_after: Mapping[str, Any] | None = None,
    ) -> ChangeStream:
        return await self._events.watch(
            events.STREAM_PIPELINE, resume_after, start_after
        )

    async def _follow_stream(self, stream: ChangeStream) -> None:
        """
        Deliver events from a change stream, resuming after failures, losing none.

        The stream resumes from the token the driver keeps, which moves on with every
        batch, empty ones too. After an ``invalidate`` (the collection was dropped or
        renamed) it starts again after that event, once the indexes are back. After
        an error that no resuming can cure (the token fell out of the oplog, say), it
        opens a stream from now and then reads what it missed from the collection
        itself, by the server's ``at`` stamps (delivery skips what it delivered).
        """
        follower = _StreamFollower(self, stream.resume_token)
        current: ChangeStream | None = stream
        while True:
            try:
                current = await follower.follow(current)
            except PyMongoError as exc:
                follower.lost(exc)
                await _close_quietly(current)
                current = None
                await anyio.sleep(follower.trouble.failed(exc))
                how = "caught_up" if follower.catch_up else "resumed"
                self._metrics.stream_restarted(how)
                continue

            await _close_quietly(current)
            current = None


@attrs.define
class _StreamFollower:
    """Where a broker's change stream is, and how to go on after it stops."""

    broker: MongoDBEventBroker
    resume_after: Mapping[str, Any] | None
    start_after: Mapping[str, Any] | None = None
    catch_up: bool = False
    trouble: Trouble = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.trouble = Trouble(
            self.broker._logger, "Event stream", metrics=self.broker._metrics
        )

    async def follow(self, stream: ChangeStream | None) -> ChangeStream:
        """Open the stream if needed, and deliver from it until it ends."""
        if stream is None:
            stream = await self.broker._open_stream(self.resume_after, self.start_after)
            self.start_after = None

        if self.catch_up:
            await self.broker._read_unseen()
            self.catch_up = False

        while stream.alive:
            change = await stream.try_next()
            self.trouble.over()
            if change is not None and change.get("operationType") == "invalidate":
                await self._invalidated(change)
                break

            if change is not None:
                await self.broker._deliver(change.get("fullDocument") or {})

            self.resume_after = stream.resume_token or self.resume_after

        return stream

    async def _invalidated(self, change: Document) -> None:
        self.broker._logger.warning(
            "The events collection was dropped or renamed; listening to the new one"
        )
        await self.broker._prepare_collection()
        self.start_after, self.resume_after = change["_id"], None

    def lost(self, exc: BaseException) -> None:
        """Note the failure that ended the stream: can it be resumed?"""
        if not is_temporary_failure(exc):
            # A resume cannot help: start from now, then read what was missed
            self.resume_after = self.start_after = None
            self.catch_up = True


async def _close_quietly(stream: ChangeStream | None) -> None:
    if stream is None:
        return

    try:
        await stream.close()
    except PyMongoError:
        pass
