"""The MongoDB event broker: events carried between processes through a collection."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from logging import Logger
from typing import Any, Literal, TypeVar
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

from ._client import (
    check_server,
    client_or_uri_validator,
    describe_hosts,
    durable_collection,
    explaining_unreachable_servers,
    insulated,
    is_mongomock,
    open_client,
    redact,
    require_asyncio,
)
from ._indexes import ensure_indexes
from ._names import database_validator, validate_collection_name
from ._retry import Trouble, call_retrying, is_temporary_failure

T = TypeVar("T")
Mode = Literal["auto", "change_stream", "polling"]


def _validate_collection(
    instance: MongoDBEventBroker, attribute: object, value: object
) -> None:
    validate_collection_name(value, instance.database)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


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
    #: The newest ``at`` stamp delivered (or seen at start), by the server's clock
    _newest: datetime = attrs.field(
        init=False, factory=lambda: datetime.now(timezone.utc)
    )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(hosts={describe_hosts(self.client_or_uri)!r}, "
            f"database={self.database!r}, collection={self.collection!r})"
        )

    async def _run(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation()``, retrying it on temporary failures."""
        return await call_retrying(
            self.retry_settings,
            self._logger,
            lambda attempt: operation(),
            " in the event broker",
        )

    @property
    def active_mode(self) -> str:
        """The delivery mode in use once started: ``change_stream`` or ``polling``."""
        return self._active_mode

    async def start(self, exit_stack: AsyncExitStack, logger: Logger) -> None:
        require_asyncio(self)

        await super().start(exit_stack, logger)
        self._client = await open_client(self.client_or_uri, exit_stack, logger)

        database = self._client[self.database]
        self._events = durable_collection(database, self.collection)

        async def prepare() -> dict[str, Any]:
            hello: dict[str, Any] = {}
            if not is_mongomock(self._client):
                hello = await check_server(database)

            await self._prepare_collection()
            return hello

        with explaining_unreachable_servers(self._client):
            hello = await self._run(prepare)

        replicated = "setName" in hello or hello.get("msg") == "isdbgrid"
        mode = self.mode
        if mode == "auto":
            mode = "change_stream" if replicated else "polling"

        server_time = hello.get("localTime")
        if not isinstance(server_time, datetime):
            server_time = datetime.now(timezone.utc)

        self._newest = _aware(server_time)
        # The events stored before the start are not for us (nor replayed later)
        await self._skip_existing(self._newest)
        stream = await self._first_stream() if mode == "change_stream" else None
        if stream is None:
            mode = "polling"

        self._active_mode = mode
        # Open the stream before anything that needs undoing: a refusal is then a
        # plain error
        task_group = await exit_stack.enter_async_context(anyio.create_task_group())
        exit_stack.callback(task_group.cancel_scope.cancel)
        if stream is not None:
            task_group.start_soon(self._follow_stream, stream)
        else:
            task_group.start_soon(self._poll)

        self._logger.info("MongoDB event broker started (%s)", mode)

    async def _prepare_collection(self) -> None:
        """Create the events collection's indexes, or bring them up to date."""
        await ensure_indexes(
            self._events,
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
            ],
        )

    async def _first_stream(self) -> Any:
        """
        Open the change stream the broker starts with, retrying temporary failures.

        :return: the stream, or ``None`` if the server refused one and ``mode`` is
            ``"auto"`` (a replica set with change streams turned off, as Amazon
            DocumentDB has by default): the broker then polls
        :raises RuntimeError: if the server refused one and ``mode`` is
            ``"change_stream"``
        """
        try:
            return await self._run(self._open_stream)
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
            document = {
                "_id": ObjectId(),
                "publisher": self._publisher,
                "seq": self._sequence,
                "type": type(event).__name__,
                "payload": payload,
            }

            async def store() -> None:
                try:
                    # The server stamps "at" with its own clock
                    await self._events.update_one(
                        {"_id": document["_id"]},
                        {"$setOnInsert": document, "$currentDate": {"at": True}},
                        upsert=True,
                    )
                except DuplicateKeyError:
                    pass  # our own write, retried after a lost reply

            await self._run(store)

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

        if isinstance(at, datetime):
            self._newest = max(self._newest, _aware(at))

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

        async def read() -> list[Any]:
            cursor = self._events.find(
                {"at": {"$gte": since - timedelta(seconds=self.lookback)}},
                {"publisher": 1, "seq": 1, "at": 1},
            )
            return list(await cursor.to_list(None))

        for document in await self._run(read):
            publisher, seq = document.get("publisher"), document.get("seq")
            if isinstance(publisher, str) and isinstance(seq, int):
                last = self._last_seen.get(publisher, (0, since))[0]
                self._last_seen[publisher] = (max(seq, last), since)

    async def _read_unseen(self) -> None:
        """
        Deliver, in order, the stored events not delivered yet.

        It asks for the events of each known publisher above the last ``seq``
        delivered, and for those of new publishers, stamped no earlier than
        ``lookback`` seconds before the newest event seen.
        """
        known = list(self._last_seen)
        query: dict[str, Any] = {
            "at": {"$gte": self._newest - timedelta(seconds=self.lookback)},
            "$or": [
                {"publisher": publisher, "seq": {"$gt": self._last_seen[publisher][0]}}
                for publisher in known
            ]
            + [{"publisher": {"$nin": [*known, self._publisher]}}],
        }

        async def read() -> list[Any]:
            cursor = self._events.find(
                query, sort=[("at", ASCENDING), ("publisher", ASCENDING), ("seq", 1)]
            )
            return list(await cursor.to_list(None))

        for document in await insulated(read()):
            await self._deliver(document)

        self._forget_old_publishers(self._newest)

    async def _poll(self) -> None:
        """Read new events in order, every ``poll_interval``."""
        trouble = Trouble(self._logger, "Event broker poll")
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
    ) -> Any:
        stream = self._events.watch(
            [{"$match": {"operationType": {"$in": ["insert", "invalidate"]}}}],
            resume_after=resume_after,
            start_after=start_after,
        )
        if inspect.isawaitable(stream):  # pymongo opens it with await, Motor not
            stream = await stream

        return stream

    async def _follow_stream(self, stream: Any) -> None:
        """
        Deliver events from a change stream, resuming after failures, losing none.

        The stream resumes from the token the driver keeps, which moves on with every
        batch, empty ones too. After an ``invalidate`` (the collection was dropped or
        renamed) it starts again after that event, once the indexes are back. After
        an error that no resuming can cure (the token fell out of the oplog, say), it
        opens a stream from now and then reads what it missed from the collection
        itself, by the server's ``at`` stamps (delivery skips what it delivered).
        """
        resume_after: Mapping[str, Any] | None = stream.resume_token
        start_after: Mapping[str, Any] | None = None
        catch_up = False
        trouble = Trouble(self._logger, "Event stream")
        while True:
            try:
                if stream is None:
                    stream = await insulated(
                        self._open_stream(resume_after, start_after)
                    )
                    start_after = None

                if catch_up:
                    await self._read_unseen()
                    catch_up = False

                while stream.alive:
                    change = await insulated(stream.try_next())
                    trouble.over()
                    if change is not None and change.get("operationType") == (
                        "invalidate"
                    ):
                        self._logger.warning(
                            "The events collection was dropped or renamed; "
                            "listening to the new one"
                        )
                        await insulated(self._prepare_collection())
                        start_after, resume_after = change["_id"], None
                        break

                    if change is not None:
                        await self._deliver(change.get("fullDocument") or {})

                    resume_after = stream.resume_token or resume_after
            except PyMongoError as exc:
                if not is_temporary_failure(exc):
                    # A resume cannot help: start from now, then read what was missed
                    resume_after = start_after = None
                    catch_up = True

                await _close_quietly(stream)
                stream = None
                await anyio.sleep(trouble.failed(exc))
                continue

            await _close_quietly(stream)
            stream = None


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


async def _close_quietly(stream: Any) -> None:
    if stream is None:
        return

    try:
        result = stream.close()
        if inspect.isawaitable(result):
            await insulated(result)
    except PyMongoError:
        pass
