"""What the store (or broker) logged during a test, as the tests look for it."""

from __future__ import annotations

import pytest

#: How the store and broker begin the warning about a failed attempt they retry
RETRY_WARNING = "Temporary MongoDB error"


def logged(
    caplog: pytest.LogCaptureFixture, level: int | None = None, prefix: str = ""
) -> list[str]:
    """Return the messages logged (at ``level`` only, if given) starting ``prefix``."""
    return [
        record.getMessage()
        for record in caplog.records
        if (level is None or record.levelno == level)
        and record.getMessage().startswith(prefix)
    ]


def retry_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return the warnings about failed attempts that the retry loop repeats."""
    return logged(caplog, prefix=RETRY_WARNING)
