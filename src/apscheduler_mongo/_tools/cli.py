"""The ``apscheduler-mongo`` command line: its options, commands and exit statuses."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from functools import partial
from typing import IO, TYPE_CHECKING, Any, cast

import anyio
import anyio.to_thread
import attrs
from apscheduler import (
    AsyncScheduler,
    DeserializationError,
    RetrySettings,
    ScheduleLookupError,
    SerializationError,
)
from apscheduler.abc import DataStore, Serializer
from apscheduler.eventbrokers.local import LocalEventBroker
from pymongo.errors import PyMongoError
from tenacity import stop_after_delay, wait_exponential

from .. import _layout as layout
from .._adapters import Adapter, adapter_for
from .._client import (
    describe_hosts,
    open_client,
    redact,
    server_errors,
    validate_client_or_uri,
)
from .._datastore import MongoDBDataStore
from .._export import (
    SERIALIZERS,
    Counts,
    ExportContents,
    ExportFileError,
    ImportReport,
    export_store,
    import_contents,
    read_export,
    safe_serializer,
)
from .._names import validate_database_name
from .._retry import retrying
from .._signing import AllowedCallables, Signer, keys_from_environment
from ..migration import check_v3_source
from . import actions, import_v3
from .actions import innermost
from .doctor import diagnose
from .doctor import render_json as render_doctor_json
from .doctor import render_text as render_doctor_text
from .signing import StoreSigner
from .status import (
    NotFoundError,
    Reader,
    format_table,
    gather_status,
    render_json,
    render_text,
    require_store,
)

if TYPE_CHECKING:
    #: What add_subparsers() returns
    _Commands = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_SERVER = 3
EXIT_UNHEALTHY = 4
EXIT_REFUSED = 5
EXIT_INTERRUPTED = 130

_EPILOG = """\
exit statuses:
  0    success
  1    not found: no such schedule (or it is quarantined, or cannot be read
       here), or the database holds no store; for sign, parts left unsigned;
       for export, records the store could not read (left out of the file);
       for import, records skipped (each listed); for import-v3, jobs that
       could not be converted (each listed, with why)
  2    usage or configuration error: a bad option, a missing or malformed URI,
       a bad database name, a demo database that holds a store
  3    the server could not be reached within --timeout, or it refused or
       failed a request (authentication, permissions, an incompatible server)
  4    doctor: a check failed (with --strict, or warned)
  5    import: the file was refused (another format, malformed, a signature
       that does not match, a class not allowed); nothing was written
  130  interrupted (Ctrl-C); a change may or may not have been made

environment:
  MONGODB_URI  the default of --uri; put a URI with a password here rather
               than in --uri, which other users of this host can see
  APSCHEDULER_MONGO_SIGNING_KEY
               the store's signing key(s), separated by commas, the first one
               signing (the default of --key-file)
  APSCHEDULER3_MONGODB_URI
               import-v3: the default of --from-uri
"""
#: How many of the parts ``sign`` left without a signature it names
_LISTED = 20
#: The largest number MongoDB takes as a limit (a signed 64-bit integer)
_MAX_LIMIT = 2**63 - 1


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


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number, not {text!r}"
        ) from None


def _count(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")

    if value > _MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be at most {_MAX_LIMIT}, not {text}")

    return value


def _port(text: str) -> int:
    value = _whole_number(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 1 to 65535, not {text}")

    return value


def _add_connection(
    parser: argparse.ArgumentParser, database: str, database_help: str
) -> None:
    """Add ``--uri`` and ``--database`` (defaulting to ``database``) to ``parser``."""
    parser.add_argument(
        "--uri",
        help="MongoDB URI (default: the MONGODB_URI environment variable, the place "
        "for a URI with a password: a command line is visible to other users)",
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
        "--timeout",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="give up (exit status 3) if the command has not finished by then, "
        "retrying temporary failures until then (default: %(default)g)",
    )
    return options


def _key_options(options: argparse.ArgumentParser) -> None:
    """Add ``--key-file`` to ``options`` (the keys never come on the command line)."""
    options.add_argument(
        "--key-file",
        metavar="PATH",
        help="a file holding the store's signing key(s), separated by commas or "
        "lines, the first one signing (default: the APSCHEDULER_MONGO_SIGNING_KEY "
        "environment variable; never give a key itself on the command line)",
    )


def _changing_options() -> argparse.ArgumentParser:
    """Return the options of the commands that change the store through its API."""
    options = argparse.ArgumentParser(add_help=False)
    _key_options(options)
    options.add_argument(
        "--accept-unsigned",
        action="store_true",
        help="as the store's accept_unsigned: while signing is being rolled out, "
        "also read documents that carry no signature",
    )
    options.add_argument(
        "--serializer",
        choices=("pickle", "cbor", "json"),
        default="pickle",
        help="the serializer the store was configured with, to read the schedule "
        "to change (default: %(default)s)",
    )
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
            "The demo database is emptied first; one that holds a store is refused "
            "unless --overwrite is given."
        ),
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    _add_connection(demo, "apscheduler_demo", "database to use; it is emptied first")
    demo.add_argument(
        "--seconds",
        type=_positive_seconds,
        default=5.0,
        help="how long to run the schedules (default: %(default)s)",
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="empty the database even if it holds a store (its tasks, schedules "
        "and jobs are lost)",
    )


def _transfer_options(serializer_help: str) -> argparse.ArgumentParser:
    """Return the options of ``export`` and ``import`` on the store and its values."""
    options = argparse.ArgumentParser(add_help=False)
    _key_options(options)
    options.add_argument(
        "--accept-unsigned",
        action="store_true",
        help="as the store's accept_unsigned: while signing is being rolled out, "
        "also read documents that carry no signature",
    )
    options.add_argument(
        "--serializer",
        choices=SERIALIZERS,
        default="pickle",
        help=f"the serializer the store was configured with{serializer_help} "
        "(default: %(default)s)",
    )
    options.add_argument(
        "--allow-type",
        action="append",
        default=[],
        metavar="MODULE:QUALNAME",
        help="a class that arguments may hold, besides APScheduler's triggers and "
        "plain values: imported by this command because you name it; repeat it "
        "for more",
    )
    return options


def _add_transfers(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Declare ``export`` and ``import``."""
    export = add(
        "export",
        "write the store's tasks and schedules to a file",
        "Write the store's tasks and schedules (and, with --jobs, its queued and "
        "running jobs) to a JSON Lines file that 'import' reads back into any "
        "store: a backup, or a move to another database or cluster. With a key "
        "(--key-file or APSCHEDULER_MONGO_SIGNING_KEY) every line is signed. The "
        "store is read with the safe counterpart of --serializer, so no stored "
        "code runs: a class in arguments needs --allow-type. A record the store "
        "cannot read is left out, with a warning (exit status 1).",
        _transfer_options("; the file's values are written with it too"),
    )
    export.add_argument(
        "--output",
        metavar="FILE",
        help="the file to write, readable by its owner only; it replaces FILE once "
        "complete (default: standard output)",
    )
    export.add_argument(
        "--jobs", action="store_true", help="also export the queued and running jobs"
    )
    export.add_argument(
        "--builtin",
        action="store_true",
        help="read APScheduler's built-in MongoDB store "
        "(apscheduler.datastores.mongodb.MongoDBDataStore) in --database instead",
    )
    imports = add(
        "import",
        "add the tasks and schedules of an export file to the store",
        "Read a file that 'export' wrote and add its tasks, schedules and jobs to "
        "the store, announcing them through the event broker. The whole file is "
        "read and checked before anything is written; with a key, a file whose "
        "signatures do not match is refused, and so is an unsigned one (unless "
        "--trust-unsigned). Values are read with safe serializers, running no code "
        "the file names. What the store already has is left as it is (or, with "
        "--replace, replaced), so running it again adds nothing twice.",
        _transfer_options(", to write the records with"),
    )
    imports.add_argument(
        "file", metavar="FILE", help="the file to read ('-': standard input)"
    )
    imports.add_argument(
        "--replace",
        action="store_true",
        help="replace the tasks and schedules the store already has (jobs are "
        "never replaced)",
    )
    imports.add_argument(
        "--trust-unsigned",
        action="store_true",
        help="with a key, import an unsigned file all the same: it is then signed "
        "in the store, so do it only for a file whose origin you trust",
    )
    imports.add_argument(
        "--dry-run",
        action="store_true",
        help="read and check the file, and say what would be done, writing nothing",
    )
    imports.add_argument(
        "--events-collection",
        default="events",
        metavar="NAME",
        help="collection of the MongoDBEventBroker that the schedulers use, through "
        "which the import is announced to them (default: %(default)s)",
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
    store, changing = _store_options(), _changing_options()

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
        "running jobs (owner and lease expiry) and the newest finished jobs, with "
        "triggers, arguments and errors as text. Reads only, and deserializes "
        "nothing: no code stored in the database runs here.",
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
        changing,
    )
    pause.add_argument("schedule_id", metavar="SCHEDULE_ID", help="the schedule's id")
    resume = add(
        "resume",
        "resume a paused schedule",
        "Resume a paused schedule, as AsyncScheduler.unpause_schedule() does, and "
        "wake the schedulers through the event broker. By default the schedule "
        "resumes where it left off: fire times missed while paused are handled by "
        "its coalescing and misfire grace time settings.",
        changing,
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
        changing,
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
        changing,
    )
    sign = add(
        "sign",
        "sign the documents the store holds",
        "Sign again with the first key the task, schedule and job parts signed "
        "with another of the keys (after a rotation) and, with --adopt-unsigned, "
        "those that carry no signature (rolling signing out). Nothing is "
        "deserialized: parts are signed as stored. Adopting vouches for what the "
        "database holds now: do it only on a database you trust as it stands. A "
        "wrong signature, or a part left unsigned, is listed (exit status 1). "
        "Needs the key: --key-file or APSCHEDULER_MONGO_SIGNING_KEY.",
    )
    _key_options(sign)
    sign.add_argument(
        "--allow",
        action="append",
        default=None,
        metavar="PATTERN",
        help="an allowed callable ('module:qualname' or 'module:*'), as the "
        "store's allowed_callables; repeat it for more. Tasks outside are left "
        "unsigned and reported",
    )
    sign.add_argument(
        "--adopt-unsigned",
        action="store_true",
        help="also sign the parts that carry no signature (rolling signing out on a "
        "store that ran without a key); without it they are left alone and "
        "listed, since on a signed store they were written without the key",
    )
    sign.add_argument(
        "--dry-run",
        action="store_true",
        help="count what would be signed, and write nothing",
    )
    doctor = add(
        "doctor",
        "check that the deployment is set up right",
        "Check the server (version, topology), change streams, majority writes, "
        "the store's indexes, the live schedulers (gone quiet, clocks off), the "
        "oplog window, the user's privileges, signing, and sharding; each line "
        "says ok, warn, fail or unknown, and how to fix what is not ok. Exit "
        "status 4 when a check failed: use it as a health check. Writes one probe "
        "document (and deletes it) to check majority writes; deserializes nothing.",
    )
    doctor.add_argument(
        "--json", action="store_true", help="print JSON instead of a table"
    )
    doctor.add_argument(
        "--strict",
        action="store_true",
        help="count warnings as failures in the exit status",
    )
    doctor.add_argument(
        "--events-collection",
        default="events",
        metavar="NAME",
        help="collection of the MongoDBEventBroker (default: %(default)s)",
    )
    _add_transfers(add)
    import_v3.declare(
        add(
            "import-v3",
            "add the jobs of an APScheduler 3 MongoDBJobStore as schedules",
            import_v3.DESCRIPTION,
            _transfer_options(", to write the schedules with"),
        )
    )
    dashboard = add(
        "dashboard",
        "serve the live web dashboard",
        "Serve the web dashboard of the store (the 'dashboard' extra): tasks, "
        "schedules, jobs and results, updated live through the event broker. It "
        "has no login: it listens on 127.0.0.1 unless --host says otherwise. "
        "--timeout applies to each request. Showing the store deserializes "
        "nothing and writes nothing; --serializer is for the actions.",
        changing,
    )
    dashboard.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default: %(default)s, this host only)",
    )
    dashboard.add_argument(
        "--port",
        type=_port,
        default=8765,
        help="the port, from 1 to 65535 (default: %(default)s)",
    )
    dashboard.add_argument(
        "--root-path",
        default="",
        metavar="PATH",
        help="the path prefix under which a reverse proxy serves the dashboard "
        "(/ops/scheduler), put before every URL the page uses",
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


def _warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


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


def _has_password(uri: str) -> bool:
    """Tell whether a MongoDB URI carries a password (``user:password@``)."""
    authority = uri.partition("://")[2].partition("/")[0].partition("?")[0]
    userinfo = authority.rpartition("@")[0]
    return bool(userinfo.partition(":")[2])


def _uri(args: argparse.Namespace) -> str | None:
    """
    Return the URI to use: ``--uri``, else ``MONGODB_URI``.

    A password given in ``--uri`` is on the command line, which other users of this
    host can read (``ps``): that is warned about, without showing the password.
    """
    if args.uri is None:
        return os.environ.get("MONGODB_URI") or None

    if _has_password(args.uri):
        _warn(
            "the URI given with --uri carries a password, which other users of "
            "this host can read in the process list; set the MONGODB_URI "
            "environment variable instead"
        )

    return str(args.uri)


def _say(line: str) -> None:
    sys.stdout.write(f"{line}\n")


async def _status(args: argparse.Namespace, reader: Reader) -> int:
    status = await gather_status(reader, args.limit)
    sys.stdout.write(render_json(status) if args.json else render_text(status))
    return EXIT_OK


async def _doctor(args: argparse.Namespace, reader: Reader, adapter: Adapter) -> int:
    diagnosis = await diagnose(reader, adapter, args.events_collection)
    if args.json:
        sys.stdout.write(render_doctor_json(diagnosis, strict=args.strict))
    else:
        sys.stdout.write(render_doctor_text(diagnosis))

    return EXIT_OK if diagnosis.healthy(strict=args.strict) else EXIT_UNHEALTHY


def _signer(args: argparse.Namespace) -> Signer | None:
    """
    Return the signer of the keys in ``--key-file`` or the environment, if any.

    :raises OSError: if the key file cannot be read
    :raises ValueError: if a key is too short
    """
    keys = keys_from_environment(args.key_file)
    return None if keys is None else Signer(keys)


async def _sign(
    args: argparse.Namespace,
    reader: Reader,
    signer: Signer,
    allowed: AllowedCallables | None,
) -> int:
    """Sign the store's documents; say what was signed and what was left."""
    await require_store(reader)
    kinds = (layout.TASKS, layout.SCHEDULES, layout.JOBS)
    collections = {
        kind: reader.adapter.collection(reader.database_name, kind) for kind in kinds
    }
    retry = partial(retrying, reader.retry_settings, reader.logger)
    signing = StoreSigner(
        collections,
        signer,
        reader.database_name,
        retry,
        allowed,
        args.dry_run,
        args.adopt_unsigned,
    )
    report = await signing.run()
    would = "would sign" if args.dry_run else "signed"
    _say(
        f"{would} {report.signed} part(s) that carried no signature, and "
        f"{report.re_signed} signed with another key than the first; "
        f"{report.already} already signed; {report.changed} changed meanwhile "
        f"(run again)"
    )
    for kind, document_id, part, reason in report.refused:
        _say(f"left unsigned: {kind} {document_id} ({part}): {reason}")

    for kind, document_id, part in report.unsigned[:_LISTED]:
        _say(f"carries no signature, left alone: {kind} {document_id} ({part})")

    if len(report.unsigned) > _LISTED:
        _say(f"... and {len(report.unsigned) - _LISTED} more without a signature")

    if report.unsigned:
        _say("(--adopt-unsigned signs them: look at them first, with status)")

    return EXIT_NOT_FOUND if report.refused or report.unsigned else EXIT_OK


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


Change = Callable[[argparse.Namespace, AsyncScheduler, Reader], Awaitable[int]]
_CHANGES: dict[str, Change] = {
    "pause": _change_schedule,
    "resume": _change_schedule,
    "remove": _change_schedule,
    "purge": _purge,
}


async def _change(
    args: argparse.Namespace, scheduler: AsyncScheduler, reader: Reader
) -> int:
    """Make a change through the store's API, if the database holds a store."""
    await require_store(reader)  # starting the store would create one
    async with scheduler:
        return await _CHANGES[args.command](args, scheduler, reader)


def _timed_out(
    hosts: Sequence[str], errors: Sequence[str], args: argparse.Namespace, outcome: str
) -> int:
    """Say that the server did not answer in time (``errors``: what it met)."""
    met = f" ({'; '.join(errors)})" if errors else ""  # each names its server
    return _fail(
        EXIT_SERVER,
        f"no answer from MongoDB at {', '.join(hosts)} within {args.timeout:g} s"
        f"{met}{outcome}",
    )


def _retry_settings(args: argparse.Namespace) -> RetrySettings:
    """Return the retries of a command: temporary failures, until ``--timeout``."""
    return RetrySettings(
        stop=stop_after_delay(args.timeout),
        wait=wait_exponential(multiplier=0.25, max=2),
    )


async def run_command(args: argparse.Namespace, client: object) -> int:
    """
    Run a store command (any but ``demo``) on ``client``; return the exit status.

    ``status`` only reads; the commands that change the store do it through its
    API, on a scheduler (never started) that announces the change to the others.
    This is the seam for tests, which pass a mongomock-motor client.
    """
    if args.command in ("export", "import"):
        return await _run_transfer(args, client)

    if args.command == "import-v3":
        return await _import_v3(args, client)

    logger = _stderr_logger()
    settings = _retry_settings(args)
    changes = args.command in _CHANGES
    try:
        database = validate_database_name(args.database)
        signer = _signer(args) if changes or args.command == "sign" else None
        scheduler = (
            actions.action_scheduler(
                client,
                database,
                _serializer(args.serializer),
                args.events_collection,
                settings,
                logger,
                signing_key=signer,
                accept_unsigned=args.accept_unsigned,
            )
            if changes
            else None
        )
        allowed = (
            AllowedCallables.of(args.allow)
            if args.command == "sign" and args.allow
            else None
        )
    except (TypeError, ValueError, OSError) as exc:
        return _fail(EXIT_USAGE, str(exc))

    adapter = adapter_for(client)
    reader = Reader(adapter, database, settings, logger)
    try:
        with anyio.fail_after(args.timeout):
            if args.command == "sign":
                if signer is None:
                    return _fail(
                        EXIT_USAGE,
                        "no signing key: pass --key-file, or set "
                        "APSCHEDULER_MONGO_SIGNING_KEY",
                    )

                return await _sign(args, reader, signer, allowed)

            if args.command == "doctor":
                return await _doctor(args, reader, adapter)

            if scheduler is None:
                return await _status(args, reader)

            return await _change(args, scheduler, reader)
    except TimeoutError:
        outcome = " (the change may or may not have been made)" if changes else ""
        return _timed_out(adapter.hosts(), server_errors(adapter), args, outcome)
    except Exception as exc:
        error = innermost(exc)
        if isinstance(error, (NotFoundError, ScheduleLookupError)):
            return _fail(EXIT_NOT_FOUND, str(error))

        if isinstance(error, (PyMongoError, RuntimeError)):
            return _fail(EXIT_SERVER, str(error))

        raise


# export and import


class _WarningCount(logging.Handler):
    """Count the warnings logged (not the retries'): records a store left out."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.addFilter(_not_a_retry)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        del record  # counted; the run's own handler shows it
        self.count += 1


def _allowed_types(refs: Sequence[str]) -> list[type]:
    """
    Import the classes the operator named with ``--allow-type``.

    :raises ValueError: if a reference is malformed or names no class
    """
    classes = []
    for ref in refs:
        module_name, colon, qualname = ref.partition(":")
        if not colon or not module_name or not qualname:
            raise ValueError(f"--allow-type {ref!r}: expected MODULE:QUALNAME")

        try:
            found: object = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"--allow-type {ref!r}: {exc}") from None

        for name in qualname.split("."):
            found = getattr(found, name, None)

        if not isinstance(found, type):
            raise ValueError(f"--allow-type {ref!r} does not name a class")

        classes.append(found)

    return classes


@attrs.frozen
class _Transfer:
    """What ``export`` and ``import`` take from the command line."""

    database: str
    signer: Signer | None
    allowed: list[type]
    #: The safe counterpart of --serializer, which reads the store running nothing
    serializer: Serializer
    settings: RetrySettings
    logger: logging.Logger

    @classmethod
    def of(cls, args: argparse.Namespace) -> _Transfer:
        """
        :raises OSError: if the key file cannot be read
        :raises ImportError: if the serializer needs a package that is missing
        :raises ValueError: if an option has a bad value
        """
        allowed = _allowed_types(args.allow_type)
        return cls(
            validate_database_name(args.database),
            _signer(args),
            allowed,
            safe_serializer(args.serializer, allowed),
            _retry_settings(args),
            _stderr_logger(),
        )

    def store(self, client: object, args: argparse.Namespace) -> MongoDBDataStore:
        return MongoDBDataStore(
            client,
            database=self.database,
            serializer=self.serializer,
            retry_settings=self.settings,
            signing_key=self.signer,
            accept_unsigned=args.accept_unsigned,
        )


@asynccontextmanager
async def _started(store: DataStore, logger: logging.Logger) -> AsyncIterator[None]:
    """Start a store on a local event broker (its changes concern no one else)."""
    async with AsyncExitStack() as exit_stack:
        broker = LocalEventBroker()
        await broker.start(exit_stack, logger)
        await store.start(exit_stack, broker, logger)
        yield


@contextmanager
def _output(path: str | None) -> Iterator[IO[str]]:
    """
    Yield the stream to export to: standard output, or a new file beside ``path``,
    readable by its owner only (the arguments are in it in the clear), which
    replaces ``path`` once complete and is removed if the export fails.
    """
    if path is None or path == "-":
        yield sys.stdout
        return

    directory, name = os.path.split(os.path.abspath(path))
    descriptor, unfinished = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with open(descriptor, "w", encoding="utf-8") as stream:
            yield stream

        os.replace(unfinished, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(unfinished)

        raise


def _unreadable(error: BaseException) -> DeserializationError | None:
    """Return the deserialization error that ``error`` comes from, if any."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, DeserializationError):
            return seen

        seen = seen.__cause__ or seen.__context__

    return None


def _transfer_failure(exc: Exception) -> int:
    """Say why an export or import failed; return the exit status."""
    error = innermost(exc)
    if isinstance(error, NotFoundError):
        return _fail(EXIT_NOT_FOUND, str(error))

    # APScheduler's built-in store raises a KeyError for a schedule it cannot
    # deserialize (4.0.0a6): what matters is why it could not
    if (unreadable := _unreadable(error)) is not None:
        return _fail(
            EXIT_NOT_FOUND,
            f"cannot read the store: {unreadable} (name the classes that arguments "
            f"hold with --allow-type; is --serializer right?)",
        )

    if isinstance(error, SerializationError):
        return _fail(EXIT_NOT_FOUND, str(error))

    if isinstance(error, (PyMongoError, RuntimeError)):
        return _fail(EXIT_SERVER, str(error))

    if isinstance(error, OSError):  # the file
        return _fail(EXIT_USAGE, str(error))

    raise exc


async def _write_export(
    args: argparse.Namespace, store: DataStore, output: IO[str], setup: _Transfer
) -> int:
    """Export a store (not started yet) to ``output``; say what was written."""
    warnings = _WarningCount()
    async with _started(store, setup.logger):
        setup.logger.addHandler(warnings)
        report = await export_store(
            store,
            output,
            jobs=args.jobs,
            signer=setup.signer,
            serializer=_serializer(args.serializer),
        )
        left_out = warnings.count

    output.flush()
    signed = "signed" if report.signed else "not signed"
    sys.stderr.write(
        f"exported {report.tasks} task(s), {report.schedules} schedule(s) and "
        f"{report.jobs} job(s) to {args.output or 'standard output'} "
        f"({report.serializer}, {signed})\n"
    )
    if left_out:
        return _fail(
            EXIT_NOT_FOUND,
            f"the store could not read {left_out} record(s) (see the "
            f"warnings above), which are not in the file",
        )

    return EXIT_OK


async def _export(args: argparse.Namespace, client: object) -> int:
    """Export this package's store in ``--database``."""
    try:
        setup = _Transfer.of(args)
        store = setup.store(client, args)
    except (TypeError, ValueError, OSError, ImportError) as exc:
        return _fail(EXIT_USAGE, str(exc))

    adapter = adapter_for(client)
    try:
        with anyio.fail_after(args.timeout), _output(args.output) as output:
            # Starting the store on a database without one would create one
            await require_store(
                Reader(adapter, setup.database, setup.settings, setup.logger)
            )
            return await _write_export(args, store, output, setup)
    except TimeoutError:
        return _timed_out(adapter.hosts(), server_errors(adapter), args, "")
    except Exception as exc:
        return _transfer_failure(exc)


async def _export_builtin(args: argparse.Namespace, uri: str) -> int:
    """Export the store of APScheduler's built-in MongoDB store in ``--database``."""
    from apscheduler.datastores.mongodb import MongoDBDataStore as BuiltinStore
    from pymongo import MongoClient

    try:
        setup = _Transfer.of(args)
    except (TypeError, ValueError, OSError, ImportError) as exc:
        return _fail(EXIT_USAGE, str(exc))

    client: MongoClient[Any] | None = None
    try:
        client = MongoClient(uri, serverSelectionTimeoutMS=int(args.timeout * 1000))
        store = BuiltinStore(
            client,
            database=setup.database,
            serializer=setup.serializer,
            retry_settings=setup.settings,
        )
        with anyio.fail_after(args.timeout), _output(args.output) as output:
            names = await anyio.to_thread.run_sync(
                client[setup.database].list_collection_names
            )
            if layout.BUILTIN_MARKER not in names:
                raise NotFoundError(
                    f"database {setup.database!r} holds no store of APScheduler's "
                    f"built-in MongoDB store (it has no {layout.BUILTIN_MARKER!r} "
                    f"collection); is --database right?"
                )

            return await _write_export(args, store, output, setup)
    except TimeoutError:
        return _timed_out(describe_hosts(uri), [], args, "")
    except Exception as exc:
        return _transfer_failure(exc)
    finally:
        if client is not None:
            client.close()


def _counts(counts: Counts) -> str:
    return (
        f"{counts.tasks} task(s), {counts.schedules} schedule(s), {counts.jobs} job(s)"
    )


def _render_import(args: argparse.Namespace, report: ImportReport) -> None:
    """Say what an import did (or would do), and each record skipped, with why."""
    would = "would be " if report.dry_run else ""
    checked = "checked" if report.signed else "not checked"
    _say(f"read {args.file} (signatures {checked})")
    _say(f"{would}added: {_counts(report.added)}")
    _say(f"already present, left as they are: {_counts(report.present)}")
    if args.replace:
        _say(f"{would}replaced: {_counts(report.replaced)}")

    for skipped in report.skipped:
        _say(f"skipped: {skipped.kind} {skipped.id!r}: {skipped.reason}")


def _read_file(args: argparse.Namespace, setup: _Transfer) -> ExportContents:
    """
    Read and check the file to import (``-``: standard input).

    :raises ExportFileError: if it is refused
    :raises OSError: if it cannot be read
    :raises UnicodeDecodeError: if it is not UTF-8 text
    """
    read = partial(
        read_export,
        signer=setup.signer,
        trust_unsigned=args.trust_unsigned,
        allowed_types=setup.allowed,
    )
    if args.file == "-":
        return read(sys.stdin)

    with open(args.file, encoding="utf-8") as stream:
        return read(stream)


async def _import(args: argparse.Namespace, client: object) -> int:
    """Import a file into this package's store in ``--database``."""
    try:
        setup = _Transfer.of(args)
        scheduler = actions.action_scheduler(
            client,
            setup.database,
            setup.serializer,
            args.events_collection,
            setup.settings,
            setup.logger,
            signing_key=setup.signer,
            accept_unsigned=args.accept_unsigned,
        )
        # All of it is read and checked before the store is even started
        contents = await anyio.to_thread.run_sync(_read_file, args, setup)
    except (ExportFileError, UnicodeDecodeError) as exc:
        return _fail(EXIT_REFUSED, f"refused {args.file}: {exc}; nothing was written")
    except (TypeError, ValueError, OSError, ImportError) as exc:
        return _fail(EXIT_USAGE, str(exc))

    adapter = adapter_for(client)
    reader = Reader(adapter, setup.database, setup.settings, setup.logger)
    try:
        with anyio.fail_after(args.timeout):
            # Refused before the event broker adds its collection there
            if layout.BUILTIN_MARKER in await reader.collection_names():
                return _fail(
                    EXIT_USAGE,
                    f"database {setup.database!r} holds the collections of "
                    f"APScheduler's built-in MongoDB store, which this store cannot "
                    f"share: import into another database",
                )

            if args.dry_run:
                report = await _dry_run(args, client, reader, contents, setup)
            else:
                async with scheduler:
                    report = await import_contents(
                        scheduler.data_store, contents, replace=args.replace
                    )
    except TimeoutError:
        outcome = (
            " (some of it may have been imported: run it again, it adds nothing twice)"
        )
        return _timed_out(
            adapter.hosts(),
            server_errors(adapter),
            args,
            "" if args.dry_run else outcome,
        )
    except Exception as exc:
        return _transfer_failure(exc)

    _render_import(args, report)
    return EXIT_NOT_FOUND if report.skipped else EXIT_OK


async def _dry_run(
    args: argparse.Namespace,
    client: object,
    reader: Reader,
    contents: ExportContents,
    setup: _Transfer,
) -> ImportReport:
    """Say what an import would do, creating nothing (not even a store)."""
    try:
        await require_store(reader)
    except NotFoundError:
        return await import_contents(None, contents, dry_run=True)

    store = setup.store(client, args)
    async with _started(store, setup.logger):
        return await import_contents(
            store, contents, replace=args.replace, dry_run=True
        )


def _v3_uri(args: argparse.Namespace) -> str | None:
    """Return the URI of the 3.x job store, if not the store's: warn of a password."""
    if args.from_uri is None:
        return os.environ.get("APSCHEDULER3_MONGODB_URI") or None

    if _has_password(args.from_uri):
        _warn(
            "the URI given with --from-uri carries a password, which other users "
            "of this host can read in the process list; set the "
            "APSCHEDULER3_MONGODB_URI environment variable instead"
        )

    return str(args.from_uri)


async def _import_v3(args: argparse.Namespace, client: object) -> int:
    """Import the jobs of a 3.x MongoDBJobStore into the store in ``--database``."""
    from_uri = _v3_uri(args)
    try:
        setup = _Transfer.of(args)
        import_v3.executors_of(args.executor)
        validate_database_name(args.from_database)
        if from_uri is None:
            check_v3_source(args.from_database, args.from_collection, setup.database)
        else:
            validate_client_or_uri(from_uri)

        scheduler = actions.action_scheduler(
            client,
            setup.database,
            setup.serializer,
            args.events_collection,
            setup.settings,
            setup.logger,
            signing_key=setup.signer,
            accept_unsigned=args.accept_unsigned,
        )
    except (TypeError, ValueError, OSError, ImportError) as exc:
        return _fail(EXIT_USAGE, str(exc).replace("client_or_uri", "--from-uri"))

    adapter = adapter_for(client)
    try:
        async with AsyncExitStack() as exit_stack:
            source_client = (
                client
                if from_uri is None
                else (await open_client(from_uri, exit_stack)).client
            )
            source = cast(Any, source_client)[args.from_database][args.from_collection]
            with anyio.fail_after(args.timeout):
                if args.dry_run:
                    return await import_v3.run(args, source, None, setup.allowed, _say)

                async with scheduler:
                    return await import_v3.run(
                        args, source, scheduler.data_store, setup.allowed, _say
                    )
    except TimeoutError:
        outcome = (
            ""
            if args.dry_run
            else " (some of it may have been imported: run it "
            "again, it adds nothing twice)"
        )
        return _timed_out(adapter.hosts(), server_errors(adapter), args, outcome)
    except Exception as exc:
        return _transfer_failure(exc)


async def _run_transfer(args: argparse.Namespace, client: object) -> int:
    """Run ``export`` or ``import`` on ``client``; return the exit status."""
    if args.command == "export" and args.builtin:
        # APScheduler's store takes a synchronous client: see _export_builtin()
        return _fail(EXIT_USAGE, "export --builtin opens its own client, on --uri")

    if args.command == "export":
        return await _export(args, client)

    return await _import(args, client)


async def _run_on_uri(args: argparse.Namespace, uri: str) -> int:
    async with AsyncExitStack() as exit_stack:
        try:
            adapter = await open_client(uri, exit_stack)
        except PyMongoError as exc:
            return _fail(EXIT_SERVER, str(exc))

        return await run_command(args, adapter.client)


def _demo(args: argparse.Namespace, uri: str | None) -> int:
    from .demo import run_demo

    try:
        ran = anyio.run(run_demo, uri, args.database, args.seconds, args.overwrite)
    except (TypeError, ValueError, RuntimeError) as exc:
        return _fail(EXIT_USAGE, str(exc))
    except PyMongoError as exc:
        return _fail(EXIT_SERVER, str(exc))

    return 0 if ran > 0 else 1


def _dashboard(args: argparse.Namespace, uri: str) -> int:
    try:
        import uvicorn

        from ..dashboard import Dashboard
    except ImportError as exc:
        return _fail(EXIT_USAGE, str(exc))

    try:
        from ..metrics import MetricsEndpoint, prometheus_meter_provider
    except ImportError:  # without the metrics extra: no /metrics
        metrics = None
    else:
        provider, registry = prometheus_meter_provider()
        metrics = MetricsEndpoint(registry, meter_provider=provider)

    try:
        app = Dashboard(
            uri,
            metrics=metrics,
            database=args.database,
            serializer=_serializer(args.serializer),
            signing_key=_signer(args),
            accept_unsigned=args.accept_unsigned,
            events_collection=args.events_collection,
            actions=args.actions,
            timeout=args.timeout,
            root_path=args.root_path,
        )
    except (TypeError, ValueError, OSError) as exc:
        return _fail(EXIT_USAGE, str(exc))

    loopback = args.host in ("127.0.0.1", "::1", "localhost")
    where = f"[{args.host}]" if ":" in args.host else args.host
    under = f" (its URLs under {app.root_path}/)" if app.root_path else ""
    sys.stderr.write(
        f"Dashboard of database {args.database!r} on http://{where}:{args.port}/"
        f"{under} (actions {'on' if args.actions else 'off'}). It has no login: "
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


def _run(args: argparse.Namespace) -> int:
    uri = _uri(args)
    if uri is not None:
        try:
            validate_client_or_uri(uri)
        except (TypeError, ValueError) as exc:
            return _fail(EXIT_USAGE, str(exc).replace("client_or_uri", "--uri"))

    if args.command == "demo":
        return _demo(args, uri)

    if uri is None:
        return _fail(EXIT_USAGE, "no MongoDB URI: pass --uri, or set MONGODB_URI")

    if args.command == "dashboard":
        return _dashboard(args, uri)

    if args.command == "export" and args.builtin:
        built: int = anyio.run(_export_builtin, args, uri)
        return built

    code: int = anyio.run(_run_on_uri, args, uri)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        return _run(args)
    # On Python 3.10, the event loop's runner turns Ctrl-C into the cancellation of
    # the command's task, which then escapes anyio.run() as CancelledError
    except (KeyboardInterrupt, asyncio.CancelledError):
        outcome = " (the change may or may not have been made)"
        return _fail(
            EXIT_INTERRUPTED,
            f"interrupted{outcome if command in (*_CHANGES, 'import') else ''}",
        )
