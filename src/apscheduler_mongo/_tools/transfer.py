"""The ``export``, ``import`` and ``import-v3`` commands: options and runners."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from functools import partial
from typing import IO, Any, cast

import anyio
import anyio.to_thread
import attrs
from apscheduler import (
    AsyncScheduler,
    DeserializationError,
    RetrySettings,
    SerializationError,
)
from apscheduler.abc import DataStore, Serializer
from apscheduler.eventbrokers.local import LocalEventBroker
from pymongo.errors import PyMongoError

from .. import _layout as layout
from .._adapters import adapter_for
from .._client import describe_hosts, open_client, server_errors, validate_client_or_uri
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
from .._signing import AllowedCallables, Signer
from ..migration import check_v3_source
from . import actions, import_v3
from ._common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SERVER,
    EXIT_USAGE,
    fail,
    not_a_retry,
    retry_settings,
    say,
    serializer_of,
    signed_store_options,
    signer_of,
    stderr_logger,
    timed_out,
    uri_from,
)
from .actions import innermost
from .status import NotFoundError, Reader, require_store

#: The commands this module declares and runs
COMMANDS = ("export", "import", "import-v3")


def _transfer_options(serializer_help: str) -> argparse.ArgumentParser:
    """Return the options of ``export`` and ``import`` on the store and its values."""
    options = argparse.ArgumentParser(add_help=False)
    signed_store_options(options)
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


def declare(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Declare ``export``, ``import`` and ``import-v3``."""
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
    import_v3.declare(
        add(
            "import-v3",
            "add the jobs of an APScheduler 3 MongoDBJobStore as schedules",
            import_v3.DESCRIPTION,
            _transfer_options(", to write the schedules with"),
        )
    )


class _WarningCount(logging.Handler):
    """Count the warnings logged (not the retries'): records a store left out."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.addFilter(not_a_retry)
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
            signer_of(args),
            allowed,
            safe_serializer(args.serializer, allowed),
            retry_settings(args),
            stderr_logger(),
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

    def scheduler(self, client: object, args: argparse.Namespace) -> AsyncScheduler:
        """Return a scheduler (never started) whose broker announces the changes."""
        return actions.action_scheduler(
            client,
            self.database,
            self.serializer,
            args.events_collection,
            self.settings,
            self.logger,
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
        return fail(EXIT_NOT_FOUND, str(error))

    # APScheduler's built-in store raises a KeyError for a schedule it cannot
    # deserialize (4.0.0a6): what matters is why it could not
    if (unreadable := _unreadable(error)) is not None:
        return fail(
            EXIT_NOT_FOUND,
            f"cannot read the store: {unreadable} (name the classes that arguments "
            f"hold with --allow-type; is --serializer right?)",
        )

    if isinstance(error, SerializationError):
        return fail(EXIT_NOT_FOUND, str(error))

    if isinstance(error, (PyMongoError, RuntimeError)):
        return fail(EXIT_SERVER, str(error))

    if isinstance(error, OSError):  # the file
        return fail(EXIT_USAGE, str(error))

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
            serializer=serializer_of(args.serializer),
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
        return fail(
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
        return fail(EXIT_USAGE, str(exc))

    adapter = adapter_for(client)
    try:
        with anyio.fail_after(args.timeout), _output(args.output) as output:
            # Starting the store on a database without one would create one
            await require_store(
                Reader(adapter, setup.database, setup.settings, setup.logger)
            )
            return await _write_export(args, store, output, setup)
    except TimeoutError:
        return timed_out(adapter.hosts(), server_errors(adapter), args, "")
    except Exception as exc:
        return _transfer_failure(exc)


async def export_builtin(args: argparse.Namespace, uri: str) -> int:
    """Export the store of APScheduler's built-in MongoDB store in ``--database``."""
    from apscheduler.datastores.mongodb import MongoDBDataStore as BuiltinStore
    from pymongo import MongoClient

    try:
        setup = _Transfer.of(args)
    except (TypeError, ValueError, OSError, ImportError) as exc:
        return fail(EXIT_USAGE, str(exc))

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
        return timed_out(describe_hosts(uri), [], args, "")
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
    say(f"read {args.file} (signatures {checked})")
    say(f"{would}added: {_counts(report.added)}")
    say(f"already present, left as they are: {_counts(report.present)}")
    if args.replace:
        say(f"{would}replaced: {_counts(report.replaced)}")

    for skipped in report.skipped:
        say(f"skipped: {skipped.kind} {skipped.id!r}: {skipped.reason}")


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
        scheduler = setup.scheduler(client, args)
        # All of it is read and checked before the store is even started
        contents = await anyio.to_thread.run_sync(_read_file, args, setup)
    except (ExportFileError, UnicodeDecodeError) as exc:
        return fail(EXIT_REFUSED, f"refused {args.file}: {exc}; nothing was written")
    except (TypeError, ValueError, OSError, ImportError) as exc:
        return fail(EXIT_USAGE, str(exc))

    adapter = adapter_for(client)
    reader = Reader(adapter, setup.database, setup.settings, setup.logger)
    try:
        with anyio.fail_after(args.timeout):
            # Refused before the event broker adds its collection there
            if layout.BUILTIN_MARKER in await reader.collection_names():
                return fail(
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
        return timed_out(
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


async def _import_v3(args: argparse.Namespace, client: object) -> int:
    """Import the jobs of a 3.x MongoDBJobStore into the store in ``--database``."""
    from_uri = uri_from(args.from_uri, "--from-uri", "APSCHEDULER3_MONGODB_URI")
    try:
        setup = _Transfer.of(args)
        import_v3.executors_of(args.executor)
        validate_database_name(args.from_database)
        if setup.signer is not None and not args.allow:
            raise ValueError(
                "the store signs what is imported, vouching for the functions the "
                "APScheduler 3 documents name: name those the jobs may run with "
                "--allow 'module:*' (repeat it for more)"
            )

        if args.allow:
            AllowedCallables.of(args.allow)  # refuse a malformed pattern now
        if from_uri is None:
            check_v3_source(args.from_database, args.from_collection, setup.database)
        else:
            validate_client_or_uri(from_uri)

        scheduler = setup.scheduler(client, args)
    except (TypeError, ValueError, OSError, ImportError) as exc:
        return fail(EXIT_USAGE, str(exc).replace("client_or_uri", "--from-uri"))

    adapter, same = adapter_for(client), from_uri is None
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
                    return await import_v3.run(
                        args, source, None, setup.allowed, say, same_server=same
                    )

                async with scheduler:
                    return await import_v3.run(
                        args,
                        source,
                        scheduler.data_store,
                        setup.allowed,
                        say,
                        same_server=same,
                    )
    except TimeoutError:
        outcome = (
            ""
            if args.dry_run
            else " (some of it may have been imported: run it "
            "again, it adds nothing twice)"
        )
        return timed_out(adapter.hosts(), server_errors(adapter), args, outcome)
    except Exception as exc:
        return _transfer_failure(exc)


async def run(args: argparse.Namespace, client: object) -> int:
    """Run one of :data:`COMMANDS` on ``client``; return the exit status."""
    if args.command == "import-v3":
        return await _import_v3(args, client)

    if args.command == "export" and args.builtin:
        # APScheduler's store takes a synchronous client: see export_builtin()
        return fail(EXIT_USAGE, "export --builtin opens its own client, on --uri")

    if args.command == "export":
        return await _export(args, client)

    return await _import(args, client)
