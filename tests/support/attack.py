"""
The trust-boundary attack: an attacker's raw writes, and the processes they target.

The attacker holds write access to the database and nothing else: no key, no code on
any host. Each tampering path writes a payload that, if it ever ran, would touch its
own marker file; :func:`tamper` makes every write, and the test checks which markers
exist afterwards. The legitimate application's tasks live here too, so that scheduler
processes (run with ``python -m tests.support.attack``) can import them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from apscheduler import (
    AsyncScheduler,
    CoalescePolicy,
    ConflictPolicy,
    Schedule,
    SchedulerRole,
    Task,
)
from apscheduler.serializers.pickle import PickleSerializer
from apscheduler.triggers.interval import IntervalTrigger
from bson import ObjectId
from pymongo import MongoClient

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker
from apscheduler_mongo._marshalling import schedule_to_document
from apscheduler_mongo._signing import Codec

#: The tampering paths, each with a marker file of its own
PATHS = (
    "args",  # a pickle gadget in a schedule's args
    "trigger",  # a pickle gadget in a schedule's trigger
    "new-task",  # a new task pointing at os:system, with a schedule for it
    "func-swap",  # an existing task with only its func changed
    "event",  # an event whose JSON payload names a module to import
    "result",  # a pickle gadget in a stored result's exception
    "splice",  # a valid signature (and its value) moved into another document
    "stripped",  # a gadget in a schedule whose signature was removed
)
#: The module the event path names; importing it touches the event marker
EVIL_MODULE = "attack_evil_module"
#: Where the legitimate schedules record their runs
RUNS = "runs"
INTERVAL = timedelta(seconds=0.5)
ALLOWED = ["tests.support.attack:*"]


def marker(directory: Path, path: str) -> Path:
    return directory / f"ran-{path}"


def touch_command(directory: Path, path: str) -> str:
    return f"touch {marker(directory, path)}"


# The legitimate application's tasks


def record(text: str) -> None:
    """Record a run of a legitimate schedule (its argument is only text to it)."""
    uri, database = os.environ["ATTACK_URI"], os.environ["ATTACK_DATABASE"]
    client: MongoClient[dict[str, Any]] = MongoClient(
        uri, serverSelectionTimeoutMS=5000
    )
    with client:
        client[database][RUNS].insert_one({"text": text, "pid": os.getpid()})


def run_command(command: str) -> None:
    """Run an administrator's command: legitimate, with the arguments it was given."""
    subprocess.run(command, shell=True, check=False)


class _Gadget:
    """What an attacker pickles: unpickling it runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def gadget(command: str) -> bytes:
    return pickle.dumps(_Gadget(command), protocol=4)


def _schedule(schedule_id: str, task_id: str, *args: Any) -> Schedule:
    schedule = Schedule(
        id=schedule_id,
        task_id=task_id,
        trigger=IntervalTrigger(seconds=INTERVAL.total_seconds()),
        args=args,
        coalesce=CoalescePolicy.latest,
        job_executor="threadpool",
    )
    schedule.next_fire_time = datetime.now(timezone.utc) + timedelta(seconds=1)
    return schedule


async def set_up(store: MongoDBDataStore, markers: Path) -> None:
    """Add the legitimate application's tasks and schedules, through a signing store."""
    await store.add_task(
        Task(id="record", func=f"{__name__}:record", job_executor="threadpool")
    )
    await store.add_task(
        Task(id="admin", func=f"{__name__}:run_command", job_executor="threadpool")
    )
    # Only text to ``record``; the splice moves it to the admin task's schedule
    for schedule_id in ("legit", "args", "trigger", "func-swap", "stripped"):
        text = touch_command(
            markers, "splice" if schedule_id == "legit" else schedule_id
        )
        task = "record"
        if schedule_id == "func-swap":
            await store.add_task(
                Task(id="swapped", func=f"{__name__}:record", job_executor="threadpool")
            )
            task = "swapped"
        await store.add_schedule(
            _schedule(schedule_id, task, text), ConflictPolicy.replace
        )

    await store.add_schedule(
        _schedule("admin", "admin", "true"), ConflictPolicy.replace
    )


def tamper(uri: str, database: str, markers: Path) -> None:
    """Make every tampering path's raw writes, as an attacker without the key would."""
    codec = Codec(PickleSerializer())  # what anyone can compute: no key
    client: MongoClient[dict[str, Any]] = MongoClient(
        uri, serverSelectionTimeoutMS=5000
    )
    with client:
        db = client[database]
        schedules, tasks, jobs = db["schedules"], db["tasks"], db["jobs"]
        # A gadget in a schedule's args, and in another's trigger
        schedules.update_one(
            {"_id": "args"}, {"$set": {"args": gadget(touch_command(markers, "args"))}}
        )
        schedules.update_one(
            {"_id": "trigger"},
            {"$set": {"trigger": gadget(touch_command(markers, "trigger"))}},
        )
        # A task of the attacker's, with a schedule for it
        tasks.insert_one(
            {"_id": "evil", "func": "os:system", "job_executor": "threadpool"}
        )
        evil = _schedule("new-task", "evil", touch_command(markers, "new-task"))
        schedules.insert_one(schedule_to_document(evil, codec))
        # An existing task whose func is changed (its stored signature kept)
        tasks.update_one({"_id": "swapped"}, {"$set": {"func": "os:system"}})
        # The legitimate schedule's signed arguments (harmless text to ``record``)
        # moved, with their signature, into the schedule of the task that runs
        # commands
        legit = schedules.find_one({"_id": "legit"})
        assert legit is not None
        moved: dict[str, Any] = {"args": legit["args"]}
        if isinstance(legit.get("mac"), Mapping):
            moved["mac.call"] = legit["mac"].get("call")
        schedules.update_one({"_id": "admin"}, {"$set": moved})
        # A gadget in a schedule whose signatures were removed
        schedules.update_one(
            {"_id": "stripped"},
            {
                "$set": {"args": gadget(touch_command(markers, "stripped"))},
                "$unset": {"mac": ""},
            },
        )
        # A stored result whose exception is a gadget
        jobs.insert_one(_finished_job(gadget(touch_command(markers, "result"))))


def publish_evil_event(uri: str, database: str) -> None:
    """Store an event whose payload names a module to import (brokers skip the
    events stored before they start, so this comes once the victims run)."""
    payload = (
        b'{"job_id": "00000000-0000-0000-0000-000000000000", "task_id": "x", '
        b'"schedule_id": null, "_apscheduler_json": ["'
        + EVIL_MODULE.encode()
        + b':Thing", {}]}'
    )
    client: MongoClient[dict[str, Any]] = MongoClient(
        uri, serverSelectionTimeoutMS=5000
    )
    with client:
        client[database]["events"].insert_one(
            {
                "_id": ObjectId(),
                "publisher": "attacker",
                "seq": 1,
                "type": "JobAdded",
                "payload": payload,
                "at": datetime.now(timezone.utc),
            }
        )


def _finished_job(exception: bytes) -> dict[str, Any]:
    from uuid import uuid4

    from bson import Binary

    now = datetime.now(timezone.utc)
    micros = int(now.timestamp() * 1_000_000)
    later = micros + 3_600_000_000
    return {
        "_id": Binary.from_uuid(uuid4()),
        "state": "finished",
        "task_id": "record",
        "schedule_id": None,
        "executor": "threadpool",
        "created_at": micros,
        "created_at_offset": 0,
        "finished_time": micros,
        "result": {
            "outcome": "error",
            "exception": exception,
            "started_at": micros,
            "started_at_offset": 0,
            "finished_at": micros,
            "finished_at_offset": 0,
            "expires_at": later,
            "expires_at_offset": 0,
        },
    }


def write_evil_module(directory: Path, markers: Path) -> None:
    """Write the module the event names: importing it touches the event marker."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{EVIL_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(marker(markers, 'event'))!r}).touch()\n"
        f"class Thing:\n    def __setstate__(self, state):\n        pass\n"
    )


# The victims


async def run_victim(role: str, seconds: float, secured: bool) -> None:
    """Run a scheduler (``both``) or a worker that configured no task, for a while."""
    uri, database = os.environ["ATTACK_URI"], os.environ["ATTACK_DATABASE"]
    options: dict[str, Any] = {}
    if secured:
        options = {"signing_key": os.environ["ATTACK_KEY"]}

    store = MongoDBDataStore(
        uri,
        database=database,
        allowed_callables=ALLOWED if secured else None,
        **options,
    )
    broker = MongoDBEventBroker(
        uri, database=database, mode="polling", poll_interval=0.1, **options
    )
    async with AsyncScheduler(
        data_store=store,
        event_broker=broker,
        role=SchedulerRole[role],
        cleanup_interval=timedelta(seconds=1),
    ) as scheduler:
        await scheduler.start_in_background()
        await asyncio.sleep(seconds)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["both", "worker"])
    parser.add_argument("seconds", type=float)
    parser.add_argument("--secured", action="store_true")
    args = parser.parse_args()
    asyncio.run(run_victim(args.role, args.seconds, args.secured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
