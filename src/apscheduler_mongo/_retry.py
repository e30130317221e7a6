"""Which failures are temporary, and so worth retrying."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from logging import Logger
from typing import TypeVar

from apscheduler import RetrySettings
from pymongo.errors import ConnectionFailure, PyMongoError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from ._client import redact

T = TypeVar("T")

#: Error labels the server (or driver) puts on errors that are safe to retry
RETRYABLE_LABELS = ("RetryableWriteError", "TransientTransactionError")


def is_temporary_failure(exc: BaseException) -> bool:
    """
    Tell whether ``exc`` is a temporary failure that a retry may cure.

    True for network errors, timeouts, failovers and server selection timeouts
    (pymongo's :exc:`~pymongo.errors.ConnectionFailure` family, which holds
    :exc:`~pymongo.errors.AutoReconnect`) and for errors labelled
    ``RetryableWriteError`` or ``TransientTransactionError``. False for everything
    else: authentication, authorization, configuration, validation and duplicate key
    errors are raised at once.
    """
    if isinstance(exc, ConnectionFailure):
        return True

    if isinstance(exc, PyMongoError):
        return any(exc.has_error_label(label) for label in RETRYABLE_LABELS)

    return False


def retrying(settings: RetrySettings, logger: Logger, where: str = "") -> AsyncRetrying:
    """
    Return a Tenacity loop that retries temporary failures as ``settings`` say.

    Each failed attempt is logged as a warning (``where`` names the component), with
    credentials removed from the message.
    """

    def log_attempt(retry_state: RetryCallState) -> None:
        assert retry_state.outcome is not None
        logger.warning(
            "Temporary MongoDB error%s (attempt %d): %s",
            where,
            retry_state.attempt_number,
            redact(str(retry_state.outcome.exception())),
        )

    return AsyncRetrying(
        stop=settings.stop,
        wait=settings.wait,
        retry=retry_if_exception(is_temporary_failure),
        after=log_attempt,
        reraise=True,
    )


async def call_retrying(
    settings: RetrySettings,
    logger: Logger,
    operation: Callable[[int], Awaitable[T]],
    where: str = "",
) -> T:
    """Run ``operation(attempt_number)``, retrying as :func:`retrying` says."""
    async for attempt in retrying(settings, logger, where):
        with attempt:
            return await operation(attempt.retry_state.attempt_number)

    raise AssertionError("unreachable")  # pragma: no cover
