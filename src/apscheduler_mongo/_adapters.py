"""
The clients the store and the broker accept, behind one typed interface.

Three kinds of client are accepted: pymongo's :class:`~pymongo.AsyncMongoClient`,
Motor's ``AsyncIOMotorClient`` (a wrapper around pymongo's synchronous client, whose
cursors and streams are opened without ``await``) and mongomock-motor's in-process
fake (which lacks server commands, some bulk-write forms and codec options). An
:class:`Adapter` for the client is chosen once, when the store or the broker starts;
the rest of the package talks to :class:`Collection` objects and never asks which
kind of client it has.

Every call to the server goes through :func:`insulated` (see there why).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

import attrs
from bson.codec_options import DatetimeConversion
from pymongo import (
    AsyncMongoClient,
    IndexModel,
    ReadPreference,
    UpdateOne,
    WriteConcern,
)
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure
from pymongo.results import BulkWriteResult, DeleteResult, UpdateResult

from ._layout import Document

T = TypeVar("T")

#: The server's code for a duplicate key
DUPLICATE_KEY = 11000

#: What the store's and the broker's writes wait for, unless the client or its URI
#: sets a write concern: a majority of the replica set, so that no write a scheduler
#: was told about is rolled back at a failover; for at most 10 s, after which the
#: write counts as a temporary failure and is retried (its outcome settled then)
MAJORITY = WriteConcern("majority", wtimeout=10_000)

#: Marks the documents a $unionWith brought in
_UNION = "_apscheduler_mongo_union"
#: The server's codes for a pipeline stage it does not know or support
_UNKNOWN_STAGE = frozenset({40324, 115, 303})


def _refuses_union(exc: OperationFailure) -> bool:
    return exc.code in _UNKNOWN_STAGE or "$unionWith" in str(exc)


#: Python versions whose asyncio.wait_for() waits in a task of its own
_WAIT_FOR_IN_A_TASK = sys.version_info < (3, 12)
#: The calls that :func:`insulated` left running when their callers were cancelled
_abandoned: set[asyncio.Future[Any]] = set()


async def insulated(awaitable: Awaitable[T]) -> T:
    """
    Await a pymongo call so that no cancellation reaches pymongo inside it.

    On Python 3.10 and 3.11, pymongo's server selection waits through
    :func:`asyncio.wait_for`, which there waits in a task of its own; AnyIO cancels
    again and again until a cancelled task gives up, and such repeated cancellations
    can leave pymongo's topology lock held by nobody: the cancelled call raises
    ``RuntimeError: Lock is not acquired``, and every later call on the client
    (closing it included, and so the end of ``asyncio.run()``) waits forever. Seen
    with pymongo 4.20.1 when stopping a scheduler while the server was unreachable.

    So on those Pythons the call runs in a task of its own, which a cancellation of
    the caller leaves running: the caller is cancelled at once, and the call ends by
    itself (with its result, or with the driver's server selection timeout), its
    outcome discarded, like a request whose reply was lost. Elsewhere it is awaited
    as it is.
    """
    if not _WAIT_FOR_IN_A_TASK:
        return await awaitable

    call = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        _abandoned.add(call)
        call.add_done_callback(_discard_outcome)
        raise


def _discard_outcome(call: asyncio.Future[Any]) -> None:
    _abandoned.discard(call)
    if not call.cancelled():
        call.exception()  # retrieved, so that asyncio does not report it


async def abandoned_calls_ended() -> None:
    """Wait for the calls that cancelled callers left running (in this loop) to end."""
    loop = asyncio.get_running_loop()
    # Another loop's calls (one that ended without them, as a test's may) are not
    # this loop's to wait for: asyncio.wait() would refuse them
    calls = [call for call in _abandoned if not call.done() and call.get_loop() is loop]
    if calls:
        await asyncio.wait(calls)


async def _resolved(value: Any) -> Any:
    """Return ``value``, awaited if it is awaitable (pymongo's are, Motor's not)."""
    return await value if inspect.isawaitable(value) else value


@attrs.frozen
class Update:
    """A conditional update of one document: the filter, and the change."""

    query: Mapping[str, Any]
    change: Mapping[str, Any]


def _matched_despite(exc: BulkWriteError) -> int:
    """
    Return how many writes of a failed bulk write matched, or raise the error.

    Duplicate keys are expected (see :meth:`Collection.update_each`); any other write
    error, or a write concern error, is raised.
    """
    details = exc.details or {}
    errors = details.get("writeErrors", [])
    if details.get("writeConcernErrors") or any(
        error.get("code") != DUPLICATE_KEY for error in errors
    ):
        raise exc

    return int(details.get("nMatched", 0))


@attrs.define
class Server:
    """What a server was found to refuse, so as not to ask again."""

    #: Whether it takes ``$unionWith``
    union: bool = True


#: A pipeline to run on another collection, beside a pipeline here
Union = tuple["Collection", Sequence[Mapping[str, Any]]]


class ChangeStream(Protocol):
    """What the broker uses of a change stream."""

    @property
    def alive(self) -> bool: ...

    @property
    def resume_token(self) -> Mapping[str, Any] | None: ...

    async def try_next(self) -> Document | None: ...

    async def close(self) -> None: ...


class _Stream:
    """A client's change stream, its calls to the server made through insulated()."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    @property
    def alive(self) -> bool:
        return bool(self._raw.alive)

    @property
    def resume_token(self) -> Mapping[str, Any] | None:
        return cast(Mapping[str, Any] | None, self._raw.resume_token)

    async def try_next(self) -> Document | None:
        return cast(Document | None, await insulated(self._raw.try_next()))

    async def close(self) -> None:
        await insulated(_resolved(self._raw.close()))


class Collection:
    """
    One collection, with the calls the store and the broker make on it.

    Reads return whole lists (the store never streams a cursor); every call is one
    round trip (a read of many documents may take a ``getMore`` or two), made through
    :func:`insulated`.
    """

    def __init__(self, raw: Any, server: Server | None = None) -> None:
        #: The client's own collection object
        self.raw = raw
        #: What the server can do, as learnt so far (shared by the client's
        #: collections)
        self.server = server or Server()

    @property
    def name(self) -> str:
        return str(self.raw.name)

    async def find(
        self,
        query: Mapping[str, Any],
        projection: Mapping[str, Any] | None = None,
        *,
        sort: Sequence[tuple[str, int]] | None = None,
        limit: int = 0,
    ) -> list[Document]:
        options: dict[str, Any] = {"sort": sort} if sort else {}
        if limit:
            options["limit"] = limit

        cursor = self.raw.find(query, projection, **options)
        return list(await insulated(cursor.to_list(None)))

    async def find_one(
        self,
        query: Mapping[str, Any],
        projection: Mapping[str, Any] | None = None,
        *,
        sort: Sequence[tuple[str, int]] | None = None,
    ) -> Document | None:
        options: dict[str, Any] = {"sort": sort} if sort else {}
        found = await insulated(self.raw.find_one(query, projection, **options))
        return cast(Document | None, found)

    async def aggregate(self, pipeline: Sequence[Mapping[str, Any]]) -> list[Document]:
        async def run() -> list[Document]:
            cursor = await _resolved(self.raw.aggregate(pipeline))
            return list(await cursor.to_list(None))

        return await insulated(run())

    async def aggregate_with(
        self, pipeline: Sequence[Mapping[str, Any]], *others: Union
    ) -> list[list[Document]]:
        """
        Run a pipeline here and one on each other collection; return the outputs.

        One round trip where the server has ``$unionWith`` (MongoDB 4.4 and later);
        where it refuses it (Amazon DocumentDB before 8.0.3, say), one for each
        pipeline, from then on.
        """
        if self.server.union:
            unions = [
                {
                    "$unionWith": {
                        "coll": other.name,
                        "pipeline": [*stages, {"$addFields": {_UNION: number}}],
                    }
                }
                for number, (other, stages) in enumerate(others, 1)
            ]
            try:
                # The first pipeline's documents are marked too: a stored field of
                # that name must not say where a document came from
                first = {"$addFields": {_UNION: 0}}
                documents = await self.aggregate([*pipeline, first, *unions])
            except OperationFailure as exc:
                if not _refuses_union(exc):
                    raise

                self.server.union = False
            else:
                outputs: list[list[Document]] = [[] for _ in range(len(others) + 1)]
                for document in documents:
                    outputs[document.pop(_UNION, 0)].append(document)

                return outputs

        return await self._separately(pipeline, others)

    async def _separately(
        self, pipeline: Sequence[Mapping[str, Any]], others: Sequence[Union]
    ) -> list[list[Document]]:
        outputs = [await self.aggregate(pipeline)]
        for other, stages in others:
            outputs.append(await other.aggregate(stages))

        return outputs

    async def count_documents(self, query: Mapping[str, Any]) -> int:
        return int(await insulated(self.raw.count_documents(query)))

    async def estimated_document_count(self) -> int:
        """Return the number of documents from the collection's metadata (no scan)."""
        return int(await insulated(self.raw.estimated_document_count()))

    async def distinct(self, key: str, query: Mapping[str, Any]) -> list[Any]:
        return list(await insulated(self.raw.distinct(key, query)))

    async def insert_one(self, document: Mapping[str, Any]) -> None:
        await insulated(self.raw.insert_one(document))

    async def update_one(
        self,
        query: Mapping[str, Any],
        update: Mapping[str, Any],
        *,
        upsert: bool = False,
    ) -> UpdateResult:
        result = await insulated(self.raw.update_one(query, update, upsert=upsert))
        return cast(UpdateResult, result)

    async def update_many(
        self, query: Mapping[str, Any], update: Mapping[str, Any]
    ) -> UpdateResult:
        return cast(UpdateResult, await insulated(self.raw.update_many(query, update)))

    async def delete_one(self, query: Mapping[str, Any]) -> DeleteResult:
        return cast(DeleteResult, await insulated(self.raw.delete_one(query)))

    async def delete_many(self, query: Mapping[str, Any]) -> DeleteResult:
        return cast(DeleteResult, await insulated(self.raw.delete_many(query)))

    async def find_one_and_replace(
        self, query: Mapping[str, Any], replacement: Mapping[str, Any]
    ) -> Document | None:
        """Replace (or insert) a document; return the one it replaced, if any."""
        call = self.raw.find_one_and_replace(query, replacement, upsert=True)
        return cast(Document | None, await insulated(call))

    async def update_each(self, updates: Sequence[Update]) -> int:
        """
        Apply each conditional update to the one document it matches, if any.

        The updates go in one unordered bulk write. Return how many matched: an update
        that fails on a duplicate key (a unique slot taken meanwhile) counts as not
        matched. A write concern error raises, even though the updates were applied:
        they are not confirmed, and repeating them is how the store settles that.
        """
        if not updates:
            return 0

        if len(updates) == 1:  # the driver's update command costs less than a bulk
            [update] = updates
            call = self.raw.update_one(update.query, update.change)
            try:
                outcome = await insulated(call)
            except DuplicateKeyError:
                return 0

            return int(outcome.matched_count)

        requests = [UpdateOne(update.query, update.change) for update in updates]
        try:
            call = self.raw.bulk_write(requests, ordered=False)
            result: BulkWriteResult = await insulated(call)
        except BulkWriteError as exc:
            return _matched_despite(exc)

        return result.matched_count

    async def drop(self) -> None:
        await insulated(self.raw.drop())

    async def list_indexes(self) -> list[Document]:
        """Return the collection's index descriptions (none if it does not exist)."""

        async def run() -> list[Document]:
            cursor = await _resolved(self.raw.list_indexes())
            return list(await cursor.to_list(None))

        return await insulated(run())

    async def create_indexes(self, models: Sequence[IndexModel]) -> None:
        await insulated(self.raw.create_indexes(models))

    async def drop_index(self, name: str) -> None:
        await insulated(self.raw.drop_index(name))

    async def change_ttl(self, index: str, seconds: int) -> bool:
        """
        Give a time-to-live index a new expiry in place; tell whether it worked.

        :raises pymongo.errors.OperationFailure: if the server failed otherwise than
            by refusing the command
        """
        command = {
            "collMod": self.name,
            "index": {"name": index, "expireAfterSeconds": seconds},
        }
        await insulated(self.raw.database.command(command))
        return True

    async def watch(
        self,
        pipeline: Sequence[Mapping[str, Any]],
        resume_after: Mapping[str, Any] | None,
        start_after: Mapping[str, Any] | None,
    ) -> ChangeStream:
        opened = self.raw.watch(
            pipeline, resume_after=resume_after, start_after=start_after
        )
        return _Stream(await insulated(_resolved(opened)))


#: The server's code for dropping an index that does not exist
INDEX_NOT_FOUND = 27


class _MongomockCollection(Collection):
    """A mongomock-motor collection: updates one by one, no ``collMod``."""

    @override
    async def update_each(self, updates: Sequence[Update]) -> int:
        # Its bulk_write() cannot take pymongo's current UpdateOne
        matched = 0
        for update in updates:
            try:
                outcome = await self.raw.update_one(update.query, update.change)
            except DuplicateKeyError:
                continue

            matched += outcome.matched_count

        return matched

    @override
    async def change_ttl(self, index: str, seconds: int) -> bool:
        return False  # it has no collMod

    @override
    async def drop_index(self, name: str) -> None:
        # It lists no partialFilterExpression, so every start finds a partial index
        # changed and builds it again; two stores starting at once then both drop
        # it, and it says the second drop failed without the server's code
        try:
            await super().drop_index(name)
        except OperationFailure as exc:
            if exc.code is None and "index not found" in str(exc):
                raise OperationFailure(str(exc), code=INDEX_NOT_FOUND) from exc

            raise

    @override
    async def aggregate_with(
        self, pipeline: Sequence[Mapping[str, Any]], *others: Union
    ) -> list[list[Document]]:
        return await self._separately(pipeline, others)  # it has no $unionWith


class Adapter:
    """What differs between the kinds of client: chosen once per store or broker."""

    collection_class: type[Collection] = Collection
    #: Whether the client decodes BSON (an in-process fake stores Python objects)
    decodes_bson = True

    def __init__(self, client: Any) -> None:
        self.client = client
        self.server = Server()

    def collection(
        self, database: str, name: str, *, majority: bool = False
    ) -> Collection:
        """
        Return a collection for the store's or the broker's own use.

        Its writes wait for a majority (:data:`MAJORITY`), unless the client sets a
        write concern of its own (then that one holds; with ``majority``, it never
        does), and its reads go to the primary, whatever the client's read
        preference: the store reads back its own claims, which a secondary may not
        have yet.
        """
        options: dict[str, Any] = {"read_preference": ReadPreference.PRIMARY}
        if majority or self.write_concern().is_server_default:
            options["write_concern"] = MAJORITY

        db = self.client[database]
        if self.decodes_bson:
            # A date outside Python's range (anyone who can write the database can
            # store one) is read as a DatetimeMS, not raised as InvalidBSON from
            # inside the driver, which no caller could skip past
            options["codec_options"] = db.codec_options.with_options(
                datetime_conversion=DatetimeConversion.DATETIME_AUTO
            )

        raw = db.get_collection(name, **options)
        return self.collection_class(raw, self.server)

    def write_concern(self) -> WriteConcern:
        return cast(WriteConcern, self.client.write_concern)

    async def collection_names(self, database: str) -> list[str]:
        return list(await insulated(self.client[database].list_collection_names()))

    async def command(
        self, database: str, command: str | Mapping[str, Any]
    ) -> Document | None:
        """Run a command (its name, or the command document); ``None`` where the
        client has no server."""
        return cast(Document, await insulated(self.client[database].command(command)))

    def server_descriptions(self) -> dict[tuple[str, int | None], Any]:
        """Return what the client knows of each server, by address."""
        descriptions = self.client.topology_description.server_descriptions()
        return cast(dict[tuple[str, int | None], Any], descriptions)

    def hosts(self) -> list[str]:
        return [f"{host}:{port}" for host, port in self.server_descriptions()]

    async def close(self) -> None:
        await _resolved(self.client.close())


class _MotorAdapter(Adapter):
    @override
    def server_descriptions(self) -> dict[tuple[str, int | None], Any]:
        descriptions = self.client.delegate.topology_description.server_descriptions()
        return cast(dict[tuple[str, int | None], Any], descriptions)


class _MongomockAdapter(_MotorAdapter):
    """mongomock-motor: no server commands, no topology, no write concerns."""

    collection_class = _MongomockCollection
    decodes_bson = False

    @override
    def write_concern(self) -> WriteConcern:
        return WriteConcern()  # it answers every attribute with a database

    @override
    async def command(
        self, database: str, command: str | Mapping[str, Any]
    ) -> Document | None:
        return None

    @override
    def server_descriptions(self) -> dict[tuple[str, int | None], Any]:
        return {}

    @override
    def hosts(self) -> list[str]:
        return ["mongomock"]


def motor_client_class() -> type | None:
    try:
        from motor.motor_asyncio import AsyncIOMotorClient
    except ImportError:
        return None

    return cast(type, AsyncIOMotorClient)


def _is_mongomock(client: object) -> bool:
    return any(
        cls.__module__.startswith("mongomock_motor") for cls in type(client).__mro__
    )


def adapter_for(client: object) -> Adapter:
    """Return the adapter for a client accepted by ``validate_client_or_uri``."""
    if isinstance(client, AsyncMongoClient):
        return Adapter(client)

    if _is_mongomock(client):
        return _MongomockAdapter(client)

    return _MotorAdapter(client)
