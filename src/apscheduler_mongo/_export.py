"""
Export a store's tasks, schedules and jobs to a portable file, and import it back.

The file is JSON Lines (see ``docs/cli.rst`` for the schema): a header naming the
format, its version and the serializer of the values that need one, then one line per
record, then a trailer with the number of records. Plain fields are JSON; triggers and
arguments are base64 of the serializer's bytes, and are read back only with the safe
serializers of :mod:`.serializers`, so that a file runs no code it names.

With a :class:`Signer`, every line carries an HMAC bound to the file's random id and
to its position, so that no line can be changed, moved, dropped or taken from another
file; an import checks every line before it deserializes or writes anything.

The store on either side is any started APScheduler data store, read and written
through its public API only.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import IO, Any
from uuid import UUID, uuid4

import attrs
from apscheduler import (
    CoalescePolicy,
    ConflictingIdError,
    ConflictPolicy,
    DeserializationError,
    Job,
    Schedule,
    SerializationError,
    Task,
)
from apscheduler.abc import DataStore, Serializer, Trigger
from apscheduler.serializers.json import JSONSerializer
from apscheduler.serializers.pickle import PickleSerializer
from bson.errors import InvalidDocument

from ._signing import DisallowedCallableError, Signer, namespace
from ._version import __version__
from .serializers import SafeCBORSerializer, SafeJSONSerializer, SafePickleSerializer

#: The header's ``format``
FORMAT = "apscheduler-mongo-export"
#: The version of the format this module writes, and the newest it reads
VERSION = 1
#: The serializers a file's values may be written with, by the header's name
SERIALIZERS = ("pickle", "json", "cbor")
#: What the lines' signatures are bound to: no database is named so (a database
#: name cannot hold "/"), so no signature of a store's document matches a line's
_SCOPE = "apscheduler-mongo/export"
#: The kinds of record, in the order a file holds them
_KINDS = ("task", "schedule", "job")
_END = "end"
#: The signature's field in a line (not part of what it signs)
_MAC = "mac"
#: The options of APScheduler's JSON and CBOR serializers that a file can be read with
_JSON_MAGIC_KEY = "_apscheduler_json"
_CBOR_TYPE_TAG = 4664


class ExportFileError(ValueError):
    """Raised when an export file is refused: malformed, foreign, or not verified."""


@attrs.frozen
class ExportReport:
    """
    What :func:`export_store` wrote.

    :var tasks: how many tasks
    :var schedules: how many schedules
    :var jobs: how many jobs
    :var serializer: the name of the serializer of the values (``pickle``, ...)
    :var signed: whether the lines are signed
    :var file_id: the file's random id (in its header)
    """

    tasks: int
    schedules: int
    jobs: int
    serializer: str
    signed: bool
    file_id: str


@attrs.frozen
class Counts:
    """A number of tasks, schedules and jobs."""

    tasks: int = 0
    schedules: int = 0
    jobs: int = 0


@attrs.frozen
class Skipped:
    """A record of the file that an import did not write, and why."""

    kind: str
    id: str
    reason: str


@attrs.frozen
class ImportReport:
    """
    What :func:`import_store` did (or, in a dry run, would do).

    :var added: the records added (in a dry run: that would be)
    :var present: the records the store already had, left as they are
    :var replaced: the records the store had, replaced (``replace=True``)
    :var skipped: the records not written, each with why
    :var signed: whether the file's signatures were checked
    :var dry_run: whether nothing was written
    """

    added: Counts
    present: Counts
    replaced: Counts
    skipped: tuple[Skipped, ...]
    signed: bool
    dry_run: bool


@attrs.frozen
class ExportContents:
    """What an export file holds, verified and read back: ready to be imported."""

    tasks: tuple[Task, ...]
    schedules: tuple[Schedule, ...]
    jobs: tuple[Job, ...]
    #: Whether its signatures were checked
    signed: bool


def serializer_name(serializer: Serializer) -> str:
    """
    Return the name, in a file's header, of the format ``serializer`` writes.

    :raises ValueError: if it is none of APScheduler's serializers (or their safe
        counterparts), or has options a reader would not know
    """
    if isinstance(serializer, PickleSerializer):
        return "pickle"

    if isinstance(serializer, JSONSerializer):
        if serializer.magic_key != _JSON_MAGIC_KEY:
            raise ValueError(
                "an export's JSON serializer must use the default magic_key"
            )

        return "json"

    # Told by name: its module needs cbor2, an optional dependency
    if any(cls.__name__ == "CBORSerializer" for cls in type(serializer).__mro__):
        if getattr(serializer, "type_tag", None) != _CBOR_TYPE_TAG:
            raise ValueError(
                "an export's CBOR serializer must use the default type_tag"
            )

        return "cbor"

    raise ValueError(
        f"cannot export with {type(serializer).__qualname__}: use APScheduler's "
        f"pickle, JSON or CBOR serializer"
    )


def safe_serializer(name: str, allowed_types: Iterable[type | str] = ()) -> Serializer:
    """
    Return the serializer that reads the format ``name`` rebuilding only allowed
    classes (:mod:`.serializers`): APScheduler's triggers and plain values, and
    ``allowed_types``.

    :raises ValueError: if ``name`` is not one of :data:`SERIALIZERS`
    """
    if name == "pickle":
        return SafePickleSerializer(allowed_types=allowed_types)

    if name == "json":
        return SafeJSONSerializer(allowed_types=allowed_types)

    if name == "cbor":
        return SafeCBORSerializer(allowed_types=allowed_types)

    raise ValueError(
        f"no serializer {name!r}: expected one of {', '.join(SERIALIZERS)}"
    )


# Writing


def _seconds(value: timedelta | None) -> int | float | None:
    if value is None:
        return None

    whole, micros = divmod(value // timedelta(microseconds=1), 1_000_000)
    return whole if micros == 0 else value.total_seconds()


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _canonical(line: Mapping[str, Any]) -> str:
    """Return the form of a line that its signature covers (without the signature)."""
    fields = {key: value for key, value in line.items() if key != _MAC}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _line_signature(
    signer: Signer, file_id: str, index: int, line: Mapping[str, Any]
) -> bytes:
    """Return the signature of the ``index``-th line (the header is 0) of a file."""
    return signer.sign(
        namespace(_SCOPE, str(VERSION)), file_id, "line", [index, _canonical(line)]
    )


@attrs.define
class _Writer:
    """Write a file's lines, signing each with its position when there is a signer."""

    output: IO[str]
    serializer: Serializer
    signer: Signer | None
    file_id: str
    lines: int = 0

    def write(self, line: dict[str, Any]) -> None:
        text = json.dumps(line, ensure_ascii=True)
        if self.signer is not None:
            # Signed as a reader will see it: as JSON reads it back
            signature = _line_signature(
                self.signer, self.file_id, self.lines, json.loads(text)
            )
            mac = base64.b64encode(signature).decode()
            text = json.dumps({**line, _MAC: mac}, ensure_ascii=True)

        self.output.write(text + "\n")
        self.lines += 1

    def serialized(self, kind: str, item_id: object, field: str, value: object) -> str:
        try:
            data = self.serializer.serialize(value)
        except SerializationError as exc:
            raise SerializationError(
                f"cannot serialize the {field} of {kind} {str(item_id)!r}: {exc}"
            ) from exc

        return base64.b64encode(data).decode()


def _task_line(task: Task) -> dict[str, Any]:
    return {
        "kind": "task",
        "id": task.id,
        "func": task.func,
        "job_executor": task.job_executor,
        "max_running_jobs": task.max_running_jobs,
        "misfire_grace_time": _seconds(task.misfire_grace_time),
        "metadata": task.metadata,
    }


def _schedule_line(schedule: Schedule, writer: _Writer) -> dict[str, Any]:
    def serialized(field: str, value: object) -> str:
        return writer.serialized("schedule", schedule.id, field, value)

    return {
        "kind": "schedule",
        "id": schedule.id,
        "task_id": schedule.task_id,
        "trigger": serialized("trigger", schedule.trigger),
        "trigger_text": str(schedule.trigger),
        "args": serialized("args", schedule.args),
        "kwargs": serialized("kwargs", schedule.kwargs),
        "paused": schedule.paused,
        "coalesce": schedule.coalesce.name,
        "misfire_grace_time": _seconds(schedule.misfire_grace_time),
        "max_jitter": _seconds(schedule.max_jitter),
        "job_executor": schedule.job_executor,
        "job_result_expiration_time": _seconds(schedule.job_result_expiration_time),
        "metadata": schedule.metadata,
        "next_fire_time": _time(schedule.next_fire_time),
        "last_fire_time": _time(schedule.last_fire_time),
    }


def _job_line(job: Job, writer: _Writer) -> dict[str, Any]:
    def serialized(field: str, value: object) -> str:
        return writer.serialized("job", job.id, field, value)

    return {
        "kind": "job",
        "id": str(job.id),
        "task_id": job.task_id,
        "args": serialized("args", job.args),
        "kwargs": serialized("kwargs", job.kwargs),
        "schedule_id": job.schedule_id,
        "scheduled_fire_time": _time(job.scheduled_fire_time),
        "executor": job.executor,
        "jitter": _seconds(job.jitter),
        "start_deadline": _time(job.start_deadline),
        "result_expiration_time": _seconds(job.result_expiration_time),
        "metadata": job.metadata,
        "created_at": _time(job.created_at),
    }


async def export_store(
    store: DataStore,
    output: IO[str],
    *,
    jobs: bool = False,
    signer: Signer | None = None,
    serializer: Serializer | None = None,
) -> ExportReport:
    """
    Write the tasks and schedules of a store (and its queued jobs) to ``output``.

    Everything is read first, through the store's API (a record the store cannot
    read is left out by the store, which logs a warning), and then written, tasks
    and schedules in the order of their ids, jobs in the order they were created.
    Leases are not exported: a job running when exported is written as queued.

    :param store: a started data store
    :param output: a text stream to write the lines to
    :param jobs: also export the jobs that are queued or running
    :param signer: sign every line with the first of its keys (default: the
        store's ``signing_key``, if it has one)
    :param serializer: the serializer of triggers and arguments in the file
        (APScheduler's ``PickleSerializer`` by default, which writes all that
        APScheduler's default store holds)
    :raises ValueError: if ``serializer`` is not one of APScheduler's
    :raises SerializationError: if a value cannot be serialized with it
    """
    serializer = serializer if serializer is not None else PickleSerializer()
    name = serializer_name(serializer)
    tasks = sorted(await store.get_tasks(), key=lambda task: task.id)
    schedules = sorted(await store.get_schedules(), key=lambda schedule: schedule.id)
    queued = await store.get_jobs() if jobs else []
    queued.sort(key=lambda job: (job.created_at, str(job.id)))

    signer = signer if signer is not None else store_signer(store)
    file_id = uuid4().hex
    writer = _Writer(output, serializer, signer, file_id)
    # Serialize everything before the first line is written: a value that cannot be
    # serialized leaves no partial file
    records = [
        *(_task_line(task) for task in tasks),
        *(_schedule_line(schedule, writer) for schedule in schedules),
        *(_job_line(job, writer) for job in queued),
    ]
    writer.write(
        {
            "format": FORMAT,
            "version": VERSION,
            "exported_at": datetime.now(timezone.utc).isoformat(),
            "serializer": name,
            "signed": signer is not None,
            "file_id": file_id,
            "jobs": jobs,
            "store": f"{type(store).__module__}.{type(store).__qualname__}",
            "database": getattr(store, "database", None),
            "apscheduler_mongo": __version__,
        }
    )
    for record in records:
        writer.write(record)

    writer.write(
        {
            "kind": _END,
            "records": len(records),
            "tasks": len(tasks),
            "schedules": len(schedules),
            "jobs": len(queued),
        }
    )
    return ExportReport(
        tasks=len(tasks),
        schedules=len(schedules),
        jobs=len(queued),
        serializer=name,
        signed=signer is not None,
        file_id=file_id,
    )


# Reading


@attrs.frozen
class _Line:
    """A line of a file, parsed: its number (from 1) and its fields."""

    number: int
    fields: Mapping[str, Any]

    def error(self, message: str) -> ExportFileError:
        return ExportFileError(f"line {self.number}: {message}")

    def get(self, name: str, types: type | tuple[type, ...], what: str) -> Any:
        """Return a field, which must be of ``types`` (``bool`` is no number)."""
        if name not in self.fields:
            raise self.error(f"no {name!r} field")

        value = self.fields[name]
        if isinstance(value, types) and not (
            isinstance(value, bool) and bool not in _as_tuple(types)
        ):
            return value

        raise self.error(f"{name!r} must be {what}, not {value!r:.80}")

    def text(self, name: str) -> str:
        value: str = self.get(name, str, "a string")
        return value

    def optional_text(self, name: str) -> str | None:
        value: str | None = self.get(name, (str, type(None)), "a string or null")
        return value

    def flag(self, name: str) -> bool:
        value: bool = self.get(name, bool, "true or false")
        return value

    def duration(self, name: str) -> timedelta | None:
        value = self.get(name, (int, float, type(None)), "a number of seconds or null")
        try:
            return None if value is None else timedelta(seconds=value)
        except (OverflowError, ValueError) as exc:
            raise self.error(f"{name!r}: {exc}") from None

    def time(self, name: str) -> datetime | None:
        text = self.get(name, (str, type(None)), "an ISO 8601 time or null")
        if text is None:
            return None

        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            value = None

        if value is None or value.utcoffset() is None:
            raise self.error(f"{name!r} must be an ISO 8601 time with its UTC offset")

        return value

    def metadata(self) -> dict[str, Any]:
        value: dict[str, Any] = self.get("metadata", dict, "an object")
        return value

    def deserialized(self, name: str, serializer: Serializer) -> Any:
        """Return the value of a serialized field, read with a safe serializer."""
        text = self.text(name)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise self.error(f"{name!r} is not base64") from None

        try:
            return serializer.deserialize(data)
        except DeserializationError as exc:
            raise self.error(
                f"cannot read the {name} of {self.fields.get('kind')} "
                f"{str(self.fields.get('id'))!r}: {exc}"
            ) from None


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _parse(number: int, text: str) -> _Line:
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError):
        raise ExportFileError(f"line {number}: not JSON") from None

    if not isinstance(fields, dict):
        raise ExportFileError(f"line {number}: not a JSON object")

    return _Line(number, fields)


def _header(line: _Line) -> tuple[str, bool, str]:
    """Check a file's header; return its serializer, whether it is signed, its id."""
    if line.fields.get("format") != FORMAT:
        raise ExportFileError(
            f"not an apscheduler-mongo export file (its first line has no "
            f"'format': {FORMAT!r})"
        )

    version = line.fields.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise ExportFileError(
            f"the file is of version {version} of the export format; this "
            f"apscheduler-mongo ({__version__}) reads version {VERSION}: upgrade it"
        )

    if version != VERSION or isinstance(version, bool):
        raise line.error(f"'version' must be {VERSION}, not {version!r:.80}")

    name = line.text("serializer")
    if name not in SERIALIZERS:
        expected = ", ".join(SERIALIZERS)
        raise line.error(
            f"unknown serializer {name!r:.80} (expected one of {expected})"
        )

    return name, line.flag("signed"), line.text("file_id")


def _verify(signer: Signer, file_id: str, line: _Line) -> None:
    """Check a line's signature, before anything in it is used."""
    text = line.fields.get(_MAC)
    if not isinstance(text, str):
        raise line.error("no signature: the file was changed")

    try:
        signature = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        signature = b""

    try:
        valid = signer.verify(
            namespace(_SCOPE, str(VERSION)),
            file_id,
            "line",
            [line.number - 1, _canonical(line.fields)],
            signature,
        )
    except (InvalidDocument, TypeError, ValueError, OverflowError):
        valid = False  # a value the message cannot hold: nobody signed that

    if not valid:
        raise line.error(
            "the signature does not match: the line was changed, moved or taken from "
            "another file, or signed with a key not given here"
        )


def _check_trust(signed: bool, signer: Signer | None, trust_unsigned: bool) -> None:
    """Refuse an unsigned file when there is a key to check it with, unless trusted."""
    if not signed and signer is not None and not trust_unsigned:
        raise ExportFileError(
            "the file is not signed: importing it into a store that signs would sign "
            "whatever it holds; import it only if you trust where it has been "
            "(trust_unsigned, or --trust-unsigned on the command line)"
        )


def _verified_lines(
    input: IO[str], signer: Signer | None, trust_unsigned: bool
) -> tuple[str, bool, list[_Line]]:
    """
    Read and check every line of a file; return its serializer, whether its
    signatures were checked, and its records.
    """
    lines = iter(enumerate(input, start=1))
    first = next(lines, None)
    if first is None:
        raise ExportFileError("the file is empty")

    header = _parse(*first)
    name, signed, file_id = _header(header)
    _check_trust(signed, signer, trust_unsigned)
    checked = signed and signer is not None
    if checked:
        assert signer is not None
        _verify(signer, file_id, header)

    records: list[_Line] = []
    end: _Line | None = None
    for number, text in lines:
        line = _parse(number, text)
        if checked:
            assert signer is not None
            _verify(signer, file_id, line)

        if end is not None:
            raise line.error(f"a line after the last one (line {end.number})")

        kind = line.fields.get("kind")
        if kind == _END:
            end = line
        elif kind in _KINDS:
            records.append(line)
        else:
            raise line.error(f"unknown kind of record {kind!r:.80}")

    if end is None:
        raise ExportFileError(
            "the file ends before its last line: it was cut short (or is still being "
            "written)"
        )

    if end.get("records", int, "a number") != len(records):
        raise end.error(
            f"the file should hold {end.fields['records']} record(s), and holds "
            f"{len(records)}"
        )

    return name, checked, records


def _read_task(line: _Line) -> Task:
    fields: dict[str, Any] = {
        "id": line.text("id"),
        "func": line.optional_text("func"),
        "job_executor": line.text("job_executor"),
        "max_running_jobs": line.get("max_running_jobs", (int, type(None)), "a number"),
        "misfire_grace_time": line.duration("misfire_grace_time"),
        "metadata": line.metadata(),
    }
    return Task(**fields)


def _arguments(line: _Line, serializer: Serializer) -> dict[str, Any]:
    args = line.deserialized("args", serializer)
    kwargs = line.deserialized("kwargs", serializer)
    if not isinstance(args, (tuple, list)):
        raise line.error(f"'args' must hold a sequence, not {type(args).__name__}")

    if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        raise line.error("'kwargs' must hold a mapping of names")

    return {"args": tuple(args), "kwargs": kwargs}


def _read_schedule(line: _Line, serializer: Serializer) -> Schedule:
    trigger = line.deserialized("trigger", serializer)
    if not isinstance(trigger, Trigger):
        raise line.error(f"'trigger' holds a {type(trigger).__name__}, not a trigger")

    coalesce = line.text("coalesce")
    if coalesce not in CoalescePolicy.__members__:
        raise line.error(f"unknown coalesce policy {coalesce!r:.80}")

    fields: dict[str, Any] = {
        "id": line.text("id"),
        "task_id": line.text("task_id"),
        "trigger": trigger,
        **_arguments(line, serializer),
        "paused": line.flag("paused"),
        "coalesce": CoalescePolicy[coalesce],
        "misfire_grace_time": line.duration("misfire_grace_time"),
        "max_jitter": line.duration("max_jitter"),
        "job_executor": line.text("job_executor"),
        "job_result_expiration_time": line.duration("job_result_expiration_time"),
        "metadata": line.metadata(),
        "next_fire_time": line.time("next_fire_time"),
        "last_fire_time": line.time("last_fire_time"),
    }
    return Schedule(**fields)


def _read_job(line: _Line, serializer: Serializer) -> Job:
    try:
        job_id = UUID(line.text("id"))
    except ValueError:
        raise line.error("'id' must be a UUID") from None

    fields: dict[str, Any] = {
        "id": job_id,
        "task_id": line.text("task_id"),
        **_arguments(line, serializer),
        "schedule_id": line.optional_text("schedule_id"),
        "scheduled_fire_time": line.time("scheduled_fire_time"),
        "executor": line.text("executor"),
        "jitter": line.duration("jitter") or timedelta(),
        "start_deadline": line.time("start_deadline"),
        "result_expiration_time": line.duration("result_expiration_time")
        or timedelta(),
        "metadata": line.metadata(),
        "created_at": line.time("created_at"),
    }
    if fields["created_at"] is None:
        raise line.error("'created_at' must be a time, not null")

    return Job(**fields)


def read_export(
    input: IO[str],
    *,
    signer: Signer | None = None,
    trust_unsigned: bool = False,
    allowed_types: Iterable[type | str] = (),
) -> ExportContents:
    """
    Read an export file back, checking all of it before returning anything.

    When the file is signed and ``signer`` is given, every line's signature is
    checked before anything is deserialized. Then triggers and arguments are read
    with the safe counterpart of the serializer the header names, which rebuilds
    APScheduler's triggers, plain values and ``allowed_types`` only, and imports
    nothing.

    :param input: a text stream of the file's lines
    :param signer: the keys to check the signatures with; with a signer, a file
        that is not signed is refused (unless ``trust_unsigned``)
    :param trust_unsigned: accept a file that is not signed although ``signer`` is
        given
    :param allowed_types: the classes, besides APScheduler's triggers and plain
        values, that arguments may hold (classes, or ``"module:qualname"`` strings
        of modules already imported: nothing is imported here)
    :raises ExportFileError: if the file is of another format or a newer version,
        malformed, fails its signature check, is not signed and not trusted, or holds
        a class that is not allowed (the message names the line)
    """
    name, checked, lines = _verified_lines(input, signer, trust_unsigned)
    serializer = safe_serializer(name, allowed_types)
    readers: dict[str, Callable[[_Line], Any]] = {
        "task": _read_task,
        "schedule": lambda line: _read_schedule(line, serializer),
        "job": lambda line: _read_job(line, serializer),
    }
    collected: dict[str, list[Any]] = {kind: [] for kind in _KINDS}
    seen: dict[tuple[str, str], int] = {}
    for line in lines:
        kind = line.fields["kind"]
        try:
            item = readers[kind](line)
        except ExportFileError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:  # attrs' validators
            raise line.error(f"not a valid {kind}: {exc}") from None

        key = (kind, str(item.id))
        if key in seen:
            raise line.error(f"{kind} {key[1]!r} is also on line {seen[key]}")

        seen[key] = line.number
        collected[kind].append(item)

    return ExportContents(
        tuple(collected["task"]),
        tuple(collected["schedule"]),
        tuple(collected["job"]),
        checked,
    )


# Importing


@attrs.define
class _Importer:
    """Add the records of a file to a store (``None``: an empty one), counting."""

    store: DataStore | None
    contents: ExportContents
    replace: bool
    dry_run: bool
    #: The counts by kind: added, present and replaced
    added: dict[str, int] = attrs.field(factory=dict)
    present: dict[str, int] = attrs.field(factory=dict)
    replaced: dict[str, int] = attrs.field(factory=dict)
    skipped: list[Skipped] = attrs.field(factory=list)
    #: The tasks that the store has, or was given
    usable: set[str] = attrs.field(factory=set)

    @property
    def writes(self) -> DataStore | None:
        """The store to write to, unless this is a dry run."""
        return None if self.dry_run else self.store

    def count(self, counts: dict[str, int], kind: str) -> None:
        counts[kind] = counts.get(kind, 0) + 1

    def has_task(self, kind: str, item_id: str, task_id: str) -> bool:
        """Tell whether a record's task is in the store; note why not if not."""
        if task_id in self.usable:
            return True

        in_file = any(task.id == task_id for task in self.contents.tasks)
        where = "was refused by the store" if in_file else "is nowhere"
        self.skipped.append(Skipped(kind, item_id, f"its task {task_id!r} {where}"))
        return False

    async def tasks(self) -> None:
        stored = (
            {task.id for task in await self.store.get_tasks()} if self.store else set()
        )
        self.usable.update(stored)
        for task in self.contents.tasks:
            present = task.id in stored
            if present and not self.replace:
                self.count(self.present, "task")
                continue

            if self.writes is not None:
                try:
                    await self.writes.add_task(task)
                except DisallowedCallableError as exc:
                    self.skipped.append(Skipped("task", task.id, str(exc)))
                    continue

            self.usable.add(task.id)
            self.count(self.replaced if present else self.added, "task")

    async def jobs(self) -> None:
        ids = [job.id for job in self.contents.jobs]
        stored = (
            {job.id for job in await self.store.get_jobs(ids)}
            if self.store and ids
            else set()
        )
        for job in self.contents.jobs:
            if not self.has_task("job", str(job.id), job.task_id):
                continue

            declined = ""
            if job.id not in stored and self.writes is not None:
                declined = await _add_job(self.writes, job)

            if job.id in stored or declined == _PRESENT:
                self.count(self.present, "job")
            elif declined:
                self.skipped.append(Skipped("job", str(job.id), declined))
            else:
                self.count(self.added, "job")

    async def schedules(self) -> None:
        ids = {schedule.id for schedule in self.contents.schedules}
        stored = (
            {schedule.id for schedule in await self.store.get_schedules(ids)}
            if self.store and ids
            else set()
        )
        policy = ConflictPolicy.replace if self.replace else ConflictPolicy.do_nothing
        for schedule in self.contents.schedules:
            if not self.has_task("schedule", schedule.id, schedule.task_id):
                continue

            present = schedule.id in stored
            if present and not self.replace:
                self.count(self.present, "schedule")
                continue

            if self.writes is not None:
                await self.writes.add_schedule(schedule, policy)

            self.count(self.replaced if present else self.added, "schedule")

    def report(self) -> ImportReport:
        def counts(by_kind: Mapping[str, int]) -> Counts:
            return Counts(*(by_kind.get(kind, 0) for kind in _KINDS))

        return ImportReport(
            added=counts(self.added),
            present=counts(self.present),
            replaced=counts(self.replaced),
            skipped=tuple(self.skipped),
            signed=self.contents.signed,
            dry_run=self.dry_run,
        )


async def import_contents(
    store: DataStore | None,
    contents: ExportContents,
    *,
    replace: bool = False,
    dry_run: bool = False,
) -> ImportReport:
    """
    Add what :func:`read_export` read to a store, creating nothing twice.

    Tasks first, then jobs (before their schedules: a store may decline a job for a
    fire time that its schedule has moved past), then schedules. A record the store
    already has is left as it is, or with ``replace`` replaced (tasks and schedules;
    a job is never replaced). A schedule or job whose task is neither in the file
    nor in the store is skipped, and so are those of a task the store refused.

    :param store: a started data store, or ``None`` for a dry run into a store that
        holds nothing yet
    :param replace: replace the tasks and schedules the store already has
    :param dry_run: only say what would be done
    :raises ValueError: if ``store`` is ``None`` and it is no dry run
    """
    if store is None and not dry_run:
        raise ValueError("an import that writes needs a store")

    importer = _Importer(store, contents, replace, dry_run)
    await importer.tasks()
    await importer.jobs()
    await importer.schedules()
    return importer.report()


#: What :func:`_add_job` returns for a job whose id the store has
_PRESENT = "present"


async def _add_job(store: DataStore, job: Job) -> str:
    """Add a job; return ``""``, :data:`_PRESENT`, or why the store declined it."""
    try:
        await store.add_job(job)
    except ConflictingIdError:
        return _PRESENT  # its document is there, finished or unreadable

    # A store may decline, without an error, a job for a fire time that its
    # schedule has moved past, or has a job for already
    if job.schedule_id is not None and not await store.get_jobs([job.id]):
        return (
            f"the store declined it: its schedule {job.schedule_id!r} has moved past "
            f"its fire time, or has a job for it already"
        )

    return ""


def store_signer(store: object) -> Signer | None:
    """Return the signer of a store that signs what it stores (this package's)."""
    signer = getattr(store, "signing_key", None)
    return signer if isinstance(signer, Signer) else None


async def import_store(
    store: DataStore,
    input: IO[str],
    *,
    replace: bool = False,
    signer: Signer | None = None,
    trust_unsigned: bool = False,
    allowed_types: Iterable[type | str] = (),
    dry_run: bool = False,
) -> ImportReport:
    """
    Read an export file, and add what it holds to a store, creating nothing twice.

    The whole file is read and checked (:func:`read_export`) before anything is
    written: a file that fails is refused as a whole. Then :func:`import_contents`
    adds it through the store's API, which announces it as usual (through the
    store's event broker).

    :param store: a started data store
    :param input: a text stream of the file's lines
    :param replace: replace the tasks and schedules the store already has (else
        they are left as they are)
    :param signer: the keys to check the file's signatures with (default: the
        store's ``signing_key``, if it has one). With keys, a file that is not
        signed is refused: importing it into a store that signs would sign
        whatever it holds. Without, a signed file is read unchecked
    :param trust_unsigned: import a file that is not signed all the same
    :param allowed_types: the classes, besides APScheduler's triggers and plain
        values, that the arguments may hold (classes, or ``"module:qualname"``
        strings of modules already imported)
    :param dry_run: only say what would be done
    :raises ExportFileError: if the file is refused
    """
    contents = read_export(
        input,
        signer=signer if signer is not None else store_signer(store),
        trust_unsigned=trust_unsigned,
        allowed_types=allowed_types,
    )
    return await import_contents(store, contents, replace=replace, dry_run=dry_run)
