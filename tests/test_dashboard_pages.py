"""
The dashboard's pages beyond the overview: live schedulers, finding jobs (filters,
id prefixes, paging), filtering schedules, and what a page costs at scale.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from apscheduler import ConflictPolicy, Job, JobOutcome, JobResult, Schedule
from apscheduler.triggers.cron import CronTrigger
from bson import Binary
from pymongo.errors import OperationFailure

from apscheduler_mongo import MongoDBDataStore
from apscheduler_mongo._marshalling import to_micros, uuid_from_bson
from apscheduler_mongo._tools.status import Reader
from apscheduler_mongo.dashboard import Dashboard, _audit
from apscheduler_mongo.dashboard._app import ACTIONS

from .support.commands import CommandLog
from .support.hostile import system_gadget
from .support.index_rules import queries_of, served
from .support.items import add_task
from .support.tiers import IN_PROCESS_ONLY, WIRE_ONLY
from .test_dashboard import (
    HOSTILE,
    _add_schedules,
    _decodes,
    _page_commands,
    _token,
    browsing,
)

pytestmark = pytest.mark.anyio


def _rows(page: str, kind: str) -> list[str]:
    return re.findall(rf'<tr data-{kind}="([^"]*)"', page)


async def _release(
    store: MongoDBDataStore, job: Job, outcome: JobOutcome, owner: str = "w"
) -> None:
    await store.release_job(
        owner,
        job,
        JobResult.from_job(
            job,
            outcome,
            exception=ValueError("boom") if outcome is JobOutcome.error else None,
        ),
    )


def _job(task_id: str = "task", **options: Any) -> Job:
    return Job(
        task_id=task_id,
        executor="async",
        result_expiration_time=timedelta(hours=1),
        **options,
    )


class TestSchedulers:
    async def test_live_and_quiet(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        """The live store's record is listed; a record whose heartbeat is old is
        flagged gone quiet, with when its leases lapse; stored text is escaped."""
        await add_task(store)
        now = datetime.now(timezone.utc)
        await client[database_name]["schedulers"].insert_one(
            {
                "_id": "quiet-one",
                "schedulers": [HOSTILE],
                "host": HOSTILE,
                "pid": 4242,
                "started": to_micros(now - timedelta(hours=1)),
                "heartbeat": to_micros(now - timedelta(minutes=5)),
                "interval": 10.0,
                "clock_offset": 0.2,
                "schedules_held": 2,
                "jobs_held": 1,
                "leases_until": to_micros(now + timedelta(minutes=1)),
                "expires": now + timedelta(minutes=10),
            }
        )
        async with browsing(Dashboard(client, database=database_name)) as http:
            reply = await http.get("/schedulers")

        page = reply.text
        assert reply.status_code == 200
        assert 'aria-current="page">Schedulers' in page
        rows = _rows(page, "scheduler")
        assert "quiet-one" in rows
        assert len(rows) == 2  # the test's own store registered too
        quiet = page[page.index('data-scheduler="quiet-one"') :].split("</tr>")[0]
        assert 'class="quiet"' in quiet
        assert "gone quiet, its leases lapse" in quiet
        assert "2 schedules, 1 jobs" in quiet
        assert "4242" in quiet
        assert HOSTILE not in page
        assert "&lt;script&gt;" in quiet
        live = page[page.index('class="alive"') :].split("</tr>")[0]
        assert ">live<" in live


class TestFindingJobs:
    async def test_states_tasks_outcomes_and_paging(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(store)
        await add_task(store, task_id="other")
        queued = [_job() for _ in range(5)]
        for job in queued:
            await store.add_job(job)

        other = _job("other")
        await store.add_job(other)
        dashboard = Dashboard(client, database=database_name, page_size=2)
        async with browsing(dashboard) as http:
            # Queued jobs, in queue order, two a page
            first = (await http.get("/jobs")).text
            assert _rows(first, "job") == [str(queued[0].id), str(queued[1].id)]
            following = re.search(r'href="(/jobs\?[^"]*after=[^"]*)" data-page', first)
            assert following
            second = (await http.get(following[1].replace("&amp;", "&"))).text
            assert _rows(second, "job") == [str(queued[2].id), str(queued[3].id)]

            # One task's
            only = (await http.get("/jobs", params={"task": "other"})).text
            assert _rows(only, "job") == [str(other.id)]

            # Running and finished, newest first, by outcome
            taken = await store.acquire_jobs("w", timedelta(minutes=5), 3)
            assert [job.id for job in taken] == [job.id for job in queued[:3]]
            await _release(store, taken[0], JobOutcome.success)
            await _release(store, taken[1], JobOutcome.error)
            seen = (await http.get("/jobs", params={"state": "running"})).text
            assert _rows(seen, "job") == [str(queued[2].id)]
            finished = (await http.get("/jobs", params={"state": "finished"})).text
            assert _rows(finished, "job") == [str(queued[1].id), str(queued[0].id)]
            failed = (
                await http.get(
                    "/jobs", params={"state": "finished", "outcome": "error"}
                )
            ).text
            assert _rows(failed, "job") == [str(queued[1].id)]

            # The fragment a live update fetches is the panels only
            fragment = await http.get(
                "/jobs",
                params={"state": "running"},
                headers={"x-dashboard-fragment": "1"},
            )
            assert "<html" not in fragment.text
            assert _rows(fragment.text, "job") == [str(queued[2].id)]

    async def test_id_prefix(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        """A prefix finds the jobs whose id starts with it, in any state, with or
        without dashes, in any case; an odd number of digits too."""
        await add_task(store)
        ids = [
            UUID("3fa85f64-5717-4562-b3fc-2c963f66afa6"),
            UUID("3fa8ffff-0000-4000-8000-000000000000"),
            UUID("3fb00000-0000-4000-8000-000000000000"),
            UUID("ffffffff-ffff-4fff-bfff-ffffffffffff"),
        ]
        for job_id in ids:
            await store.add_job(_job(id=job_id))

        async with browsing(Dashboard(client, database=database_name)) as http:
            found = {
                prefix: _rows(
                    (await http.get("/jobs", params={"id": prefix})).text, "job"
                )
                for prefix in ("3fa8", "3FA85F64-57", "3f", "3fb", "f", "0", "3fa85")
            }

        assert found == {
            "3fa8": [str(ids[0]), str(ids[1])],
            "3FA85F64-57": [str(ids[0])],
            "3f": [str(ids[0]), str(ids[1]), str(ids[2])],
            "3fb": [str(ids[2])],
            "f": [str(ids[3])],
            "0": [],
            "3fa85": [str(ids[0])],
        }

    @pytest.mark.parametrize(
        "params",
        [
            pytest.param({"state": "lost"}, id="state"),
            pytest.param({"state": "finished", "outcome": "exploded"}, id="outcome"),
            pytest.param(
                {"state": "queued", "outcome": "error"}, id="outcome of queued"
            ),
            pytest.param({"id": "xyz"}, id="prefix"),
            pytest.param({"id": "0" * 33}, id="long prefix"),
            pytest.param({"after": "12.zz"}, id="page"),
            pytest.param({"after": f"{2**63}.{'0' * 32}"}, id="page past int64"),
            pytest.param({"task": "t" * 201}, id="long task"),
        ],
    )
    async def test_bad_filters_refused(
        self,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
        params: dict[str, str],
    ) -> None:
        await add_task(store)
        async with browsing(Dashboard(client, database=database_name)) as http:
            reply = await http.get("/jobs", params={**params, "x": HOSTILE})

        assert reply.status_code == 400
        assert reply.text.startswith("Cannot show that: ")
        assert reply.headers["content-type"].startswith("text/plain")

    async def test_stored_fields_escaped(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(store, task_id=HOSTILE)
        job = _job(HOSTILE)
        await store.add_job(job)
        async with browsing(Dashboard(client, database=database_name)) as http:
            page = (await http.get("/jobs", params={"task": HOSTILE})).text

        assert _rows(page, "job") == [str(job.id)]
        assert HOSTILE not in page
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page

    async def test_hostile_job_documents(
        self, tier: str, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        """Jobs with wrong types in every shown field are listed, each field shown
        as unknown or as text, and the page still answers."""
        await add_task(store)
        await client[database_name]["jobs"].insert_many(
            [
                {
                    "_id": Binary.from_uuid(uuid4()),
                    "state": "queued",
                    "created_at": 1,
                    "task_id": {"$gt": HOSTILE},
                    "schedule_id": [HOSTILE],
                    "scheduled_fire_time": "soon",
                    "acquired_by": 5,
                },
                {"_id": HOSTILE, "state": "queued", "created_at": 2},
            ]
        )
        short = {"_id": Binary(b"short", 4), "state": "queued", "created_at": "x"}
        # pymongo before 4.19 refuses to decode such a binary at all (InvalidBSON,
        # from inside the driver): no reader can show it there
        short_uuids = tier == "mongomock" or _decodes(short)
        if short_uuids:
            await client[database_name]["jobs"].insert_one(short)

        async with browsing(Dashboard(client, database=database_name)) as http:
            reply = await http.get("/jobs")

        assert reply.status_code == 200
        assert len(_rows(reply.text, "job")) == (3 if short_uuids else 2)
        assert HOSTILE not in reply.text


class TestFilteringSchedules:
    async def test_by_task_and_prefix_with_paging(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(store)
        await add_task(store, task_id="other")
        await _add_schedules(store, "a-1", "a-2", "a-3", "b-1")
        for schedule_id in ("a-4", "c-1"):
            await _add_schedules(store, schedule_id)
            await client[database_name]["schedules"].update_one(
                {"_id": schedule_id}, {"$set": {"task_id": "other"}}
            )

        dashboard = Dashboard(client, database=database_name, page_size=2)
        async with browsing(dashboard) as http:
            prefixed = (await http.get("/", params={"id": "a-"})).text
            assert _rows(prefixed, "schedule") == ["a-1", "a-2"]
            following = re.search(r'href="(/\?[^"]*after=[^"]*)" data-page', prefixed)
            assert following
            assert "id=a-" in following[1]
            rest = (await http.get(following[1].replace("&amp;", "&"))).text
            assert _rows(rest, "schedule") == ["a-3", "a-4"]

            tasks = (await http.get("/", params={"task": "other"})).text
            assert _rows(tasks, "schedule") == ["a-4", "c-1"]
            both = (await http.get("/", params={"task": "other", "id": "a"})).text
            assert _rows(both, "schedule") == ["a-4"]
            nothing = (await http.get("/", params={"id": "zz"})).text
            assert _rows(nothing, "schedule") == []
            # The last character before the surrogates: its range ends past them
            edge = await http.get("/", params={"id": "\ud7ff"})
            assert edge.status_code == 200 and _rows(edge.text, "schedule") == []
            assert 'href="/schedule?id=a-4"' in tasks


class TestSchedulePage:
    async def test_trigger_in_words_and_next_fire_times(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(store)
        trigger = CronTrigger.from_crontab("0 9 * * mon-fri", timezone="Europe/Berlin")
        schedule_id = f"weekday {HOSTILE}"
        first = trigger.next()
        assert first is not None
        arguments: dict[str, Any] = {"args": ("report",)}
        await store.add_schedule(
            Schedule(
                id=schedule_id,
                task_id="task",
                trigger=trigger,
                next_fire_time=first,
                **arguments,
                misfire_grace_time=timedelta(minutes=5),
                job_executor="async",
            ),
            ConflictPolicy.exception,
        )
        expected = [trigger.next() for _ in range(9)]
        assert None not in expected
        async with browsing(Dashboard(client, database=database_name)) as http:
            reply = await http.get("/schedule", params={"id": schedule_id})
            missing = await http.get("/schedule?id=gone")

        page = reply.text
        assert reply.status_code == 200
        assert HOSTILE not in page
        assert "weekday &lt;script&gt;" in page
        assert "Monday to Friday" in page and "09:00" in page
        assert "Europe/Berlin" in page
        times = re.findall(r"<li>(\S+ \S+) \(in ", page)
        assert len(times) == 10
        assert times[1:] == [
            moment.isoformat(sep=" ", timespec="seconds")
            for moment in expected
            if moment is not None
        ]
        assert "0:05:00" in page  # the misfire grace time
        assert "&#39;report&#39;" in page
        assert missing.status_code == 404
        assert "No schedule gone" in missing.text

    async def test_hostile_trigger_runs_nothing(
        self,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
        tmp_path: Path,
    ) -> None:
        """A trigger that would run a command if unpickled is shown as text, with
        why it has no fire times; the command never runs."""
        await add_task(store)
        await _add_schedules(store, "s")
        marker = tmp_path / "ran"
        await client[database_name]["schedules"].update_one(
            {"_id": "s"}, {"$set": {"trigger": system_gadget(marker)}}
        )
        async with browsing(Dashboard(client, database=database_name)) as http:
            reply = await http.get("/schedule?id=s")

        assert reply.status_code == 200
        assert "system(" in reply.text
        assert "not as a trigger" in reply.text
        assert "<li>" not in reply.text
        assert not marker.exists()


class TestJobPage:
    async def test_failed_job_traceback_and_retry(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        """A failed job's page shows its arguments, error and traceback (escaped);
        retrying adds a new job of the same task with the same arguments."""
        await add_task(store)
        arguments: dict[str, Any] = {"args": (HOSTILE,)}
        failed = Job(task_id="task", executor="async", **arguments)
        await store.add_job(failed)
        [taken] = await store.acquire_jobs("w", timedelta(minutes=5), 1)
        try:
            raise RuntimeError(f"disk {HOSTILE} full")
        except RuntimeError as exc:
            error = exc

        await store.release_job(
            "w", taken, JobResult.from_job(taken, JobOutcome.error, exception=error)
        )
        dashboard = Dashboard(client, database=database_name, actions=True)
        async with browsing(dashboard) as http:
            page = await http.get(f"/job?id={failed.id}")
            form = {"csrf_token": _token(page.text), "job_id": str(failed.id)}
            retried = await http.post(
                "/actions/retry", data=form, headers={"accept": "application/json"}
            )
            again = await http.post(
                "/actions/cancel", data=form, headers={"accept": "application/json"}
            )
            missing = await http.get(f"/job?id={uuid4()}")
            malformed = await http.get("/job?id=not-a-job")

        assert page.status_code == 200
        assert HOSTILE not in page.text
        assert '<pre class="traceback">Traceback (most recent call last):' in page.text
        assert "RuntimeError: disk &lt;script&gt;" in page.text
        assert 'class="retry"' in page.text and 'class="cancel"' not in page.text
        message = retried.json()["message"]
        assert retried.status_code == 200, message
        new_id = UUID(message.split()[-1])
        [new] = await store.get_jobs([new_id])
        assert (new.task_id, new.args) == ("task", (HOSTILE,))
        assert again.status_code == 409  # a finished job cannot be cancelled
        assert missing.status_code == 404 and "No job" in missing.text
        assert malformed.status_code == 404

    async def test_cancel_a_queued_job(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(store)
        queued = _job()
        await store.add_job(queued)
        dashboard = Dashboard(client, database=database_name, actions=True)
        async with browsing(dashboard) as http:
            page = await http.get(f"/job?id={queued.id}")
            assert 'class="cancel"' in page.text and 'class="retry"' not in page.text
            reply = await http.post(
                "/actions/cancel",
                data={"csrf_token": _token(page.text), "job_id": str(queued.id)},
                headers={"accept": "application/json"},
            )
            after = (await http.get(f"/job?id={queued.id}")).text

        assert reply.status_code == 200, reply.text
        assert 'data-outcome="cancelled"' in after
        assert not await store.acquire_jobs("w", timedelta(minutes=5), 10)

    async def test_run_now_from_the_schedule_page(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        await add_task(store)
        await _add_schedules(store, "nightly", args=("report",))
        [before] = await store.get_schedules({"nightly"})
        dashboard = Dashboard(client, database=database_name, actions=True)
        async with browsing(dashboard) as http:
            page = await http.get("/schedule?id=nightly")
            assert 'class="run-now"' in page.text
            reply = await http.post(
                "/actions/run-now",
                data={"csrf_token": _token(page.text), "schedule_id": "nightly"},
                headers={"accept": "application/json"},
            )
            queued = (await http.get("/schedule?id=nightly")).text
            [job] = await store.acquire_jobs("w", timedelta(minutes=5), 10)
            running = (await http.get("/schedule?id=nightly")).text
            await _release(store, job, JobOutcome.error)
            after = (await http.get("/schedule?id=nightly")).text

        assert reply.status_code == 200, reply.text
        assert (job.schedule_id, job.args) == ("nightly", ("report",))
        assert _rows(queued, "live") == _rows(running, "live") == [str(job.id)]
        assert '<td class="state">running</td>' in running
        # Once finished: among the last runs (a failure's record is kept a day)
        assert _rows(after, "live") == []
        assert _rows(after, "run") == [str(job.id)]
        assert "run now or retried" in after
        [schedule] = await store.get_schedules({"nightly"})
        assert schedule.next_fire_time == before.next_fire_time


class TestAudit:
    async def test_each_action_recorded(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        """Who asked for what, when, from where and how it ended; shown escaped,
        newest first, and expiring by the server's TTL."""
        await add_task(store)
        await _add_schedules(store, "s")
        dashboard = Dashboard(
            client,
            database=database_name,
            actions=True,
            identify=lambda request: request.headers.get("x-operator"),
            audit_retention=timedelta(days=7),
        )
        json = {"accept": "application/json"}
        async with browsing(dashboard) as http:
            token = _token((await http.get("/")).text)
            form = {"csrf_token": token, "schedule_id": "s"}
            who = {**json, "x-operator": HOSTILE}
            assert (
                await http.post("/actions/pause", data=form, headers=who)
            ).is_success
            missing = {**form, "schedule_id": "gone"}
            refused = await http.post("/actions/remove", data=missing, headers=json)
            assert refused.status_code == 404
            page = (await http.get("/audit")).text

        records = await client[database_name]["audit"].find({}).to_list(None)
        assert [(r["action"], r["target"], r["outcome"]) for r in records] == [
            ("pause", "s", "done"),
            ("remove", "gone", "failed"),
        ]
        paused, removed = records
        assert paused["who"] == HOSTILE and removed["who"] is None
        assert paused["message"] == "paused schedule 's'"
        assert "no schedule 'gone'" in removed["message"]
        assert paused["address"] == "127.0.0.1"
        kept = paused["expires"] - paused["at"]
        assert kept == timedelta(days=7)
        indexes = await client[database_name]["audit"].index_information()
        assert indexes["expires"]["expireAfterSeconds"] == 0
        assert _rows(page, "audit") == ["remove", "pause"]
        assert HOSTILE not in page
        assert "&lt;script&gt;" in page and "anonymous" in page

    async def test_target_is_what_the_action_acts_on(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        """A form's other fields cannot name another target in the record."""
        await add_task(store)
        await _add_schedules(store, "real")
        dashboard = Dashboard(client, database=database_name, actions=True)
        async with browsing(dashboard) as http:
            token = _token((await http.get("/")).text)
            form = {"csrf_token": token, "schedule_id": "real", "job_id": "decoy"}
            reply = await http.post("/actions/pause", data=form)
            assert reply.status_code == 303

        [record] = await client[database_name]["audit"].find({}).to_list(None)
        assert (record["action"], record["target"]) == ("pause", "real")

    async def test_said_only_what_the_dashboard_said(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        """After a plain form, the page says what was done; a link cannot make it
        say anything else."""
        await add_task(store)
        await _add_schedules(store, "s")
        dashboard = Dashboard(client, database=database_name, actions=True)
        async with browsing(dashboard) as http:
            token = _token((await http.get("/")).text)
            done = await http.post(
                "/actions/pause", data={"csrf_token": token, "schedule_id": "s"}
            )
            shown = (await http.get(done.headers["location"])).text
            forged = await http.get(
                "/", params={"said": "Session expired: log in at evil.example"}
            )
            resigned = await http.get(
                "/", params={"said": "Session expired", "sig": "0" * 64}
            )

        assert '<p id="said" role="status">paused schedule &#39;s&#39;</p>' in shown
        for reply in (forged, resigned):
            assert '<p id="said" role="status"></p>' in reply.text
            assert "Session expired" not in reply.text

    async def test_not_recorded_not_made(
        self,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """An action whose record cannot be written is not made."""

        async def unwritable(*_args: Any, **_kwargs: Any) -> None:
            raise OperationFailure("not authorized on audit", code=13)

        monkeypatch.setattr(_audit.Trail, "begin", unwritable)
        await add_task(store)
        await _add_schedules(store, "s")
        dashboard = Dashboard(client, database=database_name, actions=True)
        async with browsing(dashboard) as http:
            token = _token((await http.get("/")).text)
            reply = await http.post(
                "/actions/pause",
                data={"csrf_token": token, "schedule_id": "s"},
                headers={"accept": "application/json"},
            )

        assert reply.status_code == 503
        assert "not authorized on audit" in reply.json()["message"]
        assert not (await store.get_schedules({"s"}))[0].paused

    async def test_read_only_refuses_every_action(
        self, store: MongoDBDataStore, client: Any, database_name: str
    ) -> None:
        """Without ``actions``, every action is refused, nothing is recorded, and
        no page offers one."""
        await add_task(store)
        await _add_schedules(store, "s")
        async with browsing(Dashboard(client, database=database_name)) as http:
            pages = [(await http.get(path)).text for path in ("/", "/schedule?id=s")]
            replies = [
                await http.post(f"/actions/{name}", data={"schedule_id": "s"})
                for name in sorted(ACTIONS)
            ]

        assert [reply.status_code for reply in replies] == [403] * len(ACTIONS)
        assert all("actions are off" in reply.text for reply in replies)
        assert not any('method="post"' in page for page in pages)
        assert await client[database_name]["audit"].count_documents({}) == 0
        assert not (await store.get_schedules({"s"}))[0].paused


#: Every page of the dashboard, with filters that reach each query it can send
PAGES = {
    "overview": "/",
    "overview by task": "/?task=task&id=s-0",
    "schedulers": "/schedulers",
    "a schedule": "/schedule?id=s-00000",
    "audit": "/audit",
    "queued jobs": "/jobs",
    "finished errors": "/jobs?state=finished&outcome=error&task=task",
    "job id prefix": "/jobs?id=3fa8",
    "next page of jobs": f"/jobs?after={to_micros(datetime.now(timezone.utc))}."
    f"{'0' * 32}",
}


async def _grow(database: Any, schedule: Any, job: Any, have: int, total: int) -> None:
    """Copy a stored schedule and job until there are ``total`` of each."""
    for low in range(have, total, 500):
        numbers = range(low, min(low + 500, total))
        await database["schedules"].insert_many(
            [{**schedule, "_id": f"s-{n:05}"} for n in numbers]
        )
        await database["jobs"].insert_many(
            [
                {**job, "_id": Binary.from_uuid(uuid4()), "created_at": n}
                for n in numbers
            ]
        )


@pytest.mark.slow
class TestPageCost:
    @WIRE_ONLY
    async def test_every_query_served_by_an_index(
        self,
        store: MongoDBDataStore,
        logged_client: Any,
        command_log: CommandLog,
        database_name: str,
        figures: Any,
    ) -> None:
        """Each page costs the same commands with 10 schedules and jobs as with
        1,000, and every query it sends is served by an index (what keeps a real
        server's time flat; the stand-in uses none, and inserts too slowly for
        more)."""
        await add_task(store)
        await _add_schedules(store, "s-00000")
        await store.add_job(_job())
        database = logged_client[database_name]
        schedule = await database["schedules"].find_one({"_id": "s-00000"})
        job = await database["jobs"].find_one({})
        pages = {**PAGES, "a job": f"/job?id={uuid_from_bson(job['_id'])}"}
        costs: dict[int, dict[str, list[tuple[str, Any]]]] = {}
        have = 1
        async with browsing(Dashboard(logged_client, database=database_name)) as http:
            for total in (10, 1000):
                await _grow(database, schedule, job, have, total)
                have = total
                costs[total] = {}
                for name, path in pages.items():
                    start = len(command_log.commands)
                    reply = await http.get(path)
                    assert reply.status_code == 200, (name, reply.text)
                    costs[total][name] = _page_commands(command_log, start)

        indexes = {}
        for name in ("schedules", "jobs", "tasks", "schedulers", "history"):
            cursor = await database[name].list_indexes()
            indexes[name] = [
                list(index["key"].items()) for index in await cursor.to_list(None)
            ]

        for name in pages:
            small, large = costs[10][name], costs[1000][name]
            assert [n for n, _ in small] == [n for n, _ in large], name
            queries = [
                query for n, command in large for query in queries_of(n, command)
            ]
            unserved = [
                query
                for query in queries
                if query.filter and not served(query, indexes[query.collection])
            ]
            assert not unserved, (name, unserved)

        figures(
            "commands per page load, the same with 10 and 1,000 schedules and jobs "
            "(besides the driver's handshakes and one clock reading): "
            + ", ".join(f"{name} {len(costs[1000][name])}" for name in pages)
        )

    @IN_PROCESS_ONLY
    async def test_same_reads_at_ten_thousand(
        self,
        store: MongoDBDataStore,
        client: Any,
        database_name: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """In process, where 10,000 documents are quick to add: each page makes the
        same reads, and returns as many rows, with 10 and 10,000 of each."""
        reads: list[str] = []
        for method in ("find", "aggregate", "count", "estimated_count"):
            original = getattr(Reader, method)

            def counted(
                *args: Any,
                _original: Any = original,
                _name: str = method,
                **kwargs: Any,
            ) -> Any:
                if args[1] != "events":  # the live updates' own polls, not the page's
                    reads.append(f"{_name} {args[1]}")

                return _original(*args, **kwargs)

            monkeypatch.setattr(Reader, method, counted)

        await add_task(store)
        await _add_schedules(store, "s-00000")
        await store.add_job(_job())
        database = client[database_name]
        schedule = await database["schedules"].find_one({"_id": "s-00000"})
        job = await database["jobs"].find_one({})
        pages = {**PAGES, "a job": f"/job?id={uuid_from_bson(job['_id'])}"}
        seen: dict[int, dict[str, tuple[list[str], int]]] = {}
        have = 1
        async with browsing(Dashboard(client, database=database_name)) as http:
            for total in (10, 10_000):
                await _grow(database, schedule, job, have, total)
                have = total
                seen[total] = {}
                for name, path in pages.items():
                    del reads[:]
                    reply = await http.get(path)
                    assert reply.status_code == 200, (name, reply.text)
                    rows = len(re.findall(r"<tr data-", reply.text))
                    seen[total][name] = (list(reads), rows)

        for name in pages:
            assert seen[10][name][0] == seen[10_000][name][0], name
        assert seen[10_000]["overview"][1] > seen[10]["overview"][1]
        assert seen[10_000]["queued jobs"][1] == 100  # a page, however many
