"""The registry of live schedulers: records, heartbeats, deregistration, the dead."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from datetime import timedelta
from typing import Any

import anyio
import pytest
from apscheduler import Job, RetrySettings
from apscheduler.abc import EventBroker
from pymongo.errors import AutoReconnect

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._adapters import adapter_for
from apscheduler_mongo._registry import KEPT_FOR, QUIET_AFTER
from apscheduler_mongo._tools.status import (
    Reader,
    SchedulerRow,
    gather_status,
    live_schedulers,
    render_text,
    scheduler_state,
)

from .support.items import add_task
from .support.stores import started_store
from .support.tiers import MULTI_PROCESS
from .support.workers import beating_worker

pytestmark = pytest.mark.anyio

INTERVAL = 0.2


async def _listed(client: Any, database: str) -> list[SchedulerRow]:
    reader = Reader(
        adapter_for(client), database, RetrySettings(), logging.getLogger("test")
    )
    clock = await reader.server_clock()
    return await live_schedulers(reader, clock.now_datetime())


@pytest.fixture
async def beating_store(
    client: Any, database_name: str, local_broker: EventBroker, logger: logging.Logger
) -> Any:
    async with started_store(
        client,
        database_name,
        local_broker,
        logger,
        start_from_scratch=True,
        heartbeat_interval=INTERVAL,
    ) as store:
        yield store


class TestRecord:
    @pytest.mark.usefixtures("beating_store")
    async def test_registered_at_start(self, client: Any, database_name: str) -> None:
        [row] = await _listed(client, database_name)
        assert row.host == socket.gethostname()
        assert row.pid == os.getpid()
        assert row.schedulers == []  # no claim yet
        assert row.interval == INTERVAL
        assert row.started is not None and row.heartbeat is not None
        assert row.software is not None and "apscheduler_mongo" in row.software
        assert not row.quiet
        assert (row.schedules_held, row.jobs_held, row.leases_until) == (0, 0, None)

    async def test_heartbeat_says_what_it_holds(
        self, beating_store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(beating_store)
        for _ in range(2):
            await beating_store.add_job(Job(task_id="task", executor="async"))

        [job, _] = await beating_store.acquire_jobs("worker-1", timedelta(minutes=1), 2)
        [before] = await _listed(client, database_name)
        await anyio.sleep(INTERVAL * 2.5)
        [after] = await _listed(client, database_name)
        assert after.heartbeat is not None and before.heartbeat is not None
        assert after.heartbeat > before.heartbeat
        assert after.schedulers == ["worker-1"]
        assert after.jobs_held == 2
        assert after.leases_until == job.acquired_until
        assert not after.quiet

        # A lease extended is a lease held longer
        await beating_store.extend_acquired_job_leases(
            "worker-1", {job.id}, timedelta(minutes=5)
        )
        await anyio.sleep(INTERVAL * 2.5)
        [extended] = await _listed(client, database_name)
        assert extended.leases_until is not None and job.acquired_until is not None
        assert extended.leases_until - job.acquired_until > timedelta(minutes=3)

    async def test_failed_heartbeats_logged_once(
        self,
        beating_store: MongoDBDataStore,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        records = beating_store._registry.collection
        write = records.update_one
        failures = 3
        succeeded = 0
        second_success = anyio.Event()  # the first one's end of episode is logged

        async def failing(*args: Any, **kwargs: Any) -> Any:
            nonlocal failures, succeeded
            if failures:
                failures -= 1
                raise AutoReconnect("connection reset by the test")

            result = await write(*args, **kwargs)
            succeeded += 1
            if succeeded == 2:
                second_success.set()

            return result

        def logged() -> list[tuple[str, str]]:
            return [
                (record.levelname, record.getMessage())
                for record in caplog.records
                if record.getMessage().startswith("Scheduler heartbeat")
            ]

        monkeypatch.setattr(records, "update_one", failing)
        with caplog.at_level(logging.DEBUG), anyio.fail_after(10):
            await second_success.wait()

        levels = [level for level, _ in logged()]
        assert levels == ["WARNING", "DEBUG", "DEBUG", "INFO"]
        assert "after 3 failed attempt(s)" in logged()[-1][1]

    async def test_clean_stop_deregisters(
        self,
        client: Any,
        database_name: str,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        async with started_store(
            client, database_name, local_broker, logger, heartbeat_interval=0.01
        ):
            await anyio.sleep(0.1)  # heartbeats are being written as it stops
            assert len(await _listed(client, database_name)) == 1

        assert await _listed(client, database_name) == []
        documents = client[database_name]["schedulers"].find({})
        assert await documents.to_list(None) == []

    @pytest.mark.usefixtures("beating_store")
    async def test_status_lists_it(self, client: Any, database_name: str) -> None:
        reader = Reader(
            adapter_for(client), database_name, RetrySettings(), logging.getLogger()
        )
        status = await gather_status(reader, 0)
        [row] = status.schedulers
        text = render_text(status)
        assert "Schedulers (1)" in text
        assert f"  {os.getpid()}  " in text
        assert scheduler_state(row, status.taken_at) == "live"

    @pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "1"])
    def test_bad_interval(self, value: object) -> None:
        with pytest.raises((TypeError, ValueError), match="heartbeat_interval"):
            MongoDBDataStore(
                "mongodb://127.0.0.1/",
                heartbeat_interval=value,  # type: ignore[arg-type]
            )


class TestUntrustedRecords:
    """A record is read as untrusted input: every field is checked before shown."""

    @pytest.mark.usefixtures("beating_store")
    async def test_garbage_shown_as_unknown(
        self, client: Any, database_name: str
    ) -> None:
        [real] = await _listed(client, database_name)
        collection = client[database_name]["schedulers"]
        far = real.heartbeat + timedelta(days=1)  # type: ignore[operator]
        await collection.insert_one(
            {
                "_id": "forged\x1b[31m",
                "expires": far,
                "schedulers": ["a\nb", 5, {"$x": 1}],
                "host": {"$where": "1"},
                "pid": "12; rm -rf /",
                "heartbeat": "soon",
                "interval": float("nan"),
                "clock_offset": True,
                "jobs_held": 2.5,
                "leases_until": 2**62,
                "software": ["x"],
            }
        )
        rows = await _listed(client, database_name)
        [forged] = [row for row in rows if row.id != real.id]
        assert forged.host is not None and "$where" in forged.host  # shown as text
        assert forged.pid is None
        assert forged.heartbeat is None and forged.interval is None
        assert forged.clock_offset is None and forged.jobs_held is None
        assert forged.leases_until is None and forged.software is None
        assert forged.quiet  # no readable heartbeat: not shown as live
        assert all(isinstance(name, str) for name in forged.schedulers)

    @pytest.mark.usefixtures("beating_store")
    @pytest.mark.parametrize(
        "fields",
        [
            {"interval": 1e300, "clock_offset": -1e300},
            {"interval": -5, "clock_offset": float("inf")},
            {"interval": 2**62, "heartbeat": -(2**62)},
        ],
    )
    async def test_numbers_out_of_range(
        self, client: Any, database_name: str, fields: dict[str, Any]
    ) -> None:
        """Numbers no store writes are shown as unknown, not computed with."""
        [real] = await _listed(client, database_name)
        far = real.heartbeat + timedelta(days=1)  # type: ignore[operator]
        await client[database_name]["schedulers"].insert_one(
            {"_id": "odd", "expires": far, "heartbeat": 0, **fields}
        )
        [odd] = [row for row in await _listed(client, database_name) if row.id == "odd"]
        assert odd.interval is None and odd.clock_offset is None
        assert odd.quiet
        reader = Reader(
            adapter_for(client), database_name, RetrySettings(), logging.getLogger()
        )
        assert "gone quiet" in render_text(await gather_status(reader, 0))


@MULTI_PROCESS
class TestKilledScheduler:
    async def test_shown_gone_then_expires(
        self, store: MongoDBDataStore, client: Any, wire_uri: str, database_name: str
    ) -> None:
        """A scheduler killed with SIGKILL is shown as gone quiet, with when its
        leases lapse, and its record expires by itself."""
        await add_task(store)
        await store.add_job(Job(task_id="task", executor="async"))
        lease = 2.0
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        process = context.Process(
            target=beating_worker,
            args=(wire_uri, database_name, INTERVAL, lease, ready),
        )
        process.start()
        try:
            assert await anyio.to_thread.run_sync(ready.wait, 60)
            # Listed beside this test's own store
            [live] = [
                row
                for row in await _listed(client, database_name)
                if row.pid == process.pid
            ]
            assert (live.pid, live.schedulers, live.jobs_held) == (
                process.pid,
                ["beating"],
                1,
            )
            assert not live.quiet
        finally:
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            process.join(10)

        assert process.exitcode == -signal.SIGKILL
        await anyio.sleep(QUIET_AFTER * INTERVAL + 0.5)
        [gone] = [
            row for row in await _listed(client, database_name) if row.id == live.id
        ]
        assert gone.quiet
        assert gone.leases_until is not None
        reader = Reader(
            adapter_for(client), database_name, RetrySettings(), logging.getLogger()
        )
        status = await gather_status(reader, 0)
        assert "gone quiet, its leases lapse" in render_text(status)

        # Kept KEPT_FOR intervals after its last heartbeat, then no longer shown
        # (and deleted by the server's TTL monitor, on a real server)
        await anyio.sleep(KEPT_FOR * INTERVAL)
        assert [row.pid for row in await _listed(client, database_name)] == [
            os.getpid()
        ]
        cursor = await client[database_name]["schedulers"].list_indexes()
        assert any(
            index.get("expireAfterSeconds") == 0
            and dict(index["key"]) == {"expires": 1}
            for index in await cursor.to_list(None)
        )
