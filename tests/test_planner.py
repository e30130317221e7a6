"""
Unit tests of the claim planner: what a claim takes, finishes, sets aside or leaves.

Pure tests, without a database: the job and task documents are built as the store
writes them (:func:`~apscheduler_mongo._marshalling.job_to_document`,
:func:`~apscheduler_mongo._marshalling.task_to_document`), the way a claim's read
hands them to the planner.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import pytest
from apscheduler import Job, JobOutcome, Task, TaskLookupError
from apscheduler.serializers.pickle import PickleSerializer
from bson import ObjectId

from apscheduler_mongo._adapters import Update
from apscheduler_mongo._layout import (
    ACQUIRED,
    FINISHED,
    TASK_FIELD,
    Document,
    free_jobs,
    slot_key,
)
from apscheduler_mongo._marshalling import (
    from_micros,
    job_to_document,
    task_to_document,
    to_micros,
    uuid_to_bson,
)
from apscheduler_mongo._planner import (
    Cap,
    ClaimContext,
    ClaimPlan,
    Refused,
    Slots,
    holdings_of,
    plan_claims,
    task_cap,
    tasks_of,
)
from apscheduler_mongo._signing import (
    AllowedCallables,
    Codec,
    DisallowedCallableError,
    Signer,
    UnverifiedDataError,
)

NOW = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
LEASE = timedelta(minutes=1)
SERIALIZER = PickleSerializer()
CODEC = Codec(SERIALIZER)
LOGGER = logging.getLogger("apscheduler_mongo.tests.planner")
#: The token of the claim being planned
TOKEN = ObjectId()


def queued(task_id: str = "task", **options: Any) -> Document:
    """Return the document of a queued job of ``task_id``, as the store wrote it."""
    options.setdefault("result_expiration_time", timedelta(minutes=5))
    job = Job(task_id=task_id, executor="async", **options)
    return job_to_document(job, CODEC)


def holder(task_id: str = "task", **fields: Any) -> Document:
    """Return a running job holding a slot (or running without one)."""
    return {"_id": uuid_to_bson(uuid4()), "task_id": task_id, **fields}


def summaries(holders: list[Document]) -> list[Document]:
    """
    Return what a claim reads of ``holders`` (``holdings()``): one document listing,
    per task, a count and each job holding a slot, with its key.
    """
    by_task: dict[str, Document] = {}
    for job in holders:
        entry = by_task.setdefault(
            job["task_id"], {"task": job["task_id"], "running": 0, "held": []}
        )
        entry["running"] += 1
        if job.get("slot_key"):
            entry["held"].append({"job": job["_id"], "key": job["slot_key"]})

    return [{"_id": None, "tasks": list(by_task.values())}] if by_task else []


def slots_left(holders: list[Document]) -> Slots:
    """Return the slots a claim may take while ``holders`` run."""
    return Slots(holdings_of(summaries(holders), LOGGER))


def context() -> ClaimContext:
    """Return the context of a claim by ``me``, at NOW, for a lease of LEASE."""
    now = to_micros(NOW)
    return ClaimContext("me", now, to_micros(NOW + LEASE), TOKEN, CODEC, LOGGER)


def plan(
    documents: list[Document],
    caps: dict[str, Cap],
    holders: list[Document] | None = None,
) -> ClaimPlan:
    """Plan the claim of ``documents``, with the slots ``holders`` leave free."""
    return plan_claims(documents, caps, slots_left(holders or []), context())


def slot_keys(claimed: ClaimPlan) -> list[str | None]:
    """Return the slot key each claimed job's update takes (None for none)."""
    return [
        update.change["$set"].get("slot_key")
        for document, update in claimed.chosen
        if document is not None and document["_id"] in claimed.jobs
    ]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


class TestUncappedTasks:
    """The jobs of a task without a limit are all claimed, in the order read."""

    def test_all_claimed_in_queue_order(self) -> None:
        documents = [queued() for _ in range(3)]
        claimed = plan(documents, {"task": None})

        ids = [document["_id"] for document in documents]
        assert list(claimed.jobs) == ids
        assert [document["_id"] for document, _ in claimed.chosen if document] == ids
        assert claimed.finished == {}
        assert claimed.were_queued == set(ids)
        assert claimed.at_cap == set()
        lease = {
            "state": ACQUIRED,
            "acquired_by": "me",
            "acquired_until": to_micros(NOW + LEASE),
            "v": TOKEN,
        }
        for (document, update), original in zip(claimed.chosen, documents, strict=True):
            # Each write takes the job only if nobody changed it since it was read
            query = {"_id": original["_id"], "v": None, **free_jobs(to_micros(NOW))}
            assert update == Update(query, {"$set": lease})
            assert document == {**original, **lease}

    def test_jobs_are_handed_out_leased(self) -> None:
        claimed = plan([queued()], {"task": None})

        [job] = claimed.jobs.values()
        assert job.task_id == "task"
        assert job.acquired_by == "me"
        assert job.acquired_until == from_micros(to_micros(NOW + LEASE))


class TestCappedTasks:
    """
    The jobs of a task with ``max_running_jobs`` take its free numbered slots: the
    slots held are skipped, and jobs running without a slot count against the limit.
    """

    def test_held_slots_are_skipped(self) -> None:
        documents = [queued() for _ in range(3)]
        claimed = plan(documents, {"task": 3}, [holder(slot_key=slot_key("task", 1))])

        # Slot 1 is held: two are free, 0 and 2; the third job stays queued
        assert list(claimed.jobs) == [document["_id"] for document in documents[:2]]
        assert slot_keys(claimed) == [slot_key("task", 0), slot_key("task", 2)]
        assert len(claimed.chosen) == 2
        assert claimed.at_cap == {"task"}

    def test_running_jobs_without_a_slot_count(self) -> None:
        documents = [queued() for _ in range(2)]
        claimed = plan(documents, {"task": 2}, [holder()])

        assert list(claimed.jobs) == [documents[0]["_id"]]
        assert slot_keys(claimed) == [slot_key("task", 0)]

    def test_nothing_free_nothing_claimed(self) -> None:
        claimed = plan([queued()], {"task": 1}, [holder(), holder()])

        assert claimed == ClaimPlan(at_cap={"task"})

    def test_other_tasks_are_not_held_back(self) -> None:
        full, free = queued("full"), queued("free")
        claimed = plan([full, free], {"full": 1, "free": None}, [holder("full")])

        assert list(claimed.jobs) == [free["_id"]]
        assert slot_keys(claimed) == [None]

    def test_slots_left(self) -> None:
        slots = slots_left([holder(slot_key=slot_key("task", 0)), holder("other")])

        assert [slots.take("task", 3) for _ in range(3)] == [1, 2, None]
        # One job of "other" runs without a slot: it fills a cap of 1, not of 2
        assert slots.take("other", 1) is None
        assert slots_left([holder("other")]).take("other", 2) == 0
        assert slots.take("idle", 1) == 0

    @pytest.mark.parametrize("key", ["garbage", "x/task", "/task", 7, ["task", 0]])
    def test_malformed_slot_keys_are_named_and_counted(
        self, key: object, caplog: pytest.LogCaptureFixture
    ) -> None:
        documents = [queued() for _ in range(2)]
        malformed = holder(slot_key=key)
        claimed = plan(documents, {"task": 2}, [malformed])

        # Still running: one slot is left, and slot 0 is free as far as anyone knows
        assert list(claimed.jobs) == [documents[0]["_id"]]
        assert slot_keys(claimed) == [slot_key("task", 0)]
        assert warnings(caplog) == [
            f"Job {malformed['_id'].as_uuid()} holds a malformed slot key {key!r}"
        ]


class TestJobsThatCannotRun:
    """A job that cannot run is finished in the claim's write, not handed out."""

    def test_unknown_task(self, caplog: pytest.LogCaptureFixture) -> None:
        orphan, good = queued("no-such-task"), queued()
        claimed = plan([orphan, good], {"task": None})

        assert list(claimed.jobs) == [good["_id"]]
        result = claimed.finished[orphan["_id"]]
        assert result.outcome is JobOutcome.error
        assert isinstance(result.exception, TaskLookupError)
        assert_finished(claimed, orphan)
        assert any("no-such-task" in message for message in warnings(caplog))

    def test_refused_task(self) -> None:
        """A job of a refused task finishes with the refusal; its args stay unread."""
        refusal = DisallowedCallableError("the callable 'os:system' is not allowed")
        job = {**queued("evil"), "args": b"not a pickle: never read"}
        claimed = plan([job], {"evil": Refused(refusal)})

        assert claimed.jobs == {}
        result = claimed.finished[job["_id"]]
        assert result.outcome is JobOutcome.error
        assert result.exception is refusal
        assert_finished(claimed, job)

    def test_refused_task_cap(self, caplog: pytest.LogCaptureFixture) -> None:
        """A task outside the allowed callables, or unsigned, is refused."""
        allowed = Codec(SERIALIZER, allowed=AllowedCallables.of(["myapp:*"]))
        cap = task_cap(task(), allowed, LOGGER)
        assert isinstance(cap, Refused)
        assert isinstance(cap.error, DisallowedCallableError)
        signed = Codec(SERIALIZER, Signer("k" * 32))
        cap = task_cap(task(), signed, LOGGER)
        assert isinstance(cap, Refused)
        assert isinstance(cap.error, UnverifiedDataError)
        assert len(warnings(caplog)) == 2

    def test_start_deadline_passed(self) -> None:
        late = queued(start_deadline=NOW - timedelta(seconds=1))
        in_time = queued(start_deadline=NOW + timedelta(seconds=1))
        claimed = plan([late, in_time], {"task": None})

        assert list(claimed.jobs) == [in_time["_id"]]
        result = claimed.finished[late["_id"]]
        assert result.outcome is JobOutcome.missed_start_deadline
        assert_finished(claimed, late)

    def test_unreadable(self, caplog: pytest.LogCaptureFixture) -> None:
        unreadable = {**queued(), "args": b"not a pickle"}
        claimed = plan([unreadable], {"task": None})

        assert claimed.jobs == {}
        result = claimed.finished[unreadable["_id"]]
        assert result.outcome is JobOutcome.deserialization_failed
        assert_finished(claimed, unreadable)
        assert any("Cannot read job" in message for message in warnings(caplog))

    def test_id_no_uuid_is_quarantined(self, caplog: pytest.LogCaptureFixture) -> None:
        stray = {**queued(), "_id": "job-1"}
        claimed = plan([stray], {"task": None})

        # No result can name it: it is taken out of the queue, without one
        assert claimed.jobs == claimed.finished == {}
        [(document, update)] = claimed.chosen
        assert document is None
        assert update.query["_id"] == "job-1"
        assert update.change["$set"]["state"] == FINISHED
        assert update.change["$set"]["quarantine"]["reason"]
        assert "result" not in update.change["$set"]
        assert warnings(caplog) == [
            "Quarantining job 'job-1': its id is no UUID, so no result can name it"
        ]


def assert_finished(claimed: ClaimPlan, original: Document) -> None:
    """Assert that the claim writes ``original`` as finished, with its result."""
    [(document, update)] = [
        (document, update)
        for document, update in claimed.chosen
        if document is not None and document["_id"] == original["_id"]
    ]
    assert document == original
    assert update.change["$set"]["state"] == FINISHED
    assert update.change["$set"]["release_token"] == TOKEN
    assert update.change["$set"]["result"]["outcome"] == (
        claimed.finished[original["_id"]].outcome.name
    )


def task(**options: Any) -> Document:
    """Return the document of task ``t``, as the store wrote it."""
    return task_to_document(
        Task(id="t", func="builtins:len", job_executor="async", **options), CODEC
    )


class TestTaskCap:
    """A task's cap is its ``max_running_jobs``; a bad task or limit allows none."""

    @pytest.mark.parametrize("cap", [None, 1, 3])
    def test_cap(self, cap: int | None, caplog: pytest.LogCaptureFixture) -> None:
        assert task_cap(task(max_running_jobs=cap), CODEC, LOGGER) == cap
        assert warnings(caplog) == []

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param(0, id="zero"),
            pytest.param(-1, id="negative"),
            pytest.param(2.0, id="double"),
            pytest.param("2", id="string"),
            pytest.param(True, id="bool"),
            pytest.param([1], id="array"),
        ],
    )
    def test_bad_max_running_jobs(
        self, value: object, caplog: pytest.LogCaptureFixture
    ) -> None:
        assert task_cap({**task(), "max_running_jobs": value}, CODEC, LOGGER) == 0
        [warning] = warnings(caplog)
        assert warning.startswith("Cannot read task 't'") or warning.startswith(
            "Task 't' has an invalid max_running_jobs"
        )
        assert warning.endswith("its jobs stay queued")

    def test_unreadable_task(self, caplog: pytest.LogCaptureFixture) -> None:
        unreadable = task(max_running_jobs=3)
        del unreadable["job_executor"]

        assert task_cap(unreadable, CODEC, LOGGER) == 0
        [warning] = warnings(caplog)
        assert warning.startswith("Cannot read task 't'")

    def test_a_job_of_a_bad_task_stays_queued(self) -> None:
        cap = task_cap({**task(), "max_running_jobs": 0}, CODEC, LOGGER)
        claimed = plan([queued("t")], {"t": cap})

        assert claimed == ClaimPlan(at_cap={"t"})


class TestTasksOf:
    """The tasks a claim's read puts beside its jobs are taken out, by task id."""

    def test_tasks_by_id(self) -> None:
        first, second = task(), {**task(), "_id": "u"}
        documents = [
            {**queued("t"), TASK_FIELD: [first]},
            {**queued("u"), TASK_FIELD: [second]},
            {**queued("t"), TASK_FIELD: [first]},
            {**queued("gone"), TASK_FIELD: []},
        ]

        assert tasks_of(documents) == {"t": first, "u": second}
        assert all(TASK_FIELD not in document for document in documents)

    def test_tasks_without_a_string_id_are_left_out(self) -> None:
        odd = {**task(), "_id": {"nested": 1}}
        documents = [{**queued(), TASK_FIELD: [odd]}, queued()]

        assert tasks_of(documents) == {}
