"""Bringing a collection's indexes to what this version needs, at start."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Any

from pymongo import IndexModel
from pymongo.errors import OperationFailure

from ._adapters import INDEX_NOT_FOUND, Collection
from ._retry import is_temporary_failure

#: The index options we set, with the value that means "not set"
_OPTIONS: dict[str, Any] = {
    "unique": False,
    "sparse": False,
    "expireAfterSeconds": None,
    "partialFilterExpression": None,
}
_TTL = "expireAfterSeconds"


def _key(spec: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Return an index's key as (field, direction) pairs, 1.0 read as 1."""
    return [
        (field, int(order) if isinstance(order, float) else order)
        for field, order in spec["key"].items()
    ]


def _differences(wanted: Mapping[str, Any], existing: Mapping[str, Any]) -> set[str]:
    """Name what differs between two index descriptions: "key" and option names."""
    differences = {"key"} if _key(wanted) != _key(existing) else set()
    for option, unset in _OPTIONS.items():
        if wanted.get(option, unset) != existing.get(option, unset):
            differences.add(option)

    return differences


async def ensure_indexes(
    collection: Collection,
    wanted: Sequence[IndexModel],
    retired: Set[str] = frozenset(),
) -> None:
    """
    Give ``collection`` the indexes ``wanted``, changing any it has by those names.

    Idempotent, and safe with other schedulers starting at the same time. An index
    that exists with another time to live gets the new one in place (``collMod``); any
    other non-unique index that differs is built again. The indexes named in
    ``retired`` (made by an earlier version, now unused) are dropped.

    :raises RuntimeError: if a unique index differs (it cannot be rebuilt while
        schedulers run: for a moment nothing would keep its keys unique), or an
        index cannot be created, say because an index made by something else holds
        its keys
    """
    existing = {info["name"]: info for info in await collection.list_indexes()}
    missing = [
        model
        for model in wanted
        if not await _up_to_date(collection, model.document, existing)
    ]
    for name in retired & existing.keys():
        await _drop_index(collection, name)

    if missing:
        await _create(collection, missing)


async def _up_to_date(
    collection: Collection, spec: Mapping[str, Any], existing: Mapping[str, Any]
) -> bool:
    """
    Make an existing index what ``spec`` says, where it can be done in place.

    :return: whether the index is as ``spec`` says now; if not, it does not exist
        (any more) and is to be created
    """
    current = existing.get(spec["name"])
    if current is None:
        return False

    differences = _differences(spec, current)
    if not differences:
        return True

    if differences == {_TTL} and await _change_ttl(collection, spec):
        return True

    if spec.get("unique") or current.get("unique"):
        raise RuntimeError(
            f"the unique index {spec['name']!r} of collection "
            f"{collection.name!r} differs from what this version needs (in "
            f"{', '.join(sorted(differences))}) and cannot be changed while "
            f"schedulers run; stop them all, drop the index, and start again"
        )

    await _drop_index(collection, spec["name"])
    return False


async def _create(collection: Collection, models: Sequence[IndexModel]) -> None:
    try:
        await collection.create_indexes(models)
    except OperationFailure as exc:
        if is_temporary_failure(exc):
            raise

        raise RuntimeError(
            f"cannot create the indexes this version needs on collection "
            f"{collection.name!r}: {exc}. The collection probably holds indexes "
            f"(and data) made by something else, such as APScheduler's built-in "
            f"MongoDB store, whose documents cannot be read here; use a new "
            f"database, or drop that collection"
        ) from exc


async def _change_ttl(collection: Collection, spec: Mapping[str, Any]) -> bool:
    """
    Change an index's time to live in place; tell whether the server could.

    A server without ``collMod`` (or one that refuses it, to a user without the
    ``collMod`` privilege) gets the index built again instead, which a time-to-live
    index (never unique here) allows.
    """
    try:
        return await collection.change_ttl(spec["name"], spec[_TTL])
    except OperationFailure as exc:
        if is_temporary_failure(exc):
            raise

        return False


async def _drop_index(collection: Collection, name: str) -> None:
    try:
        await collection.drop_index(name)
    except OperationFailure as exc:
        if exc.code != INDEX_NOT_FOUND:  # another scheduler dropped it first
            raise
