"""
Move schedules into a store: from APScheduler 3's ``MongoDBJobStore``, and from one
store to another through a file.

:func:`export_store` writes a store's tasks and schedules (and jobs) to a JSON Lines
file, signed line by line with the store's key if it has one, and
:func:`import_store` reads such a file into any store, checking all of it before it
writes anything (the format is in :doc:`cli`).

:func:`import_v3` reads the jobs of a 3.x ``MongoDBJobStore`` collection (any
database and collection, on any client) and adds the equal tasks and schedules to a
data store. It reads the 3.x pickles without APScheduler 3 and running nothing they
name (as records of the 3.x classes' state, see :doc:`migration`), never changes
the 3.x collection, and creates nothing twice when run again: a schedule keeps its
3.x job's id, and one that is already there is left as it is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import IO, Any

import attrs
from apscheduler import ConflictPolicy, Schedule, Task
from apscheduler.abc import DataStore, Serializer

from . import _export
from . import _layout as layout
from ._export import Counts, ExportFileError, ExportReport, ImportReport, Skipped
from ._signing import AllowedCallables
from ._v3 import (
    DEFAULT_EXECUTORS,
    Converted,
    NotConvertibleError,
    V3Job,
    brief,
    convert_job,
    read_job,
    task_id_of,
)

__all__ = [
    "Counts",
    "ExportFileError",
    "ExportReport",
    "ImportReport",
    "Skipped",
    "V3ImportReport",
    "check_v3_source",
    "export_store",
    "import_store",
    "import_v3",
]

# Documented here, where they are public
for _public in (Counts, ExportFileError, ExportReport, ImportReport, Skipped):
    _public.__module__ = __name__

#: The collections of a store, which no 3.x collection it imports from may be
_STORE_COLLECTIONS = frozenset(
    {
        layout.TASKS,
        layout.SCHEDULES,
        layout.JOBS,
        layout.EVENTS,
        layout.SCHEDULERS,
        layout.QUARANTINE,
        layout.HISTORY,
        layout.AUDIT,
    }
)


@attrs.frozen
class V3ImportReport:
    """
    What :func:`import_v3` did (or, in a dry run, would do).

    :var read: how many 3.x documents were read
    :var tasks: the tasks of the converted jobs, by id
    :var schedules: the schedule of each job that could be converted
    :var refused: why each job that could not be converted was not, by its id
    :var tasks_added: the ids of the tasks added (in a dry run: that would be)
    :var tasks_present: the ids of the tasks the store already had, left as they are
    :var schedules_added: the ids of the schedules added (in a dry run: that would be)
    :var schedules_present: the ids of the schedules the store already had, left as
        they are
    :var dry_run: whether nothing was written
    """

    read: int
    tasks: Mapping[str, Task]
    schedules: tuple[Schedule, ...]
    refused: Mapping[str, str]
    tasks_added: tuple[str, ...]
    tasks_present: tuple[str, ...]
    schedules_added: tuple[str, ...]
    schedules_present: tuple[str, ...]
    dry_run: bool


def check_v3_source(
    source_database: str, source_collection: str, target_database: str
) -> None:
    """
    Refuse to import into the database whose collection the 3.x jobs are read from.

    3.x's ``MongoDBJobStore`` and this package's store both default to database
    ``apscheduler``, and to a collection named ``jobs``: importing there would write
    the schedules beside (and the store's jobs into) the 3.x documents.

    :raises ValueError: if the 3.x collection is one of the target store's
    """
    if source_database == target_database and source_collection in _STORE_COLLECTIONS:
        raise ValueError(
            f"the APScheduler 3 jobs are in collection {source_collection!r} of "
            f"database {source_database!r}, which the store would use as its own: "
            "import into another database"
        )


async def import_v3(
    source: Any,
    store: DataStore | None,
    *,
    executors: Mapping[str, str] = DEFAULT_EXECUTORS,
    allowed_types: Iterable[type | str] = (),
    allowed_callables: Iterable[str] | None = None,
    now: datetime | None = None,
    check_source: bool = True,
) -> V3ImportReport:
    """
    Add the tasks and schedules equal to the jobs of a 3.x ``MongoDBJobStore``.

    Each job becomes a schedule with the job's id, arguments, misfire grace time,
    coalescing, executor, jitter (as ``max_jitter``) and next run time, of a task
    named by the job's function (``max_instances`` becomes its
    ``max_running_jobs``); a paused job becomes a paused schedule. Tasks and
    schedules the store already has are left as they are, so running it again adds
    nothing twice. The 3.x collection is only read.

    :param source: the 3.x collection (a :class:`pymongo.asynchronous.collection.\
AsyncCollection`, or Motor's)
    :param store: a started data store to add to, or ``None`` for a dry run, which
        only reads ``source``
    :param executors: APScheduler 4's executor for each 3.x executor name (by
        default ``default`` and ``threadpool`` to ``threadpool``, ``processpool`` to
        ``processpool``)
    :param allowed_types: the user's classes that the jobs' arguments may hold, as
        classes or ``"module:qualname"`` strings (of modules already imported):
        any other class refuses the job
    :param allowed_callables: ``"module:qualname"`` or ``"module:*"`` patterns: a
        job whose function falls outside is not converted (default: those of
        ``store``, if it is this package's store and has some). Importing vouches
        for the functions the 3.x documents name: a store with a signing key signs
        them, so give the patterns when the 3.x collection could have been written
        by someone you do not trust
    :param now: from when a paused job's next fire time is computed (default: now)
    :param check_source: refuse a source whose database and collection names are
        those of ``store``'s own (pass ``False`` only when they are on different
        servers)
    :raises ValueError: if ``check_source`` and ``store`` is this package's store on
        the database whose collection ``source`` is, or a pattern is malformed
    """
    target = getattr(store, "database", None)
    if check_source and isinstance(target, str):
        check_v3_source(source.database.name, source.name, target)

    if allowed_callables is not None:
        allowed: AllowedCallables | None = AllowedCallables.of(allowed_callables)
    else:
        allowed = getattr(store, "allowed_callables", None)

    now = now or datetime.now(timezone.utc)
    types = tuple(allowed_types)
    read, jobs, refused = await _read_all(source, types, allowed)
    limits = _common_limits(jobs)
    converted: list[Converted] = []
    for job in jobs:
        outcome = _converted(job, task_id_of(job, limits), now, executors)
        if isinstance(outcome, str):
            refused[job.id] = outcome
        else:
            converted.append(outcome)

    tasks: dict[str, Task] = {}
    for item in converted:
        tasks.setdefault(item.task.id, item.task)

    schedule_ids = [item.schedule.id for item in converted]
    if store is None:
        return V3ImportReport(
            read=read,
            tasks=tasks,
            schedules=tuple(item.schedule for item in converted),
            refused=refused,
            tasks_added=tuple(tasks),
            tasks_present=(),
            schedules_added=tuple(schedule_ids),
            schedules_present=(),
            dry_run=True,
        )

    known_tasks = {task.id for task in await store.get_tasks()}
    for task_id, task in tasks.items():
        if task_id not in known_tasks:
            await store.add_task(task)

    known = {schedule.id for schedule in await store.get_schedules(set(schedule_ids))}
    for item in converted:
        if item.schedule.id not in known:
            await store.add_schedule(item.schedule, ConflictPolicy.do_nothing)

    return V3ImportReport(
        read=read,
        tasks=tasks,
        schedules=tuple(item.schedule for item in converted),
        refused=refused,
        tasks_added=tuple(task_id for task_id in tasks if task_id not in known_tasks),
        tasks_present=tuple(task_id for task_id in tasks if task_id in known_tasks),
        schedules_added=tuple(i for i in schedule_ids if i not in known),
        schedules_present=tuple(i for i in schedule_ids if i in known),
        dry_run=False,
    )


async def _read_all(
    source: Any,
    allowed_types: tuple[type | str, ...],
    allowed: AllowedCallables | None,
) -> tuple[int, list[V3Job], dict[str, str]]:
    """Return how many documents were read, the jobs read, and why others were not."""
    jobs: list[V3Job] = []
    refused: dict[str, str] = {}
    read = 0
    async for document in source.find({}, sort=[("_id", 1)]):
        read += 1
        job = _read(document, allowed_types, allowed)
        if isinstance(job, str):
            key = document.get("_id")
            short = isinstance(key, str) and len(key) <= 200
            refused[key if short else brief(key)] = job
        else:
            jobs.append(job)

    return read, jobs, refused


def _read(
    document: Mapping[str, Any],
    allowed_types: tuple[type | str, ...],
    allowed: AllowedCallables | None,
) -> V3Job | str:
    """Return the 3.x job ``document`` holds, or why it cannot be converted."""
    try:
        job = read_job(document, allowed_types)
    except NotConvertibleError as exc:
        return str(exc)
    except Exception as exc:  # one crafted document must not end the import
        return f"it cannot be read: {brief(exc)}"

    if allowed is not None and not allowed.allows(job.func):
        return f"its function {job.func!r} is not among the allowed callables"

    return job


def _converted(
    job: V3Job, task_id: str, now: datetime, executors: Mapping[str, str]
) -> Converted | str:
    """Return the conversion of ``job``, or why it cannot be converted."""
    try:
        return convert_job(job, task_id, now, executors)
    except NotConvertibleError as exc:
        return str(exc)
    except Exception as exc:  # one crafted document must not end the import
        return f"it cannot be converted: {brief(exc)}"


def _common_limits(jobs: Iterable[V3Job]) -> dict[str, int]:
    """Return each function's most common ``max_instances`` (the least, in a tie)."""
    counts: dict[str, Counter[int]] = {}
    for job in jobs:
        counts.setdefault(job.func, Counter())[job.max_instances] += 1

    return {
        func: min(counter, key=lambda limit: (-counter[limit], limit))
        for func, counter in counts.items()
    }


async def export_store(
    store: DataStore,
    output: IO[str],
    *,
    jobs: bool = False,
    serializer: Serializer | None = None,
) -> ExportReport:
    """
    Write the tasks and schedules of a store (and its jobs) to ``output``.

    The lines are signed with the store's ``signing_key``, if it has one. Leases are
    not exported: a job running when exported is written as queued.

    :param store: a started data store (any, read through its API)
    :param output: a text stream to write the lines to
    :param jobs: also export the jobs that are queued or running
    :param serializer: the serializer of triggers and arguments in the file
        (APScheduler's ``PickleSerializer`` by default)
    :raises ValueError: if ``serializer`` is not one of APScheduler's
    :raises ~apscheduler.SerializationError: if a value cannot be serialized with it
    """
    return await _export.export_store(store, output, jobs=jobs, serializer=serializer)


async def import_store(
    store: DataStore,
    input: IO[str],
    *,
    replace: bool = False,
    trust_unsigned: bool = False,
    allowed_types: Iterable[type | str] = (),
    dry_run: bool = False,
) -> ImportReport:
    """
    Add what an export file holds to a store, creating nothing twice.

    The whole file is read and checked before anything is written; a file that fails
    is refused as a whole. With the store's ``signing_key``, every line's signature is
    checked, and a file that is not signed is refused unless ``trust_unsigned``
    (importing it would sign whatever it holds). Values are read only with the safe
    serializers of :mod:`apscheduler_mongo.serializers`.

    :param store: a started data store
    :param input: a text stream of the file's lines
    :param replace: replace the tasks and schedules the store already has (else they
        are left as they are); jobs are never replaced
    :param trust_unsigned: import a file that is not signed all the same
    :param allowed_types: the classes, besides APScheduler's triggers and plain
        values, that the arguments may hold (classes, or ``"module:qualname"``
        strings of modules already imported)
    :param dry_run: only say what would be done
    :raises ExportFileError: if the file is refused
    """
    return await _export.import_store(
        store,
        input,
        replace=replace,
        trust_unsigned=trust_unsigned,
        allowed_types=allowed_types,
        dry_run=dry_run,
    )
