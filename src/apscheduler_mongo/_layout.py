"""
The document layout: collections, job states, indexes, and the queries on them.

Every filter, update and sort the store and the command line send is built here, so
that a field's name and meaning can be read (and changed) in one place; the
conversions between APScheduler's structures and these documents are in
:mod:`._marshalling`. :doc:`design` describes the layout for users.

Times are integer microseconds since the Unix epoch (see :mod:`._marshalling`); "now"
is always passed in, in those units.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import attrs
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.errors import DuplicateKeyError

#: A document as the driver reads or writes it
Document = dict[str, Any]

#: A collection only APScheduler's built-in MongoDB store has (its job results)
BUILTIN_MARKER = "job_results"

TASKS = "tasks"
SCHEDULES = "schedules"
JOBS = "jobs"
EVENTS = "events"
#: The live schedulers' records (see :mod:`._registry`)
SCHEDULERS = "schedulers"
#: The job history per minute and store process, for charts (see :mod:`._history`)
HISTORY = "history"

#: Where a quarantined schedule or job records why, and since when: such a document
#: is never handed out again, and never deleted unannounced
QUARANTINE = "quarantine"
#: Where a document keeps its signatures (see :mod:`._signing`): one per part
MAC_FIELD = "mac"
#: The signed parts of each kind of document, and the fields each part covers: what
#: a process would deserialize or import, with what binds it to its task. A part is
#: signed whenever any of its fields is written; a document holds the part while it
#: holds the part's first field (a job that finished with success drops its
#: arguments; one that did not keeps them, signed, so that it can be retried)
SIGNED_PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    TASKS: {"task": ("job_executor", "func")},
    SCHEDULES: {"call": ("args", "kwargs", "task_id"), "trigger": ("trigger",)},
    JOBS: {
        "call": ("args", "kwargs", "task_id"),
        "result": ("result.outcome", "result.return_value", "result.exception"),
    },
    EVENTS: {"payload": ("payload", "type", "publisher", "seq")},
}

#: The states of a job document (its ``state`` field)
QUEUED = "queued"
ACQUIRED = "acquired"
FINISHED = "finished"
LIVE_STATES = [QUEUED, ACQUIRED]
STATES = [QUEUED, ACQUIRED, FINISHED]

#: The order in which jobs are handed out
QUEUE_ORDER = [("created_at", ASCENDING), ("_id", ASCENDING)]
#: The order in which due schedules are handed out
DUE_ORDER = [("next_fire_time", ASCENDING), ("_id", ASCENDING)]
#: The newest finished jobs first; those without a finish time (quarantined) last.
#: The reverse of the ``finished`` index's order, so that the index serves it
NEWEST_FIRST = [("finished_time", DESCENDING), ("_id", DESCENDING)]
BY_ID = [("_id", ASCENDING)]

#: The indexes of each collection, and (below) which queries each serves. Every query
#: on a hot path is served by one whose prefix is its equality fields and whose
#: order gives its sort (tests/test_cost.py checks the commands sent)
SCHEDULE_INDEXES = [
    # Due schedules in the order they are handed out; finished ones (null)
    IndexModel([("next_fire_time", ASCENDING), ("_id", ASCENDING)], name="due"),
    # The free schedule that falls due first
    IndexModel(
        [("acquired_by", ASCENDING), ("next_fire_time", ASCENDING)], name="free"
    ),
    # The held schedule whose lease runs out first
    IndexModel([("acquired_until", ASCENDING)], name="leases"),
    # What a claim took, read back by its token
    IndexModel(
        [("v", ASCENDING), ("next_fire_time", ASCENDING), ("_id", ASCENDING)],
        name="claim",
    ),
    # One task's schedules in id order (the dashboard's filter by task)
    IndexModel([("task_id", ASCENDING), ("_id", ASCENDING)], name="task_schedules"),
]
#: The server deletes a scheduler's record once its ``expires`` (a date) has passed
SCHEDULER_INDEXES = [
    IndexModel([("expires", ASCENDING)], name="expires", expireAfterSeconds=0)
]
HISTORY_INDEXES = [
    # The minutes of a span, for the charts (read_history)
    IndexModel([("minute", ASCENDING)], name="minute"),
    # The server deletes a minute's counts once its ``expires`` (a date) has passed
    IndexModel([("expires", ASCENDING)], name="expires", expireAfterSeconds=0),
]
#: Indexes of earlier versions that nothing uses any more, dropped at start
RETIRED_SCHEDULE_INDEXES = frozenset({"next_fire_time", "task_id"})
JOB_INDEXES = [
    # The queue (queued jobs, and acquired ones whose lease may have lapsed), in
    # queue order; the live jobs; jobs in no known state
    IndexModel(
        [("state", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)],
        name="queue",
    ),
    # The jobs one scheduler holds, in queue order (reaping)
    IndexModel(
        [
            ("state", ASCENDING),
            ("acquired_by", ASCENDING),
            ("created_at", ASCENDING),
            ("_id", ASCENDING),
        ],
        name="owner",
    ),
    # One task's queue, in queue order (a claim reads a capped task's free jobs no
    # further than its free slots); the running jobs of some tasks (running counts)
    IndexModel(
        [
            ("task_id", ASCENDING),
            ("state", ASCENDING),
            ("created_at", ASCENDING),
            ("_id", ASCENDING),
        ],
        name="task_queue",
    ),
    # The live jobs of finished schedules (cleanup); a schedule's last runs,
    # newest first (``schedule_runs``: the dashboard's page of a schedule)
    IndexModel(
        [
            ("schedule_id", ASCENDING),
            ("state", ASCENDING),
            ("finished_time", ASCENDING),
            ("_id", ASCENDING),
        ],
        name="schedule_state",
    ),
    # What a claim took, read back by its token
    IndexModel(
        [("v", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)], name="claim"
    ),
    # The queued jobs meant for later, by fire time
    IndexModel(
        [("state", ASCENDING), ("scheduled_fire_time", ASCENDING)], name="waiting"
    ),
    # Finished jobs by finish time (forgetting used fire times, in batches)
    IndexModel(
        [("state", ASCENDING), ("finished_time", ASCENDING), ("_id", ASCENDING)],
        name="finished",
    ),
    # Stored results by expiry
    IndexModel([("result.expires_at", ASCENDING)], name="results", sparse=True),
    # One job per fire time of a schedule, one holder per slot of a capped task
    IndexModel([("fire_key", ASCENDING)], name="fire_key", unique=True, sparse=True),
    IndexModel([("slot_key", ASCENDING)], name="slot_key", unique=True, sparse=True),
    # Expired records, deleted by the server (and by cleanup)
    IndexModel([("purge_at", ASCENDING)], name="purge_at", expireAfterSeconds=0),
    # Finished jobs by outcome, newest first, of all tasks or of one (the
    # dashboard's job listing); only finished jobs have an outcome, so no other
    # write touches these
    IndexModel(
        [
            ("state", ASCENDING),
            ("outcome", ASCENDING),
            ("created_at", ASCENDING),
            ("_id", ASCENDING),
        ],
        name="outcomes",
        partialFilterExpression={"outcome": {"$exists": True}},
    ),
    IndexModel(
        [
            ("task_id", ASCENDING),
            ("state", ASCENDING),
            ("outcome", ASCENDING),
            ("created_at", ASCENDING),
            ("_id", ASCENDING),
        ],
        name="task_outcomes",
        partialFilterExpression={"outcome": {"$exists": True}},
    ),
]
RETIRED_JOB_INDEXES = frozenset({"leases", "acquired_by", "task_state"})


def event_indexes(ttl_seconds: int) -> list[IndexModel]:
    """Return the indexes of the broker's events collection."""
    return [
        # Old events, deleted by the server
        IndexModel([("at", ASCENDING)], name="at", expireAfterSeconds=ttl_seconds),
        # New events, in the order they are read
        IndexModel(
            [("at", ASCENDING), ("publisher", ASCENDING), ("seq", ASCENDING)],
            name="read_order",
        ),
    ]


RETIRED_EVENT_INDEXES = frozenset({"publisher_seq"})


# Keys

#: How a duplicate key error names its index, for servers whose errors carry no
#: ``keyPattern`` ("E11000 duplicate key error collection: db.jobs index: fire_key")
_DUPLICATE_INDEX = re.compile(r"\bindex: (\S+)")


def duplicated_key(exc: DuplicateKeyError) -> str | None:
    """Return the (first) field of the unique index a duplicate key error names."""
    key_pattern = (exc.details or {}).get("keyPattern")
    if isinstance(key_pattern, Mapping) and key_pattern:
        return str(next(iter(key_pattern)))

    match = _DUPLICATE_INDEX.search(str(exc))
    return match.group(1) if match else None


def fire_key(schedule_id: str, fire_time: int) -> str:
    """Return the unique key of one fire time (microseconds) of one schedule."""
    return f"{fire_time}/{schedule_id}"


def slot_key(task_id: str, slot: int) -> str:
    """Return the unique key of one concurrency slot of a task."""
    return f"{slot}/{task_id}"


def slot_number(key: str) -> int:
    """Return the slot number held in a key made by :func:`slot_key`."""
    return int(key.partition("/")[0])


# Leases: ``acquired_by`` (the owner), ``acquired_until`` (the expiry) and ``v``, the
# version token that every write to a leasable document replaces


def new_token() -> ObjectId:
    return ObjectId()


# Writes a retry can recognise: each carries a fresh token, in ``v`` and in a field
# of its own; a retried write that finds nothing to do reads that field back to tell
# whether its lost attempt landed

#: The token of the insert that created a document
INSERT_TOKEN = "insert_token"
#: The token of the release that finished a job or let a schedule go
RELEASE_TOKEN = "release_token"
#: The token of the read that took a job's result
TAKE_TOKEN = "take_token"


@attrs.frozen
class Tag:
    """A write tagged with ``token`` in ``field``, to be recognised after a retry."""

    field: str
    token: ObjectId = attrs.field(factory=new_token)

    def fields(self) -> Document:
        """Return the fields the write sets (``v`` too: every write replaces it)."""
        return {"v": self.token, self.field: self.token}

    def projection(self) -> Document:
        return {self.field: 1}

    def on(self, document: Mapping[str, Any] | None) -> bool:
        """Tell whether ``document`` (as read back) carries this write's token."""
        return document is not None and document.get(self.field) == self.token


def by_id(document_id: object) -> Document:
    return {"_id": document_id}


def by_ids(ids: Iterable[Any]) -> Document:
    return {"_id": {"$in": list(ids)}}


#: Projections of the fields some reads need
TASK_ID_ONLY: Document = {"task_id": 1}
STATE_ONLY: Document = {"state": 1}
NEXT_FIRE_TIME_ONLY: Document = {"next_fire_time": 1}
#: What counting the running jobs of tasks reads of each
RUNNING_TASK_IDS: Document = {"task_id": True, "_id": False}


def task_pipeline(task_id: str) -> list[Document]:
    """Return the pipeline that reads one task (beside its running count)."""
    return [{"$match": {"_id": task_id}}]


def lease(owner: str, until: int, token: ObjectId) -> Document:
    """Return the fields of a lease held by ``owner`` until ``until``."""
    return {"acquired_by": owner, "acquired_until": until, "v": token}


#: The fields of a document nobody holds
NO_LEASE: Document = {"acquired_by": None, "acquired_until": None}
#: The fields of its lease a job loses when it stops running (with its slot)
LEASE_DROPS: Document = dict.fromkeys(["acquired_by", "acquired_until", "slot_key"], "")
#: ... and those a job that finished with success loses: its arguments too. A job
#: that finished otherwise (an error, a missed start deadline, abandoned, cancelled)
#: keeps them, with their signature, until its record goes (when its result
#: expires, or its fire time is forgotten), so that an operator can retry it
FINISHED_DROPS: Document = {
    **dict.fromkeys(["args", "kwargs", f"{MAC_FIELD}.call"], ""),
    **LEASE_DROPS,
}

# What a finished job records beside its result (which is kept only while it is
# wanted): set in the finishing write, so they cost no command of their own. Shown
# by the operator tools, never deserialized

#: The outcome (a :class:`~apscheduler.JobOutcome` name)
OUTCOME = "outcome"
#: When it started (microseconds), if it did
STARTED_TIME = "started_time"
#: The formatted traceback of the exception it finished with, as plain text, its
#: end kept (at most :data:`TRACEBACK_LIMIT` characters). Not signed: it is text
#: that nothing deserializes, imports or runs, and readers show it escaped (a
#: forged one misleads no more than any other unsigned field shown, such as a task
#: id); signing it would only add a part that nothing needs to trust
TRACEBACK = "traceback"
TRACEBACK_LIMIT = 16_384


def lapsed(now: int) -> Document:
    """Match a lease that ran out before ``now`` (at ``acquired_until`` it holds)."""
    # "$ne: None" keeps servers without type bracketing from matching nulls
    return {"acquired_until": {"$lt": now, "$ne": None}}


def claimed_with(token: ObjectId) -> Document:
    """Match the documents that the claim or write carrying ``token`` took."""
    return {"v": token}


def unchanged(document: Document) -> Document:
    """Match ``document`` as long as nobody wrote to it since it was read."""
    return {"_id": document["_id"], "v": document.get("v")}


def held_by(owner: str, ids: Sequence[Any]) -> Document:
    return {"_id": {"$in": list(ids)}, "acquired_by": owner}


def running_of(owner: str, ids: Sequence[Any]) -> Document:
    """Match the jobs of ``ids`` that ``owner`` holds, not finished."""
    return {**held_by(owner, ids), "state": ACQUIRED}


def extension(until: int, token: ObjectId) -> Document:
    """Return the update that moves a lease's expiry on (``token``: its new token)."""
    return {"$set": {"acquired_until": until, "v": token}}


def unconfirmed_claim(token: ObjectId, owner: str, jobs: bool) -> Document:
    """Match what a claim that never reached its scheduler still holds."""
    query = {**claimed_with(token), "acquired_by": owner}
    return {**query, "state": ACQUIRED} if jobs else query


def given_back_job(token: ObjectId) -> Document:
    """
    Return the update that puts a job back in the queue: one taken by an undelivered
    claim, or handed out and never started (``token``: its new version token).
    """
    return {
        "$set": {"state": QUEUED, "v": token, **NO_LEASE},
        "$unset": {"slot_key": ""},
    }


def given_back_schedule(token: ObjectId) -> Document:
    """Return the update that frees a schedule (``token``: its new version token)."""
    return {"$set": {"v": token, **NO_LEASE}}


# Schedules

#: Match the schedules that can fire: not finished, paused or quarantined
ACTIVE: Document = {"paused": {"$ne": True}, QUARANTINE: {"$exists": False}}


def due_schedules(owner: str, now: int) -> Document:
    """Match the schedules ``owner`` may take at ``now``: due, active and free."""
    return {
        "next_fire_time": {"$lte": now, "$ne": None},
        **ACTIVE,
        "$or": [{"acquired_by": None}, lapsed(now), {"acquired_by": owner}],
    }


#: Match the active schedules that someone may take when they fall due
WAITING_FREE: Document = {
    "acquired_by": None,
    "next_fire_time": {"$ne": None},
    **ACTIVE,
}
#: ... and those held, which someone may take when their lease runs out
WAITING_HELD: Document = {
    "acquired_until": {"$ne": None},
    "next_fire_time": {"$ne": None},
    **ACTIVE,
}


def finished_schedules(after: str | None) -> Document:
    """
    Match the finished schedules nobody holds (whose ids can be read).

    :param after: the id of the last schedule of the previous batch
    """
    ids: Document = {"$type": "string"}
    if after is not None:
        ids["$gt"] = after

    return {"next_fire_time": None, "acquired_by": None, "_id": ids}


def released_schedule(owner: str, schedule_id: str) -> Document:
    """Match a schedule as its releasing owner may still change it."""
    return {"_id": schedule_id, "acquired_by": owner}


def quarantined_schedule(schedule_id: object, token: object | None) -> Document:
    """Match a schedule to quarantine: as a claim with ``token`` took it, if given."""
    query = by_id(schedule_id)
    if token is not None:
        query["v"] = token

    return query


def quarantine_update(record: Document) -> Document:
    """Return the update that sets a schedule aside for good, with ``record``."""
    return {"$set": {QUARANTINE: record, "v": new_token(), **NO_LEASE}}


# Jobs


def free_jobs(now: int) -> Document:
    """
    Match the jobs a scheduler may take at ``now``: queued, or acquired with a lapsed
    lease; and not meant for later (a job that a scheduler whose clock runs ahead
    added for a fire time still to come waits for it).
    """
    return {
        "$and": [
            {"$or": [{"state": QUEUED}, {"state": ACQUIRED, **lapsed(now)}]},
            {
                "$or": [
                    {"scheduled_fire_time": None},
                    {"scheduled_fire_time": {"$lte": now}},
                ]
            },
        ]
    }


def live_jobs(ids: Iterable[Any] | None = None) -> Document:
    query: Document = {"state": {"$in": LIVE_STATES}}
    if ids is not None:
        query["_id"] = {"$in": list(ids)}

    return query


def unchanged_acquired(document: Document) -> Document:
    """Match an acquired job as long as nobody wrote to it since it was read."""
    return {**unchanged(document), "state": ACQUIRED}


def acquired_job(owner: str, job_id: object) -> Document:
    """Match a job as its owner may still finish it."""
    return {"_id": job_id, "state": ACQUIRED, "acquired_by": owner}


def acquired_jobs(owner: str | None = None) -> Document:
    return (
        {"state": ACQUIRED}
        if owner is None
        else {"state": ACQUIRED, "acquired_by": owner}
    )


def jobs_of(task_ids: Sequence[str], state: str) -> Document:
    return {"task_id": {"$in": list(task_ids)}, "state": state}


def lapsed_jobs(now: int) -> Document:
    return {"state": ACQUIRED, **lapsed(now)}


def queued_job(document_id: object) -> Document:
    """
    Match a job as long as it is queued: nobody has claimed it (a claim makes it
    acquired in the same write that takes it), so it can be cancelled.
    """
    return {"_id": document_id, "state": QUEUED}


def schedule_runs(schedule_id: str) -> Document:
    """Match the finished jobs of one schedule (the ``schedule_state`` index)."""
    return {"schedule_id": schedule_id, "state": FINISHED}


def in_state(state: str) -> Document:
    """Match the jobs in one state (served by the ``queue`` index)."""
    return {"state": state}


#: The finished jobs whose result is still stored
STORED_RESULTS: Document = {"state": FINISHED, "result": {"$exists": True}}
#: The queued and running jobs of each task, counted on the server in one command
LIVE_JOB_COUNTS: list[Document] = [
    {"$match": {"state": {"$in": LIVE_STATES}}},
    {"$group": {"_id": {"task": "$task_id", "state": "$state"}, "count": {"$sum": 1}}},
]


#: What reading a stored result takes of its job document
RESULT_FIELDS: Document = {"result": 1, "v": 1, "fire_key": 1, MAC_FIELD: 1}
#: What cleanup reads of the finished schedules it removes, and of used fire times
FINISHED_SCHEDULE_FIELDS: Document = {"task_id": 1, "v": 1}
USED_FIRE_TIME_FIELDS: Document = {"schedule_id": 1, "fire_time": 1, "finished_time": 1}
#: What a reaping or status read leaves out of a job document
WITHOUT_ARGUMENTS: Document = {"args": 0, "kwargs": 0}
#: Match the jobs in no state the store knows
STRAY_JOBS: Document = {"state": {"$nin": STATES}}
#: Match the documents of APScheduler 3's ``MongoDBJobStore`` (``{_id,
#: next_run_time, job_state}``), whose default database and collection are this
#: store's: they have no ``state``, and ours all have one. Served by the ``queue``
#: index (``state`` prefix, bounds [null, null]), which holds no entry there on a
#: store of ours, so a read finds nothing to fetch, whatever the store's size
V3_JOBS: Document = {"state": None, "job_state": {"$exists": True}}
#: What telling whether a collection holds some document reads of it
ID_ONLY: Document = {"_id": 1}


def live_jobs_of_schedules(schedule_ids: Sequence[Any]) -> Document:
    return {"schedule_id": {"$in": list(schedule_ids)}, "state": {"$in": LIVE_STATES}}


def stored_result(document_id: object) -> Document:
    """Match a finished job whose result is still stored."""
    return {"_id": document_id, "state": FINISHED, "result": {"$exists": True}}


def expired_records(now: datetime) -> Document:
    """Match the finished jobs whose ``purge_at`` (a BSON date) has passed."""
    # Only finished jobs have one
    return {"purge_at": {"$lte": now, "$type": "date"}}


def expired_results(now: int) -> Document:
    """Match the jobs whose stored result has expired (only finished ones have one)."""
    return {"result.expires_at": {"$lte": now}}


#: The update that drops a finished job's stored result
DROP_RESULT: Document = {"$unset": {"result": ""}}


def taken_result(tagged: Document, purge_at: datetime | None) -> Document:
    """
    Return the update that hands out a stored result once, and drops it.

    :param tagged: the fields that tag the write (see :class:`Tag`)
    :param purge_at: when the record may go (``None`` for a job of a schedule,
        whose record of the fire time stays until cleanup forgets it)
    """
    changes = dict(tagged)
    if purge_at is not None:
        changes["purge_at"] = purge_at

    return {"$set": changes, **DROP_RESULT}


def used_fire_times(cutoff: int, after: tuple[int, Any] | None) -> Document:
    """
    Match the records of fire times used before ``cutoff``, whose results are gone.

    :param after: the (finish time, id) of the last record of the previous batch
    """
    query: Document = {
        "state": FINISHED,
        "finished_time": {"$lt": cutoff, "$ne": None},
        "fire_key": {"$exists": True},
        "result": {"$exists": False},
    }
    if after is not None:
        finished_time, document_id = after
        query["$or"] = [
            {"finished_time": {"$gt": finished_time}},
            {"finished_time": finished_time, "_id": {"$gt": document_id}},
        ]

    return query


#: The order in which used fire times are forgotten, batch by batch
FINISH_ORDER = [("finished_time", ASCENDING), ("_id", ASCENDING)]


def forgettable(ids: Sequence[Any]) -> Document:
    return {"_id": {"$in": list(ids)}, "state": FINISHED, "result": {"$exists": False}}


def quarantined_job_update(record: Document) -> Document:
    """
    Return the update that takes a job document out of the queue for good.

    For a job that no result can name (its id is no UUID): it becomes finished
    without a result, purge time or finish time, so nothing deletes it, and it
    records why.
    """
    return {
        "$set": {"state": FINISHED, QUARANTINE: record, "v": new_token()},
        "$unset": LEASE_DROPS,
    }


def queue_branch(
    now: int,
    tasks: str,
    limit: int | None,
    task_ids: str | Document,
    passed_over: Sequence[Any] = (),
) -> list[Document]:
    """
    Return the pipeline that reads free jobs of some tasks, in queue order, each
    with its task document (if any) in ``TASK_FIELD``.

    ``task_ids`` matches the tasks (``{"$in": [...]}``, ``{"$nin": [...]}`` or one
    id); a further round of a claim leaves out the jobs it read already.
    """
    query = {**free_jobs(now), "task_id": task_ids}
    if passed_over:
        query["_id"] = {"$nin": list(passed_over)}

    pipeline: list[Document] = [{"$match": query}, {"$sort": dict(QUEUE_ORDER)}]
    if limit:
        pipeline.append({"$limit": limit})

    pipeline.append(
        {
            "$lookup": {
                "from": tasks,
                "localField": "task_id",
                "foreignField": "_id",
                "as": TASK_FIELD,
            }
        }
    )
    return pipeline


def holdings(task_ids: Document) -> list[Document]:
    """
    Return the pipeline that reads what the running jobs of some tasks hold, in one
    document: per task with running jobs, how many run, and each job that holds a
    slot with its key (read beside a claim's candidates, in the same round trip).
    """
    return [
        {"$match": {"state": ACQUIRED, "task_id": task_ids}},
        {
            "$group": {
                "_id": "$task_id",
                "running": {"$sum": 1},
                # Each job holding a slot (a slotless one pushes nothing)
                "held": {
                    "$push": {
                        "$cond": [
                            "$slot_key",
                            {"job": "$_id", "key": "$slot_key"},
                            "$$REMOVE",
                        ]
                    }
                },
            }
        },
        {
            "$group": {
                "_id": None,
                "tasks": {
                    "$push": {"task": "$_id", "running": "$running", "held": "$held"}
                },
            }
        },
    ]


#: What a claim reads of every task, now and then, to know which tasks are capped
TASK_LIMITS: list[Document] = [{"$project": {"max_running_jobs": 1}}]


def next_waiting_job(now: int) -> list[Document]:
    """
    Return the pipeline that finds the queued job meant for the earliest time after
    ``now`` (one that a scheduler whose clock runs ahead added early).
    """
    return [
        {"$match": {"state": QUEUED, "scheduled_fire_time": {"$gt": now}}},
        {"$sort": {"scheduled_fire_time": 1}},
        {"$limit": 1},
        {"$project": {"task_id": 1, "schedule_id": 1, "scheduled_fire_time": 1}},
    ]


def running_jobs_of(task_id: str) -> list[Document]:
    """Return the pipeline that counts the running jobs of one task."""
    return [
        {"$match": {"task_id": task_id, "state": ACQUIRED}},
        {"$group": {"_id": None, "running": {"$sum": 1}}},
    ]


#: Where a claim's read puts each job's task document (removed before use)
TASK_FIELD = "_task"


# Signatures (see _signing.py, and _tools/signing.py, which signs stored documents)

#: What telling whether a task is signed reads of it
TASK_SIGNATURE: Document = {f"{MAC_FIELD}.task": 1}


def signature_of(document: Mapping[str, Any], part: str) -> object:
    """Return the stored signature of one part of a document (``None``: unsigned)."""
    signatures = document.get(MAC_FIELD)
    return signatures.get(part) if isinstance(signatures, Mapping) else None


def is_signed(document: Mapping[str, Any], part: str) -> bool:
    """Tell whether a document carries a signature of ``part``."""
    return signature_of(document, part) is not None


def after_id(document_id: object) -> Document:
    """Match the documents whose ``_id`` sorts after ``document_id`` (paging)."""
    return {"_id": {"$gt": document_id}}


def _string_after(text: str) -> str:
    """Return the least string that sorts after every string starting with ``text``."""
    last = ord(text[-1])
    if last < 0x10FFFF:
        # Surrogates are no characters (BSON cannot hold one): step over them
        return text[:-1] + chr(0xE000 if 0xD7FF <= last < 0xE000 else last + 1)

    return _string_after(text[:-1]) if len(text) > 1 else "\U0010ffff"


def schedule_listing(
    task_id: str | None, prefix: str | None, after: str | None
) -> Document:
    """
    Match one page of the schedules (of one task, whose ids start with ``prefix``)
    in id order, after the previous page's last id: served by the ``_id`` index, or
    ``task_schedules`` for one task's.
    """
    query: Document = {}
    if task_id is not None:
        query["task_id"] = task_id
    if prefix:
        query["_id"] = {"$gte": prefix, "$lt": _string_after(prefix)}
    if after is not None:
        query.setdefault("_id", {}).pop("$gte", None)
        query["_id"]["$gt"] = after

    return query


def job_listing(
    state: str,
    task_id: str | None,
    outcome: str | None,
    after: tuple[int, Any] | None,
    *,
    newest_first: bool,
) -> Document:
    """
    Match one page of the jobs in ``state`` (of one task, with one outcome), in
    :func:`listing_order`, after the (creation time, id) of the previous page's
    last job. Served by the ``queue`` index, or ``task_queue`` for one task.
    """
    query: Document = {"state": state}
    if task_id is not None:
        query["task_id"] = task_id
    if outcome is not None:
        query[OUTCOME] = outcome
    if after is not None:
        created_at, document_id = after
        beyond = "$lt" if newest_first else "$gt"
        query["$or"] = [
            {"created_at": {beyond: created_at}},
            {"created_at": created_at, "_id": {beyond: document_id}},
        ]

    return query


def listing_order(newest_first: bool) -> list[tuple[str, int]]:
    """Return the order of a job listing: queue order, or its reverse."""
    if newest_first:
        return [(field, DESCENDING) for field, _ in QUEUE_ORDER]

    return QUEUE_ORDER


def unchanged_fields(document_id: object, values: Mapping[str, Any]) -> Document:
    """Match a document as long as the fields in ``values`` still hold them."""
    return {"_id": document_id, **values}


def signature_update(part: str, signature: bytes) -> Document:
    """Return the update that stores the signature of one part of a document."""
    return {"$set": {f"{MAC_FIELD}.{part}": signature}}


# The dashboard's audit trail (see dashboard/_audit.py)

#: Who made which change through the dashboard, and how it ended
AUDIT = "audit"
AUDIT_INDEXES = [
    # The server deletes a record once its ``expires`` (a date) has passed
    IndexModel([("expires", ASCENDING)], name="expires", expireAfterSeconds=0),
    # The newest records first (the audit page)
    IndexModel([("at", DESCENDING), ("_id", DESCENDING)], name="newest"),
]
AUDIT_ORDER = [("at", DESCENDING), ("_id", DESCENDING)]
AUDIT_FIELDS: Document = dict.fromkeys(
    ["at", "who", "address", "action", "target", "outcome", "message"], 1
)


def audit_record(
    record_id: ObjectId,
    at: datetime,
    expires: datetime,
    *,
    who: str | None,
    address: str | None,
    action: str,
    target: str | None,
) -> Document:
    """Return the record of an action about to be made (its outcome ``pending``)."""
    return {
        "_id": record_id,
        "at": at,
        "expires": expires,
        "who": who,
        "address": address,
        "action": action,
        "target": target,
        "outcome": "pending",
    }


def audit_outcome(outcome: str, message: str) -> Document:
    """Return the update that records how an action ended."""
    return {"$set": {"outcome": outcome, "message": message}}
