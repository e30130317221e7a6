"""
Whether an index serves a query, by MongoDB's rules for index prefixes and sorts.

A query is served by an index when the index's first field is constrained by the
query, the fields the query fixes to one value (or a few, with ``$in``) form a
prefix of the index, and the sort (if any) follows that prefix in the index's order
(or its reverse). Range and other conditions may be on any field: the server checks
them on the keys it walks. ``$or`` is served when the branches of one ``$or`` all are
(each with the conditions beside it), or when those conditions are served without it.

This is what ``tests/test_cost.py`` checks every command against; it is a model of
the query planner's rules, not the planner: on a real server, ``explain()`` has the
last word.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

#: Operators that fix a field to one value, or to a few (the planner explodes
#: ``$in`` into several ranges and merges them in sort order)
_POINT_OPERATORS = frozenset({"$eq", "$in"})


@attrs.frozen
class Query:
    """One query a command carried: where, what, in which order."""

    collection: str
    filter: Mapping[str, Any]
    sort: Sequence[tuple[str, int]] = ()
    #: How the query came (the command and, for a pipeline, the stage)
    origin: str = ""


def _fields(filter: Mapping[str, Any]) -> tuple[dict[str, str], list[Any]]:
    """Return the top-level fields ("point" or "range") and the ``$or`` lists."""
    fields: dict[str, str] = {}
    ors: list[Any] = []
    for key, condition in filter.items():
        if key == "$and":
            for part in condition:
                more, more_ors = _fields(part)
                for field, kind in more.items():
                    fields[field] = (
                        "point" if "point" in (kind, fields.get(field)) else kind
                    )
                ors += more_ors
        elif key == "$or":
            ors.append(condition)
        elif key.startswith("$"):
            continue  # $expr and the like: checked on documents, constrain nothing
        elif isinstance(condition, Mapping) and any(
            k.startswith("$") for k in condition
        ):
            operators = set(condition)
            fields[key] = "point" if operators & _POINT_OPERATORS else "range"
        else:
            fields[key] = "point"

    return fields, ors


def _served_by(
    fields: Mapping[str, str],
    sort: Sequence[tuple[str, int]],
    key: Sequence[tuple[str, Any]],
) -> bool:
    names = [name for name, _ in key]
    if not names or names[0] not in fields:
        return False

    prefix = 0
    while prefix < len(names) and fields.get(names[prefix]) == "point":
        prefix += 1

    wanted = [
        (name, direction) for name, direction in sort if fields.get(name) != "point"
    ]
    if not wanted:
        return True

    following = list(key[prefix : prefix + len(wanted)])
    if [name for name, _ in following] != [name for name, _ in wanted]:
        return False

    same = [int(d) == int(w) for (_, d), (_, w) in zip(following, wanted, strict=True)]
    return all(same) or not any(same)


def served(query: Query, indexes: Iterable[Sequence[tuple[str, Any]]]) -> bool:
    """Tell whether one of ``indexes`` (their keys) serves ``query``."""
    keys = list(indexes)
    fields, ors = _fields(query.filter)
    if any(_served_by(fields, query.sort, key) for key in keys):
        return True

    if not ors:
        return False

    # One $or whose every branch is served, with the conditions beside it (the
    # server checks any other $or on the keys or documents it reads)
    return any(_all_branches_served(branches, fields, query, keys) for branches in ors)


def _all_branches_served(
    branches: Sequence[Mapping[str, Any]],
    fields: Mapping[str, str],
    query: Query,
    keys: Sequence[Sequence[tuple[str, Any]]],
) -> bool:
    for branch in branches:
        merged, _ = _fields(branch)
        merged.update({k: v for k, v in fields.items() if k not in merged})
        if not any(_served_by(merged, query.sort, key) for key in keys):
            return False

    return True


def queries_of(command_name: str, command: Mapping[str, Any]) -> list[Query]:
    """Return the queries a command carries (none for inserts, handshakes ...)."""
    target = command.get(command_name)
    if not isinstance(target, str):
        return []

    if command_name == "find":
        sort = list((command.get("sort") or {}).items())
        return [Query(target, command.get("filter") or {}, sort, "find")]

    if command_name in ("update", "delete"):
        statements = command.get("updates" if command_name == "update" else "deletes")
        return [
            Query(target, s.get("q") or {}, (), command_name) for s in statements or ()
        ]

    if command_name == "findAndModify":
        sort = list((command.get("sort") or {}).items())
        return [Query(target, command.get("query") or {}, sort, command_name)]

    if command_name in ("distinct", "count"):
        return [Query(target, command.get("query") or {}, (), command_name)]

    if command_name == "aggregate":
        return _pipeline_queries(target, command.get("pipeline") or [], "aggregate")

    return []


def _pipeline_queries(
    collection: str, pipeline: Sequence[Mapping[str, Any]], origin: str
) -> list[Query]:
    """The first ``$match`` (and ``$sort``) of a pipeline, and of its unions."""
    queries: list[Query] = []
    if pipeline and "$match" in pipeline[0]:
        sort: list[tuple[str, int]] = []
        if len(pipeline) > 1 and "$sort" in pipeline[1]:
            sort = list(pipeline[1]["$sort"].items())

        queries.append(Query(collection, pipeline[0]["$match"], sort, origin))
    elif not any("$changeStream" in stage for stage in pipeline):
        queries.append(Query(collection, {}, (), f"{origin} without $match"))

    for stage in pipeline:
        if "$unionWith" in stage:
            union = stage["$unionWith"]
            queries += _pipeline_queries(
                union["coll"], union.get("pipeline") or [], "union"
            )
        elif "$lookup" in stage and "foreignField" in stage["$lookup"]:
            lookup = stage["$lookup"]
            queries.append(
                Query(
                    lookup["from"], {lookup["foreignField"]: {"$in": []}}, (), "lookup"
                )
            )

    return queries
