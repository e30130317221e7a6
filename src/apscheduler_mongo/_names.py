"""Validation of database names."""

from __future__ import annotations

_DATABASE_FORBIDDEN = frozenset('/\\. "$*<>:|?\x00')
_DATABASE_MAX_BYTES = 63


def validate_database_name(name: object) -> str:
    """
    Return ``name`` if it is a usable MongoDB database name.

    :raises TypeError: if ``name`` is not a string
    :raises ValueError: if ``name`` is empty, too long or has a forbidden character
    """
    if not isinstance(name, str):
        raise TypeError(f"database must be a string, not {type(name).__qualname__}")

    if not name:
        raise ValueError("database must not be empty")

    if bad := sorted(set(name) & _DATABASE_FORBIDDEN):
        raise ValueError(
            f"database name {name!r} contains forbidden characters: "
            + " ".join(repr(char) for char in bad)
        )

    if len(name.encode("utf-8")) > _DATABASE_MAX_BYTES:
        raise ValueError(
            f"database name {name!r} is longer than {_DATABASE_MAX_BYTES} bytes"
        )

    return name
