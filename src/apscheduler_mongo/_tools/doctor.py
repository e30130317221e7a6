"""
What ``apscheduler-mongo doctor`` checks: is the deployment set up right?

Each check reads what it needs from the server (one command or query each; the
majority-write check writes and deletes one probe document) and says ``ok``,
``warn``, ``fail`` or ``unknown`` (it could not tell: a command this user may not
run, say), with what it found and, unless ``ok``, how to fix it. Nothing stored is
deserialized (the database is untrusted input): records are read field by field.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

import attrs
from bson import Timestamp
from pymongo import IndexModel
from pymongo.errors import OperationFailure, PyMongoError, WriteConcernError

from .. import _layout as layout
from .._adapters import Adapter
from .._client import redact
from .._clock import ServerClock
from .._layout import Document
from .status import Reader, format_table, live_schedulers, offset_text, when

Status = Literal["ok", "warn", "fail", "unknown"]

#: A host whose clock is further off than this (seconds) gets a warning: leases
#: are judged by the server's clock, but APScheduler computes fire times by the
#: host's
CLOCK_LIMIT = 1.0
#: An oplog window shorter than this gets a warning (seconds)
OPLOG_WINDOW_LIMIT = 3600.0
#: What a scheduler's database user needs on each of the store's collections (see
#: the privileges table of the Deployment page)
NEEDED_ACTIONS = frozenset(
    {"find", "insert", "update", "remove", "listIndexes", "createIndex", "dropIndex"}
)
#: The store's collections, which the user needs those actions on
STORE_COLLECTIONS = (
    layout.TASKS,
    layout.SCHEDULES,
    layout.JOBS,
    layout.SCHEDULERS,
    layout.HISTORY,
)
#: The server's code for a command this user may not run
UNAUTHORIZED = 13
#: The probe document of the majority-write check (in the ``schedulers``
#: collection, never listed: it has no ``expires``)
PROBE_ID = "apscheduler-mongo doctor probe"


@attrs.frozen
class Check:
    """One line of the checklist."""

    name: str
    status: Status
    #: What was found
    detail: str
    #: What to do, unless the check passed
    fix: str = ""


@attrs.frozen
class Diagnosis:
    database: str
    hosts: list[str]
    checks: list[Check]

    def healthy(self, *, strict: bool = False) -> bool:
        """Tell whether no check failed (with ``strict``: nor warned)."""
        bad = {"fail", "warn"} if strict else {"fail"}
        return not any(check.status in bad for check in self.checks)


@attrs.define
class _Doctor:
    reader: Reader
    adapter: Adapter
    events_collection: str
    hello: Document = attrs.field(factory=dict)

    async def _command(self, database: str, command: Mapping[str, Any]) -> Document:
        reply = await self.adapter.command(database, command)
        return reply or {}

    async def server(self) -> Check:
        self.hello = await self._command(self.reader.database_name, {"hello": 1})
        if not self.hello:
            return Check("server", "unknown", "an in-process fake: no server")

        build = await self._command("admin", {"buildInfo": 1})
        version = build.get("version", "?")
        if self.hello.get("msg") == "isdbgrid":
            return Check("server", "ok", f"MongoDB {version}, sharded cluster (mongos)")

        if "setName" in self.hello:
            members = len(self.hello.get("hosts", []))
            return Check(
                "server",
                "ok",
                f"MongoDB {version}, replica set {self.hello['setName']!r} "
                f"({members} data-bearing member(s) listed)",
            )

        return Check(
            "server",
            "warn",
            f"MongoDB {version}, a standalone server: no change streams, and a "
            "write acknowledged by it alone is lost if the server is",
            "run a replica set (a single member will do for change streams; three "
            "for writes that survive a lost server)",
        )

    async def change_streams(self) -> Check:
        if not self.hello:
            return Check("change streams", "unknown", "an in-process fake: no server")

        events = self.adapter.collection(
            self.reader.database_name, self.events_collection
        )
        try:
            stream = await events.watch([], None, None)
            await stream.close()
        except OperationFailure as exc:
            if exc.code == UNAUTHORIZED:
                return Check(
                    "change streams",
                    "warn",
                    f"not allowed to this user ({_short(exc)}): the event broker "
                    "cannot follow a change stream",
                    "grant the changeStream action (readWrite includes it), or set "
                    "the broker's mode='polling'",
                )
            return _no_change_streams(exc)
        except NotImplementedError as exc:
            return _no_change_streams(exc)

        return Check("change streams", "ok", "available to the event broker")

    async def majority_writes(self) -> Check:
        # w="majority" even where the client's URI asks for less
        probe = self.adapter.collection(
            self.reader.database_name, layout.SCHEDULERS, majority=True
        )
        try:
            await probe.update_one(
                {"_id": PROBE_ID}, {"$set": {"probe": True}}, upsert=True
            )
            await probe.delete_one({"_id": PROBE_ID})
        except WriteConcernError as exc:
            return Check(
                "majority writes",
                "fail",
                f"not acknowledged by a majority: {_short(exc)}",
                "bring enough data-bearing members up (an arbiter does not count); "
                "the store writes with w='majority'",
            )

        return Check("majority writes", "ok", "a write was acknowledged by a majority")

    async def indexes(self) -> Check:
        wanted: dict[str, Sequence[IndexModel]] = {
            layout.SCHEDULES: layout.SCHEDULE_INDEXES,
            layout.JOBS: layout.JOB_INDEXES,
            layout.SCHEDULERS: layout.SCHEDULER_INDEXES,
            self.events_collection: layout.event_indexes(600),
        }
        names = set(await self.reader.collection_names())
        problems: list[str] = []
        for collection, models in wanted.items():
            if collection == self.events_collection and collection not in names:
                continue  # no MongoDBEventBroker on this database

            have = {
                str(index.get("name")): dict(index.get("key", {}))
                for index in await self.adapter.collection(
                    self.reader.database_name, collection
                ).list_indexes()
            }
            for model in models:
                name = model.document["name"]
                key = dict(model.document["key"])
                if name not in have:
                    problems.append(f"{collection}: {name} missing")
                elif have[name] != key:
                    problems.append(f"{collection}: {name} differs")

        if problems:
            return Check(
                "indexes",
                "fail",
                "; ".join(problems),
                "start a scheduler with this version of apscheduler-mongo on the "
                "database: the store builds its indexes when it starts",
            )

        return Check("indexes", "ok", "every index the store's queries use is there")

    async def schedulers(self, clock: ServerClock) -> Check:
        now = clock.now_datetime()
        rows = await live_schedulers(self.reader, now)
        if not rows:
            return Check(
                "schedulers",
                "warn",
                "no scheduler is running on this store",
                "start one (nothing runs the store's jobs until one does)",
            )

        off = [
            f"{row.host or '?'} (pid {row.pid}): {offset_text(row.clock_offset)}"
            for row in rows
            if row.clock_offset is not None and abs(row.clock_offset) > CLOCK_LIMIT
        ]
        quiet = [
            f"{row.host or '?'} (pid {row.pid}): last heartbeat "
            f"{when(row.heartbeat, now)}, its leases lapse "
            f"{when(row.leases_until, now, lease=True)}"
            for row in rows
            if row.quiet
        ]
        live = len(rows) - len(quiet)
        detail = f"{live} live, {len(quiet)} gone quiet"
        if quiet:
            return Check(
                "schedulers",
                "warn",
                f"{detail}: {'; '.join(quiet)}",
                "check those processes; their work passes to the others when their "
                "leases lapse",
            )

        if off:
            return Check(
                "schedulers",
                "warn",
                f"{detail}; clocks off the server's by over {CLOCK_LIMIT:g} s: "
                + "; ".join(off),
                "synchronise those hosts' clocks (NTP, chrony): APScheduler "
                "computes fire times by the host's clock",
            )

        return Check(
            "schedulers", "ok", f"{detail}, every clock within {CLOCK_LIMIT:g} s"
        )

    async def oplog(self) -> Check:
        if "setName" not in self.hello:
            return Check("oplog", "ok", "not a replica set member: no oplog to check")

        oplog = self.adapter.collection("local", "oplog.rs")
        first = await oplog.find({}, {"ts": 1}, sort=[("$natural", 1)], limit=1)
        last = await oplog.find({}, {"ts": 1}, sort=[("$natural", -1)], limit=1)
        stamps = [
            stamp
            for doc in (*first, *last)
            if isinstance(stamp := doc.get("ts"), Timestamp)
        ]
        if len(stamps) != 2:
            return Check("oplog", "unknown", "could not read the oplog's ends")

        window = float(stamps[1].time - stamps[0].time)
        kept = await self._events_kept()
        detail = f"window {timedelta(seconds=round(window))}" + (
            "" if kept is None else f"; events kept {timedelta(seconds=kept)}"
        )
        if window < OPLOG_WINDOW_LIMIT:
            return Check(
                "oplog",
                "warn",
                f"{detail}: a broker's change stream cut off for longer than the "
                "window cannot resume; it catches up from the events collection, "
                "which holds events only as long as they are kept",
                "make the oplog larger (replSetResizeOplog)",
            )

        return Check("oplog", "ok", detail)

    async def _events_kept(self) -> int | None:
        """Return the events' time to live (seconds), from the broker's TTL index."""
        events = self.adapter.collection(
            self.reader.database_name, self.events_collection
        )
        for index in await events.list_indexes():
            seconds = index.get("expireAfterSeconds")
            if index.get("name") == "at" and isinstance(seconds, int):
                return seconds

        return None

    async def privileges(self) -> Check:
        status = await self._command(
            "admin", {"connectionStatus": 1, "showPrivileges": True}
        )
        info = status.get("authInfo", {})
        if not info.get("authenticatedUsers"):
            return Check(
                "privileges",
                "warn",
                "not authenticated: whoever reaches the server can write the "
                "database, and what it holds decides what schedulers run",
                "turn access control on, and give each process a user with only "
                "the roles it needs (see the Security page)",
            )

        database = self.reader.database_name
        granted = {name: set[str]() for name in STORE_COLLECTIONS}
        for privilege in info.get("authenticatedUserPrivileges", []):
            resource = privilege.get("resource", {})
            actions = set(privilege.get("actions", []))
            if resource.get("db") not in (database, ""):
                continue

            for name in STORE_COLLECTIONS:
                if resource.get("collection") in ("", name):
                    granted[name] |= actions

        missing = {
            name: sorted(NEEDED_ACTIONS - actions)
            for name, actions in granted.items()
            if NEEDED_ACTIONS - actions
        }
        if missing:
            lacks = "; ".join(
                f"{', '.join(actions)} on {name}" for name, actions in missing.items()
            )
            return Check(
                "privileges",
                "fail",
                f"in {database!r}, the user may not {lacks}",
                "grant the readWrite role on the database to schedulers' users "
                "(see the privileges on the Deployment page)",
            )

        return Check("privileges", "ok", f"the user can read and write {database!r}")

    async def signing(self) -> Check:
        tasks = await self.reader.find(
            layout.TASKS, {}, {layout.MAC_FIELD: 1}, sort=layout.BY_ID, limit=1
        )
        if not tasks:
            return Check("signing", "unknown", "no task stored yet")

        if layout.MAC_FIELD in tasks[0]:
            return Check("signing", "ok", "the tasks carry signatures")

        return Check(
            "signing",
            "warn",
            "the tasks carry no signature: whoever can write the database can make "
            "every scheduler import and run code of their choosing",
            "set signing_key on every store and run 'apscheduler-mongo sign "
            "--adopt-unsigned' (see the Security page)",
        )

    async def sharding(self) -> Check:
        if self.hello.get("msg") != "isdbgrid":
            return Check("sharding", "ok", "not a sharded cluster")

        database = self.reader.database_name
        namespaces = [
            f"{database}.{name}"
            for name in (layout.TASKS, layout.SCHEDULES, layout.JOBS, layout.SCHEDULERS)
        ]
        config = self.adapter.collection("config", "collections")
        sharded = await config.find(
            {"_id": {"$in": namespaces}, "dropped": {"$ne": True}}, {"_id": 1}
        )
        if sharded:
            names = ", ".join(str(doc["_id"]) for doc in sharded)
            return Check(
                "sharding",
                "fail",
                f"sharded: {names}",
                "keep the store's collections unsharded (see 'Sharded clusters' on "
                "the Deployment page): move them to an unsharded database",
            )

        return Check("sharding", "ok", "the store's collections are unsharded")


async def _run(name: str, check: Callable[[], Awaitable[Check]]) -> Check:
    """Run one check; a refusal or a failure makes it ``unknown``, saying why."""
    try:
        return await check()
    except PyMongoError as exc:  # not allowed to ask, say
        return Check(name, "unknown", f"could not tell: {_short(exc)}")


def _no_change_streams(exc: BaseException) -> Check:
    return Check(
        "change streams",
        "warn",
        f"unavailable ({_short(exc)}): MongoDBEventBroker polls instead "
        "(mode='auto'), at poll_interval",
        "run a replica set or a sharded cluster for change streams",
    )


def _short(exc: BaseException) -> str:
    """Say what went wrong in a line: the server's own message, if it sent one."""
    details = exc.details if isinstance(exc, OperationFailure) else None
    message = details.get("errmsg") if isinstance(details, Mapping) else None
    return redact(str(message or exc)).split("\n")[0][:200]


async def diagnose(
    reader: Reader, adapter: Adapter, events_collection: str = "events"
) -> Diagnosis:
    """
    Run every check on the reader's database; return the checklist.

    :raises NotFoundError: if the database holds no store
    """
    from .status import require_store

    await require_store(reader)
    doctor = _Doctor(reader, adapter, events_collection)
    checks = [await _run("server", doctor.server)]
    clock = await reader.server_clock()
    for name, check in (
        ("change streams", doctor.change_streams),
        ("majority writes", doctor.majority_writes),
        ("indexes", doctor.indexes),
        ("schedulers", lambda: doctor.schedulers(clock)),
        ("oplog", doctor.oplog),
        ("privileges", doctor.privileges),
        ("signing", doctor.signing),
        ("sharding", doctor.sharding),
    ):
        checks.append(await _run(name, check))

    this_host = clock.measured_offset()
    if this_host is not None and abs(this_host) > CLOCK_LIMIT:
        checks.append(
            Check(
                "this host's clock",
                "warn",
                offset_text(this_host),
                "synchronise this host's clock (NTP, chrony)",
            )
        )

    return Diagnosis(reader.database_name, adapter.hosts(), checks)


def render_text(diagnosis: Diagnosis) -> str:
    """Return the checklist as lines: status, check, what was found, the fix."""
    rows = []
    for check in diagnosis.checks:
        rows.append([check.status.upper(), check.name, check.detail])
        if check.fix:
            rows.append(["", "", f"fix: {check.fix}"])

    header = f"Store in database {diagnosis.database!r} at {', '.join(diagnosis.hosts)}"
    return f"{header}\n\n{format_table(['STATUS', 'CHECK', 'FOUND'], rows)}\n"


def render_json(diagnosis: Diagnosis, *, strict: bool = False) -> str:
    document = attrs.asdict(diagnosis)
    document["healthy"] = diagnosis.healthy(strict=strict)
    return json.dumps(document, indent=2, default=_json_default) + "\n"


def _json_default(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else str(value)
