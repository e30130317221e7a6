"""Which failures are temporary, and so worth retrying."""

from __future__ import annotations

from pymongo.errors import ConnectionFailure, PyMongoError

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
