"""``apscheduler-mongo doctor``: each check on healthy and broken deployments."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from apscheduler import RetrySettings
from apscheduler.abc import EventBroker
from bson import Timestamp
from pymongo import AsyncMongoClient

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._adapters import Adapter, adapter_for
from apscheduler_mongo._tools.cli import (
    EXIT_OK,
    EXIT_UNHEALTHY,
    build_parser,
    main,
    run_command,
)
from apscheduler_mongo._tools.doctor import (
    Check,
    Diagnosis,
    _Doctor,
    diagnose,
    render_text,
)
from apscheduler_mongo._tools.status import Reader

from .support.commands import CommandLog
from .support.items import add_task
from .support.stores import started_store

pytestmark = pytest.mark.anyio


@pytest.fixture
async def started(
    client: Any, database_name: str, local_broker: EventBroker, logger: logging.Logger
) -> AsyncIterator[MongoDBDataStore]:
    """A running store: its indexes built, its scheduler registered."""
    async with started_store(
        client, database_name, local_broker, logger, start_from_scratch=True
    ) as store:
        yield store


def _reader(adapter: Adapter, database: str) -> Reader:
    return Reader(adapter, database, RetrySettings(), logging.getLogger("test"))


async def _diagnose(client: Any, database: str) -> Diagnosis:
    adapter = adapter_for(client)
    return await diagnose(_reader(adapter, database), adapter)


def _by_name(diagnosis: Diagnosis) -> dict[str, Check]:
    return {check.name: check for check in diagnosis.checks}


class TestChecklist:
    async def test_healthy_store(
        self, started: MongoDBDataStore, client: Any, database_name: str, tier: str
    ) -> None:
        await add_task(started)
        diagnosis = await _diagnose(client, database_name)
        checks = _by_name(diagnosis)
        assert diagnosis.healthy(), render_text(diagnosis)
        assert checks["indexes"].status == "ok"
        assert checks["schedulers"].status == "ok"
        assert checks["schedulers"].detail.startswith("1 live, 0 gone quiet")
        assert checks["sharding"].status == "ok"
        assert checks["signing"].status == "warn"  # no signing key
        assert "sign --adopt-unsigned" in checks["signing"].fix
        if tier != "mongomock":
            assert checks["server"].detail.startswith("MongoDB ")
            assert checks["majority writes"].status == "ok"
        # Every line that is not ok says how to fix it
        assert all(
            check.fix for check in diagnosis.checks if check.status in ("warn", "fail")
        )
        # The probe of majority writes left nothing behind, and is never listed
        documents = await client[database_name]["schedulers"].find({}).to_list(None)
        assert len(documents) == 1

    @pytest.mark.usefixtures("started")
    async def test_missing_index(self, client: Any, database_name: str) -> None:
        await client[database_name]["jobs"].drop_index("queue")
        diagnosis = await _diagnose(client, database_name)
        indexes = _by_name(diagnosis)["indexes"]
        assert indexes.status == "fail"
        assert "jobs: queue missing" in indexes.detail
        assert "builds its indexes when it starts" in indexes.fix
        assert not diagnosis.healthy()

    @pytest.mark.usefixtures("started")
    async def test_scheduler_clock_off_and_one_gone_quiet(
        self, client: Any, database_name: str
    ) -> None:
        records = client[database_name]["schedulers"]
        [mine] = await records.find({}).to_list(None)
        await records.update_one({"_id": mine["_id"]}, {"$set": {"clock_offset": 5.0}})
        diagnosis = await _diagnose(client, database_name)
        schedulers = _by_name(diagnosis)["schedulers"]
        assert schedulers.status == "warn"
        assert "5.0 s behind" in schedulers.detail
        assert "NTP" in schedulers.fix

        # A record whose heartbeat stopped a minute ago, not expired yet
        old = int((datetime.now(timezone.utc) - timedelta(minutes=1)).timestamp() * 1e6)
        await records.insert_one(
            {
                "_id": "dead",
                "host": "worker-9",
                "pid": 99,
                "interval": 10.0,
                "heartbeat": old,
                "leases_until": old,
                "jobs_held": 1,
                "expires": datetime.now(timezone.utc) + timedelta(minutes=5),
            }
        )
        schedulers = _by_name(await _diagnose(client, database_name))["schedulers"]
        assert schedulers.status == "warn"
        assert "1 live, 1 gone quiet" in schedulers.detail
        assert "worker-9 (pid 99)" in schedulers.detail

    async def test_signed_store(
        self,
        client: Any,
        database_name: str,
        local_broker: EventBroker,
        logger: logging.Logger,
    ) -> None:
        async with started_store(
            client, database_name, local_broker, logger, signing_key=b"k" * 32
        ) as store:
            await add_task(store)
            signing = _by_name(await _diagnose(client, database_name))["signing"]

        assert signing.status == "ok"


@pytest.mark.parametrize("tier", ["wire"], indirect=True)
class TestStandaloneServer:
    """The wire tier's stand-in is a standalone server without change streams."""

    @pytest.mark.usefixtures("started")
    async def test_says_so(self, client: Any, database_name: str) -> None:
        checks = _by_name(await _diagnose(client, database_name))
        if "setName" in await client.admin.command("hello"):
            pytest.skip("MONGODB_URI names a replica set")

        assert checks["server"].status == "warn"
        assert "standalone" in checks["server"].detail
        assert "replica set" in checks["server"].fix
        assert checks["change streams"].status == "warn"
        assert "polls instead" in checks["change streams"].detail


@pytest.mark.parametrize("tier", ["wire"], indirect=True)
@pytest.mark.usefixtures("started")
async def test_probe_asks_a_majority(wire_uri: str, database_name: str) -> None:
    """The probe asks for w="majority" even of a client whose URI asks for less."""
    log = CommandLog()
    client: AsyncMongoClient[Any] = AsyncMongoClient(
        wire_uri, w=1, event_listeners=[log]
    )
    try:
        checks = _by_name(await _diagnose(client, database_name))
    finally:
        await client.close()

    assert checks["majority writes"].status == "ok"
    [probe] = [
        command
        for name, command in log.commands
        if name == "update" and command.get("update") == "schedulers"
    ]
    assert probe["writeConcern"]["w"] == "majority"


class _Pretending(Adapter):
    """An adapter over mongomock-motor that answers the server commands a test
    scripts (mongomock-motor answers none): a mongos, or an authenticated user."""

    def __init__(self, client: Any, replies: Mapping[str, Any]) -> None:
        real = adapter_for(client)
        super().__init__(client)
        self.collection_class = real.collection_class
        self.decodes_bson = real.decodes_bson
        self._real = real
        self._replies = replies

    async def command(self, _database: str, command: Any) -> Any:
        name = next(iter(command)) if isinstance(command, Mapping) else command
        return self._replies.get(name)

    def write_concern(self) -> Any:
        return self._real.write_concern()

    def hosts(self) -> list[str]:
        return ["pretend:27017"]

    async def collection_names(self, database: str) -> list[str]:
        return await self._real.collection_names(database)


@pytest.mark.parametrize("tier", ["mongomock"], indirect=True)
class TestScriptedServers:
    """What only a real mongos, replica set or access control shows, scripted (not
    run here against real ones: see the note in docs/cli.rst)."""

    @pytest.fixture(autouse=True)
    def no_change_streams(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """mongomock-motor has no ``watch``: the scripted servers answer for it."""

        async def scripted(_doctor: Any) -> Check:
            return Check("change streams", "unknown", "scripted")

        monkeypatch.setattr(_Doctor, "change_streams", scripted)

    @pytest.mark.usefixtures("started")
    async def test_sharded_collections(self, client: Any, database_name: str) -> None:
        adapter = _Pretending(
            client,
            {
                "hello": {"msg": "isdbgrid", "maxWireVersion": 21},
                "buildInfo": {"version": "7.0.2"},
            },
        )
        await client["config"]["collections"].insert_one(
            {"_id": f"{database_name}.jobs", "key": {"_id": "hashed"}}
        )
        try:
            diagnosis = await diagnose(_reader(adapter, database_name), adapter)
        finally:
            await client.drop_database("config")

        checks = _by_name(diagnosis)
        assert checks["server"].detail == "MongoDB 7.0.2, sharded cluster (mongos)"
        assert checks["sharding"].status == "fail"
        assert f"{database_name}.jobs" in checks["sharding"].detail
        assert "unsharded" in checks["sharding"].fix

    @pytest.mark.usefixtures("started")
    async def test_short_oplog(self, client: Any, database_name: str) -> None:
        adapter = _Pretending(
            client,
            {"hello": {"setName": "rs0", "hosts": ["a:1"], "maxWireVersion": 21}},
        )
        oplog = client["local"]["oplog.rs"]
        await oplog.insert_many(
            [{"ts": Timestamp(1_000, 1)}, {"ts": Timestamp(1_600, 1)}]
        )
        await client[database_name]["events"].create_index(
            "at", name="at", expireAfterSeconds=600
        )
        try:
            diagnosis = await diagnose(_reader(adapter, database_name), adapter)
        finally:
            await client.drop_database("local")

        check = _by_name(diagnosis)["oplog"]
        assert check.status == "warn"
        assert check.detail.startswith("window 0:10:00; events kept 0:10:00")
        assert "replSetResizeOplog" in check.fix

    @pytest.mark.usefixtures("started")
    async def test_privileges(self, client: Any, database_name: str) -> None:
        def status(actions: list[str]) -> dict[str, Any]:
            privilege = {"resource": {"db": database_name, "collection": ""}}
            return {
                "authInfo": {
                    "authenticatedUsers": [{"user": "app", "db": "admin"}],
                    "authenticatedUserPrivileges": [{**privilege, "actions": actions}],
                }
            }

        reader_only = _Pretending(client, {"connectionStatus": status(["find"])})
        diagnosis = await diagnose(_reader(reader_only, database_name), reader_only)
        privileges = _by_name(diagnosis)["privileges"]
        assert privileges.status == "fail"
        lacking = "createIndex, dropIndex, insert, listIndexes, remove, update on"
        assert f"may not {lacking} tasks; {lacking} schedules" in privileges.detail

        readwrite = ["find", "insert", "update", "remove"]
        indexes = ["listIndexes", "createIndex", "dropIndex"]
        writer = _Pretending(
            client, {"connectionStatus": status([*readwrite, *indexes])}
        )
        diagnosis = await diagnose(_reader(writer, database_name), writer)
        assert _by_name(diagnosis)["privileges"].status == "ok"

        nobody = _Pretending(client, {"connectionStatus": {"authInfo": {}}})
        diagnosis = await diagnose(_reader(nobody, database_name), nobody)
        assert _by_name(diagnosis)["privileges"].status == "warn"


class TestCommandLine:
    @pytest.mark.parametrize("tier", ["wire"], indirect=True)
    @pytest.mark.usefixtures("started")
    async def test_exit_status_and_json(
        self,
        client: Any,
        wire_uri: str,
        database_name: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        argv = ["doctor", "--uri", wire_uri, "--database", database_name]
        assert await _main(argv) == EXIT_OK
        text = capsys.readouterr().out
        assert re.search(r"^OK +indexes +every index", text, re.MULTILINE), text

        assert await _main([*argv, "--json"]) == EXIT_OK
        document = json.loads(capsys.readouterr().out)
        assert document["healthy"] is True
        assert {check["name"] for check in document["checks"]} >= {
            "server",
            "indexes",
            "schedulers",
            "sharding",
        }
        # Warnings (no change streams, no signing) fail a strict health check
        assert await _main([*argv, "--strict"]) == EXIT_UNHEALTHY
        capsys.readouterr()

        await client[database_name]["schedules"].drop_index("due")
        assert await _main(argv) == EXIT_UNHEALTHY
        text = capsys.readouterr().out
        assert re.search(r"^FAIL +indexes +schedules: due missing", text, re.MULTILINE)

    @pytest.mark.parametrize("tier", ["mongomock"], indirect=True)
    async def test_no_store(self, client: Any, database_name: str) -> None:
        args = build_parser().parse_args(["doctor", "--database", database_name])
        assert await run_command(args, client) == 1


async def _main(argv: list[str]) -> int:
    import anyio

    return await anyio.to_thread.run_sync(main, argv)
