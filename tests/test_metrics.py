"""Each metric moves when its event happens, and a scrape shows them all."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from apscheduler import (
    AsyncScheduler,
    ConflictPolicy,
    Job,
    JobAdded,
    JobOutcome,
    JobResult,
    RetrySettings,
    Schedule,
)
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pymongo.errors import AutoReconnect
from tenacity import stop_after_attempt, wait_fixed

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker
from apscheduler_mongo._job_claims import JobClaim
from apscheduler_mongo.dashboard import Dashboard
from apscheduler_mongo.metrics import (
    MetricsEndpoint,
    prometheus_meter_provider,
    prometheus_names,
)

from .support.commands import CommandLog
from .support.items import add_task, due_schedule
from .support.stores import started_store
from .support.tiers import WIRE_ONLY

pytestmark = pytest.mark.anyio

LEASE = timedelta(minutes=1)
SHORT = timedelta(milliseconds=100)
#: Retries that wait a little: a test of retries is not a test of patience
QUICK_RETRIES = RetrySettings(stop=stop_after_attempt(3), wait=wait_fixed(0.05))


def sample_values(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Parse a scrape (failing on anything not in Prometheus's text format)."""
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def value(text: str, name: str, **labels: str) -> float:
    """Return the sum of the samples ``name`` whose labels include ``labels``."""
    return sum(
        sample
        for sample_name, sample_labels, sample in sample_values(text)
        if sample_name == name and labels.items() <= sample_labels.items()
    )


@pytest.fixture
def metered() -> tuple[Any, CollectorRegistry]:
    return prometheus_meter_provider()


@pytest.fixture
async def stores(
    client: Any,
    database_name: str,
    metered: tuple[Any, CollectorRegistry],
    local_events: Any,
    logger: logging.Logger,
) -> AsyncIterator[tuple[MongoDBDataStore, MongoDBDataStore]]:
    """Two started stores on one database, as two schedulers have, both metered."""
    async with AsyncExitStack() as exit_stack:
        pair = []
        for scratch in (True, False):
            store = MongoDBDataStore(
                client,
                database=database_name,
                start_from_scratch=scratch,
                meter_provider=metered[0],
                retry_settings=QUICK_RETRIES,
            )
            await store.start(exit_stack, local_events, logger)
            pair.append(store)

        yield pair[0], pair[1]


def scrape(metered: tuple[Any, CollectorRegistry]) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metered[1]).decode()


# What happens to a store, each made to happen on purpose


async def run_a_late_job(store: MongoDBDataStore) -> None:
    """A job of a schedule, started 3 s after its fire time, runs for 2 s."""
    now = datetime.now(timezone.utc)
    await store.add_job(
        Job(task_id="task", executor="async", schedule_id="s", scheduled_fire_time=now)
    )
    [job] = await store.acquire_jobs("me", LEASE, 1)
    started = now + timedelta(seconds=3)
    result = JobResult(
        job_id=job.id,
        outcome=JobOutcome.success,
        started_at=started,
        finished_at=started + timedelta(seconds=2),
        expires_at=started + timedelta(minutes=1),
    )
    await store.release_job("me", job, result)


async def lose_a_claim(store: MongoDBDataStore, other: MongoDBDataStore) -> None:
    """Another scheduler takes the job ``store`` chose, between its read and write."""
    await store.add_job(Job(task_id="task", executor="async"))
    choose = JobClaim.choose
    raced = False

    async def racing(claim: JobClaim) -> Any:
        nonlocal raced
        chosen = await choose(claim)
        if not raced:
            raced = True
            assert len(await other.acquire_jobs("other", LEASE, 10)) == 1

        return chosen

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(JobClaim, "choose", racing)
        assert await store.acquire_jobs("me", LEASE, 10) == []


async def take_over_lapsed_leases(
    store: MongoDBDataStore, other: MongoDBDataStore
) -> None:
    """A job's and a schedule's leases lapse; another scheduler takes them."""
    await store.add_job(Job(task_id="task", executor="async"))
    await store.add_schedule(due_schedule(), ConflictPolicy.replace)
    assert len(await store.acquire_jobs("me", SHORT, 10)) == 1
    assert len(await store.acquire_schedules("me", SHORT, 10)) == 1
    await anyio.sleep(0.3)
    assert len(await other.acquire_jobs("other", LEASE, 10)) == 1
    assert len(await other.acquire_schedules("other", LEASE, 10)) == 1
    await other.remove_schedules(["s"])


async def reap_a_job(store: MongoDBDataStore, other: MongoDBDataStore) -> None:
    """A scheduler's lease on a job lapses; cleanup finishes it as abandoned."""
    await store.add_job(Job(task_id="task", executor="async"))
    assert len(await store.acquire_jobs("me", SHORT, 10)) == 1
    await anyio.sleep(0.3)
    await other.cleanup()


def failing_once(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Return ``call``, but failing the first time with a network error."""
    failed = False

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        if not failed:
            failed = True
            raise AutoReconnect("connection reset by the test")

        return await call(*args, **kwargs)

    return flaky


async def fail_once(store: MongoDBDataStore) -> None:
    """One insert fails with a network error, and is retried."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store._jobs, "insert_one", failing_once(store._jobs.insert_one))
        await store.add_job(Job(task_id="task", executor="async"))


class TestEachMetricMoves:
    async def test_job_life(
        self, stores: Any, metered: tuple[Any, CollectorRegistry]
    ) -> None:
        store, _ = stores
        await add_task(store)
        await run_a_late_job(store)
        text = scrape(metered)
        task = {"task": "task"}
        assert value(text, "apscheduler_mongo_jobs_added_total", **task) == 1
        assert value(text, "apscheduler_mongo_jobs_acquired_total", **task) == 1
        assert (
            value(
                text,
                "apscheduler_mongo_jobs_released_total",
                outcome="success",
                **task,
            )
            == 1
        )
        run_time = "apscheduler_mongo_job_run_time_seconds"
        assert value(text, f"{run_time}_count", **task) == 1
        assert value(text, f"{run_time}_sum", **task) == pytest.approx(2.0)
        lateness = "apscheduler_mongo_job_lateness_seconds"
        assert value(text, f"{lateness}_count", **task) == 1
        assert value(text, f"{lateness}_sum", **task) == pytest.approx(3.0)
        # The histogram's buckets are in seconds: 3 s falls in le="5"
        assert value(text, f"{lateness}_bucket", le="2.5", **task) == 0
        assert value(text, f"{lateness}_bucket", le="5.0", **task) == 1

    async def test_missed_start_deadline(
        self, stores: Any, metered: tuple[Any, CollectorRegistry]
    ) -> None:
        """A job whose start deadline passed is finished by the claim: counted as
        released, with its outcome."""
        store, _ = stores
        await add_task(store)
        passed = datetime.now(timezone.utc) - timedelta(seconds=1)
        await store.add_job(
            Job(task_id="task", executor="async", start_deadline=passed)
        )
        assert await store.acquire_jobs("me", LEASE, 10) == []
        text = scrape(metered)
        released = "apscheduler_mongo_jobs_released_total"
        assert value(text, released, outcome="missed_start_deadline") == 1

    async def test_lost_claim(
        self, stores: Any, metered: tuple[Any, CollectorRegistry]
    ) -> None:
        store, other = stores
        await add_task(store)
        assert "claims_lost" not in scrape(metered)
        await lose_a_claim(store, other)
        text = scrape(metered)
        assert value(text, "apscheduler_mongo_claims_lost_total", kind="job") == 1

    async def test_lapsed_leases_taken_over(
        self, stores: Any, metered: tuple[Any, CollectorRegistry]
    ) -> None:
        store, other = stores
        await add_task(store)
        await take_over_lapsed_leases(store, other)
        text = scrape(metered)
        name = "apscheduler_mongo_leases_taken_over_total"
        assert value(text, name, kind="job") == 1
        assert value(text, name, kind="schedule") == 1

    async def test_reaped(
        self, stores: Any, metered: tuple[Any, CollectorRegistry]
    ) -> None:
        store, other = stores
        await add_task(store)
        await reap_a_job(store, other)
        text = scrape(metered)
        assert value(text, "apscheduler_mongo_jobs_reaped_total", task="task") == 1

    async def test_retried_failure(
        self, stores: Any, metered: tuple[Any, CollectorRegistry]
    ) -> None:
        store, _ = stores
        await add_task(store)
        await fail_once(store)
        text = scrape(metered)
        retries = "apscheduler_mongo_retries_total"
        assert value(text, retries, error="AutoReconnect") == 1
        assert value(text, "apscheduler_mongo_outages_total") == 1
        assert value(text, "apscheduler_mongo_retry_wait_seconds_total") == (
            pytest.approx(0.05)
        )
        # A success ended the outage: the next failure starts another
        await store.get_jobs()
        await fail_once(store)
        text = scrape(metered)
        assert value(text, retries, error="AutoReconnect") == 2
        assert value(text, "apscheduler_mongo_outages_total") == 2

    async def test_clock_offset(
        self, stores: Any, metered: tuple[Any, CollectorRegistry], tier: str
    ) -> None:
        if tier == "mongomock":
            pytest.skip("mongomock-motor tells no server time: there is no offset")

        store, _ = stores
        [(_, _, offset)] = [
            sample
            for sample in sample_values(scrape(metered))
            if sample[0] == "apscheduler_mongo_clock_offset_seconds"
        ]
        assert offset == pytest.approx(store._clock.offset(), abs=0.001)

    async def test_events(
        self,
        client: Any,
        database_name: str,
        metered: tuple[Any, CollectorRegistry],
        logger: logging.Logger,
    ) -> None:
        received = anyio.Event()
        async with AsyncExitStack() as exit_stack:
            brokers = []
            for _ in range(2):
                broker = MongoDBEventBroker(
                    client,
                    database=database_name,
                    mode="polling",
                    poll_interval=0.02,
                    meter_provider=metered[0],
                )
                await broker.start(exit_stack, logger)
                brokers.append(broker)

            brokers[1].subscribe(lambda _: received.set(), {JobAdded})
            job = Job(task_id="t", executor="async")
            await brokers[0].publish(
                JobAdded(job_id=job.id, task_id="t", schedule_id=None)
            )
            with anyio.fail_after(10):
                await received.wait()

        text = scrape(metered)
        kind = {"type": "JobAdded"}
        assert value(text, "apscheduler_mongo_events_published_total", **kind) == 1
        assert value(text, "apscheduler_mongo_events_delivered_total", **kind) == 1
        lag = "apscheduler_mongo_event_delivery_lag_seconds"
        assert value(text, f"{lag}_count") == 1
        assert 0 <= value(text, f"{lag}_sum") < 10


class TestBrokerOutages:
    async def test_each_publish_outage_counted(
        self,
        client: Any,
        database_name: str,
        metered: tuple[Any, CollectorRegistry],
        logger: logging.Logger,
    ) -> None:
        """A publish that succeeds after a failure ends the outage: the next
        failure is another one."""
        async with AsyncExitStack() as exit_stack:
            broker = MongoDBEventBroker(
                client,
                database=database_name,
                mode="polling",
                meter_provider=metered[0],
                retry_settings=QUICK_RETRIES,
            )
            await broker.start(exit_stack, logger)
            for _ in range(2):
                flaky = failing_once(broker._events.update_one)
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(broker._events, "update_one", flaky)
                    job = Job(task_id="t", executor="async")
                    await broker.publish(
                        JobAdded(job_id=job.id, task_id="t", schedule_id=None)
                    )

        text = scrape(metered)
        assert value(text, "apscheduler_mongo_outages_total") == 2
        assert value(text, "apscheduler_mongo_retries_total") == 2


class TestScrapeEndpoint:
    async def test_jobs_per_task_read_on_scrape(
        self, stores: Any, metered: tuple[Any, CollectorRegistry]
    ) -> None:
        store, _ = stores
        await add_task(store)
        for _ in range(3):
            await store.add_job(Job(task_id="task", executor="async"))
        await store.acquire_jobs("me", LEASE, 1)
        endpoint = MetricsEndpoint(metered[1], store=store, meter_provider=metered[0])
        transport = httpx.ASGITransport(app=endpoint)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            reply = await http.get("/")
            refused = await http.post("/")

        assert reply.status_code == 200
        assert reply.headers["content-type"] == endpoint.content_type
        assert value(reply.text, "apscheduler_mongo_jobs_queued", task="task") == 2
        assert value(reply.text, "apscheduler_mongo_jobs_running", task="task") == 1
        assert refused.status_code == 405

        # A task whose jobs are all gone shows 0, not its last count
        for job in await store.get_jobs():
            if job.acquired_by is None:
                await store.acquire_jobs("me", LEASE, 10)
        for job in await store.get_jobs():
            await store.release_job(
                "me", job, JobResult.from_job(job, JobOutcome.success)
            )
        text = (await endpoint.body()).decode()
        assert value(text, "apscheduler_mongo_jobs_queued", task="task") == 0
        assert value(text, "apscheduler_mongo_jobs_running", task="task") == 0

    async def test_store_stopped(
        self,
        client: Any,
        database_name: str,
        metered: tuple[Any, CollectorRegistry],
        local_broker: Any,
        logger: logging.Logger,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Once its store stopped, a scrape reads nothing through its closed client."""
        async with started_store(
            client, database_name, local_broker, logger, meter_provider=metered[0]
        ) as store:
            endpoint = MetricsEndpoint(
                metered[1], store=store, meter_provider=metered[0]
            )
            await add_task(store)
            await store.add_job(Job(task_id="task", executor="async"))
            assert "apscheduler_mongo_jobs_queued{" in (await endpoint.body()).decode()

        text = (await endpoint.body()).decode()
        assert "apscheduler_mongo_jobs_added_total" in text
        assert "Could not count" not in caplog.text

    async def test_on_the_dashboard(
        self, stores: Any, metered: tuple[Any, CollectorRegistry]
    ) -> None:
        store, _ = stores
        await add_task(store)
        await store.add_job(Job(task_id="task", executor="async"))
        endpoint = MetricsEndpoint(metered[1], meter_provider=metered[0])
        dashboard = Dashboard(store, metrics=endpoint)
        transport = httpx.ASGITransport(app=dashboard)
        async with (
            dashboard,
            httpx.AsyncClient(transport=transport, base_url="http://t") as http,
        ):
            reply = await http.get("/metrics")

        assert reply.status_code == 200
        # Read through the dashboard's own client: the endpoint was given no store
        assert value(reply.text, "apscheduler_mongo_jobs_queued", task="task") == 1
        assert value(reply.text, "apscheduler_mongo_jobs_added_total", task="task") == 1

    async def test_dashboard_without_metrics(self, stores: Any) -> None:
        store, _ = stores
        dashboard = Dashboard(store)
        transport = httpx.ASGITransport(app=dashboard)
        async with (
            dashboard,
            httpx.AsyncClient(transport=transport, base_url="http://t") as http,
        ):
            assert (await http.get("/metrics")).status_code == 404


@WIRE_ONLY
async def test_scrape_costs_two_commands(
    counted_store: MongoDBDataStore, command_log: CommandLog
) -> None:
    """A scrape reads the jobs per task with one aggregation, whatever the tasks,
    and the schedulers with one query."""
    for number in range(5):
        await add_task(counted_store, task_id=f"task-{number}")
        await counted_store.add_job(Job(task_id=f"task-{number}", executor="async"))

    provider, registry = prometheus_meter_provider()
    endpoint = MetricsEndpoint(registry, store=counted_store, meter_provider=provider)
    with command_log.recording() as sent:
        text = (await endpoint.body()).decode()

    assert sent == ["aggregate jobs", "find schedulers"], sent
    assert value(text, "apscheduler_mongo_jobs_queued") == 5
    assert value(text, "apscheduler_mongo_schedulers", state="live") == 1
    assert value(text, "apscheduler_mongo_schedulers", state="quiet") == 0


def test_docs_list_every_metric() -> None:
    """The operations page's table names each metric, and only those."""
    page = (Path(__file__).parent.parent / "docs" / "operations.rst").read_text()
    listed = set(re.findall(r"``(apscheduler_mongo_[a-z_]+)``", page))
    assert listed == set(prometheus_names())


async def _run_schedulers(
    client: Any, database: str, provider: Any, seconds: float
) -> None:
    """Run two schedulers for a while, each with a metered store and event broker
    of its own (polling: the stand-ins have no change streams)."""

    async def run(name: str) -> None:
        store = MongoDBDataStore(client, database=database, meter_provider=provider)
        broker = MongoDBEventBroker(
            client,
            database=database,
            mode="polling",
            poll_interval=0.05,
            meter_provider=provider,
        )
        async with AsyncScheduler(store, broker, identity=name) as scheduler:
            await scheduler.start_in_background()
            await anyio.sleep(seconds)

    async with anyio.create_task_group() as group:
        for name in ("scheduler-1", "scheduler-2"):
            group.start_soon(run, name)


class TestBusyStore:
    async def test_scrape_shows_every_metric(
        self,
        stores: Any,
        metered: tuple[Any, CollectorRegistry],
        client: Any,
        database_name: str,
        tier: str,
    ) -> None:
        """Two schedulers at work, with every event the metrics count made to
        happen: one scrape shows every metric the library exports, but the change
        stream's restarts (the stand-ins have no change streams; a fake stream's
        test counts them, tests/test_eventbroker.py)."""
        store, other = stores
        await add_task(store)
        busy = Schedule(
            id="busy",
            task_id="task",
            trigger=IntervalTrigger(seconds=0.1),
            job_executor="async",
        )
        busy.next_fire_time = datetime.now(timezone.utc)
        await store.add_schedule(busy, ConflictPolicy.replace)
        await _run_schedulers(client, database_name, metered[0], 1.5)
        await store.remove_schedules(["busy"])
        # What the schedulers left queued is not for the events made below
        while left := await store.acquire_jobs("drain", LEASE, 100):
            for job in left:
                result = JobResult.from_job(job, JobOutcome.cancelled)
                await store.release_job("drain", job, result)
        await run_a_late_job(store)
        await lose_a_claim(store, other)
        await take_over_lapsed_leases(store, other)
        await reap_a_job(store, other)
        await fail_once(store)

        endpoint = MetricsEndpoint(metered[1], store=store, meter_provider=metered[0])
        text = (await endpoint.body()).decode()
        shown = {name for name, _, _ in sample_values(text)}
        expected = set(prometheus_names()) - {"apscheduler_mongo_stream_restarts_total"}
        if tier == "mongomock":  # it tells no server time: no clock offset
            expected.remove("apscheduler_mongo_clock_offset_seconds")
        missing = {
            name
            for name in expected
            if name not in shown and f"{name}_count" not in shown
        }
        assert not missing, missing
        # Each sample carries the labels declared for its metric, and no others
        declared = prometheus_names()
        for name, labels, _ in sample_values(text):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            kind, allowed = declared.get(base) or declared[name]
            extra = {"le"} if kind == "histogram" else set()
            scope = {label for label in labels if label.startswith("otel_scope_")}
            assert set(labels) - scope - extra == set(allowed), (name, labels)
        # The schedule's jobs ran (len() without arguments: they fail)
        released = "apscheduler_mongo_jobs_released_total"
        assert value(text, released, outcome="error") > 5
        assert value(text, "apscheduler_mongo_events_delivered_total") > 0
