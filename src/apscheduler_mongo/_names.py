"""Validation of database and collection names, and of the ids the API takes."""

from __future__ import annotations

from collections.abc import Iterable

_DATABASE_FORBIDDEN = frozenset('/\\. "$*<>:|?\x00')
_DATABASE_MAX_BYTES = 63
_NAMESPACE_MAX_BYTES = 255


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


def validate_collection_name(name: object, database: str) -> str:
    """
    Return ``name`` if it is a usable collection name in ``database``.

    :raises TypeError: if ``name`` is not a string
    :raises ValueError: if ``name`` is empty, reserved, too long or has a forbidden
        character
    """
    if not isinstance(name, str):
        raise TypeError(
            f"collection name must be a string, not {type(name).__qualname__}"
        )

    if not name:
        raise ValueError("collection name must not be empty")

    if "$" in name or "\x00" in name:
        raise ValueError(f"collection name {name!r} must not contain '$' or NUL")

    if name.startswith((".", "system.")) or name.endswith("."):
        raise ValueError(f"collection name {name!r} is reserved or malformed")

    if len(f"{database}.{name}".encode()) > _NAMESPACE_MAX_BYTES:
        raise ValueError(
            f"namespace {database}.{name} is longer than {_NAMESPACE_MAX_BYTES} bytes"
        )

    return name


def database_validator(_instance: object, _attribute: object, value: object) -> None:
    """Attrs validator running :func:`validate_database_name`."""
    validate_database_name(value)


def require_ids(values: Iterable[object], what: str) -> list[str]:
    """
    Return ids given to the store's API, checked to be strings.

    A query built from a value of another type could match other documents than
    the caller meant (``remove_task({"$ne": None})`` would delete some task).

    :raises TypeError: if one is not a string
    """
    ids: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise TypeError(f"{what} must be a str, not {type(value).__name__}")

        ids.append(value)

    return ids
