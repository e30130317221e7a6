"""The ``apscheduler-mongo`` command line: its options, commands and exit statuses."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from apscheduler import AsyncScheduler, RetrySettings, ScheduleLookupError
from apscheduler.abc import EventBroker, Serializer
from apscheduler.eventbrokers.local import LocalEventBroker
from pymongo.errors import PyMongoError
from tenacity import stop_after_delay, wait_exponential

from .._adapters import adapter_for
from .._client import open_client, redact, server_errors, validate_client_or_uri
from .._datastore import MongoDBDataStore
from .._eventbroker import MongoDBEventBroker
from .._names import validate_database_name
from . import actions
from .actions import NotFoundError, innermost
from .status import Reader, format_table, gather_status, render_json, render_text

if TYPE_CHECKING:
    #: What add_subparsers() returns
    _Commands = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_SERVER = 3

_EPILOG = """\
exit statuses:
  0  success
  1  not found: no such schedule (or it is quarantined, or cannot be read
     here), or the database holds no store
  2  usage or configuration error: a bad option, a missing or malformed URI,
     a bad database name
  3  the server could not be reached within --timeout, or it refused or
     failed a request (authentication, permissions, an incompatible server)

environment:
  MONGODB_URI  the default of --uri
"""


class _HelpFormatter(argparse.HelpFormatter):
    """Wrap descriptions as usual, but keep the epilog (a table) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text is _EPILOG:
            return "".join(indent + line for line in text.splitlines(keepends=True))

        return super()._fill_text(text, width, indent)


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")

    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")

    return value


def _add_connection(
    parser: argparse.ArgumentParser, database: str, database_help: str
) -> None:
    """Add ``--uri`` and ``--database`` (defaulting to ``database``) to ``parser``."""
    parser.add_argument(
        "--uri",
        default=os.environ.get("MONGODB_URI"),
        help="MongoDB URI (default: the MONGODB_URI environment variable)",
    )
    parser.add_argument(
        "--database",
        default=database,
        help=f"{database_help} (default: %(default)s)",
    )


def _store_options() -> argparse.ArgumentParser:
    """Return the options that every command on a store takes."""
    options = argparse.ArgumentParser(add_help=False)
    _add_connection(options, "apscheduler", "database of the store")
    options.add_argument(
        "--serializer",
        choices=("pickle", "cbor", "json"),
        default="pickle",
        help="the serializer the store was configured with (default: %(default)s)",
    )
    options.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="give up (exit status 3) if the command has not finished by then, "
        "retrying temporary failures until then (default: %(default)g)",
    )
    return options


def _announcing_options() -> argparse.ArgumentParser:
    """Return the options of the commands that announce their changes."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--events-collection",
        default="events",
        metavar="NAME",
        help="collection of the MongoDBEventBroker that the schedulers use, through "
        "which the change is announced to them (default: %(default)s)",
    )
    return options


def _add_demo(commands: _Commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="run a scheduler on the MongoDB store for a few seconds",
        description=(
            "Start an AsyncScheduler on MongoDBDataStore, run two interval schedules "
            "for a few seconds and print what ran and when. Uses --uri or "
            "MONGODB_URI; without either, an in-process mongomock-motor database. "
            "The demo database is emptied first."
        ),
    )
    _add_connection(demo, "apscheduler_demo", "database to use; it is emptied first")
    demo.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="how long to run the schedules (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the whole command line."""
    parser = argparse.ArgumentParser(
        prog="apscheduler-mongo",
        description="Tools for the MongoDB backends of APScheduler 4: a demo, and "
        "commands to inspect and operate a store that schedulers are using.",
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
    store, announcing = _store_options(), _announcing_options()

    def add(
        name: str, summary: str, description: str, *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=_EPILOG,
            parents=[store, *parents],
            formatter_class=_HelpFormatter,
        )

    status = add(
        "status",
        "show tasks, schedules, jobs and recent results",
        "Show the store's tasks (with their running jobs), schedules (next fire "
        "time, paused, lease owner and expiry, quarantine), queued jobs per task, "
        "running jobs (owner and lease expiry) and the newest finished jobs. Reads "
        "only; schedules this process cannot deserialize are listed as such.",
    )
    status.add_argument(
        "--limit",
        type=_count,
        default=10,
        help="how many of the newest finished jobs to show (default: %(default)s)",
    )
    status.add_argument(
        "--json", action="store_true", help="print JSON instead of tables"
    )
    pause = add(
        "pause",
        "pause a schedule",
        "Pause a schedule, as AsyncScheduler.pause_schedule() does: no scheduler "
        "starts jobs for it until it is resumed. Announced through the event broker.",
        announcing,
    )
    pause.add_argument("schedule_id", metavar="SCHEDULE_ID", help="the schedule's id")
    resume = add(
        "resume",
        "resume a paused schedule",
        "Resume a paused schedule, as AsyncScheduler.unpause_schedule() does, and "
        "wake the schedulers through the event broker. By default the schedule "
        "resumes where it left off: fire times missed while paused are handled by "
        "its coalescing and misfire grace time settings.",
        announcing,
    )
    resume.add_argument("schedule_id", metavar="SCHEDULE_ID", help="the schedule's id")
    resume.add_argument(
        "--now",
        action="store_true",
        help="skip the fire times that passed while paused",
    )
    remove = add(
        "remove",
        "remove a schedule",
        "Remove a schedule (also one that is quarantined or cannot be read). Its "
        "queued jobs stay queued.",
        announcing,
    )
    remove.add_argument("schedule_id", metavar="SCHEDULE_ID", help="the schedule's id")
    add(
        "purge",
        "run the store's cleanup now",
        "Run the store's cleanup, which the schedulers also run every "
        "cleanup_interval: delete expired results, finish jobs whose lease lapsed "
        "(outcome: abandoned), remove finished schedules that have no jobs left, and "
        "forget fire times that their schedules have moved past. Prints the counts "
        "before and after.",
        announcing,
    )
    dashboard = add(
        "dashboard",
        "serve the live web dashboard",
        "Serve the web dashboard of the store (the 'dashboard' extra): tasks, "
        "schedules, jobs and results, updated live through the event broker. It "
        "has no login: it listens on 127.0.0.1 unless --host says otherwise. "
        "--timeout applies to each request.",
        announcing,
    )
    dashboard.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default: %(default)s, this host only)",
    )
    dashboard.add_argument(
        "--port", type=int, default=8765, help="the port (default: %(default)s)"
    )
    dashboard.add_argument(
        "--actions",
        action="store_true",
        help="allow pausing, resuming and removing schedules and purging",
    )
    return parser


def _fail(status: int, message: str) -> int:
    """Write one line, without credentials, to stderr; return ``status``."""
    line = " ".join(redact(message).split())
    sys.stderr.write(f"error: {line}\n")
    return status


def _not_a_retry(record: logging.LogRecord) -> bool:
    """Tell whether a record is not one of the retries' "attempt N failed" warnings."""
    # The command's own error says why the last attempt failed, in one line
    return not str(record.msg).startswith("Temporary MongoDB error")


def _stderr_logger() -> logging.Logger:
    """Return a logger, private to this run, that writes warnings to stderr."""
    logger = logging.Logger("apscheduler_mongo.cli", logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.addFilter(_not_a_retry)
    logger.addHandler(handler)
    return logger


def _serializer(name: str) -> Serializer:
    if name == "cbor":
        from apscheduler.serializers.cbor import CBORSerializer

        return CBORSerializer()

    if name == "json":
        from apscheduler.serializers.json import JSONSerializer

        return JSONSerializer()

    from apscheduler.serializers.pickle import PickleSerializer

    return PickleSerializer()


def _scheduler(
    args: argparse.Namespace,
    client: object,
    settings: RetrySettings,
    logger: logging.Logger,
) -> AsyncScheduler:
    """
    Return a scheduler (never started) on the store, for its API.

    Commands that change something announce it through a :class:`MongoDBEventBroker`
    on the same database, so that schedulers in other processes see it at once (one
    whose schedules are all paused sleeps until an event wakes it); ``status`` uses a
    local broker, which writes nothing.

    :raises ValueError: if an option has a bad value
    """
    store = MongoDBDataStore(
        client,
        database=validate_database_name(args.database),
        serializer=_serializer(args.serializer),
        retry_settings=settings,
    )
    broker: EventBroker = LocalEventBroker()
    if args.command != "status":
        # Polling, and seldom: it only publishes (a change stream needs privileges)
        broker = MongoDBEventBroker(
            client,
            database=args.database,
            collection=args.events_collection,
            retry_settings=settings,
            mode="polling",
            poll_interval=3600,
        )

    return AsyncScheduler(store, broker, logger=logger)


@asynccontextmanager
async def _opened(scheduler: AsyncScheduler, reader: Reader) -> AsyncIterator[None]:
    """Start the scheduler's store and broker, if the database holds a store."""
    names = set(await reader.collection_names())
    if not names & {"schedules", "jobs"}:
        raise NotFoundError(
            f"database {reader.database_name!r} holds no store (it has no "
            f"'schedules' or 'jobs' collection); is --database right?"
        )

    async with scheduler:
        yield


def _say(line: str) -> None:
    sys.stdout.write(f"{line}\n")


async def _status(
    args: argparse.Namespace, scheduler: AsyncScheduler, reader: Reader
) -> int:
    status = await gather_status(scheduler.data_store, reader, args.limit)
    sys.stdout.write(render_json(status) if args.json else render_text(status))
    return EXIT_OK


async def _change_schedule(
    args: argparse.Namespace, scheduler: AsyncScheduler, reader: Reader
) -> int:
    """Pause, resume or remove the schedule ``args`` names; say what was done."""
    schedule_id = args.schedule_id
    if args.command == "pause":
        said = await actions.pause(scheduler, reader, schedule_id)
    elif args.command == "resume":
        said = await actions.resume(scheduler, reader, schedule_id, now=args.now)
    else:
        said = await actions.remove(scheduler, reader, schedule_id)

    _say(said)
    return EXIT_OK


async def _purge(
    _args: argparse.Namespace, scheduler: AsyncScheduler, reader: Reader
) -> int:
    purged = await actions.purge(scheduler, reader)
    rows = [[name, str(old), str(new)] for name, old, new in purged.counts]
    _say("ran the store's cleanup")
    _say(format_table(["", "BEFORE", "AFTER"], rows, right=(1, 2)))
    return EXIT_OK


Command = Callable[[argparse.Namespace, AsyncScheduler, Reader], Awaitable[int]]
_COMMANDS: dict[str, Command] = {
    "status": _status,
    "pause": _change_schedule,
    "resume": _change_schedule,
    "remove": _change_schedule,
    "purge": _purge,
}


async def run_command(args: argparse.Namespace, client: object) -> int:
    """
    Run a store command (any but ``demo``) on ``client``; return the exit status.

    This is the seam for tests, which pass a mongomock-motor client.
    """
    logger = _stderr_logger()
    settings = RetrySettings(
        stop=stop_after_delay(args.timeout),
        wait=wait_exponential(multiplier=0.25, max=2),
    )
    try:
        scheduler = _scheduler(args, client, settings, logger)
    except (TypeError, ValueError) as exc:
        return _fail(EXIT_USAGE, str(exc))

    adapter = adapter_for(client)
    reader = Reader(adapter, args.database, settings, logger)
    changes = args.command != "status"
    try:
        with anyio.fail_after(args.timeout):
            async with _opened(scheduler, reader):
                return await _COMMANDS[args.command](args, scheduler, reader)
    except TimeoutError:
        hosts = ", ".join(adapter.hosts())
        errors = server_errors(adapter)  # each names its server
        met = f" ({'; '.join(errors)})" if errors else ""
        outcome = " (the change may or may not have been made)" if changes else ""
        return _fail(
            EXIT_SERVER,
            f"no answer from MongoDB at {hosts} within {args.timeout:g} s"
            f"{met}{outcome}",
        )
    except Exception as exc:
        error = innermost(exc)
        if isinstance(error, (NotFoundError, ScheduleLookupError)):
            return _fail(EXIT_NOT_FOUND, str(error))

        if isinstance(error, (PyMongoError, RuntimeError)):
            return _fail(EXIT_SERVER, str(error))

        raise


async def _run_on_uri(args: argparse.Namespace) -> int:
    async with AsyncExitStack() as exit_stack:
        try:
            adapter = await open_client(args.uri, exit_stack)
        except PyMongoError as exc:
            return _fail(EXIT_SERVER, str(exc))

        return await run_command(args, adapter.client)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        ran = anyio.run(run_demo, args.uri, args.database, args.seconds)
    except (TypeError, ValueError, RuntimeError) as exc:
        return _fail(EXIT_USAGE, str(exc))

    return 0 if ran > 0 else 1


def _dashboard(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..dashboard import Dashboard
    except ImportError as exc:
        return _fail(EXIT_USAGE, str(exc))

    try:
        app = Dashboard(
            args.uri,
            database=args.database,
            serializer=_serializer(args.serializer),
            events_collection=args.events_collection,
            actions=args.actions,
            timeout=args.timeout,
        )
    except (TypeError, ValueError) as exc:
        return _fail(EXIT_USAGE, str(exc))

    loopback = args.host in ("127.0.0.1", "::1", "localhost")
    where = f"[{args.host}]" if ":" in args.host else args.host
    sys.stderr.write(
        f"Dashboard of database {args.database!r} on http://{where}:{args.port}/ "
        f"(actions {'on' if args.actions else 'off'}). It has no login: "
        + (
            "it listens on this host only.\n"
            if loopback
            else "anyone who can reach this address can see the store"
            + (" and change it" if args.actions else "")
            + "; put it behind an authenticating proxy.\n"
        )
    )
    sys.stderr.flush()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=3,
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)

    if not args.uri:
        return _fail(EXIT_USAGE, "no MongoDB URI: pass --uri, or set MONGODB_URI")

    try:
        validate_client_or_uri(args.uri)
    except (TypeError, ValueError) as exc:
        return _fail(EXIT_USAGE, str(exc).replace("client_or_uri", "--uri"))

    if args.command == "dashboard":
        return _dashboard(args)

    return anyio.run(_run_on_uri, args)
