"""Which failures are temporary, and so worth retrying."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from logging import Logger
from types import TracebackType
from typing import Any

import anyio
import attrs
from apscheduler import RetrySettings
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)
from tenacity import AsyncRetrying, AttemptManager, RetryCallState, retry_if_exception

from ._adapters import DUPLICATE_KEY
from ._client import redact
from ._metrics import Metrics, error_label

#: Error labels the server (or driver) puts on errors that are safe to retry
RETRYABLE_LABELS = ("RetryableWriteError", "TransientTransactionError")

#: Server error codes of passing trouble: a node shutting down, stepping down or
#: unreachable, a network error between mongos and a shard, a time limit. pymongo
#: retries some of them once by itself, but they also reach us unlabelled as a plain
#: OperationFailure: from mongos, after pymongo's one retry of a read, and from
#: multi-document writes (update_many, delete_many), which pymongo never retries
TEMPORARY_CODES = frozenset(
    {
        6,  # HostUnreachable
        7,  # HostNotFound
        89,  # NetworkTimeout
        91,  # ShutdownInProgress
        134,  # ReadConcernMajorityNotAvailableYet
        189,  # PrimarySteppedDown
        262,  # ExceededTimeLimit
        9001,  # SocketException
        10058,  # LegacyNotPrimary
        10107,  # NotWritablePrimary
        11600,  # InterruptedAtShutdown
        11602,  # InterruptedDueToReplStateChange
        13435,  # NotPrimaryNoSecondaryOk
        13436,  # NotPrimaryOrSecondary
    }
)
#: A cursor lost between batches (killed by a failover, or timed out): every read
#: of ours is repeated whole, so asking again is safe
CURSOR_NOT_FOUND = 43
#: A write concern error saying the write was not confirmed in time: it may or may
#: not survive a failover, so its outcome is settled by retrying it
WRITE_CONCERN_FAILED = 64


def is_temporary_failure(exc: BaseException) -> bool:
    """
    Tell whether ``exc`` is a temporary failure that a retry may cure.

    True for network errors, timeouts, failovers and server selection timeouts
    (pymongo's :exc:`~pymongo.errors.ConnectionFailure` family, which holds
    :exc:`~pymongo.errors.AutoReconnect`), for errors labelled ``RetryableWriteError``
    or ``TransientTransactionError``, for the server's codes of passing trouble
    (:data:`TEMPORARY_CODES`, :exc:`~pymongo.errors.CursorNotFound`) and for write
    concern errors that leave a write unconfirmed (a timeout, or one of those codes),
    also inside a :exc:`~pymongo.errors.BulkWriteError`. False for everything else:
    authentication, authorization, configuration, validation and duplicate key
    errors, and write concerns that cannot be satisfied, are raised at once.
    """
    if isinstance(exc, ConnectionFailure):
        return True

    if not isinstance(exc, PyMongoError):
        return False

    if any(exc.has_error_label(label) for label in RETRYABLE_LABELS):
        return True

    if isinstance(exc, BulkWriteError):
        return _bulk_write_unconfirmed(exc)

    if isinstance(exc, WriteConcernError):
        return exc.code in TEMPORARY_CODES or exc.code == WRITE_CONCERN_FAILED

    if isinstance(exc, OperationFailure):
        return exc.code in TEMPORARY_CODES or exc.code == CURSOR_NOT_FOUND

    return False


def _bulk_write_unconfirmed(exc: BulkWriteError) -> bool:
    """
    Tell whether a bulk write failed only for want of confirmation.

    That is: every write error is a duplicate key (which the store expects and
    reads as "not this one"), and a write concern error says the writes were not
    confirmed in time. The store then repeats the bulk write, whose conditions make
    the repetition harmless, and learns what holds from its tokens.
    """
    details = exc.details or {}
    if any(
        error.get("code") != DUPLICATE_KEY for error in details.get("writeErrors", [])
    ):
        return False

    return any(
        error.get("code") in TEMPORARY_CODES
        or error.get("code") == WRITE_CONCERN_FAILED
        or any(label in RETRYABLE_LABELS for label in error.get("errorLabels", ()))
        for error in details.get("writeConcernErrors", [])
    )


class Attempt:
    """
    One attempt of a retry loop: enter it (``with attempt:``) around the work; it
    tells whether it is a retry (an earlier attempt failed, and may have been
    applied on the server all the same: its reply lost).
    """

    def __init__(
        self, manager: AttemptManager | None = None, *, shielded: bool = False
    ) -> None:
        #: Tenacity's attempt (``None``: the first, run outside Tenacity's loop)
        self._manager = manager
        #: Whether an earlier attempt failed
        self.retry = manager is not None and manager.retry_state.attempt_number > 1
        #: The temporary failure of a first attempt, for Tenacity's loop to retry
        self.failure: BaseException | None = None
        #: Shields the attempt from cancellation, when asked to
        self._shield = anyio.CancelScope(shield=True) if shielded else None

    def __enter__(self) -> None:
        if self._manager is not None:
            self._manager.__enter__()
        if self._shield is not None:
            self._shield.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        if self._shield is not None:
            self._shield.__exit__(exc_type, exc, traceback)

        if self._manager is not None:
            return self._manager.__exit__(exc_type, exc, traceback)

        if isinstance(exc, Exception) and is_temporary_failure(exc):
            self.failure = exc
            return True

        return None


class Attempts:
    """
    The attempts of a Tenacity loop (``async for attempt in ...``).

    The first attempt runs outside the loop: Tenacity's machinery costs about 70 µs
    of CPU per operation (a sixth of what the driver spends on a command), and
    almost every operation succeeds at once. A temporary failure of the first
    attempt is handed to the loop as the outcome of its first attempt (logged,
    counted and waited on like any), and the loop makes the next ones. Other
    errors are raised as they are, as the loop would.

    With ``shielded``, each attempt runs to its end even when its caller is
    cancelled (a command, once sent, is not cut off); the waits between attempts
    are not shielded, so a cancellation stops the retries there.
    """

    def __init__(
        self,
        loop: AsyncRetrying,
        on_success: Callable[[], None] | None = None,
        *,
        shielded: bool = False,
    ) -> None:
        self._loop = loop
        #: Called when the operation succeeded (at once, or after retries)
        self._on_success = on_success
        self._shielded = shielded
        self._first: Attempt | None = None
        self._attempts: AsyncIterator[Any] | None = None

    def __aiter__(self) -> Attempts:
        return self

    async def __anext__(self) -> Attempt:
        if self._attempts is None:
            if self._first is None:
                self._first = Attempt(shielded=self._shielded)
                return self._first

            if self._first.failure is None:
                self._succeeded()
                raise StopAsyncIteration

            self._attempts = aiter(self._loop)
            with await anext(self._attempts):
                raise self._first.failure

        try:
            return Attempt(await anext(self._attempts), shielded=self._shielded)
        except StopAsyncIteration:
            self._succeeded()
            raise

    def _succeeded(self) -> None:
        if self._on_success is not None:
            self._on_success()


#: Makes a retry loop
Retry = Callable[[], Attempts]


def retrying(
    settings: RetrySettings,
    logger: Logger,
    where: str = "",
    on_failure: Callable[[], None] | None = None,
    metrics: Metrics | None = None,
) -> AsyncRetrying:
    """
    Return a Tenacity loop that retries temporary failures as ``settings`` say.

    Each failed attempt is logged as a warning (``where`` names the component), with
    credentials removed from the message, and ``on_failure`` (if given) is called;
    ``metrics`` (if given) count the failures and the time spent waiting.
    """

    def log_attempt(retry_state: RetryCallState) -> None:
        assert retry_state.outcome is not None
        exc = retry_state.outcome.exception()
        logger.warning(
            "Temporary MongoDB error%s (attempt %d): %s",
            where,
            retry_state.attempt_number,
            redact(str(exc)),
        )
        if metrics is not None and exc is not None:
            metrics.failed(error_label(exc))
        if on_failure is not None:
            on_failure()

    def count_wait(retry_state: RetryCallState) -> None:
        if metrics is not None and retry_state.next_action is not None:
            metrics.waited(retry_state.next_action.sleep)

    return AsyncRetrying(
        stop=settings.stop,
        wait=settings.wait,
        retry=retry_if_exception(is_temporary_failure),
        after=log_attempt,
        before_sleep=count_wait,
        reraise=True,
    )


@attrs.define
class Trouble:
    """
    Back off from a failure that repeats, and log it once per episode.

    The first failure of an episode is logged as a warning, the next ones at debug
    level; the first success after them ends the episode (logged once, at info).
    """

    logger: Logger
    #: What fails, as the log names it ("Event broker poll")
    what: str
    #: The longest wait between attempts, in seconds
    longest: float = 5.0
    #: Count the failures, the waits and the episodes
    metrics: Metrics | None = attrs.field(default=None, kw_only=True)
    failures: int = attrs.field(init=False, default=0)

    def failed(self, exc: BaseException) -> float:
        """Note a failure; return how many seconds to wait before trying again."""
        self.failures += 1
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        self.logger.log(level, "%s failed, retrying: %s", self.what, redact(str(exc)))
        wait = min(0.5 * 2.0 ** (self.failures - 1), self.longest)
        if self.metrics is not None:
            self.metrics.failed(error_label(exc))
            self.metrics.waited(wait)

        return wait

    def over(self) -> None:
        """Note a success, which ends the episode of failures, if any (also an
        outage the metrics count, whatever failed in it)."""
        if self.metrics is not None:
            self.metrics.recovered()

        if self.failures:
            self.logger.info(
                "%s works again after %d failed attempt(s)", self.what, self.failures
            )
            self.failures = 0
