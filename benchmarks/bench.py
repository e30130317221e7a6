"""
Compare apscheduler_mongo's data store with APScheduler's built-in MongoDB store.

Usage: ``python benchmarks/bench.py [--quick] [--out DIR] [options]`` or
``nox -s bench -- [options]``. Both stores run against the same server in the same
run: the one at ``MONGODB_URI`` if set, otherwise a mongoeco wire server started on
127.0.0.1 for the run (Python >= 3.13 with ``mongoeco[wire]``). Nothing else is
contacted.

Measured: server commands per job lifecycle and per schedule firing (exact, from
pymongo's command monitoring), jobs per second drained by 1, 2 and 4 worker
processes (with duplicate ownerships counted), schedules per second, the cost of
acquiring jobs with many finished and leased jobs present, the event broker's
latency (ours only), the client CPU that signing adds per job (ours only, against
APScheduler's memory store as the floor) and the client CPU per job and per schedule
firing of both stores and APScheduler's memory store, beside the driver's CPU per
command ("cpu", ``client_cpu.py``). The tables go to standard output and to
``DIR/results.md``, the raw figures to ``DIR/results.json``, a chart of jobs per
second against workers to ``DIR/throughput.png`` (if matplotlib is installed).
Progress goes to standard error.

Times depend on the machine and, with mongoeco, mostly measure that pure-Python
server; the command counts do not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from _common import ROOT, STORE_KINDS, describe_server, server_uri
from _counts import count_commands
from _drain import measure_drain
from _history import history_sizes, measure_history
from _rates import acquisition_rounds, measure_acquisition, measure_schedules
from _report import evaluate_targets, markdown, plot_throughput, write_json

SECTIONS = (
    "counts",
    "schedules",
    "acquisition",
    "history",
    "drain",
    "latency",
    "signing",
    "cpu",
)
FULL = {
    "jobs": 5000,
    "schedules": 1000,
    "latency_events": 300,
    "signing_jobs": 300,
    "cpu_jobs": 200,
    "cpu_repeats": 3,
}
QUICK = {
    "jobs": 500,
    "schedules": 200,
    "latency_events": 100,
    "signing_jobs": 100,
    "cpu_jobs": 100,
    "cpu_repeats": 1,
}
#: Finished + leased jobs for the acquisition section: 10x a 5,000-job queue on a
#: real server; building that many on mongoeco takes hours (each insert there
#: scans the whole collection), so less by default there
EXTRA_REAL, EXTRA_MONGOECO, EXTRA_QUICK = 50_000, 5_000, 1_000

NOTES = [
    "The built-in store cannot start on mongoeco as it is: start() calls "
    "MongoClient.server_info(), which sends the lower-case command 'buildinfo', and "
    "mongoeco 4.11 answers 'unsupported wire command: buildinfo'. The benchmark "
    "gives it a MongoClient subclass whose server_info() sends 'buildInfo' (the "
    "same command on a real server); everything else of the built-in store ran "
    "unchanged. It uses client.start_session() for implicit sessions only, never "
    "transactions, so nothing else depends on a replica set.",
    "Command counts are exact and independent of the server and machine; times are "
    "not. On mongoeco (a pure-Python, single-threaded server sharing the machine's "
    "CPUs with the worker processes) times mostly measure that server: each "
    "inserted document is compared with every document already in the collection "
    "(its unique-index check), so inserts slow down as collections grow, and each "
    "updated document costs it about a millisecond or more; round trips weigh less "
    "than on MongoDB and the server's per-document work more.",
    "Queued, finished and leased jobs are seeded as copies of one job made through "
    "each store's own API (fresh ids and version tokens), inserted 250 at a time.",
    "Drain workers do not call get_task (a scheduler would, once per job: 1 more "
    "command per job for the built-in store, none for ours, whose claim has just "
    "read the task).",
    "APScheduler has no MongoDB event broker, so the latency is ours only.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, for a try-out (~2 min)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("build", "bench"),
        help="directory for results.md, results.json and throughput.png "
        "(default: build/bench)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument("--jobs", type=int, help="jobs to drain (default 5000)")
    parser.add_argument(
        "--workers", default="1,2,4", help="worker process counts (default 1,2,4)"
    )
    parser.add_argument(
        "--limit", type=int, default=100, help="acquire_jobs limit (default 100)"
    )
    parser.add_argument(
        "--schedules", type=int, help="due schedules to process (default 1000)"
    )
    parser.add_argument(
        "--acq-extra",
        type=int,
        help=f"finished + leased jobs present when acquiring (default "
        f"{EXTRA_REAL} with MONGODB_URI, {EXTRA_MONGOECO} on mongoeco)",
    )
    parser.add_argument(
        "--acq-queued",
        type=int,
        help="queued jobs when acquiring (default: a tenth of --acq-extra, "
        "at least 300)",
    )
    parser.add_argument(
        "--latency-events", type=int, help="events per broker latency run (300)"
    )
    parser.add_argument(
        "--signing-jobs",
        type=int,
        help="jobs per signing run (default 300; a few hundred at most on mongoeco)",
    )
    parser.add_argument(
        "--cpu-jobs",
        type=int,
        help="jobs (and schedules) per client CPU run (default 200; a few hundred at "
        "most on mongoeco)",
    )
    parser.add_argument(
        "--cpu-repeats",
        type=int,
        help="client CPU runs per store and workload, the median reported (default 3)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    sizes = QUICK if args.quick else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.acq_extra is None:
        if args.quick:
            args.acq_extra = EXTRA_QUICK
        else:
            real = bool(os.environ.get("MONGODB_URI"))
            args.acq_extra = EXTRA_REAL if real else EXTRA_MONGOECO

    if args.acq_queued is None:
        args.acq_queued = max(300, args.acq_extra // 10)

    args.worker_counts = [int(n) for n in args.workers.split(",")]
    return args


def progress(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _source() -> str:
    """Tell which apscheduler_mongo is measured: its path, and its commit if ours."""
    import apscheduler_mongo

    path = Path(apscheduler_mongo.__file__).resolve().parent
    if not path.is_relative_to(ROOT / "src"):
        return str(path)

    def git(*args: str) -> str:
        command = ["git", "-C", str(ROOT), *args]
        return subprocess.run(command, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "src")
    return f"{path} at {commit}" + (" with uncommitted changes" if dirty else "")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _versions() -> dict[str, str]:
    packages = ("apscheduler", "apscheduler-mongo", "pymongo", "mongoeco")
    return {name: found for name in packages if (found := _version(name)) is not None}


async def _counts(uri: str, _args: argparse.Namespace) -> Any:
    counts = {}
    for kind in STORE_KINDS:
        progress(f"counting commands: {kind}")
        counts[kind] = await count_commands(kind, uri)

    return counts


async def _schedules(uri: str, args: argparse.Namespace) -> Any:
    rows = []
    for kind in STORE_KINDS:
        for with_jobs in (False, True):
            progress(f"schedules/s: {kind}, {args.schedules} schedules")
            rows.append(
                await measure_schedules(kind, uri, args.schedules, with_jobs=with_jobs)
            )

    return rows


async def _acquisition(uri: str, args: argparse.Namespace) -> Any:
    results = {}
    rounds = acquisition_rounds(args.acq_queued)
    for kind in STORE_KINDS:
        progress(
            f"acquisition cost: {kind}, {args.acq_queued} queued, "
            f"{args.acq_extra} finished + leased"
        )
        results[kind] = await measure_acquisition(
            kind, uri, args.acq_queued, args.acq_extra, rounds
        )

    return results


async def _history(uri: str, args: argparse.Namespace) -> Any:
    rows = []
    sizes = history_sizes(args.quick)
    for kind in STORE_KINDS:
        progress(f"cost versus history: {kind}, {sizes} finished jobs")
        rows += await measure_history(kind, uri, sizes)

    return rows


async def _drain(uri: str, args: argparse.Namespace) -> Any:
    rows = []
    for workers in args.worker_counts:
        for kind in STORE_KINDS:
            progress(f"draining {args.jobs} jobs: {kind}, {workers} workers")
            row = await measure_drain(kind, uri, args.jobs, workers, args.limit)
            progress(
                f"  {row['jobs_per_second']:.1f} jobs/s, "
                f"{row['duplicates']} duplicates, {row['lost']} lost"
            )
            rows.append(row)

    return rows


async def _latency(uri: str, args: argparse.Namespace) -> Any:
    import broker_latency

    progress(f"broker latency: {args.latency_events} events per mode")
    return await broker_latency.measure(uri, events=args.latency_events)


async def _signing(uri: str, args: argparse.Namespace) -> Any:
    from signing import measure_signing

    progress(f"client CPU of signing: {args.signing_jobs} jobs per run")
    return await measure_signing(uri, args.signing_jobs)


async def _cpu(uri: str, args: argparse.Namespace) -> Any:
    from client_cpu import measure_client_cpu

    progress(
        f"client CPU per job and firing: {args.cpu_jobs} jobs (and schedules) per "
        f"run, {args.cpu_repeats} runs each"
    )
    return await measure_client_cpu(uri, args.cpu_jobs, args.cpu_repeats)


def _markdown(results: dict[str, Any]) -> str:
    """Render the results, with the signing and client CPU sections before the
    targets and notes."""
    text = markdown(results)
    extra: list[str] = []
    if results.get("signing"):
        import signing

        extra += signing.markdown_lines(results["signing"])
        extra.append("")
    if results.get("cpu"):
        import client_cpu

        extra += client_cpu.markdown_lines(results["cpu"])
        extra.append("")
    if not extra:
        return text

    section = "\n".join(extra) + "\n"
    for heading in ("## Targets", "## Notes"):
        if (at := text.find(f"\n{heading}")) >= 0:
            return text[: at + 1] + section + text[at + 1 :]

    return text + section


_RUNNERS = {
    "counts": _counts,
    "schedules": _schedules,
    "acquisition": _acquisition,
    "history": _history,
    "drain": _drain,
    "latency": _latency,
    "signing": _signing,
    "cpu": _cpu,
}


async def run(uri: str, args: argparse.Namespace) -> dict[str, Any]:
    sections = set(args.sections.split(","))
    return {
        section: await runner(uri, args)
        for section, runner in _RUNNERS.items()
        if section in sections
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    clock = time.monotonic()
    with server_uri() as uri:
        server = describe_server(uri)
        progress(f"server: {server}")
        results: dict[str, Any] = {
            "server": server,
            "server_short": "MONGODB_URI"
            if os.environ.get("MONGODB_URI")
            else "mongoeco",
            "started": started.isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "versions": _versions(),
            "source": _source(),
            "sizes": {
                "quick": args.quick,
                "drain jobs": args.jobs,
                "workers": args.workers,
                "acquire limit": args.limit,
                "due schedules": args.schedules,
                "acquisition queued": args.acq_queued,
                "acquisition finished + leased": args.acq_extra,
                "latency events": args.latency_events,
                "signing jobs": args.signing_jobs,
                "cpu jobs": args.cpu_jobs,
                "cpu repeats": args.cpu_repeats,
            },
        }
        results.update(asyncio.run(run(uri, args)))

    results["seconds"] = time.monotonic() - clock
    results["targets"] = evaluate_targets(results)
    results["notes"] = list(NOTES)
    args.out.mkdir(parents=True, exist_ok=True)
    text = _markdown(results)
    sys.stdout.write(text)
    (args.out / "results.md").write_text(text)
    write_json(results, args.out / "results.json")
    progress(f"wrote {args.out / 'results.md'} and results.json")
    chart = args.out / "throughput.png"
    if (reason := plot_throughput(results, chart)) is not None:
        progress(f"no chart: {reason}")
    else:
        progress(f"wrote {chart}")


if __name__ == "__main__":
    main()
