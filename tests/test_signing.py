"""Signing stored data, allowed callables, and the store's checks of what it reads."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any
from uuid import UUID

import pytest
from anyio import create_memory_object_stream, fail_after, sleep
from apscheduler import (
    ConflictPolicy,
    DeserializationError,
    Event,
    Job,
    JobOutcome,
    JobResult,
    RetrySettings,
    Schedule,
    Task,
    TaskAdded,
    TaskLookupError,
)
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.serializers.pickle import PickleSerializer
from apscheduler.triggers.interval import IntervalTrigger
from bson import Binary, DatetimeMS, ObjectId
from pymongo.errors import OperationFailure

from apscheduler_mongo import (
    DisallowedCallableError,
    MongoDBDataStore,
    MongoDBEventBroker,
    SyncMongoDBDataStore,
    UnverifiedDataError,
)
from apscheduler_mongo._adapters import adapter_for
from apscheduler_mongo._marshalling import (
    job_from_document,
    job_to_document,
    schedule_from_document,
    schedule_to_document,
    task_from_document,
    task_to_document,
)
from apscheduler_mongo._retry import retrying
from apscheduler_mongo._signing import (
    AllowedCallables,
    Codec,
    Signer,
    keys_from_environment,
    split_keys,
)
from apscheduler_mongo._tools.signing import SignReport, StoreSigner

pytestmark = pytest.mark.anyio

OLD_KEY = "old-key-old-key-old-key-0123456789"
NEW_KEY = "new-key-new-key-new-key-0123456789"
SERIALIZER = PickleSerializer()
LEASE = timedelta(seconds=30)
#: Keep results, to read them back
KEEP = timedelta(minutes=5)
#: Typed as Any: APScheduler's converters confuse mypy about these
ARGS: Any = (2,)


def codec(*keys: str, **options: Any) -> Codec:
    return Codec(SERIALIZER, Signer(keys) if keys else None, **options)


def schedule(schedule_id: str = "s", *args: Any) -> Schedule:
    return Schedule(
        id=schedule_id,
        task_id="t",
        trigger=IntervalTrigger(seconds=1),
        args=args,
        job_executor="async",
        next_fire_time=datetime.now(timezone.utc) - timedelta(seconds=1),
    )


class TestSigner:
    """A signature binds a value to its document and part; keys rotate."""

    def test_a_signed_document_reads_back(self) -> None:
        document = schedule_to_document(schedule(), codec(NEW_KEY))
        assert set(document["mac"]) == {"call", "trigger"}
        assert schedule_from_document(document, codec(NEW_KEY)).id == "s"

    def test_rotation(self) -> None:
        """The first key signs; every key verifies."""
        old = schedule_to_document(schedule(), codec(OLD_KEY))
        new = schedule_to_document(schedule(), codec(NEW_KEY, OLD_KEY))
        rotated = codec(NEW_KEY, OLD_KEY)
        assert schedule_from_document(old, rotated).id == "s"
        assert schedule_from_document(new, codec(NEW_KEY)).id == "s"
        with pytest.raises(UnverifiedDataError):
            schedule_from_document(new, codec(OLD_KEY))

    def test_tampered_bytes(self) -> None:
        document = schedule_to_document(schedule("s", 1), codec(NEW_KEY))
        document["args"] = SERIALIZER.serialize((2,))
        with pytest.raises(UnverifiedDataError, match="does not match"):
            schedule_from_document(document, codec(NEW_KEY))

    def test_a_flipped_signature_bit(self) -> None:
        document = schedule_to_document(schedule(), codec(NEW_KEY))
        mac = bytearray(document["mac"]["trigger"])
        mac[0] ^= 1
        document["mac"]["trigger"] = bytes(mac)
        with pytest.raises(UnverifiedDataError):
            schedule_from_document(document, codec(NEW_KEY))

    @pytest.mark.parametrize("field", ["_id", "task_id"])
    def test_splicing_into_another_document_or_task(self, field: str) -> None:
        """A signed value and its signature moved elsewhere do not verify."""
        document = schedule_to_document(schedule(), codec(NEW_KEY))
        document[field] = "other"
        with pytest.raises(UnverifiedDataError):
            schedule_from_document(document, codec(NEW_KEY))

    def test_splicing_into_another_part(self) -> None:
        document = schedule_to_document(schedule(), codec(NEW_KEY))
        document["mac"]["trigger"] = document["mac"]["call"]
        with pytest.raises(UnverifiedDataError):
            schedule_from_document(document, codec(NEW_KEY))

    def test_splicing_into_another_database(self) -> None:
        """Stores that share a key do not accept each other's documents."""
        document = schedule_to_document(schedule(), codec(NEW_KEY, scope="a"))
        assert schedule_from_document(document, codec(NEW_KEY, scope="a")).id == "s"
        with pytest.raises(UnverifiedDataError):
            schedule_from_document(document, codec(NEW_KEY, scope="b"))

    def test_splicing_into_another_kind_of_document(self) -> None:
        """A job's signed call does not verify as a schedule's with the same id."""
        job = Job(task_id="t", executor="async")
        document = job_to_document(job, codec(NEW_KEY))
        as_schedule = schedule_to_document(schedule(), codec(NEW_KEY))
        as_schedule["_id"] = document["_id"]
        as_schedule["mac"]["call"] = document["mac"]["call"]
        as_schedule["args"], as_schedule["kwargs"] = (
            document["args"],
            document["kwargs"],
        )
        with pytest.raises(UnverifiedDataError):
            schedule_from_document(as_schedule, codec(NEW_KEY))

    def test_downgrade_is_refused(self) -> None:
        """A stripped signature is not accepted once a key is set."""
        document = schedule_to_document(schedule(), codec())
        assert "mac" not in document
        with pytest.raises(UnverifiedDataError, match="no signature"):
            schedule_from_document(document, codec(NEW_KEY))

    def test_unsigned_accepted_while_rolling_out(self) -> None:
        """accept_unsigned takes documents without signatures, never wrong ones."""
        rolling_out = codec(NEW_KEY, accept_unsigned=True)
        unsigned = schedule_to_document(schedule(), codec())
        assert schedule_from_document(unsigned, rolling_out).id == "s"
        wrong = schedule_to_document(schedule(), codec(OLD_KEY))
        with pytest.raises(UnverifiedDataError):
            schedule_from_document(wrong, rolling_out)

    def test_nothing_is_deserialized_before_the_check(self) -> None:
        """A gadget in a tampered field is never unpickled."""
        document = job_to_document(Job(task_id="t", executor="async"), codec(NEW_KEY))
        document["args"] = b"not a pickle at all"
        with pytest.raises(UnverifiedDataError):
            job_from_document(document, codec(NEW_KEY))

    def test_ids_read_back_as_uuids_verify(self) -> None:
        """A job id read back as a UUID (other codec options) verifies the same."""
        job = Job(task_id="t", executor="async")
        document = job_to_document(job, codec(NEW_KEY))
        assert isinstance(document["_id"], Binary)
        document["_id"] = job.id
        assert job_from_document(document, codec(NEW_KEY)).id == job.id

    def test_keys_hidden_in_repr(self) -> None:
        signer = Signer([NEW_KEY, OLD_KEY])
        assert NEW_KEY not in repr(signer)
        assert repr(signer) == "Signer(<2 key(s)>)"
        store = MongoDBDataStore("mongodb://127.0.0.1:1/", signing_key=NEW_KEY)
        assert NEW_KEY not in repr(store)
        assert NEW_KEY not in repr(store.signing_key)

    @pytest.mark.parametrize(
        "keys, error",
        [
            pytest.param("short", ValueError, id="short"),
            pytest.param([], ValueError, id="none"),
            pytest.param([NEW_KEY, 5], TypeError, id="not-text"),
        ],
    )
    def test_bad_keys(self, keys: Any, error: type[Exception]) -> None:
        with pytest.raises(error):
            Signer(keys)

    def test_keys_from_the_environment(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
    ) -> None:
        monkeypatch.delenv("APSCHEDULER_MONGO_SIGNING_KEY", raising=False)
        assert keys_from_environment() is None
        monkeypatch.setenv("APSCHEDULER_MONGO_SIGNING_KEY", f"{NEW_KEY},{OLD_KEY}")
        assert keys_from_environment() == (NEW_KEY.encode(), OLD_KEY.encode())
        key_file = tmp_path / "key"
        key_file.write_text(f"{OLD_KEY}\n")
        assert keys_from_environment(key_file) == (OLD_KEY.encode(),)
        assert split_keys(" a, b\nc ") == ["a", "b", "c"]


class TestAllowedCallables:
    """Patterns name one callable, or every callable of one module."""

    @pytest.mark.parametrize(
        "ref, allowed",
        [
            ("myapp.tasks:send_report", True),
            ("myapp.tasks:Report.run", False),  # "*" is one top-level name
            ("myapp.tasks:os.system", False),
            ("myapp.tasks.sub:send_report", False),
            ("myapp.other:send_report", False),
            ("os:system", False),
            ("myapp.tasks", False),
            ("myapp.tasks:a:b", False),
            (None, True),
        ],
    )
    def test_patterns(self, ref: str | None, allowed: bool) -> None:
        patterns = AllowedCallables.of(["myapp.tasks:*", "builtins:len"])
        assert patterns.allows(ref) is allowed

    def test_exact(self) -> None:
        patterns = AllowedCallables.of(["myapp.tasks:send_report"])
        assert patterns.allows("myapp.tasks:send_report")
        assert not patterns.allows("myapp.tasks:other")

    @pytest.mark.parametrize(
        "patterns, error",
        [
            pytest.param("myapp:*", TypeError, id="string"),
            pytest.param(["myapp"], ValueError, id="no-colon"),
            pytest.param(["myapp.*:*"], ValueError, id="module-wildcard"),
            pytest.param(["my app:f"], ValueError, id="space"),
            pytest.param([3], TypeError, id="not-text"),
        ],
    )
    def test_bad_patterns(self, patterns: Any, error: type[Exception]) -> None:
        with pytest.raises(error):
            MongoDBDataStore("mongodb://127.0.0.1:1/", allowed_callables=patterns)

    def test_a_disallowed_task_is_not_read(self) -> None:
        allowed = codec(NEW_KEY, allowed=AllowedCallables.of(["myapp:*"]))
        document = task_to_document(
            Task(id="t", func="os:system", job_executor="async"), codec(NEW_KEY)
        )
        with pytest.raises(DisallowedCallableError):
            task_from_document(document, 0, allowed)

        with pytest.raises(DisallowedCallableError):
            task_to_document(Task(id="t", func="os:system", job_executor="a"), allowed)


@pytest.fixture
async def signed_store(
    client: Any, database_name: str
) -> Any:  # an async generator of MongoDBDataStore
    async with AsyncExitStack() as exit_stack:
        logger = logging.getLogger("apscheduler_mongo.tests")
        broker = LocalEventBroker()
        await broker.start(exit_stack, logger)
        store = MongoDBDataStore(
            client,
            database=database_name,
            signing_key=NEW_KEY,
            allowed_callables=["builtins:*"],
            start_from_scratch=True,
        )
        await store.start(exit_stack, broker, logger)
        yield store


class TestStore:
    """The store signs what it writes and refuses what fails its checks."""

    async def test_round_trip(self, signed_store: MongoDBDataStore) -> None:
        await signed_store.add_task(Task(id="t", func="builtins:len", job_executor="a"))
        await signed_store.add_schedule(schedule("s", 1), ConflictPolicy.exception)
        [acquired] = await signed_store.acquire_schedules("me", LEASE, 10)
        assert acquired.args == (1,)
        job = Job(task_id="t", executor="async", args=ARGS, result_expiration_time=KEEP)
        await signed_store.add_job(job)
        [claimed] = await signed_store.acquire_jobs("me", LEASE, 10)
        assert claimed.args == (2,)
        task = await signed_store.get_task("t")
        assert task.func == "builtins:len"
        result = JobResult.from_job(claimed, JobOutcome.success, return_value=3)
        await signed_store.release_job("me", claimed, result)
        stored = await signed_store.get_job_result(job.id)
        assert stored is not None and stored.return_value == 3

    async def test_a_forged_task_is_refused(
        self, signed_store: MongoDBDataStore, database: Any
    ) -> None:
        """A task written without the key: get_task raises; its jobs fail at once."""
        await database["tasks"].insert_one(
            {"_id": "forged", "func": "builtins:print", "job_executor": "async"}
        )
        with pytest.raises(UnverifiedDataError):
            await signed_store.get_task("forged")

        job = Job(task_id="forged", executor="async", result_expiration_time=KEEP)
        await signed_store.add_job(job)
        assert await signed_store.acquire_jobs("me", LEASE, 10) == []
        result = await signed_store.get_job_result(job.id)
        assert result is not None and result.outcome is JobOutcome.error
        assert isinstance(result.exception, UnverifiedDataError)

    async def test_a_disallowed_task_cannot_be_added(
        self, signed_store: MongoDBDataStore
    ) -> None:
        with pytest.raises(DisallowedCallableError):
            await signed_store.add_task(
                Task(id="t", func="os:system", job_executor="a")
            )

    async def test_a_schedule_of_a_refused_task_is_quarantined(
        self, signed_store: MongoDBDataStore, database: Any
    ) -> None:
        await signed_store.add_task(Task(id="t", func="builtins:len", job_executor="a"))
        await signed_store.add_schedule(schedule("s"), ConflictPolicy.exception)
        await database["tasks"].update_one(
            {"_id": "t"}, {"$set": {"func": "os:system"}}
        )
        assert await signed_store.acquire_schedules("me", LEASE, 10) == []
        document = await database["schedules"].find_one({"_id": "s"})
        assert "its task is refused" in document["quarantine"]["reason"]

    async def test_a_forged_job_result_is_not_read(
        self, signed_store: MongoDBDataStore, database: Any
    ) -> None:
        await signed_store.add_task(Task(id="t", func="builtins:len", job_executor="a"))
        job = Job(task_id="t", executor="async", result_expiration_time=KEEP)
        await signed_store.add_job(job)
        [claimed] = await signed_store.acquire_jobs("me", LEASE, 10)
        result = JobResult.from_job(claimed, JobOutcome.success, return_value=3)
        await signed_store.release_job("me", claimed, result)
        await database["jobs"].update_one(
            {"_id": Binary.from_uuid(job.id)},
            {"$set": {"result.return_value": SERIALIZER.serialize(4)}},
        )
        with pytest.raises(UnverifiedDataError):
            await signed_store.get_job_result(job.id)


class TestBadInput:
    """Ids and stored flags of the wrong type are refused, not misread."""

    @pytest.mark.parametrize("task_id", [{"$ne": None}, 1, None])
    async def test_task_ids_must_be_strings(
        self, store: MongoDBDataStore, task_id: Any
    ) -> None:
        await store.add_task(Task(id="t", func="builtins:len", job_executor="a"))
        with pytest.raises(TypeError, match="task_id must be a str"):
            await store.remove_task(task_id)

        with pytest.raises(TypeError):
            await store.get_task(task_id)

        assert [task.id for task in await store.get_tasks()] == ["t"]

    async def test_schedule_ids_must_be_strings(self, store: MongoDBDataStore) -> None:
        await store.add_schedule(schedule("s"), ConflictPolicy.exception)
        with pytest.raises(TypeError):
            await store.remove_schedules([{"$ne": None}])  # type: ignore[list-item]

        with pytest.raises(TypeError):
            await store.get_schedules({1})  # type: ignore[arg-type]

        assert [s.id for s in await store.get_schedules()] == ["s"]

    async def test_paused_of_the_wrong_type_is_quarantined(
        self, store: MongoDBDataStore, database: Any
    ) -> None:
        """``paused: "true"`` (a manual edit) neither runs nor passes for paused."""
        await store.add_schedule(schedule("s"), ConflictPolicy.exception)
        await database["schedules"].update_one(
            {"_id": "s"}, {"$set": {"paused": "true"}}
        )
        assert await store.acquire_schedules("me", LEASE, 10) == []
        document = await database["schedules"].find_one({"_id": "s"})
        assert "paused" in document["quarantine"]["reason"]

    async def test_unknown_task_still_fails_as_before(
        self, signed_store: MongoDBDataStore
    ) -> None:
        job = Job(task_id="missing", executor="async", result_expiration_time=KEEP)
        await signed_store.add_job(job)
        assert await signed_store.acquire_jobs("me", LEASE, 10) == []
        result = await signed_store.get_job_result(job.id)
        assert result is not None and isinstance(result.exception, TaskLookupError)


POLL = 0.02


def dropped_by(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return the loggers that warned of dropping an event that failed its check."""
    return [r.name for r in caplog.records if "Dropping event" in r.getMessage()]


class TestBroker:
    """Events are signed when published; one that fails the check is dropped."""

    async def test_signed_events_pass_forged_ones_are_dropped_once(
        self, client: Any, database_name: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        async with AsyncExitStack() as exit_stack:
            brokers = []
            for name in ("receiver", "publisher"):
                logger = logging.getLogger(f"apscheduler_mongo.tests.{name}")
                broker = MongoDBEventBroker(
                    client,
                    database=database_name,
                    signing_key=[NEW_KEY, OLD_KEY],
                    poll_interval=POLL,
                )
                await broker.start(exit_stack, logger)
                brokers.append(broker)

            receiver, publisher = brokers
            send, receive = create_memory_object_stream[Event](10)
            exit_stack.enter_context(send)
            exit_stack.enter_context(receive)
            receiver.subscribe(send.send, {TaskAdded})
            events = client[database_name]["events"]
            now = datetime.now(timezone.utc)
            forged = [
                {
                    "_id": ObjectId(),
                    "publisher": "attacker",
                    "seq": seq,
                    "type": "TaskAdded",
                    "payload": b'{"task_id": "forged"}',
                    "at": now,
                }
                for seq in (1, 2)
            ]
            await events.insert_many(forged)
            await publisher.publish(TaskAdded(task_id="signed"))
            with fail_after(3):
                received = await receive.receive()

            assert isinstance(received, TaskAdded)
            assert received.task_id == "signed"
            stored = await events.find_one({"publisher": {"$ne": "attacker"}})
            assert set(stored["mac"]) == {"payload"}
            # Both brokers read both forged events (the publisher on its next polls)
            for _ in range(150):  # 3 s at most
                if len(dropped_by(caplog)) >= 2:
                    break

                await sleep(0.02)

            await sleep(10 * POLL)  # time to warn again, if it did

        # Two forged events, one warning by each broker
        assert sorted(dropped_by(caplog)) == [
            "apscheduler_mongo.tests.publisher",
            "apscheduler_mongo.tests.receiver",
        ]

    async def test_forged_positions_do_not_stop_delivery(
        self, client: Any, database_name: str
    ) -> None:
        """A forged sequence number or a stamp from the future skips no event."""
        logger = logging.getLogger("apscheduler_mongo.tests")
        async with AsyncExitStack() as exit_stack:
            brokers = []
            for _ in range(2):
                broker = MongoDBEventBroker(
                    client,
                    database=database_name,
                    signing_key=NEW_KEY,
                    mode="polling",
                    poll_interval=POLL,
                )
                await broker.start(exit_stack, logger)
                brokers.append(broker)

            receiver, publisher = brokers
            send, receive = create_memory_object_stream[Event](10)
            exit_stack.enter_context(send)
            exit_stack.enter_context(receive)
            receiver.subscribe(send.send, {TaskAdded})
            await publisher.publish(TaskAdded(task_id="first"))
            with fail_after(3):
                assert (await receive.receive()).task_id == "first"  # type: ignore[attr-defined]

            events = client[database_name]["events"]
            real = await events.find_one({"publisher": {"$ne": "attacker"}})
            far = datetime(9999, 1, 1, tzinfo=timezone.utc)
            await events.insert_one(
                {
                    **real,
                    "_id": ObjectId(),
                    "seq": 2**62,  # as if the real publisher had published that many
                    "at": far,
                }
            )
            # A stamp moved to the future on a genuine, signed event
            await events.update_one({"_id": real["_id"]}, {"$set": {"at": far}})
            await publisher.publish(TaskAdded(task_id="second"))
            with fail_after(3):
                assert (await receive.receive()).task_id == "second"  # type: ignore[attr-defined]

    async def test_default_serializer_imports_nothing(self) -> None:
        broker = MongoDBEventBroker("mongodb://127.0.0.1:1/")
        with pytest.raises(DeserializationError):
            broker.serializer.deserialize(b'{"_apscheduler_json": ["os:system", "x"]}')


class TestSyncStore:
    """The threaded store takes the same options and signs alike."""

    def test_signing_key_passes_through(self) -> None:
        store = SyncMongoDBDataStore(
            "mongodb://127.0.0.1:1/",
            signing_key=NEW_KEY,
            allowed_callables=["myapp:*"],
        )
        assert store.store.signing_key is not None
        assert store.store.allowed_callables == AllowedCallables(("myapp:*",))
        assert NEW_KEY not in repr(store)


async def _sign_stored(client: Any, database_name: str, **options: Any) -> SignReport:
    adapter = adapter_for(client)
    kinds = ("tasks", "schedules", "jobs")
    collections = {kind: adapter.collection(database_name, kind) for kind in kinds}
    retry = partial(retrying, RetrySettings(), logging.getLogger("tests"))
    scope = database_name
    return await StoreSigner(collections, scope=scope, retry=retry, **options).run()


class TestSignCommand:
    """Signing a stored store: unsigned parts signed, rotation, tampering refused."""

    async def _fill(self, store: MongoDBDataStore) -> Job:
        await store.add_task(Task(id="t", func="builtins:len", job_executor="a"))
        await store.add_task(Task(id="u", func="os:system", job_executor="a"))
        await store.add_schedule(schedule("s", 1), ConflictPolicy.exception)
        done = Job(task_id="t", executor="async", result_expiration_time=KEEP)
        await store.add_job(done)
        [claimed] = await store.acquire_jobs("me", LEASE, 10)
        result = JobResult.from_job(claimed, JobOutcome.success, return_value=3)
        await store.release_job("me", claimed, result)
        await store.add_job(Job(task_id="t", executor="async", args=ARGS))
        return done

    async def test_signs_what_an_unsigned_store_wrote(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        done = await self._fill(store)
        report = await _sign_stored(
            client,
            database_name,
            signer=Signer(NEW_KEY),
            allowed=AllowedCallables.of(["builtins:*"]),
            adopt_unsigned=True,
        )
        # tasks t; schedule call and trigger; 2 jobs' calls... the finished job's
        # call was dropped with its arguments; its result
        assert report.signed == 5, report
        assert report.refused == [
            ("tasks", "'u'", "task", "its callable 'os:system' is not allowed")
        ]
        again = await _sign_stored(
            client,
            database_name,
            signer=Signer(NEW_KEY),
            allowed=AllowedCallables.of(["builtins:*"]),
            adopt_unsigned=True,
        )
        assert again.signed == 0 and again.already == 5, again

        signed = MongoDBDataStore(client, database=database_name, signing_key=NEW_KEY)
        async with AsyncExitStack() as exit_stack:
            logger = logging.getLogger("apscheduler_mongo.tests")
            broker = LocalEventBroker()
            await broker.start(exit_stack, logger)
            await signed.start(exit_stack, broker, logger)
            assert (await signed.get_task("t")).func == "builtins:len"
            [read] = await signed.get_schedules()
            assert read.args == (1,)
            [job] = await signed.acquire_jobs("me", LEASE, 10)
            assert job.args == (2,)
            result = await signed.get_job_result(done.id)
            assert result is not None and result.return_value == 3
            with pytest.raises(UnverifiedDataError):
                await signed.get_task("u")

    async def test_unsigned_parts_are_left_alone_by_default(
        self, signed_store: MongoDBDataStore, client: Any, database: Any
    ) -> None:
        """On a signed store, an unsigned part is a write without the key."""
        await signed_store.add_task(Task(id="t", func="builtins:len", job_executor="a"))
        planted = schedule_to_document(schedule("planted"), codec())
        planted["paused"] = True  # kept from being claimed, so never quarantined
        await database["schedules"].insert_one(planted)
        report = await _sign_stored(client, database.name, signer=Signer(NEW_KEY))
        assert report.signed == 0
        assert report.unsigned == [
            ("schedules", "'planted'", "call"),
            ("schedules", "'planted'", "trigger"),
        ]
        document = await database["schedules"].find_one({"_id": "planted"})
        assert "mac" not in document

    async def test_rotation_and_tampering(
        self, signed_store: MongoDBDataStore, client: Any, database: Any
    ) -> None:
        await signed_store.add_task(Task(id="t", func="builtins:len", job_executor="a"))
        await signed_store.add_schedule(schedule("s", 1), ConflictPolicy.exception)
        await signed_store.add_schedule(schedule("x", 1), ConflictPolicy.exception)
        await database["schedules"].update_one(
            {"_id": "x"}, {"$set": {"args": SERIALIZER.serialize((2,))}}
        )
        rotated = Signer([OLD_KEY, NEW_KEY])  # OLD_KEY now signs
        report = await _sign_stored(client, database.name, signer=rotated)
        assert report.re_signed == 4, report  # t; s call, s trigger; x trigger
        assert report.refused == [
            (
                "schedules",
                "'x'",
                "call",
                "its signature is wrong: changed without the key?",
            )
        ]
        document = await database["schedules"].find_one({"_id": "s"})
        assert Signer(OLD_KEY).verify(
            f"{database.name}.schedules",
            "s",
            "trigger",
            [document["trigger"]],
            document["mac"]["trigger"],
        )

    async def test_dry_run_writes_nothing(
        self, store: MongoDBDataStore, client: Any, database: Any
    ) -> None:
        await self._fill(store)
        report = await _sign_stored(
            client,
            database.name,
            signer=Signer(NEW_KEY),
            dry_run=True,
            adopt_unsigned=True,
        )
        assert report.signed == 6
        assert await database["tasks"].count_documents({"mac": {"$exists": True}}) == 0


class TestStoreWithoutKey:
    """A store without a key refuses to start on a database whose tasks are signed."""

    async def test_refused_at_start(
        self, signed_store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await signed_store.add_task(Task(id="t", func="builtins:len", job_executor="a"))
        keyless = MongoDBDataStore(client, database=database_name)
        async with AsyncExitStack() as exit_stack:
            logger = logging.getLogger("apscheduler_mongo.tests")
            broker = LocalEventBroker()
            await broker.start(exit_stack, logger)
            with pytest.raises(RuntimeError, match="are signed, and this store has no"):
                await keyless.start(exit_stack, broker, logger)


class TestTamperedJob:
    """A job whose arguments fail their check is quarantined as found, not run."""

    async def test_quarantined_with_its_arguments(
        self, signed_store: MongoDBDataStore, database: Any
    ) -> None:
        await signed_store.add_task(Task(id="t", func="builtins:len", job_executor="a"))
        job = Job(task_id="t", executor="async", args=ARGS, result_expiration_time=KEEP)
        await signed_store.add_job(job)
        forged = SERIALIZER.serialize((3,))
        await database["jobs"].update_one(
            {"_id": Binary.from_uuid(job.id)}, {"$set": {"args": forged}}
        )

        assert await signed_store.acquire_jobs("me", LEASE, 10) == []
        document = await database["jobs"].find_one({"_id": Binary.from_uuid(job.id)})
        assert document["state"] == "finished"
        assert "signature" in document["quarantine"]["reason"]
        assert document["args"] == forged  # kept as found
        assert "purge_at" not in document
        result = await signed_store.get_job_result(job.id)
        assert result is not None
        # (APScheduler stores the exception of the outcome "error" only)
        assert result.outcome is JobOutcome.deserialization_failed


class TestHostileDocuments:
    """One hand-written document stops no scheduler loop (found in review)."""

    async def test_overflowing_result_expiration(
        self, store: MongoDBDataStore, database: Any
    ) -> None:
        await store.add_task(Task(id="t", func="builtins:len", job_executor="a"))
        job = Job(task_id="t", executor="async")
        await store.add_job(job)
        await database["jobs"].update_one(
            {"_id": Binary.from_uuid(job.id)},
            {"$set": {"result_expiration_time": 2**62}},
        )
        # Not handed out: APScheduler would overflow computing its result's expiry
        assert await store.acquire_jobs("me", LEASE, 10) == []
        # ... nor would a job that cannot be read, or a lapsed one, crash the loop
        unreadable = Job(task_id="t", executor="async")
        await store.add_job(unreadable)
        await database["jobs"].update_one(
            {"_id": Binary.from_uuid(unreadable.id)},
            {"$set": {"result_expiration_time": 2**62, "args": b"no pickle"}},
        )
        assert await store.acquire_jobs("me", LEASE, 10) == []
        await store.cleanup()

    async def test_a_stored_union_marker(
        self, store: MongoDBDataStore, database: Any
    ) -> None:
        """A field named like the store's own marker of a union's parts is ignored."""
        await store.add_task(Task(id="t", func="builtins:len", job_executor="a"))
        for value in (9, "x", 1):
            await database["tasks"].update_one(
                {"_id": "t"}, {"$set": {"_apscheduler_mongo_union": value}}
            )
            assert (await store.get_task("t")).id == "t"

    async def test_a_schedule_id_that_is_a_document(
        self, store: MongoDBDataStore, database: Any
    ) -> None:
        await store.add_schedule(schedule("s"), ConflictPolicy.exception)
        await database["schedules"].update_one(
            {"_id": "s"}, {"$set": {"next_fire_time": None}}
        )
        job = Job(task_id="t", executor="async")
        await store.add_job(job)
        await database["jobs"].update_one(
            {"_id": Binary.from_uuid(job.id)}, {"$set": {"schedule_id": {"a": 1}}}
        )
        await store.cleanup()

    async def test_a_date_out_of_python_range(
        self, tier: str, store: MongoDBDataStore, database: Any
    ) -> None:
        if tier == "mongomock":
            pytest.skip("mongomock stores Python objects: no BSON date to decode")

        await store.add_task(Task(id="t", func="builtins:len", job_executor="a"))
        try:
            await database["tasks"].update_one(
                {"_id": "t"}, {"$set": {"metadata": {"when": DatetimeMS(2**62)}}}
            )
        except OperationFailure as exc:  # mongoeco decodes BSON in Python too
            pytest.skip(f"this server cannot store such a date ({exc.code})")

        [task] = await store.get_tasks()
        assert task.id == "t"

    def test_a_nested_uuid_in_a_signed_part(self) -> None:
        """A value BSON cannot encode as read fails the check, it does not crash it."""
        document = schedule_to_document(schedule(), codec(NEW_KEY))
        document["args"] = [UUID(int=1)]
        with pytest.raises(UnverifiedDataError):
            schedule_from_document(document, codec(NEW_KEY))

        document["args"] = {"$bad": 1 << 70}
        with pytest.raises(UnverifiedDataError):
            schedule_from_document(document, codec(NEW_KEY))
