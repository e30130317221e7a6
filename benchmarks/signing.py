"""
Measure the client CPU that signing stored data adds per job.

Usage: ``python benchmarks/signing.py [--jobs N] [--repeats R]`` (server:
``MONGODB_URI`` if set, otherwise a mongoeco wire server started on 127.0.0.1 for
the run, as ``bench.py`` does). ``bench.py`` runs the same as its "signing" section.

Each run is a fresh process (multiprocessing's "spawn" context) that uses
APScheduler as an application would: an ``AsyncScheduler`` with a
``LocalEventBroker`` and the data store, one task (a no-op coroutine function of
this module, ``max_running_jobs=None``), ``add_job`` N times, then the scheduler
started until N ``JobReleased`` events have arrived. The process's own CPU time
(``getrusage(RUSAGE_SELF)``, user + system, all threads) is taken around each of
the two phases; the server's CPU is not counted. Stores compared: APScheduler's
``MemoryDataStore`` (the floor), ours without a key, ours with a signing key, ours
with a key and ``allowed_callables``; each on a fresh database, ``repeats`` times
(interleaved), the median reported.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any, Literal

from apscheduler import JobReleased
from apscheduler.abc import DataStore
from apscheduler.datastores.memory import MemoryDataStore

from _common import server_uri
from _cpu_runs import (
    adding_jobs,
    in_fresh_process,
    medians_per_item,
    progress,
    run_scheduler,
)
from _report import fmt, table
from _seed import drop_database
from apscheduler_mongo import MongoDBDataStore

Variant = Literal["memory", "unsigned", "signed", "signed_allowed"]
VARIANTS: tuple[Variant, ...] = ("memory", "unsigned", "signed", "signed_allowed")
VARIANT_NAMES: dict[Variant, str] = {
    "memory": "(a) MemoryDataStore (floor)",
    "unsigned": "(b) ours, no key",
    "signed": "(c) ours, signing_key",
    "signed_allowed": "(d) ours, signing_key + allowed_callables",
}
JOBS = 300  # mongoeco scans its collections: keep it to a few hundred
REPEATS = 3
SIGNING_KEY = "x" * 32
#: The task's callable as the scheduler stores it (this module runs as ``signing``)
TASK_REF = "signing:noop"


async def noop() -> None:
    """The job: nothing, so that what is measured is the scheduler and the store."""


def _store(variant: Variant, uri: str, database: str) -> DataStore:
    if variant == "memory":
        return MemoryDataStore()

    options: dict[str, Any] = {}
    if variant in ("signed", "signed_allowed"):
        options["signing_key"] = SIGNING_KEY
    if variant == "signed_allowed":
        options["allowed_callables"] = [TASK_REF]

    return MongoDBDataStore(uri, database=database, start_from_scratch=True, **options)


async def _run(variant: Variant, uri: str, database: str, jobs: int) -> dict[str, Any]:
    """Add ``jobs`` jobs, run them all, and return the CPU time of each phase."""
    if variant != "memory":
        await drop_database(uri, database)

    figures = await run_scheduler(
        _store(variant, uri, database),
        noop,
        TASK_REF,
        adding_jobs(jobs),
        {JobReleased: jobs},
        max_running_jobs=None,
        name=f"signing.{variant}",
    )
    if variant != "memory":
        await drop_database(uri, database)

    return {"variant": variant, "jobs": jobs, **figures}


def _median_row(variant: Variant, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    medians = medians_per_item(runs, runs[0]["jobs"])
    return {"variant": variant, **medians, "runs": list(runs)}


async def measure_signing(
    uri: str, jobs: int = JOBS, repeats: int = REPEATS
) -> dict[str, Any]:
    """
    Measure each variant ``repeats`` times, each run in a fresh process.

    :return: per variant the median client CPU per job (ms) for adding, running and
        both, with every run's figures; and "added by signing", signed minus
        unsigned (ms and percent of unsigned)
    """
    runs: dict[Variant, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    for repeat in range(repeats):
        for variant in VARIANTS:
            progress(f"signing: {variant}, {jobs} jobs, run {repeat + 1}/{repeats}")
            database = f"apscheduler_bench_signing_{variant}_{repeat}"
            runs[variant].append(
                await asyncio.to_thread(
                    in_fresh_process, _run, variant, uri, database, jobs, label=variant
                )
            )

    rows = [_median_row(variant, runs[variant]) for variant in VARIANTS]
    by_variant = {row["variant"]: row for row in rows}
    signed, unsigned = by_variant["signed"], by_variant["unsigned"]
    added = {
        key: {
            "ms": signed[key] - unsigned[key],
            "percent": (signed[key] - unsigned[key]) / unsigned[key] * 100,
        }
        for key in ("add_ms", "run_ms", "total_ms")
    }
    return {"jobs": jobs, "repeats": repeats, "rows": rows, "added_by_signing": added}


def _spread(runs: Sequence[dict[str, Any]]) -> str:
    """Give each run's total CPU per job (ms), lowest first."""
    totals = sorted(
        (run["add_cpu"] + run["run_cpu"]) / run["jobs"] * 1000 for run in runs
    )
    return " / ".join(f"{total:.3f}" for total in totals)


def markdown_lines(result: dict[str, Any]) -> list[str]:
    """Render :func:`measure_signing`'s result as a Markdown section."""
    lines = [
        "## Client CPU added by signing",
        "",
        f"{result['jobs']} jobs added with add_job, then run by an AsyncScheduler "
        f"(LocalEventBroker, a no-op async task, max_running_jobs=None) until all "
        f"were released; each run in a fresh process, the client process's CPU "
        f"time (getrusage RUSAGE_SELF, user + sys) per job, median of "
        f"{result['repeats']} runs (total: of each run's add + run). The server's "
        f"CPU is not included.",
        "",
    ]
    rows: list[list[str]] = [
        [
            VARIANT_NAMES[row["variant"]],
            fmt(row["add_ms"], 3),
            fmt(row["run_ms"], 3),
            fmt(row["total_ms"], 3),
            _spread(row["runs"]),
        ]
        for row in result["rows"]
    ]
    added = result["added_by_signing"]
    rows.append(
        [
            "added by signing, (c) - (b)",
            *(
                f"{added[key]['ms']:+.3f} ({added[key]['percent']:+.1f} %)"
                for key in ("add_ms", "run_ms", "total_ms")
            ),
            "",
        ]
    )
    lines += table(
        ["store", "add ms/job", "run ms/job", "total ms/job", "total, each run"],
        rows,
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--jobs", type=int, default=JOBS, help=f"jobs per run (default {JOBS})"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=REPEATS,
        help=f"runs per store, the median reported (default {REPEATS})",
    )
    args = parser.parse_args(argv)
    with server_uri() as uri:
        result = asyncio.run(measure_signing(uri, args.jobs, args.repeats))

    sys.stdout.write("\n".join(markdown_lines(result)) + "\n")


if __name__ == "__main__":
    # Run as the module ``signing``, not ``__main__``: the task's callable is then
    # ``signing:noop`` here and in the child processes, which import it by that name
    import signing

    signing.main()
