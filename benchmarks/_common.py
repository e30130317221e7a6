"""
What the benchmark scripts share: the server, command counting, opening the stores.

The scripts run as ``python benchmarks/NAME.py``, so this directory is on
``sys.path`` and they import this module as ``_common``; worker processes started
with the "spawn" method inherit that path and import it the same way.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any, Literal

from apscheduler.abc import DataStore
from apscheduler.datastores.mongodb import MongoDBDataStore as BuiltinDataStore
from apscheduler.eventbrokers.local import LocalEventBroker
from pymongo import AsyncMongoClient, MongoClient, monitoring
from pymongo.client_session import ClientSession

from apscheduler_mongo import MongoDBDataStore

ROOT = Path(__file__).resolve().parents[1]

StoreKind = Literal["builtin", "ours"]
STORE_KINDS: tuple[StoreKind, ...] = ("builtin", "ours")
STORE_NAMES: dict[StoreKind, str] = {
    "builtin": "built-in (apscheduler.datastores.mongodb)",
    "ours": "ours (apscheduler_mongo)",
}
#: Commands that are about the connection, not about the operation measured
_HOUSEKEEPING = frozenset({"hello", "ismaster", "isMaster", "endSessions"})


@contextmanager
def server_uri() -> Iterator[str]:
    """
    Yield ``MONGODB_URI`` if set, else the URI of a mongoeco server on 127.0.0.1.

    The mongoeco server is the one the test suite uses
    (``tests/support/servers.py``), started for the duration of the ``with`` block.
    """
    if uri := os.environ.get("MONGODB_URI"):
        yield uri
        return

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    from tests.support.servers import mongoeco_server, wire_python

    if wire_python() is None:
        raise SystemExit(
            "set MONGODB_URI, or make a Python >= 3.13 with mongoeco[wire] installed "
            "findable (see tests/support/servers.py) so that a local mongoeco server "
            "can be started"
        )

    with mongoeco_server() as uri:
        yield uri


def describe_server(uri: str) -> str:
    """Describe the server for the report, without the URI's credentials."""
    if os.environ.get("MONGODB_URI"):
        return "the server at MONGODB_URI"

    return f"a mongoeco wire server on {uri.split('//')[1].split('/')[0]}"


class CommandCounter(monitoring.CommandListener):
    """
    Count the commands a client sends, by command name and collection.

    Register it with ``event_listeners=[counter]`` on the client; ``take()`` returns
    what was counted since the previous call. The listener may be called from other
    threads (the built-in store runs its synchronous client in worker threads), but
    ``take()`` is only called once the operation measured has returned.
    """

    def __init__(self) -> None:
        self.commands: list[tuple[str, str]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        if name in _HOUSEKEEPING:
            return

        target = event.command.get(name)
        if name == "getMore":
            target = event.command.get("collection")

        collection = target if isinstance(target, str) else ""
        self.commands.append((name, collection))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def take(self) -> list[tuple[str, str]]:
        """Return the commands sent since the last call, in order, and forget them."""
        taken, self.commands = self.commands, []
        return taken


def summarize(commands: Sequence[tuple[str, str]]) -> str:
    """Describe commands as ``"find jobs 1, update jobs 2"``, sorted."""
    counts = Counter(f"{name} {collection}".strip() for name, collection in commands)
    return ", ".join(f"{what} {n}" for what, n in sorted(counts.items()))


class BuildInfoClient(MongoClient[dict[str, Any]]):
    """
    A :class:`pymongo.MongoClient` whose ``server_info()`` sends ``buildInfo``.

    pymongo's own sends the lower-case alias ``buildinfo``, which MongoDB accepts but
    the mongoeco wire server rejects ("unsupported wire command: buildinfo"); the
    built-in store calls ``server_info()`` in ``start()`` to check the version, so
    without this it cannot start against mongoeco. Both spellings run the same command
    on a real server.
    """

    def server_info(self, session: ClientSession | None = None) -> dict[str, Any]:
        return dict(self.admin.command("buildInfo", session=session))


async def start_store(
    kind: StoreKind,
    uri: str,
    database: str,
    exit_stack: AsyncExitStack,
    *,
    listener: CommandCounter | None = None,
    fresh: bool = False,
) -> DataStore:
    """
    Start one of the two stores on ``database``, with a client of its own.

    :param kind: ``"builtin"`` for APScheduler's store on a synchronous
        ``MongoClient``, ``"ours"`` for ours on an ``AsyncMongoClient``
    :param listener: a command listener to register on the store's client
    :param fresh: empty the store's collections first (``start_from_scratch``)
    """
    logger = logging.getLogger(f"bench.{kind}")
    broker = LocalEventBroker()
    await broker.start(exit_stack, logger)
    listeners = [] if listener is None else [listener]
    store: DataStore
    if kind == "ours":
        client: AsyncMongoClient[Any] = AsyncMongoClient(uri, event_listeners=listeners)
        exit_stack.push_async_callback(client.close)
        store = MongoDBDataStore(client, database=database, start_from_scratch=fresh)
    else:
        sync_client = BuildInfoClient(uri, event_listeners=listeners)
        exit_stack.callback(sync_client.close)
        store = BuiltinDataStore(
            sync_client, database=database, start_from_scratch=fresh
        )

    await store.start(exit_stack, broker, logger)
    return store


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the value at ``fraction`` (0 to 1) of the sorted ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]
