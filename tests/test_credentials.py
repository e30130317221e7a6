"""Credentials: never shown anywhere, and passed to the driver untouched."""

from __future__ import annotations

import logging
import ssl
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from anyio import to_thread
from apscheduler import AsyncScheduler, JobReleased, RetrySettings
from apscheduler.abc import DataStore, EventBroker
from apscheduler.triggers.interval import IntervalTrigger
from pymongo import AsyncMongoClient, ReadPreference
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError
from tenacity import stop_after_attempt, wait_fixed

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker
from apscheduler_mongo._client import create_client, open_client

from .support.fake_servers import FakeServer, free_port, http_server
from .support.proxy import FAST_FAILURE, FAULT_RETRIES, LOOPBACK, FaultyProxy
from .support.servers import mongoeco_process, needs_mongoeco

pytestmark = pytest.mark.anyio

USER = "scheduler"
#: Distinctive enough that finding it anywhere means it leaked
PASSWORD = "kX9-cred-probe-Qm4"
WRONG_PASSWORD = "wR0ng-cred-probe-Zt7"
QUICK_RETRIES = RetrySettings(stop=stop_after_attempt(3), wait=wait_fixed(0.05))
#: A self-signed CA certificate (no key anywhere), for a tlsCAFile to load
CA_CERTIFICATE = """\
-----BEGIN CERTIFICATE-----
MIIBnzCCAUWgAwIBAgIUfYgjJQDyllxbf+kg9+piSrOmEbcwCgYIKoZIzj0EAwIw
JDEiMCAGA1UEAwwZYXBzY2hlZHVsZXItbW9uZ28gdGVzdCBDQTAgFw0yNjExMjUx
NTQ5NTZaGA8yMTI2MTEwMTE1NDk1NlowJDEiMCAGA1UEAwwZYXBzY2hlZHVsZXIt
bW9uZ28gdGVzdCBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABKTWSGqW30aq
7IrOXTK8+ohHKtj6tqVA8rWwSKGTTns4CFfpnUwWCrky3NtaZwkeEj3JObxIxvJ1
S0PQ5My2//GjUzBRMB0GA1UdDgQWBBSZXeasTVsAx35Xc2UxZpPuAGRfzzAfBgNV
HSMEGDAWgBSZXeasTVsAx35Xc2UxZpPuAGRfzzAPBgNVHRMBAf8EBTADAQH/MAoG
CCqGSM49BAMCA0gAMEUCIGsILF8UDPIk1HwS0UUyH5wuBQ0Kw2dBtF9tExo7DYW/
AiEA63e5Vcq0Z/juUCtr1MPqmsbWJZwREGvQNCtMYQwXuZk=
-----END CERTIFICATE-----
"""
CA_NAME = "apscheduler-mongo test CA"

needs_auth_server = [
    pytest.mark.wire,
    needs_mongoeco,
]


def double(value: int) -> int:
    return value * 2


def _uri(address: str, password: str = PASSWORD, **options: str | int) -> str:
    # mongoeco does not announce its mechanisms in "hello", so name the one it has
    query = {"directConnection": "true", "authMechanism": "SCRAM-SHA-256", **options}
    text = "&".join(f"{key}={value}" for key, value in query.items())
    return f"mongodb://{USER}:{password}@{address}/?{text}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc``, its causes and contexts, and the members of any group, once."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue

        seen.add(id(item))
        yield item
        pending.extend(
            linked for linked in (item.__cause__, item.__context__) if linked
        )
        members = getattr(item, "exceptions", None)  # an exception group's
        if isinstance(members, tuple):
            pending.extend(members)


class Exposure:
    """Everything a user gets to see: logs, errors, events and reprs."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog
        self.texts: dict[str, str] = {}
        self.events: list[Any] = []

    def add(self, where: str, text: str) -> None:
        self.texts[where] = text

    def add_exception(self, where: str, exc: BaseException) -> None:
        """Take in ``exc`` and everything chained to it, as text and as reprs."""
        self.add(f"{where}: traceback", "".join(traceback.format_exception(exc)))
        for index, item in enumerate(_chain(exc)):
            self.add(f"{where}[{index}]: str", str(item))
            self.add(f"{where}[{index}]: repr", repr(item))
            self.add(f"{where}[{index}]: args", repr(item.args))
            for name in ("details", "errors"):
                if (value := getattr(item, name, None)) is not None:
                    self.add(f"{where}[{index}]: {name}", repr(value))

    def add_components(self, *components: object) -> None:
        for component in components:
            self.add(f"repr({type(component).__name__})", repr(component))
            self.add(f"str({type(component).__name__})", str(component))

    def record_event(self, event: Any) -> None:
        self.events.append(event)

    def assert_nothing_shows(self, *secrets: str) -> None:
        """Assert no text seen so far (and no log record) holds any of ``secrets``."""
        records = self._caplog.records
        # Proof that the driver's own debug logging was on and captured
        assert any(record.name.startswith("pymongo.") for record in records)
        self.add("logs", self._caplog.text)
        for record in records:
            self.add(f"log record {record.name}", record.getMessage())
            if record.exc_info and record.exc_info[1] is not None:
                self.add_exception(f"log record {record.name}", record.exc_info[1])

        for number, event in enumerate(self.events):
            self.add(f"event {number}", repr(event))

        leaks = [
            f"{secret!r} in {where}: ...{text[max(0, at - 200) : at + 100]!r}..."
            for where, text in self.texts.items()
            for secret in secrets
            if (at := text.find(secret)) >= 0
        ]
        assert not leaks, "\n".join(leaks)


@pytest.fixture
def exposure(caplog: pytest.LogCaptureFixture) -> Exposure:
    caplog.set_level(logging.DEBUG)  # every logger, pymongo's own included
    return Exposure(caplog)


@pytest.fixture(scope="module")
def auth_server_port() -> Iterator[int]:
    """Port of a mongoeco server that requires USER and PASSWORD."""
    with mongoeco_process(auth=(USER, PASSWORD)) as port:
        yield port


def _store(uri: str, database: str, **kwargs: Any) -> MongoDBDataStore:
    return MongoDBDataStore(uri, database=database, **kwargs)


def _broker(uri: str, database: str, **kwargs: Any) -> MongoDBEventBroker:
    return MongoDBEventBroker(uri, database=database, **kwargs)


@asynccontextmanager
async def _running(
    store: DataStore, broker: EventBroker, exposure: Exposure
) -> AsyncIterator[AsyncScheduler]:
    """Run a scheduler with a schedule firing; yield it once a job has run."""
    ticked = anyio.Event()

    def tick(event: Any) -> None:
        if isinstance(event, JobReleased) and event.schedule_id == "tick":
            ticked.set()

    async with AsyncScheduler(data_store=store, event_broker=broker) as scheduler:
        scheduler.subscribe(exposure.record_event)
        scheduler.subscribe(tick)
        await scheduler.add_schedule(
            double, IntervalTrigger(seconds=0.3), id="tick", args=[1]
        )
        await scheduler.start_in_background()
        with anyio.fail_after(30):
            assert await scheduler.run_job(double, args=[21]) == 42
            await ticked.wait()

        exposure.add_components(store, broker, scheduler)
        yield scheduler


@pytest.mark.usefixtures("exposure")
class TestRunning:
    """
    A scheduler whose store and broker hold a password leaks it nowhere.

    Not in the logs (every logger at DEBUG, pymongo's included), the events, or the
    reprs, while it runs a job and a schedule, nor while it rides out a network cut.
    """

    pytestmark = needs_auth_server

    async def test_jobs_and_schedules(
        self, auth_server_port: int, database_name: str, exposure: Exposure
    ) -> None:
        uri = _uri(f"{LOOPBACK}:{auth_server_port}", serverSelectionTimeoutMS=5000)
        store = _store(uri, database_name)
        broker = _broker(uri, database_name)
        async with _running(store, broker, exposure):
            pass

        assert any(isinstance(event, JobReleased) for event in exposure.events)
        exposure.assert_nothing_shows(PASSWORD, uri)

    async def test_network_cut(
        self,
        auth_server_port: int,
        database_name: str,
        exposure: Exposure,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        with FaultyProxy(LOOPBACK, auth_server_port) as proxy:
            uri = proxy.uri_for(_uri(f"{LOOPBACK}:{auth_server_port}"), **FAST_FAILURE)
            store = _store(uri, database_name, retry_settings=FAULT_RETRIES)
            broker = _broker(uri, database_name, retry_settings=FAULT_RETRIES)
            async with _running(store, broker, exposure) as scheduler:
                # Cut until an operation notices (and a retry is logged)
                with anyio.fail_after(30):
                    while "Temporary MongoDB error" not in caplog.text:
                        await to_thread.run_sync(proxy.cut)
                        await anyio.sleep(0.3)

                    assert await scheduler.run_job(double, args=[2]) == 4

        assert proxy.connections_cut > 0
        exposure.assert_nothing_shows(PASSWORD, uri)


@attrs.frozen
class FailingStart:
    """Starts a scheduler whose ``failing`` component has a bad URI."""

    #: The URI of the component that works
    good_uri: str
    #: Which component gets the bad URI: "store" or "broker"
    failing: str
    database: str
    exposure: Exposure

    async def __call__(self, bad_uri: str) -> BaseException:
        """Start the scheduler with ``bad_uri``; return why it did not start."""
        store_uri, broker_uri = (
            (bad_uri, self.good_uri)
            if self.failing == "store"
            else (self.good_uri, bad_uri)
        )
        store = _store(store_uri, self.database, retry_settings=QUICK_RETRIES)
        broker = _broker(broker_uri, self.database, retry_settings=QUICK_RETRIES)
        # The scheduler takes no event before it starts
        broker.subscribe(self.exposure.record_event)
        scheduler = AsyncScheduler(data_store=store, event_broker=broker)
        with anyio.fail_after(30), pytest.raises(Exception) as exc_info:
            async with scheduler:
                pass

        self.exposure.add_exception("start()", exc_info.value)
        self.exposure.add_components(store, broker, scheduler)
        return exc_info.value

    def assert_nothing_shows(self, bad_uri: str, *secrets: str) -> None:
        """Assert that neither URI (nor a password) shows anywhere."""
        self.exposure.assert_nothing_shows(PASSWORD, *secrets, bad_uri, self.good_uri)


@pytest.fixture(params=["store", "broker"])
def start(
    request: pytest.FixtureRequest,
    auth_server_port: int,
    database_name: str,
    exposure: Exposure,
) -> FailingStart:
    """Starts a scheduler with one bad URI, for the store or the broker."""
    good_uri = _uri(f"{LOOPBACK}:{auth_server_port}", serverSelectionTimeoutMS=5000)
    return FailingStart(good_uri, str(request.param), database_name, exposure)


class TestFailingToStart:
    """
    Failing to start with a password in the URI shows it nowhere.

    Not in the error, anything chained to it, the retry warnings, the driver's debug
    logs, the events or the reprs.
    """

    pytestmark = needs_auth_server

    async def test_wrong_password(
        self, auth_server_port: int, start: FailingStart
    ) -> None:
        address = f"{LOOPBACK}:{auth_server_port}"
        bad_uri = _uri(address, WRONG_PASSWORD, serverSelectionTimeoutMS=5000)
        error = await start(bad_uri)

        failures = [e for e in _chain(error) if isinstance(e, OperationFailure)]
        assert failures
        assert "Authentication failed" in str(failures[0])
        start.assert_nothing_shows(bad_uri, WRONG_PASSWORD)

    async def test_unreachable(
        self, start: FailingStart, caplog: pytest.LogCaptureFixture
    ) -> None:
        bad_uri = _uri(
            f"{LOOPBACK}:{free_port()}",
            serverSelectionTimeoutMS=300,
            connectTimeoutMS=300,
        )
        error = await start(bad_uri)

        assert any(isinstance(e, ServerSelectionTimeoutError) for e in _chain(error))
        assert caplog.text.count("Temporary MongoDB error") == 3
        start.assert_nothing_shows(bad_uri)

    async def test_not_mongodb(self, start: FailingStart) -> None:
        async with FakeServer(http_server) as server:
            bad_uri = _uri(
                server.address, serverSelectionTimeoutMS=300, connectTimeoutMS=300
            )
            error = await start(bad_uri)

        assert any(
            "does not speak the MongoDB wire protocol" in str(e) for e in _chain(error)
        )
        start.assert_nothing_shows(bad_uri)


class TestClientOptions:
    """
    Options in the URI reach the driver untouched; a given client is used as is.

    Nothing here connects: clients connect on their first operation.
    """

    async def test_tls_and_auth_options(self, tmp_path: Path) -> None:
        ca_file = tmp_path / "ca.pem"
        ca_file.write_text(CA_CERTIFICATE)
        uri = (
            f"mongodb://{USER}:P%40ss%3Aword@db1.example.com:27018,db2.example.com/"
            f"?tls=true&tlsCAFile={ca_file}&tlsAllowInvalidHostnames=true"
            "&authSource=admin&authMechanism=SCRAM-SHA-256&appname=billing"
            "&replicaSet=rs0&readPreference=secondaryPreferred&w=majority"
            "&retryWrites=false&maxPoolSize=7&serverSelectionTimeoutMS=1234"
        )
        client = create_client(uri)
        try:
            options = client.options
            pool = options.pool_options
            credentials = pool._credentials
            assert credentials is not None
            assert credentials.username == USER
            assert credentials.password == "P@ss:word"
            assert credentials.source == "admin"
            assert credentials.mechanism == "SCRAM-SHA-256"

            context = pool._ssl_context
            assert isinstance(context, ssl.SSLContext)
            assert [cert["subject"] for cert in context.get_ca_certs()] == [
                ((("commonName", CA_NAME),),)
            ]
            assert not context.check_hostname
            assert pool.tls_allow_invalid_hostnames

            assert pool.appname == "billing"
            assert options.replica_set_name == "rs0"
            assert options.read_preference == ReadPreference.SECONDARY_PREFERRED
            assert options.write_concern.document == {"w": "majority"}
            assert options.retry_writes is False
            assert pool.max_pool_size == 7
            assert options.server_selection_timeout == pytest.approx(1.234)
            assert sorted(client.topology_description.server_descriptions()) == [
                ("db1.example.com", 27018),
                ("db2.example.com", 27017),
            ]

            # What we add: our name in the handshake, and aware datetimes
            assert "apscheduler-mongo" in pool.metadata["driver"]["name"]
            assert client.codec_options.tz_aware
        finally:
            await client.close()

        store = MongoDBDataStore(uri)
        assert repr(store) == (
            "MongoDBDataStore(hosts=['db1.example.com:27018', 'db2.example.com:27017'],"
            " database='apscheduler')"
        )

    @pytest.mark.parametrize(
        "component",
        [pytest.param(_store, id="store"), pytest.param(_broker, id="broker")],
    )
    async def test_given_client_used_as_is(self, component: Any) -> None:
        client: AsyncMongoClient[Any] = AsyncMongoClient(
            "mongodb://db.example.com/", appname="mine", tz_aware=False
        )
        try:
            backend = component(client, "apscheduler")
            assert backend.client_or_uri is client
            async with AsyncExitStack() as exit_stack:
                adapter = await open_client(backend.client_or_uri, exit_stack)
                assert adapter.client is client

            # Not closed by the exit stack, and none of its options changed
            assert not client._closed
            assert client.options.pool_options.appname == "mine"
            assert not client.codec_options.tz_aware
            assert "apscheduler-mongo" not in str(
                client.options.pool_options.metadata["driver"]
            )
        finally:
            await client.close()
