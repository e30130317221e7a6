"""Which failures are retried, and how the store retries them."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from apscheduler import RetrySettings, Task, TaskLookupError
from apscheduler.abc import EventBroker
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ConfigurationError,
    CursorNotFound,
    DuplicateKeyError,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WriteConcernError,
    WriteError,
)
from pytest_mock import MockerFixture
from tenacity import stop_after_attempt, wait_fixed

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._retry import (
    TEMPORARY_CODES,
    Attempts,
    is_temporary_failure,
    retrying,
)

from .support.logs import retry_messages

pytestmark = [
    pytest.mark.anyio,
    # mongomock's TTL index support calls datetime.utcnow() (deprecated in 3.12)
    pytest.mark.filterwarnings(
        "ignore:datetime.datetime.utcnow:DeprecationWarning:mongomock"
    ),
]

ATTEMPTS = 5


class TestIsTemporaryFailure:
    """Network trouble and retryable-labelled errors are temporary; the rest is not."""

    @pytest.mark.parametrize(
        "exc",
        [
            pytest.param(AutoReconnect("connection reset"), id="auto-reconnect"),
            pytest.param(NetworkTimeout("timed out"), id="network-timeout"),
            pytest.param(NotPrimaryError("not primary"), id="not-primary"),
            pytest.param(
                ServerSelectionTimeoutError("no servers"), id="server-selection-timeout"
            ),
            pytest.param(
                OperationFailure(
                    "interrupted at shutdown",
                    code=11600,
                    details={"errorLabels": ["RetryableWriteError"]},
                ),
                id="retryable-write-label",
            ),
            pytest.param(
                OperationFailure(
                    "write conflict",
                    code=112,
                    details={"errorLabels": ["TransientTransactionError"]},
                ),
                id="transient-transaction-label",
            ),
            *(
                pytest.param(
                    OperationFailure("unlabelled", code=code), id=f"code-{code}"
                )
                for code in sorted(TEMPORARY_CODES)
            ),
            pytest.param(
                CursorNotFound("cursor id 5 not found", code=43), id="cursor-not-found"
            ),
            pytest.param(
                WriteConcernError("waiting for replication timed out", code=64),
                id="write-concern-timeout",
            ),
            pytest.param(
                WriteConcernError("stepping down", code=189),
                id="write-concern-stepdown",
            ),
            pytest.param(
                BulkWriteError(
                    {
                        "writeErrors": [{"index": 0, "code": 11000}],
                        "writeConcernErrors": [{"code": 64, "errmsg": "timed out"}],
                    }
                ),
                id="bulk-write-unconfirmed",
            ),
        ],
    )
    def test_temporary(self, exc: BaseException) -> None:
        assert is_temporary_failure(exc)

    @pytest.mark.parametrize(
        "exc",
        [
            pytest.param(
                OperationFailure("Authentication failed.", code=18),
                id="authentication-failed",
            ),
            pytest.param(
                OperationFailure("not authorized", code=13), id="unauthorized"
            ),
            pytest.param(
                DuplicateKeyError("E11000 duplicate key error", code=11000),
                id="duplicate-key",
            ),
            pytest.param(
                WriteError("document failed validation", code=121),
                id="write-error",
            ),
            pytest.param(ConfigurationError("bad option"), id="configuration"),
            pytest.param(ValueError("bad value"), id="value-error"),
            pytest.param(
                OperationFailure(
                    "other label", code=2, details={"errorLabels": ["SomethingElse"]}
                ),
                id="unrelated-label",
            ),
            pytest.param(
                WriteConcernError("Not enough data-bearing nodes", code=100),
                id="write-concern-unsatisfiable",
            ),
            pytest.param(
                BulkWriteError(
                    {
                        "writeErrors": [{"index": 0, "code": 121}],
                        "writeConcernErrors": [{"code": 64, "errmsg": "timed out"}],
                    }
                ),
                id="bulk-write-failed-validation",
            ),
            pytest.param(
                BulkWriteError({"writeErrors": [{"index": 0, "code": 11000}]}),
                id="bulk-write-duplicate-only",
            ),
        ],
    )
    def test_permanent(self, exc: BaseException) -> None:
        assert not is_temporary_failure(exc)

    def test_codes_match_pymongos(self) -> None:
        """Our list of temporary codes holds every code pymongo itself retries."""
        from pymongo import helpers_shared

        known = getattr(helpers_shared, "_RETRYABLE_ERROR_CODES", None)
        if known is None:  # pragma: no cover (pymongo moved its private list)
            pytest.skip("this pymongo keeps its retryable codes elsewhere")

        assert set(known) <= TEMPORARY_CODES


@pytest.fixture
async def fast_retry_store(
    database_name: str, local_broker: EventBroker, logger: logging.Logger
) -> AsyncIterator[MongoDBDataStore]:
    """A started mongomock store that retries up to five times without waiting."""
    from mongomock_motor import AsyncMongoMockClient

    store = MongoDBDataStore(
        AsyncMongoMockClient(),
        database=database_name,
        retry_settings=RetrySettings(
            stop=stop_after_attempt(ATTEMPTS), wait=wait_fixed(0)
        ),
    )
    async with AsyncExitStack() as exit_stack:
        await local_broker.start(exit_stack, logger)
        await store.start(exit_stack, local_broker, logger)
        await store.add_task(Task(id="task", func="math:floor", job_executor="async"))
        yield store


def _flaky_find_one(
    mocker: MockerFixture, store: MongoDBDataStore, failures: list[BaseException]
) -> Any:
    """Make the read of a task (one aggregation) raise ``failures``, then work."""
    real_aggregate = store._tasks.aggregate
    pending = list(failures)

    async def aggregate(*args: Any, **kwargs: Any) -> Any:
        if pending:
            raise pending.pop(0)

        return await real_aggregate(*args, **kwargs)

    return mocker.patch.object(store._tasks, "aggregate", side_effect=aggregate)


class TestStoreRetries:
    """The store repeats a round trip after a temporary failure, and only then."""

    @pytest.mark.parametrize(
        "failure",
        [
            pytest.param(AutoReconnect("connection reset"), id="auto-reconnect"),
            pytest.param(NetworkTimeout("timed out"), id="network-timeout"),
            pytest.param(
                OperationFailure(
                    "interrupted",
                    code=11600,
                    details={"errorLabels": ["RetryableWriteError"]},
                ),
                id="retryable-write-label",
            ),
            pytest.param(
                CursorNotFound("cursor id 5 not found", code=43), id="cursor-not-found"
            ),
        ],
    )
    async def test_temporary_failure_retried(
        self,
        fast_retry_store: MongoDBDataStore,
        mocker: MockerFixture,
        caplog: pytest.LogCaptureFixture,
        failure: BaseException,
    ) -> None:
        find_one = _flaky_find_one(mocker, fast_retry_store, [failure, failure])
        with anyio.fail_after(10):
            task = await fast_retry_store.get_task("task")

        assert task.id == "task"
        assert task.func == "math:floor"
        assert find_one.await_count == 3
        messages = retry_messages(caplog)
        assert len(messages) == 2
        assert messages[0].startswith("Temporary MongoDB error (attempt 1)")
        assert messages[1].startswith("Temporary MongoDB error (attempt 2)")

    async def test_gives_up_after_the_last_attempt(
        self,
        fast_retry_store: MongoDBDataStore,
        mocker: MockerFixture,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        failures: list[BaseException] = [
            AutoReconnect(f"reset {n}") for n in range(ATTEMPTS + 1)
        ]
        find_one = _flaky_find_one(mocker, fast_retry_store, failures)
        with anyio.fail_after(10), pytest.raises(AutoReconnect, match="reset 4"):
            await fast_retry_store.get_task("task")

        assert find_one.await_count == ATTEMPTS
        assert len(retry_messages(caplog)) == ATTEMPTS

    @pytest.mark.parametrize(
        "failure",
        [
            pytest.param(
                DuplicateKeyError("E11000 duplicate key error", code=11000),
                id="duplicate-key",
            ),
            pytest.param(
                OperationFailure("not authorized on db", code=13), id="unauthorized"
            ),
            pytest.param(
                OperationFailure("Authentication failed.", code=18),
                id="authentication-failed",
            ),
        ],
    )
    async def test_permanent_failure_raised_at_once(
        self,
        fast_retry_store: MongoDBDataStore,
        mocker: MockerFixture,
        caplog: pytest.LogCaptureFixture,
        failure: OperationFailure,
    ) -> None:
        find_one = _flaky_find_one(mocker, fast_retry_store, [failure])
        with anyio.fail_after(10), pytest.raises(type(failure)) as exc_info:
            await fast_retry_store.get_task("task")

        assert exc_info.value is failure
        assert exc_info.value.code == failure.code
        assert find_one.await_count == 1
        assert retry_messages(caplog) == []

    async def test_lookup_error_not_retried(
        self,
        fast_retry_store: MongoDBDataStore,
        mocker: MockerFixture,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        find_one = _flaky_find_one(mocker, fast_retry_store, [])
        with anyio.fail_after(10), pytest.raises(TaskLookupError):
            await fast_retry_store.get_task("no-such-task")

        assert find_one.await_count == 1
        assert retry_messages(caplog) == []


class TestAttempts:
    """The first attempt runs outside Tenacity's loop; a failure hands over to it."""

    def loop(self, attempts: int) -> Attempts:
        settings = RetrySettings(stop=stop_after_attempt(attempts), wait=wait_fixed(0))
        return Attempts(retrying(settings, logging.getLogger("tests.attempts")))

    async def run(
        self, attempts: Attempts, outcomes: list[Exception | None]
    ) -> list[bool]:
        """Attempt the outcomes in turn; return whether each attempt was a retry."""
        retries: list[bool] = []
        async for attempt in attempts:
            with attempt:
                retries.append(attempt.retry)
                if (outcome := outcomes.pop(0)) is not None:
                    raise outcome

        return retries

    async def test_first_succeeds(self, caplog: pytest.LogCaptureFixture) -> None:
        assert await self.run(self.loop(3), [None]) == [False]
        assert not retry_messages(caplog)

    async def test_temporary_failure_retried(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        outcomes: list[Exception | None] = [AutoReconnect("gone"), None]

        assert await self.run(self.loop(3), outcomes) == [False, True]
        # Tenacity logged the first attempt's failure, as it logs any
        assert len(retry_messages(caplog)) == 1
        assert "attempt 1" in retry_messages(caplog)[0]

    async def test_permanent_failure_raised_at_once(self) -> None:
        outcomes: list[Exception | None] = [OperationFailure("no", code=13), None]

        with pytest.raises(OperationFailure):
            await self.run(self.loop(3), outcomes)

        assert outcomes == [None]  # no second attempt

    async def test_the_first_attempt_counts(self) -> None:
        """With two attempts allowed, a failing operation is tried twice in all."""
        outcomes: list[Exception | None] = [AutoReconnect(str(n)) for n in range(3)]

        with pytest.raises(AutoReconnect, match="1"):
            await self.run(self.loop(2), outcomes)

        assert len(outcomes) == 1
