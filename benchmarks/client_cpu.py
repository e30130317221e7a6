"""
Measure the client CPU per job and per schedule firing, beside APScheduler's stores.

Usage: ``python benchmarks/client_cpu.py [--jobs N] [--schedules S] [--commands K]
[--repeats R] [--section jobs|schedules|driver|all]`` (server: ``MONGODB_URI`` if
set, otherwise a mongoeco wire server started on 127.0.0.1 for the run, as
``bench.py`` does). ``bench.py`` runs the same as its "cpu" section.

Three stores, side by side, on the same server: APScheduler's ``MemoryDataStore``
(the floor: the scheduler's own CPU), APScheduler's built-in
``apscheduler.datastores.mongodb.MongoDBDataStore`` (on a synchronous
``MongoClient`` whose ``server_info()`` sends ``buildInfo``, without which it cannot
start on mongoeco: see ``_common.BuildInfoClient``) and ours
(``apscheduler_mongo.MongoDBDataStore``, no signing key), each on an
``AsyncMongoClient`` made here.

Each run is a fresh process (multiprocessing's "spawn" context) that uses
APScheduler as an application would: an ``AsyncScheduler`` with a
``LocalEventBroker``, one task (a no-op coroutine function of this module), an
"add" phase, then the scheduler started in the background until the work is done
(the "run" phase). The process's own CPU time (``getrusage(RUSAGE_SELF)``, user +
system, all threads) and the wall-clock time are taken around each phase; the
server's CPU is not counted. Workloads:

- ``capped``: the task with ``max_running_jobs=1`` (APScheduler's default); N jobs
  added with ``add_job``, run until N ``JobReleased`` events arrived;
- ``uncapped``: the same with ``max_running_jobs=None``;
- ``schedules``: S schedules of the task (``max_running_jobs=None``) added with
  ``add_schedule``, each an ``IntervalTrigger(hours=1)`` that started a second
  before, so each is due exactly once when the scheduler starts; its schedule loop
  acquires them 100 at a time, adds each one's job and releases them; run until S
  ``JobReleased`` and S ``ScheduleUpdated`` events arrived (every firing's job ran
  and every schedule was released). CPU per firing is each phase's CPU divided by S:
  the run phase's includes acquiring and releasing the schedule and the whole life
  of its job.

The stores: APScheduler's ``MemoryDataStore`` (the floor), its built-in MongoDB
store, ours, and ours with a ``meter_provider`` whose SDK collects every metric for
Prometheus (``metered``: the client CPU that metrics add).

Every run checks that all jobs succeeded and none is left in the store. Runs are
interleaved (for each repeat: each workload, each store), each on a fresh database;
the median of ``repeats`` runs is reported.

Also measured:

- the driver's CPU per command: in a fresh process, pymongo's ``AsyncMongoClient``
  sends K ``insert_one``, then K ``find_one`` by ``_id``, then K ``update_one`` by
  ``_id`` on a scratch collection (small documents, after a few untimed commands of
  each kind); CPU per command of each kind, and the median of the three kinds. A
  store's CPU above the floor, divided by that, gives its cost in "commands' worth"
  of client CPU per job (or firing);
- the commands sent and documents returned by the server per job (or firing) in the
  run phase, for the two MongoDB stores, from a ``pymongo.monitoring``
  ``CommandListener`` on the store's client (documents in ``cursor.firstBatch`` and
  ``cursor.nextBatch`` of every reply, plus ``findAndModify``'s ``value``; see
  ``_history.Traffic``). Command monitoring costs CPU, so these come from one extra
  run per store and workload, not timed, after the timed ones;
- jobs (or firings) per second: items / wall-clock time of the run phase, median.

Defaults: N = S = 200, K = 500, 3 repeats: about 8 minutes on 2 cores against
mongoeco, most of it the built-in store with the task capped at 1 (its every job
acquisition reads all the jobs; at N = 300 the section took 14 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, get_args

from apscheduler import AsyncScheduler, Event, JobReleased, ScheduleUpdated
from apscheduler.abc import DataStore
from apscheduler.datastores.memory import MemoryDataStore
from apscheduler.datastores.mongodb import MongoDBDataStore as BuiltinDataStore
from apscheduler.triggers.interval import IntervalTrigger
from pymongo import AsyncMongoClient, monitoring

from _common import BuildInfoClient, server_uri
from _cpu_runs import (
    TASK_ID,
    adding_jobs,
    cpu_seconds,
    in_fresh_process,
    medians_per_item,
    progress,
    run_scheduler,
)
from _history import Traffic
from _report import fmt, table
from _seed import drop_database
from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo.metrics import prometheus_meter_provider

Store = Literal["memory", "builtin", "ours", "metered"]
STORES: tuple[Store, ...] = get_args(Store)
STORE_NAMES: dict[Store, str] = {
    "memory": "MemoryDataStore (floor)",
    "builtin": "built-in MongoDBDataStore",
    "ours": "ours (apscheduler_mongo)",
    "metered": "ours, metrics collected",
}
Workload = Literal["capped", "uncapped", "schedules"]
WORKLOAD_NAMES: dict[Workload, str] = {
    "capped": "jobs, max_running_jobs=1",
    "uncapped": "jobs, max_running_jobs=None",
    "schedules": "schedule firings",
}
Section = Literal["jobs", "schedules", "driver", "all"]
SECTION_WORKLOADS: dict[Section, tuple[Workload, ...]] = {
    "jobs": ("capped", "uncapped"),
    "schedules": ("schedules",),
    "driver": (),
    "all": ("capped", "uncapped", "schedules"),
}
COMMAND_KINDS = ("insert_one", "find_one", "update_one")
#: mongoeco scans its collections: keep it to a few hundred. The built-in store with
#: the task capped at 1 costs it most (each job's acquisition reads every job): at
#: 300, its four runs (three timed, one counted) take ~10 of the section's ~14
#: minutes on 2 cores; at 200, the section takes under 10
JOBS = 200
REPEATS = 3
COMMANDS = 500  # of each kind, per driver run
WARMUP = 20  # untimed commands of each kind first
#: The task's callable as the scheduler stores it (this module runs as ``client_cpu``)
TASK_REF = "client_cpu:noop"


async def noop() -> None:
    """The job: nothing, so that what is measured is the scheduler and the store."""


class _Traffic(Traffic):
    """
    :class:`_history.Traffic`, safe to call from several threads at once.

    The built-in store runs its synchronous client in worker threads, and the
    scheduler may have several of its calls under way at a time.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        with self._lock:
            super().started(event)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        with self._lock:
            super().succeeded(event)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return super().counts()


def _store(
    store: Store,
    uri: str,
    database: str,
    exit_stack: AsyncExitStack,
    traffic: Traffic | None,
) -> DataStore:
    """Make the store, on a client of its own (closed by ``exit_stack``)."""
    if store == "memory":
        return MemoryDataStore()

    listeners = [] if traffic is None else [traffic]
    if store == "builtin":
        sync_client = BuildInfoClient(uri, event_listeners=listeners)
        exit_stack.callback(sync_client.close)
        return BuiltinDataStore(sync_client, database=database, start_from_scratch=True)

    client: AsyncMongoClient[Any] = AsyncMongoClient(uri, event_listeners=listeners)
    exit_stack.push_async_callback(client.close)
    # "metered": every metric collected by an OpenTelemetry SDK for Prometheus
    provider = prometheus_meter_provider()[0] if store == "metered" else None
    return MongoDBDataStore(
        client, database=database, start_from_scratch=True, meter_provider=provider
    )


def _adding_schedules(count: int) -> Callable[[AsyncScheduler], Awaitable[None]]:
    """Return an "add" phase that adds ``count`` schedules, each due once now."""

    async def add(scheduler: AsyncScheduler) -> None:
        start = datetime.now(timezone.utc) - timedelta(seconds=1)
        for n in range(count):
            trigger = IntervalTrigger(hours=1, start_time=start)
            await scheduler.add_schedule(TASK_ID, trigger, id=f"due-{n}")

    return add


async def _run(
    store: Store,
    workload: Workload,
    uri: str,
    database: str,
    items: int,
    count: bool,
) -> dict[str, Any]:
    """
    Run ``workload`` with ``items`` jobs or schedules on ``store``.

    :param count: register a command listener and count the run phase's commands and
        documents (the CPU figures of such a run include the listener's)
    """
    if store != "memory":
        await drop_database(uri, database)

    wait_for: dict[type[Event], int] = {JobReleased: items}
    if workload == "schedules":
        add = _adding_schedules(items)
        wait_for[ScheduleUpdated] = items
    else:
        add = adding_jobs(items)

    traffic = _Traffic() if count else None
    async with AsyncExitStack() as exit_stack:
        figures = await run_scheduler(
            _store(store, uri, database, exit_stack, traffic),
            noop,
            TASK_REF,
            add,
            wait_for,
            max_running_jobs=1 if workload == "capped" else None,
            name=f"cpu.{store}.{workload}",
            traffic=traffic,
        )

    if store != "memory":
        await drop_database(uri, database)

    return {"store": store, "workload": workload, "items": items, **figures}


async def _driver(uri: str, database: str, commands: int) -> dict[str, Any]:
    """Time ``commands`` commands of each kind; return the CPU of each kind (s)."""
    await drop_database(uri, database)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    cpu: dict[str, float] = {}
    try:
        collection = client[database]["scratch"]

        async def insert_one(n: int) -> None:
            await collection.insert_one({"_id": n, "value": 0, "name": f"doc-{n}"})

        async def find_one(n: int) -> None:
            if await collection.find_one({"_id": n}) is None:
                raise RuntimeError(f"document {n} not found")

        async def update_one(n: int) -> None:
            result = await collection.update_one({"_id": n}, {"$inc": {"value": 1}})
            if result.modified_count != 1:
                raise RuntimeError(f"document {n} not updated")

        kinds = {"insert_one": insert_one, "find_one": find_one}
        kinds["update_one"] = update_one
        for send in kinds.values():
            for n in range(-WARMUP, 0):
                await send(n)

        for kind, send in kinds.items():
            started = cpu_seconds()
            for n in range(commands):
                await send(n)

            cpu[kind] = cpu_seconds() - started
    finally:
        await client.close()

    await drop_database(uri, database)
    return {"commands": commands, "cpu": cpu}


def _row(
    workload: Workload,
    store: Store,
    runs: Sequence[dict[str, Any]],
    errors: Sequence[str],
    counted: dict[str, Any] | None,
) -> dict[str, Any]:
    """Summarize one store's runs of one workload: medians per item."""
    row: dict[str, Any] = {
        "workload": workload,
        "store": store,
        "runs": list(runs),
        "errors": list(errors),
        "counted": counted,
    }
    if runs:
        items: int = runs[0]["items"]
        row |= medians_per_item(runs, items)
        row["per_second"] = statistics.median(items / run["run_wall"] for run in runs)
    if counted is not None and "commands" in counted:
        row["commands_per_item"] = counted["commands"] / counted["items"]
        row["documents_per_item"] = counted["documents"] / counted["items"]

    return row


def _driver_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return the median CPU per command of each kind (ms), and their median."""
    per_kind = {
        kind: statistics.median(
            run["cpu"][kind] / run["commands"] * 1000 for run in runs
        )
        for kind in COMMAND_KINDS
    }
    return {
        "commands": runs[0]["commands"],
        "ms": per_kind,
        "median_ms": statistics.median(per_kind.values()),
        "runs": list(runs),
    }


def _add_worth(rows: list[dict[str, Any]], per_command_ms: float) -> None:
    """Set each MongoDB store's CPU above the floor, in driver commands' worth."""
    floor = next((row for row in rows if row["store"] == "memory"), None)
    if floor is None or "total_ms" not in floor:
        return

    for row in rows:
        if row["store"] != "memory" and "total_ms" in row:
            above = row["total_ms"] - floor["total_ms"]
            row["above_floor_ms"] = above
            row["commands_worth"] = above / per_command_ms


async def _fresh(
    function: Callable[..., Coroutine[Any, Any, dict[str, Any]]], *args: Any, label: str
) -> dict[str, Any]:
    return await asyncio.to_thread(in_fresh_process, function, *args, label=label)


async def measure_client_cpu(
    uri: str,
    jobs: int = JOBS,
    repeats: int = REPEATS,
    section: Section = "all",
    schedules: int | None = None,
    commands: int = COMMANDS,
) -> dict[str, Any]:
    """
    Measure the section's workloads for each store, and the driver, in fresh
    processes, ``repeats`` times each (interleaved); then count commands and
    documents in one more run of each MongoDB store and workload.

    A store whose run fails is reported with the error; the others are kept.

    :param schedules: schedules in the schedule workload (default: ``jobs``)
    :return: per workload, a row per store (medians per job or firing: add, run and
        total CPU ms, items per second, commands' worth above the floor, commands
        and documents per item; every run's figures); the driver's CPU per command
    """
    workloads = SECTION_WORKLOADS[section]
    measure_driver = section in ("driver", "all")
    sizes: dict[Workload, int] = {"capped": jobs, "uncapped": jobs}
    sizes["schedules"] = jobs if schedules is None else schedules
    runs: dict[tuple[Workload, Store], list[dict[str, Any]]] = {}
    errors: dict[tuple[Workload, Store], list[str]] = {}
    driver_runs: list[dict[str, Any]] = []
    for repeat in range(repeats):
        tag = f"run {repeat + 1}/{repeats}"
        for workload in workloads:
            for store in STORES:
                key = (workload, store)
                progress(f"cpu: {store}, {workload}, {sizes[workload]} items, {tag}")
                database = f"apscheduler_bench_cpu_{store}_{workload}_{repeat}"
                try:
                    run = await _fresh(
                        _run,
                        store,
                        workload,
                        uri,
                        database,
                        sizes[workload],
                        False,
                        label=f"{store} {workload}",
                    )
                except RuntimeError as exc:
                    progress(f"  {exc}")
                    errors.setdefault(key, []).append(str(exc))
                else:
                    runs.setdefault(key, []).append(run)

        if measure_driver:
            progress(f"cpu: driver, {commands} commands of each kind, {tag}")
            database = f"apscheduler_bench_cpu_driver_{repeat}"
            driver_runs.append(
                await _fresh(_driver, uri, database, commands, label="driver")
            )

    counted: dict[tuple[Workload, Store], dict[str, Any]] = {}
    for workload in workloads:
        for store in ("builtin", "ours"):
            progress(f"cpu: counting documents, {store}, {workload}")
            database = f"apscheduler_bench_cpu_{store}_{workload}_counted"
            try:
                counted[(workload, store)] = await _fresh(
                    _run,
                    store,
                    workload,
                    uri,
                    database,
                    sizes[workload],
                    True,
                    label=f"{store} {workload} (counted)",
                )
            except RuntimeError as exc:
                progress(f"  {exc}")
                counted[(workload, store)] = {"error": str(exc)}

    driver = _driver_summary(driver_runs) if driver_runs else None
    results: dict[str, Any] = {"repeats": repeats, "workloads": {}, "driver": driver}
    for workload in workloads:
        rows = [
            _row(
                workload,
                store,
                runs.get((workload, store), []),
                errors.get((workload, store), []),
                counted.get((workload, store)),
            )
            for store in STORES
        ]
        if driver is not None:
            _add_worth(rows, driver["median_ms"])

        results["workloads"][workload] = {"items": sizes[workload], "rows": rows}

    return results


def _spread(row: dict[str, Any]) -> str:
    """Give each run's total CPU per item (ms), lowest first."""
    totals = sorted(
        (run["add_cpu"] + run["run_cpu"]) / run["items"] * 1000 for run in row["runs"]
    )
    return " / ".join(f"{total:.3f}" for total in totals)


def _cells(row: dict[str, Any]) -> list[str]:
    if "total_ms" not in row:
        return ["failed (see below)", *[""] * 8]

    counted = row["counted"] or {}
    if "error" in counted:
        count_cells = ["failed", "failed"]
    else:
        count_cells = [
            fmt(row.get("commands_per_item"), 2),
            fmt(row.get("documents_per_item"), 2),
        ]
    worth = row.get("commands_worth")
    return [
        fmt(row["add_ms"], 3),
        fmt(row["run_ms"], 3),
        fmt(row["total_ms"], 3),
        _spread(row),
        "" if row["store"] == "memory" else fmt(worth, 1),
        fmt(row["per_second"], 1),
        *(["", ""] if row["store"] == "memory" else count_cells),
    ]


def _stores_table(result: dict[str, Any]) -> list[str]:
    rows: list[list[str]] = []
    for workload, measured in result["workloads"].items():
        label = f"{WORKLOAD_NAMES[workload]}, {measured['items']}"
        rows += [
            [label, STORE_NAMES[row["store"]], *_cells(row)] for row in measured["rows"]
        ]

    lines = [
        "APScheduler's AsyncScheduler (LocalEventBroker, a no-op async task) in a "
        "fresh process per run: N jobs added with add_job then run until all were "
        "released (task capped at 1 running job, or uncapped), or S IntervalTrigger "
        "schedules, each due once, added then fired by the scheduler until every "
        "job ran and every schedule was released. Client CPU (getrusage "
        "RUSAGE_SELF, user + sys) per job or firing, add and run phases, median of "
        f"{result['repeats']} interleaved runs (total: of each run's add + run); "
        "the server's CPU is not included. Above floor: the store's total minus "
        "MemoryDataStore's, in driver commands' worth (median CPU per command "
        "below). Per second: jobs or firings over the run phase's wall-clock "
        "time. Commands sent and documents returned by the server per job or "
        "firing, in the run phase: from one more run with a command listener (not "
        "timed).",
        "",
    ]
    lines += table(
        [
            "workload, items",
            "store",
            "add ms",
            "run ms",
            "total ms",
            "total, each run",
            "above floor, commands' worth",
            "per second",
            "commands (run)",
            "documents (run)",
        ],
        rows,
    )
    failures = [
        f"- {WORKLOAD_NAMES[workload]}, {STORE_NAMES[row['store']]}: {error}"
        for workload, measured in result["workloads"].items()
        for row in measured["rows"]
        for error in [*row["errors"], (row["counted"] or {}).get("error")]
        if error
    ]
    if failures:
        lines += ["", "Failed runs:", "", *failures]

    return lines


def _driver_table(driver: dict[str, Any]) -> list[str]:
    lines = [
        f"Driver CPU per command: pymongo AsyncMongoClient, {driver['commands']} "
        f"commands of each kind on a scratch collection of small documents, median "
        f"of {len(driver['runs'])} runs.",
        "",
    ]
    each = {
        kind: " / ".join(
            f"{run['cpu'][kind] / run['commands'] * 1000:.3f}" for run in driver["runs"]
        )
        for kind in COMMAND_KINDS
    }
    lines += table(
        ["command", "CPU ms per command", "each run"],
        [
            *([kind, fmt(driver["ms"][kind], 3), each[kind]] for kind in each),
            ["median of the three", fmt(driver["median_ms"], 3), ""],
        ],
    )
    return lines


def markdown_lines(result: dict[str, Any]) -> list[str]:
    """Render :func:`measure_client_cpu`'s result as a Markdown section."""
    lines = ["## Client CPU per job and per schedule firing", ""]
    if result["workloads"]:
        lines += [*_stores_table(result), ""]
    if result["driver"]:
        lines += [*_driver_table(result["driver"]), ""]

    return lines[:-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--jobs", type=int, default=JOBS, help=f"jobs per run (default {JOBS})"
    )
    parser.add_argument(
        "--schedules", type=int, help="schedules per run (default: as --jobs)"
    )
    parser.add_argument(
        "--commands",
        type=int,
        default=COMMANDS,
        help=f"driver commands of each kind per run (default {COMMANDS})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=REPEATS,
        help=f"runs per store, the median reported (default {REPEATS})",
    )
    parser.add_argument(
        "--section",
        choices=get_args(Section),
        default="all",
        help="what to measure (default all)",
    )
    args = parser.parse_args(argv)
    with server_uri() as uri:
        result = asyncio.run(
            measure_client_cpu(
                uri,
                args.jobs,
                args.repeats,
                args.section,
                args.schedules,
                args.commands,
            )
        )

    sys.stdout.write("\n".join(markdown_lines(result)) + "\n")


if __name__ == "__main__":
    # Run as the module ``client_cpu``, not ``__main__``: the task's callable is then
    # ``client_cpu:noop`` here and in the child processes, which import it by that
    # name
    import client_cpu

    client_cpu.main()
