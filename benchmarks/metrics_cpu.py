"""
Measure the client CPU that metrics add per job, without the noise of a scheduler.

Usage: ``python benchmarks/metrics_cpu.py [--jobs N] [--repeats R]``. Needs no server.

A job's life records, with metrics collected: ``jobs_added_total`` when it is added,
``jobs_acquired_total`` when handed out, and ``jobs_released_total``, the run time
and the lateness when released. This replays those records N times, through the
store's own :class:`~apscheduler_mongo._metrics.Metrics`, for each meter provider:

- ``none``: the global provider with no SDK configured (the API's no-op);
- ``prometheus``: :func:`apscheduler_mongo.metrics.prometheus_meter_provider` (the
  OpenTelemetry SDK, collecting for Prometheus);
- ``sdk default``: the SDK's ``MeterProvider`` with its default exemplar filter
  (what an application's own provider costs), and the Prometheus reader;

``repeats`` times each (interleaved), thread CPU time (``time.thread_time``), the
median per job printed side by side. ``benchmarks/client_cpu.py`` measures whole
jobs with and without metrics (its ``metered`` row), where this cost is within the
run-to-run spread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry

from apscheduler_mongo._metrics import Metrics
from apscheduler_mongo.metrics import prometheus_meter_provider

JOBS = 20_000
REPEATS = 5


def _providers() -> dict[str, Callable[[], object]]:
    def sdk_default() -> object:
        reader = PrometheusMetricReader(registry=CollectorRegistry())
        return MeterProvider(metric_readers=[reader])

    return {
        "none": lambda: None,
        "prometheus": lambda: prometheus_meter_provider()[0],
        "sdk default": sdk_default,
    }


def _per_job(metrics: Metrics, jobs: int) -> float:
    """Return the thread CPU per job (µs) of a job's records, ``jobs`` times."""
    tasks = [f"task-{n % 10}" for n in range(jobs)]
    started = time.thread_time()
    for task in tasks:
        metrics.added(task)
        metrics.acquired([task])
        metrics.released(task, "success", 0.012, 0.3)

    return (time.thread_time() - started) / jobs * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    runs: dict[str, list[float]] = {name: [] for name in _providers()}
    for _ in range(args.repeats):
        for name, provider in _providers().items():
            metrics = Metrics(provider())
            _per_job(metrics, 100)  # the series exist: what follows is steady state
            runs[name].append(_per_job(metrics, args.jobs))

    lines = [
        f"## Client CPU of a job's metrics ({args.jobs} jobs, 10 tasks, "
        f"median of {args.repeats})",
        "",
        "| meter provider | µs per job | each run |",
        "| --- | --- | --- |",
    ]
    for name, values in runs.items():
        each = " / ".join(f"{value:.1f}" for value in sorted(values))
        lines.append(f"| {name} | {statistics.median(values):.1f} | {each} |")

    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
