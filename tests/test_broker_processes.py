"""Several processes, one database: every event reaches every broker exactly once."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from anyio import fail_after, to_thread
from apscheduler import RetrySettings
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect, ServerSelectionTimeoutError

from .support.broker_workers import SPAWN, Workers, exchange_events
from .support.proxy import (
    FAULT_RETRIES,
    LOOPBACK,
    FaultyProxy,
    cutting,
    proxied,
    proxy_in_front_of,
)
from .support.tiers import MULTI_PROCESS

pytestmark = [pytest.mark.anyio, *MULTI_PROCESS]

WORKERS = 3
EVENTS = 200
#: How long the test waits for each worker's report
REPORT_TIMEOUT = 90


def exchange(
    uri: str, database: str, pace: float, retry_settings: RetrySettings
) -> tuple[list[dict[str, Any]], float]:
    """
    Run the exchange in WORKERS processes; return their reports and the start time.

    The test process passes the barrier with the workers, so the returned time is
    when publishing began.
    """
    barrier = SPAWN.Barrier(WORKERS + 1)
    published = SPAWN.Barrier(WORKERS)
    workers = Workers()
    for n in range(WORKERS):
        name = f"worker{n}"
        args = (barrier, published, EVENTS, EVENTS * WORKERS, pace, retry_settings)
        workers.spawn(exchange_events, uri, database, name, *args)

    with workers.running():
        barrier.wait(REPORT_TIMEOUT)
        started = time.time()
        reports = workers.reports(REPORT_TIMEOUT)

    assert [process.exitcode for process in workers.processes] == [0] * WORKERS
    return reports, started


def publishing_summary(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each worker's report says of its publishing: where its time went."""
    keys = ("publishing", "retried_operations", "failed_commands", "failed_heartbeats")
    return [
        {
            "worker": report["worker"],
            "took": round(report["published_until"] - report["published_from"], 2),
            **{key: report[key] for key in keys},
        }
        for report in reports
    ]


def assert_all_published(reports: list[dict[str, Any]]) -> None:
    """Assert every worker heard that all had published (none waited in vain)."""
    assert all(report["others_published"] for report in reports), (
        f"a publisher did not finish in time: {publishing_summary(reports)}"
    )


def assert_exactly_once_in_order(reports: list[dict[str, Any]]) -> None:
    """Assert each worker received every event once, in publish order per publisher."""
    expected = {f"worker{w}:{n}" for w in range(WORKERS) for n in range(EVENTS)}
    for report in reports:
        received: list[str] = report["received"]
        duplicates = len(received) - len(set(received))
        missing = expected - set(received)
        assert duplicates == 0, f"{report['worker']} got {duplicates} duplicates"
        assert not missing, (
            f"{report['worker']} missed {len(missing)} events: "
            f"{sorted(missing)[:3]}...; what each worker saw: "
            f"{[{k: v for k, v in r.items() if k != 'received'} for r in reports]}"
        )
        assert len(received) == len(expected)
        for publisher in range(WORKERS):
            numbers = [
                int(task_id.partition(":")[2])
                for task_id in received
                if task_id.startswith(f"worker{publisher}:")
            ]
            assert numbers == sorted(numbers), (
                f"{report['worker']} got worker{publisher}'s events out of order"
            )


async def assert_stored_once(client: Any, database: str) -> None:
    """Assert the events collection holds each published event in one document."""
    cursor = client[database]["events"].find({}, {"publisher": True, "seq": True})
    documents = await cursor.to_list(None)
    keys = [(document["publisher"], document["seq"]) for document in documents]
    assert len(keys) == len(set(keys)) == WORKERS * EVENTS
    for publisher in {publisher for publisher, _ in keys}:
        numbers = sorted(seq for name, seq in keys if name == publisher)
        assert numbers == list(range(1, EVENTS + 1))


class TestDelivery:
    """Every broker receives every process's events exactly once, in order."""

    async def test_exactly_once_in_order(
        self, client: Any, wire_uri: str, database_name: str
    ) -> None:
        reports, _ = await to_thread.run_sync(
            exchange, wire_uri, database_name, 0.0, RetrySettings()
        )

        assert len(reports) == WORKERS
        assert_all_published(reports)
        assert_exactly_once_in_order(reports)
        assert all(not report["errors"] for report in reports)
        await assert_stored_once(client, database_name)


class TestDeliveryThroughCuts:
    """Connections cut while publishing and polling lose and duplicate no event."""

    async def test_exactly_once_in_order(
        self,
        client: Any,
        wire_uri: str,
        database_name: str,
        figures: Callable[[str], None],
    ) -> None:
        with proxied(wire_uri) as (proxy, uri):
            with cutting(proxy, every=0.5, jitter=0.5) as cut_times:
                # Paced publishing (2 s at least), with the proxy cutting meanwhile
                # (every 0.25 to 0.75 s: see cutting())
                reports, started = await to_thread.run_sync(
                    exchange, uri, database_name, 0.01, FAULT_RETRIES
                )

        summary = publishing_summary(reports)
        figures(
            "publishing took "
            + ", ".join(f"{worker['took']} s" for worker in summary)
            + f"; {sum(len(w['publishing']['slow']) for w in summary)} publishes "
            "over 1 s"
        )
        assert_all_published(reports)
        assert_exactly_once_in_order(reports)
        await assert_stored_once(client, database_name)
        publishing_ended = max(report["published_until"] for report in reports)
        cuts_while_publishing = [
            t for t in cut_times if started <= t <= publishing_ended
        ]
        assert len(cuts_while_publishing) >= 3, (
            f"only {len(cuts_while_publishing)} cuts while publishing"
        )
        assert proxy.connections_cut > 0, "the cuts closed no connection"
        # The cuts broke commands in flight; publishing and polling both retried
        assert sum(report["failed_commands"] for report in reports) > 0
        assert sum(report["retried_operations"] for report in reports) > 0
        assert all(report["retried_polls"] > 0 for report in reports)
        assert all(not report["errors"] for report in reports)


class TestFaultyProxy:
    """The proxy forwards, cuts and refuses connections as the fault tests need."""

    def test_uri_for_keeps_path_and_query(self) -> None:
        proxy = FaultyProxy(LOOPBACK, 27017)
        uri = "mongodb://user:pw@127.0.0.1:27017/db?directConnection=true"
        assert proxy.uri_for(uri, connectTimeoutMS=500) == (
            f"mongodb://user:pw@127.0.0.1:{proxy.port}/db"
            "?directConnection=true&connectTimeoutMS=500"
        )
        assert (
            proxy.uri_for("mongodb://localhost:1")
            == f"mongodb://127.0.0.1:{proxy.port}"
        )
        with pytest.raises(ValueError, match=r"one server on 127\.0\.0\.1"):
            proxy.uri_for("mongodb://db.example.com:27017/")

    def test_refuses_other_targets(self) -> None:
        with pytest.raises(ValueError, match=r"only forwards to 127\.0\.0\.1"):
            FaultyProxy("192.0.2.1", 27017)

    async def test_cut_and_refuse(self, wire_uri: str) -> None:
        with proxy_in_front_of(wire_uri) as proxy:
            uri = proxy.uri_for(
                wire_uri, serverSelectionTimeoutMS=1000, retryReads="false"
            )
            client: AsyncMongoClient[Any] = AsyncMongoClient(uri)
            try:
                with fail_after(10):
                    await client.admin.command("ping")
                    assert proxy.cut() > 0
                    assert proxy.cuts == 1
                    with pytest.raises(AutoReconnect):  # the pooled connection died
                        await client.admin.command("ping")

                    await client.admin.command("ping")  # a new connection works
                    proxy.refuse_for(2.0)
                    refused_until = anyio.current_time() + 2.0
                    with pytest.raises(AutoReconnect):  # the open connection died
                        await client.admin.command("ping")

                    with pytest.raises(ServerSelectionTimeoutError):  # no new one
                        await client.admin.command("ping")

                    assert proxy.refused > 0
                    await anyio.sleep(refused_until - anyio.current_time())
                    await client.admin.command("ping")
            finally:
                await client.close()

        assert proxy.cuts == 2
