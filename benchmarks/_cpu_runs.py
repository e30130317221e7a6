"""
What the client-CPU benchmarks share: a scheduler run timed phase by phase, in a
fresh process.

``signing.py`` and ``client_cpu.py`` measure the CPU time the client process spends
(``getrusage(RUSAGE_SELF)``, user + system, all threads) while APScheduler's
``AsyncScheduler``, with a ``LocalEventBroker``, adds work and then runs it, as an
application would. Each run is a fresh process (multiprocessing's "spawn" context),
so that no run inherits another's warm caches, connections or garbage; the server
runs elsewhere and its CPU is not counted.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from multiprocessing.queues import Queue
from typing import Any

import anyio
from apscheduler import AsyncScheduler, Event, JobOutcome, JobReleased
from apscheduler.abc import DataStore
from apscheduler.eventbrokers.local import LocalEventBroker

from _history import Traffic

#: The id of the one task the runs configure
TASK_ID = "noop"
TIMEOUT = 600.0  # seconds a run may take


def cpu_seconds() -> float:
    """Return this process's CPU time so far (user + system, all threads), in s."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def medians_per_item(runs: Sequence[Mapping[str, Any]], items: int) -> dict[str, float]:
    """
    Return the median CPU per item (ms) of runs timed phase by phase (``add_cpu``
    and ``run_cpu``, in s): ``add_ms``, ``run_ms`` and ``total_ms``.
    """

    def per_item_ms(values: list[float]) -> float:
        return statistics.median(values) / items * 1000

    return {
        "add_ms": per_item_ms([run["add_cpu"] for run in runs]),
        "run_ms": per_item_ms([run["run_cpu"] for run in runs]),
        "total_ms": per_item_ms([run["add_cpu"] + run["run_cpu"] for run in runs]),
    }


def progress(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


async def run_scheduler(
    store: DataStore,
    func: Callable[[], Awaitable[None]],
    task_ref: str,
    add: Callable[[AsyncScheduler], Awaitable[object]],
    wait_for: Mapping[type[Event], int],
    *,
    max_running_jobs: int | None,
    name: str,
    traffic: Traffic | None = None,
) -> dict[str, Any]:
    """
    Add work to a scheduler on ``store``, then run it until it is done.

    The scheduler configures task :data:`TASK_ID` (``func``, whose reference must be
    ``task_ref``, with ``max_running_jobs``); then ``add(scheduler)`` (the "add"
    phase); then ``start_in_background()`` until as many events of each type in
    ``wait_for`` have arrived as it says (the "run" phase). CPU and wall-clock time
    are taken around each phase; the run phase ends when the last awaited event
    arrives, before the scheduler stops.

    :param traffic: a command listener registered on the store's client: its commands
        and documents are taken over the run phase
    :raises RuntimeError: if a job did not succeed or jobs are left in the store
    :return: ``add_cpu``, ``run_cpu``, ``add_wall``, ``run_wall`` (seconds), and
        ``commands`` and ``documents`` of the run phase if ``traffic`` was given
    """
    counts = dict.fromkeys(wait_for, 0)
    failed: list[str] = []
    result: dict[str, Any] = {}
    done = anyio.Event()

    def on_event(event: Event) -> None:
        counts[type(event)] += 1
        if isinstance(event, JobReleased) and event.outcome is not JobOutcome.success:
            failed.append(f"{event.outcome.name}: {event.exception_type}")
        if not done.is_set() and all(counts[t] >= n for t, n in wait_for.items()):
            result["run_end"] = cpu_seconds()
            result["wall_end"] = time.perf_counter()
            if traffic is not None:
                result["commands"], result["documents"] = traffic.counts()
            done.set()

    scheduler = AsyncScheduler(
        store, LocalEventBroker(), logger=logging.getLogger(f"bench.{name}")
    )
    async with scheduler:
        await scheduler.configure_task(
            TASK_ID, func=func, max_running_jobs=max_running_jobs
        )
        task = next(t for t in await scheduler.get_tasks() if t.id == TASK_ID)
        if task.func != task_ref:
            raise RuntimeError(f"the task's callable is {task.func!r}, not {task_ref}")

        add_start = cpu_seconds()
        wall_start = time.perf_counter()
        await add(scheduler)
        add_end = run_start = cpu_seconds()
        wall_added = time.perf_counter()
        scheduler.subscribe(on_event, set(wait_for))
        if traffic is not None:
            traffic.counts()  # forget the add phase's

        await scheduler.start_in_background()
        with anyio.fail_after(TIMEOUT):
            await done.wait()

        left = len(await scheduler.get_jobs())

    if failed or left:
        raise RuntimeError(
            f"{name}: {len(failed)} jobs failed ({failed[:3]}), {left} jobs left"
        )

    figures = {
        "add_cpu": add_end - add_start,
        "run_cpu": result.pop("run_end") - run_start,
        "add_wall": wall_added - wall_start,
        "run_wall": result.pop("wall_end") - wall_added,
    }
    return figures | result


def adding_jobs(count: int) -> Callable[[AsyncScheduler], Awaitable[None]]:
    """Return an "add" phase for :func:`run_scheduler`: ``count`` ``add_job`` calls."""

    async def add(scheduler: AsyncScheduler) -> None:
        for _ in range(count):
            await scheduler.add_job(TASK_ID)

    return add


def _child(
    function: Callable[..., Coroutine[Any, Any, dict[str, Any]]],
    args: tuple[Any, ...],
    results: Queue[Any],
) -> None:
    """Run ``function(*args)`` in this (fresh) process and put its result on
    ``results``, or ``{"error": ...}`` if it raised."""
    try:
        results.put(asyncio.run(function(*args)))
    except Exception as exc:
        traceback.print_exc()
        errors = ("".join(traceback.format_exception_only(e)) for e in _leaves(exc))
        results.put({"error": "; ".join(error.strip() for error in errors)})


def _leaves(exc: BaseException) -> list[BaseException]:
    """Return the exceptions inside ``exc`` if it is a group (at any depth), else
    ``exc``: a task group's error says little, the ones it holds do."""
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple) and inner:
        return [leaf for member in inner for leaf in _leaves(member)]

    return [exc]


def in_fresh_process(
    function: Callable[..., Coroutine[Any, Any, dict[str, Any]]],
    *args: Any,
    label: str,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """
    Run the coroutine function ``function(*args)`` in a fresh "spawn" process.

    ``function`` must be importable by name in the new process: defined at the top
    level of a module that is not ``__main__``.

    :raises RuntimeError: if it raised (its exception is in the message), or the
        process ended without a result or took longer than ``timeout`` + 60 s
    :return: what it returned
    """
    context = multiprocessing.get_context("spawn")
    results: Queue[Any] = context.Queue()
    process = context.Process(target=_child, args=(function, args, results))
    process.start()
    deadline = time.monotonic() + timeout + 60
    try:
        while True:
            try:
                report: dict[str, Any] = results.get(timeout=0.5)
                break
            except queue.Empty:
                if process.exitcode is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the {label} run failed (exit code {process.exitcode})"
                    ) from None
    finally:
        process.join(30)
        if process.exitcode is None:
            process.kill()

    if "error" in report:
        raise RuntimeError(f"the {label} run failed: {report['error']}")

    return report
