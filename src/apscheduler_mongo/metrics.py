"""
Metrics for Prometheus: a scrape endpoint over OpenTelemetry's Prometheus reader.

The store and the event broker count through the OpenTelemetry metrics API
(``meter_provider=``, or the global provider); this module serves what a meter
provider with a :class:`~opentelemetry.exporter.prometheus.PrometheusMetricReader`
collected, in Prometheus's text format, and sets, on each scrape, the gauges of jobs
queued and running per task from one indexed aggregation. One mechanism: the
dashboard's ``/metrics`` is this endpoint too. Needs the ``metrics`` extra
(``pip install apscheduler-mongo[metrics]``).

.. code-block:: python

    from apscheduler_mongo.metrics import MetricsEndpoint, prometheus_meter_provider

    provider, registry = prometheus_meter_provider()
    store = MongoDBDataStore(uri, meter_provider=provider)
    broker = MongoDBEventBroker(uri, meter_provider=provider)
    endpoint = MetricsEndpoint(registry, store=store, meter_provider=provider)
    app.mount("/metrics", endpoint)
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import anyio
from apscheduler import RetrySettings
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pymongo.errors import PyMongoError
from tenacity import stop_after_delay, wait_exponential

from ._datastore import MongoDBDataStore
from ._metrics import INSTRUMENTS, Metrics
from ._tools.status import Reader, job_counts, live_schedulers

__all__ = ["MetricsEndpoint", "prometheus_meter_provider", "prometheus_names"]

_logger = logging.getLogger("apscheduler_mongo.metrics")

#: The suffix Prometheus's exporter gives each unit of ours
_UNIT_SUFFIXES = {"s": "_seconds"}


def prometheus_names() -> dict[str, tuple[str, tuple[str, ...]]]:
    """
    Return the name of each metric in a scrape (without ``_bucket``, ``_sum`` or
    ``_count``), with its Prometheus type (``counter``, ``gauge`` or ``histogram``)
    and its labels (besides ``le`` and the ``otel_scope_*`` ones).
    """
    names: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, (kind, unit, _, labels) in INSTRUMENTS.items():
        exported = name.replace(".", "_") + _UNIT_SUFFIXES.get(unit, "")
        names[exported + ("_total" if kind == "counter" else "")] = (kind, labels)

    return names


def prometheus_meter_provider() -> tuple[MeterProvider, CollectorRegistry]:
    """
    Return a meter provider whose metrics a :class:`MetricsEndpoint` can serve, and
    the registry it collects into (its own: not ``prometheus_client``'s global one).

    Give the provider to the store, the broker and the endpoint, or make it the
    global one (``opentelemetry.metrics.set_meter_provider``).
    """
    registry = CollectorRegistry(auto_describe=True)
    reader = PrometheusMetricReader(registry=registry, disable_target_info=True)
    # Prometheus's text format carries no exemplars: spare each measurement the
    # look for a current span
    provider = MeterProvider(
        metric_readers=[reader], exemplar_filter=AlwaysOffExemplarFilter()
    )
    return provider, registry


async def scrape(
    registry: CollectorRegistry, metrics: Metrics, reader: Reader | None
) -> bytes:
    """
    With ``reader``, set the gauges read from the database: jobs queued and running
    per task (one aggregation, served by the ``state`` index) and the schedulers
    live and gone quiet (one query, served by the ``expires`` index; judged by this
    host's clock); then render the registry.
    """
    if reader is not None:
        queued, running = await job_counts(reader)
        metrics.job_counts(queued, running)
        rows = await live_schedulers(reader, datetime.now(timezone.utc))
        quiet = sum(row.quiet for row in rows)
        metrics.schedulers(len(rows) - quiet, quiet)

    return bytes(generate_latest(registry))


class MetricsEndpoint:
    """
    An ASGI application that answers ``GET`` with the metrics in Prometheus's text
    format: mount it in the web application (``/metrics``), or serve it alone.

    :param registry: where the meter provider's ``PrometheusMetricReader``
        collects (default: ``prometheus_client``'s global registry)
    :param store: a store of this process: while it runs, each scrape reads the
        gauges of jobs and schedulers through its client (not before it starts, nor
        after it stops)
    :param meter_provider: the provider the gauges of jobs are set on (default: the
        global one)
    :param timeout: seconds a scrape may spend reading (retrying temporary
        failures until then); past it, the scrape answers without those gauges
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        store: MongoDBDataStore | None = None,
        meter_provider: Any = None,
        timeout: float = 5.0,
    ) -> None:
        from prometheus_client import REGISTRY

        self.registry = REGISTRY if registry is None else registry
        self.store = store
        self.timeout = timeout
        #: The content type of what :meth:`body` returns
        self.content_type = CONTENT_TYPE_LATEST
        self._metrics = Metrics(meter_provider)

    def _reader(self) -> Reader | None:
        """Return a reader through the store's client, while the store runs."""
        adapter = None if self.store is None else self.store._live_adapter()
        if self.store is None or adapter is None:
            return None

        settings = RetrySettings(
            stop=stop_after_delay(self.timeout),
            wait=wait_exponential(multiplier=0.1, max=1),
        )
        return Reader(adapter, self.store.database, settings, _logger)

    async def body(self, reader: Reader | None = None) -> bytes:
        """Return a scrape's text (``reader``: read the jobs through it instead)."""
        reader = reader or self._reader()
        try:
            with anyio.fail_after(self.timeout):
                return await scrape(self.registry, self._metrics, reader)
        except (PyMongoError, TimeoutError) as exc:
            _logger.warning("Could not count the jobs for a scrape: %s", exc)
            return await scrape(self.registry, self._metrics, None)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})

            await send({"type": "lifespan.shutdown.complete"})
            return

        if scope["type"] != "http":
            return

        if scope.get("method") != "GET":
            await _respond(send, 405, b"Method Not Allowed\n", b"text/plain")
            return

        await _respond(send, 200, await self.body(), self.content_type.encode())


async def _respond(send: Any, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
