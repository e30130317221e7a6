"""The ``apscheduler-mongo`` command line: its options, commands and exit statuses."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import TYPE_CHECKING

import anyio
from apscheduler import AsyncScheduler, ScheduleLookupError
from pymongo.errors import PyMongoError

from .. import _layout as layout
from .._adapters import Adapter, adapter_for
from .._client import open_client, server_errors, validate_client_or_uri
from .._names import validate_database_name
from .._retry import retrying
from .._signing import AllowedCallables, Signer
from . import actions, transfer
from ._common import (
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SERVER,
    EXIT_UNHEALTHY,
    EXIT_USAGE,
    fail,
    key_options,
    retry_settings,
    say,
    serializer_of,
    signed_store_options,
    signer_of,
    stderr_logger,
    timed_out,
    uri_from,
)
from .actions import RefusedError, innermost
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

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_SERVER",
    "EXIT_UNHEALTHY",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "run_command",
]

if TYPE_CHECKING:
    #: What add_subparsers() returns
    _Commands = argparse._SubParsersAction[argparse.ArgumentParser]

_EPILOG = """\
exit statuses:
  0    success
  1    not found: no such schedule or job (or it is quarantined, or cannot be
       read here), or the database holds no store; for sign, parts left
       unsigned; for export, records the store could not read (left out of the
       file); for import, records skipped (each listed); for import-v3, jobs
       that could not be converted (each listed, with why)
  2    usage or configuration error: a bad option, a missing or malformed URI,
       a bad database name, a demo database that holds a store
  3    the server could not be reached within --timeout, or it refused or
       failed a request (authentication, permissions, an incompatible server)
  4    doctor: a check failed (with --strict, or warned)
  5    import: the file was refused (another format, malformed, a signature
       that does not match, a class not allowed); nothing was written; retry,
       cancel: refused, the job is in no state for it (not failed, not queued)
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


def _changing_options() -> argparse.ArgumentParser:
    """Return the options of the commands that change the store through its API."""
    options = argparse.ArgumentParser(add_help=False)
    signed_store_options(options)
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
    run_now = add(
        "run-now",
        "run a schedule's task once, now",
        "Add one job that runs the schedule's task now, with its arguments, as a "
        "fire time would (its job executor, metadata, result expiration time and "
        "misfire grace time), announced through the event broker. The schedule's "
        "next fire time does not change, and its fire times still get their own "
        "jobs. A paused schedule may be run now (it stays paused).",
        changing,
    )
    run_now.add_argument("schedule_id", metavar="SCHEDULE_ID", help="the schedule's id")
    retry = add(
        "retry",
        "run a failed job again, as a new job",
        "Add a new job with the task and arguments of a job that finished with an "
        "error, missed its start deadline, was abandoned or was cancelled, "
        "announced through the event broker. The arguments are read as a scheduler "
        "reads them (their signature checked first, with --key-file). A job that "
        "did not succeed keeps its arguments while its record is kept: a day at "
        "least, longer while its result is kept.",
        changing,
    )
    retry.add_argument("job_id", metavar="JOB_ID", help="the failed job's id")
    cancel = add(
        "cancel",
        "cancel a queued job",
        "Finish a queued job with the outcome 'cancelled', so that it never runs, "
        "in one write that a scheduler claiming the job at that moment wins (the "
        "job then runs, and cancel says so). Announced through the event broker.",
        changing,
    )
    cancel.add_argument("job_id", metavar="JOB_ID", help="the queued job's id")
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
    key_options(sign)
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
    transfer.declare(add)
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


def _uri(args: argparse.Namespace) -> str | None:
    """Return the URI to use: ``--uri``, else ``MONGODB_URI``."""
    return uri_from(args.uri, "--uri", "MONGODB_URI")


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
    say(
        f"{would} {report.signed} part(s) that carried no signature, and "
        f"{report.re_signed} signed with another key than the first; "
        f"{report.already} already signed; {report.changed} changed meanwhile "
        f"(run again)"
    )
    for kind, document_id, part, reason in report.refused:
        say(f"left unsigned: {kind} {document_id} ({part}): {reason}")

    for kind, document_id, part in report.unsigned[:_LISTED]:
        say(f"carries no signature, left alone: {kind} {document_id} ({part})")

    if len(report.unsigned) > _LISTED:
        say(f"... and {len(report.unsigned) - _LISTED} more without a signature")

    if report.unsigned:
        say("(--adopt-unsigned signs them: look at them first, with status)")

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

    say(said)
    return EXIT_OK


async def _change_job(
    args: argparse.Namespace, scheduler: AsyncScheduler, reader: Reader
) -> int:
    """Run a schedule now, retry or cancel a job; say what was done."""
    if args.command == "run-now":
        said = await actions.run_now(scheduler, reader, args.schedule_id)
    elif args.command == "retry":
        said = await actions.retry(scheduler, reader, args.job_id)
    else:
        said = await actions.cancel(scheduler, reader, args.job_id)

    say(said)
    return EXIT_OK


async def _purge(
    _args: argparse.Namespace, scheduler: AsyncScheduler, reader: Reader
) -> int:
    purged = await actions.purge(scheduler, reader)
    rows = [[name, str(old), str(new)] for name, old, new in purged.counts]
    say("ran the store's cleanup")
    say(format_table(["", "BEFORE", "AFTER"], rows, right=(1, 2)))
    return EXIT_OK


Change = Callable[[argparse.Namespace, AsyncScheduler, Reader], Awaitable[int]]
_CHANGES: dict[str, Change] = {
    "pause": _change_schedule,
    "resume": _change_schedule,
    "remove": _change_schedule,
    "run-now": _change_job,
    "retry": _change_job,
    "cancel": _change_job,
    "purge": _purge,
}


async def _change(
    args: argparse.Namespace, scheduler: AsyncScheduler, reader: Reader
) -> int:
    """Make a change through the store's API, if the database holds a store."""
    await require_store(reader)  # starting the store would create one
    async with scheduler:
        return await _CHANGES[args.command](args, scheduler, reader)


async def run_command(args: argparse.Namespace, client: object) -> int:
    """
    Run a store command (any but ``demo``) on ``client``; return the exit status.

    ``status`` only reads; the commands that change the store do it through its
    API, on a scheduler (never started) that announces the change to the others.
    This is the seam for tests, which pass a mongomock-motor client.
    """
    if args.command in transfer.COMMANDS:
        return await transfer.run(args, client)

    logger = stderr_logger()
    settings = retry_settings(args)
    changes = args.command in _CHANGES
    try:
        database = validate_database_name(args.database)
        signer = signer_of(args) if changes or args.command == "sign" else None
        scheduler = (
            actions.action_scheduler(
                client,
                database,
                serializer_of(args.serializer),
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
        return fail(EXIT_USAGE, str(exc))

    adapter = adapter_for(client)
    reader = Reader(adapter, database, settings, logger)
    try:
        with anyio.fail_after(args.timeout):
            if args.command == "sign":
                if signer is None:
                    return fail(
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
        return timed_out(adapter.hosts(), server_errors(adapter), args, outcome)
    except Exception as exc:
        error = innermost(exc)
        if isinstance(error, (NotFoundError, ScheduleLookupError)):
            return fail(EXIT_NOT_FOUND, str(error))

        if isinstance(error, RefusedError):
            return fail(EXIT_REFUSED, str(error))

        if isinstance(error, (PyMongoError, RuntimeError)):
            return fail(EXIT_SERVER, str(error))

        raise


async def _run_on_uri(args: argparse.Namespace, uri: str) -> int:
    async with AsyncExitStack() as exit_stack:
        try:
            adapter = await open_client(uri, exit_stack)
        except PyMongoError as exc:
            return fail(EXIT_SERVER, str(exc))

        return await run_command(args, adapter.client)


def _demo(args: argparse.Namespace, uri: str | None) -> int:
    from .demo import run_demo

    try:
        ran = anyio.run(run_demo, uri, args.database, args.seconds, args.overwrite)
    except (TypeError, ValueError, RuntimeError) as exc:
        return fail(EXIT_USAGE, str(exc))
    except PyMongoError as exc:
        return fail(EXIT_SERVER, str(exc))

    return 0 if ran > 0 else 1


def _dashboard(args: argparse.Namespace, uri: str) -> int:
    try:
        import uvicorn

        from ..dashboard import Dashboard
    except ImportError as exc:
        return fail(EXIT_USAGE, str(exc))

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
            serializer=serializer_of(args.serializer),
            signing_key=signer_of(args),
            accept_unsigned=args.accept_unsigned,
            events_collection=args.events_collection,
            actions=args.actions,
            timeout=args.timeout,
            root_path=args.root_path,
        )
    except (TypeError, ValueError, OSError) as exc:
        return fail(EXIT_USAGE, str(exc))

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
            return fail(EXIT_USAGE, str(exc).replace("client_or_uri", "--uri"))

    if args.command == "demo":
        return _demo(args, uri)

    if uri is None:
        return fail(EXIT_USAGE, "no MongoDB URI: pass --uri, or set MONGODB_URI")

    if args.command == "dashboard":
        return _dashboard(args, uri)

    if args.command == "export" and args.builtin:
        built: int = anyio.run(transfer.export_builtin, args, uri)
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
        return fail(
            EXIT_INTERRUPTED,
            f"interrupted{outcome if command in (*_CHANGES, 'import') else ''}",
        )
