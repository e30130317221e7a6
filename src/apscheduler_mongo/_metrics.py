"""
What the store and the broker count, through the OpenTelemetry metrics API.

Everything is counted in memory, by the instruments of the meter provider given
(``meter_provider=``), or else of the global one: with no SDK configured, the API's
instruments do nothing, and without ``opentelemetry-api`` installed, neither do
these. No count costs a command: the gauges read from the database (jobs queued and
running per task) are read by the scrape endpoint when it is scraped
(:mod:`apscheduler_mongo.metrics`).

Names follow Prometheus's guide once exported (the ``apscheduler_mongo`` prefix,
base units as suffixes, ``_total`` on counters): :data:`NAMES` lists them. Labels
are bounded: a task id, an outcome, a kind, an error class; never a job id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._version import __version__

#: Histogram boundaries for times (seconds): from a few milliseconds to minutes
TIME_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

#: Every instrument: its OpenTelemetry name, kind, unit, description and labels. The
#: names a Prometheus scrape shows are made from these (``tests/test_metrics.py``
#: checks that every one appears in a scrape of a busy store)
INSTRUMENTS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "apscheduler_mongo.jobs.added": (
        "counter",
        "{job}",
        "Jobs added, by task",
        ("task",),
    ),
    "apscheduler_mongo.jobs.acquired": (
        "counter",
        "{job}",
        "Jobs handed out to a scheduler, by task",
        ("task",),
    ),
    "apscheduler_mongo.jobs.released": (
        "counter",
        "{job}",
        "Jobs released by the scheduler that ran them, by task and outcome",
        ("task", "outcome"),
    ),
    "apscheduler_mongo.job.run_time": (
        "histogram",
        "s",
        "How long jobs ran (finished minus started), by task",
        ("task",),
    ),
    "apscheduler_mongo.job.lateness": (
        "histogram",
        "s",
        "How late jobs of schedules started (started minus the scheduled fire time), "
        "by task",
        ("task",),
    ),
    "apscheduler_mongo.claims.lost": (
        "counter",
        "{item}",
        "Jobs or schedules a claim chose and another scheduler took first, by kind",
        ("kind",),
    ),
    "apscheduler_mongo.leases.taken_over": (
        "counter",
        "{item}",
        "Jobs or schedules claimed after the lease of another scheduler lapsed, "
        "by kind",
        ("kind",),
    ),
    "apscheduler_mongo.jobs.reaped": (
        "counter",
        "{job}",
        "Jobs finished as abandoned (their scheduler gone), by task",
        ("task",),
    ),
    "apscheduler_mongo.retries": (
        "counter",
        "{attempt}",
        "Operations retried after a temporary failure, by error",
        ("error",),
    ),
    "apscheduler_mongo.retry.wait": (
        "counter",
        "s",
        "Time spent waiting before retrying temporary failures",
        (),
    ),
    "apscheduler_mongo.outages": (
        "counter",
        "{episode}",
        "Episodes of temporary failures (from the first failure to the next success)",
        (),
    ),
    "apscheduler_mongo.events.published": (
        "counter",
        "{event}",
        "Events this process published, by type",
        ("type",),
    ),
    "apscheduler_mongo.events.delivered": (
        "counter",
        "{event}",
        "Events from other processes delivered here, by type",
        ("type",),
    ),
    "apscheduler_mongo.event.delivery_lag": (
        "histogram",
        "s",
        "From an event's creation (its publisher's clock) to its delivery here",
        (),
    ),
    "apscheduler_mongo.stream.restarts": (
        "counter",
        "{restart}",
        "Change streams opened again after a failure, by how (resumed, caught_up)",
        ("how",),
    ),
    "apscheduler_mongo.clock.offset": (
        "gauge",
        "s",
        "How far the server's clock is ahead of this host's",
        (),
    ),
    "apscheduler_mongo.jobs.queued": (
        "gauge",
        "{job}",
        "Jobs waiting, by task (read when scraped)",
        ("task",),
    ),
    "apscheduler_mongo.jobs.running": (
        "gauge",
        "{job}",
        "Jobs acquired and not released, by task (read when scraped)",
        ("task",),
    ),
    "apscheduler_mongo.schedulers": (
        "gauge",
        "{scheduler}",
        "Schedulers registered on the store, by state: live, or gone quiet (read "
        "when scraped)",
        ("state",),
    ),
}


class _Nothing:
    """An instrument that records nothing (``opentelemetry-api`` is not installed)."""

    def add(self, amount: float, attributes: Mapping[str, str] | None = None) -> None:
        pass

    def record(
        self, amount: float, attributes: Mapping[str, str] | None = None
    ) -> None:
        pass

    def set(self, amount: float, attributes: Mapping[str, str] | None = None) -> None:
        pass


def _instruments(meter_provider: Any) -> dict[str, Any]:
    try:
        from opentelemetry import metrics
    except ImportError:
        return {name: _Nothing() for name in INSTRUMENTS}

    meter = metrics.get_meter(
        "apscheduler_mongo", __version__, meter_provider=meter_provider
    )
    made: dict[str, Any] = {}
    for name, (kind, unit, description, _) in INSTRUMENTS.items():
        if kind == "counter":
            made[name] = meter.create_counter(name, unit, description)
        elif kind == "gauge":
            made[name] = meter.create_gauge(name, unit, description)
        else:
            made[name] = meter.create_histogram(
                name,
                unit,
                description,
                explicit_bucket_boundaries_advisory=TIME_BUCKETS,
            )

    return made


class Metrics:
    """
    The instruments of one meter provider, and the events that move them.

    :param meter_provider: an OpenTelemetry ``MeterProvider``, or ``None`` for the
        global one
    """

    def __init__(self, meter_provider: Any = None) -> None:
        made = _instruments(meter_provider)
        self._added = made["apscheduler_mongo.jobs.added"]
        self._acquired = made["apscheduler_mongo.jobs.acquired"]
        self._released = made["apscheduler_mongo.jobs.released"]
        self._run_time = made["apscheduler_mongo.job.run_time"]
        self._lateness = made["apscheduler_mongo.job.lateness"]
        self._lost = made["apscheduler_mongo.claims.lost"]
        self._taken_over = made["apscheduler_mongo.leases.taken_over"]
        self._reaped = made["apscheduler_mongo.jobs.reaped"]
        self._retries = made["apscheduler_mongo.retries"]
        self._retry_wait = made["apscheduler_mongo.retry.wait"]
        self._outages = made["apscheduler_mongo.outages"]
        self._published = made["apscheduler_mongo.events.published"]
        self._delivered = made["apscheduler_mongo.events.delivered"]
        self._lag = made["apscheduler_mongo.event.delivery_lag"]
        self._restarts = made["apscheduler_mongo.stream.restarts"]
        self._offset = made["apscheduler_mongo.clock.offset"]
        self._queued = made["apscheduler_mongo.jobs.queued"]
        self._running = made["apscheduler_mongo.jobs.running"]
        self._schedulers = made["apscheduler_mongo.schedulers"]
        #: Whether an outage (an episode of temporary failures) is under way
        self._failing = False
        #: The tasks whose queue gauges were set, to be set to 0 once gone
        self._gauged: set[str] = set()

    # Jobs

    def added(self, task_id: str) -> None:
        self._added.add(1, {"task": task_id})

    def acquired(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            self._acquired.add(1, {"task": task_id})

    def released(
        self,
        task_id: str,
        outcome: str,
        run_time: float | None,
        lateness: float | None,
    ) -> None:
        task = {"task": task_id}
        self._released.add(1, {**task, "outcome": outcome})
        if run_time is not None:
            self._run_time.record(run_time, task)
        if lateness is not None:
            self._lateness.record(lateness, task)

    def reaped(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            self._reaped.add(1, {"task": task_id})

    # Claims

    def claims_lost(self, kind: str, count: int) -> None:
        if count:
            self._lost.add(count, {"kind": kind})

    def taken_over(self, kind: str, count: int) -> None:
        if count:
            self._taken_over.add(count, {"kind": kind})

    # Failures

    def failed(self, error: str) -> None:
        """Note a temporary failure that is retried (``error``: its class or code)."""
        self._retries.add(1, {"error": error})
        if not self._failing:
            self._failing = True
            self._outages.add(1)

    def waited(self, seconds: float) -> None:
        self._retry_wait.add(seconds)

    def recovered(self) -> None:
        """Note a success after failures: the outage, if any, is over."""
        self._failing = False

    # Events

    def published(self, kind: str) -> None:
        self._published.add(1, {"type": kind})

    def delivered(self, kind: str, lag: float) -> None:
        self._delivered.add(1, {"type": kind})
        self._lag.record(max(lag, 0.0))

    def stream_restarted(self, how: str) -> None:
        self._restarts.add(1, {"how": how})

    # Gauges

    def clock_offset(self, seconds: float) -> None:
        self._offset.set(seconds)

    def job_counts(self, queued: Mapping[str, int], running: Mapping[str, int]) -> None:
        """Set the gauges of jobs queued and running per task (0 for tasks gone)."""
        tasks = set(queued) | set(running)
        for task_id in tasks | self._gauged:
            self._queued.set(queued.get(task_id, 0), {"task": task_id})
            self._running.set(running.get(task_id, 0), {"task": task_id})

        self._gauged = tasks

    def schedulers(self, live: int, quiet: int) -> None:
        """Set the gauge of the schedulers registered, live and gone quiet."""
        self._schedulers.set(live, {"state": "live"})
        self._schedulers.set(quiet, {"state": "quiet"})


def error_label(exc: BaseException) -> str:
    """Name a temporary failure by its class, and its server code if it has one."""
    code = getattr(exc, "code", None)
    name = type(exc).__name__
    return f"{name}:{code}" if isinstance(code, int) else name
