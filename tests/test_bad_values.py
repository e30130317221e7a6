"""Hand-edited values of the wrong type never stop the scheduler (guarantee 8)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from apscheduler import ConflictPolicy, Job, Schedule, Task
from apscheduler.triggers.date import DateTrigger
from pymongo.errors import DocumentTooLarge

from apscheduler_mongo import MongoDBDataStore

pytestmark = pytest.mark.anyio


async def add_schedule(store: MongoDBDataStore, schedule_id: str, days: int) -> None:
    trigger = DateTrigger(datetime.now(timezone.utc) + timedelta(days=days))
    schedule = Schedule(
        id=schedule_id, task_id="task", trigger=trigger, job_executor="async"
    )
    schedule.next_fire_time = trigger.next()
    await store.add_schedule(schedule, ConflictPolicy.exception)


class TestWrongTypes:
    """Values edited by hand (mongosh writes numbers as doubles) are set aside."""

    @pytest.mark.parametrize(
        "value", [pytest.param(1.5e15, id="double"), pytest.param("soon", id="string")]
    )
    async def test_next_fire_time(self, store: MongoDBDataStore, value: Any) -> None:
        await add_schedule(store, "broken", 1)
        await add_schedule(store, "good", 2)
        await store._schedules.update_one(
            {"_id": "broken"}, {"$set": {"next_fire_time": value}}
        )

        next_time = await store.get_next_schedule_run_time()
        [good] = await store.get_schedules({"good"})
        assert next_time == good.next_fire_time
        broken = await store._schedules.find_one({"_id": "broken"})
        assert broken is not None
        if isinstance(value, float):
            # A double sorts among the integers, so it was met and set aside; a
            # string sorts after every number and is never the earliest
            assert "quarantine" in broken

    @pytest.mark.parametrize(
        "value", [pytest.param(2.0, id="double"), pytest.param("2", id="string")]
    )
    async def test_max_running_jobs(self, store: MongoDBDataStore, value: Any) -> None:
        await store.add_task(Task(id="bad", func="builtins:len", job_executor="async"))
        await store.add_task(Task(id="good", func="builtins:len", job_executor="async"))
        await store._tasks.update_one(
            {"_id": "bad"}, {"$set": {"max_running_jobs": value}}
        )
        await store.add_job(Job(task_id="bad", executor="async"))
        await store.add_job(Job(task_id="good", executor="async"))

        acquired = await store.acquire_jobs("me", timedelta(minutes=1), 10)
        assert [job.task_id for job in acquired] == ["good"]
        assert [job.task_id for job in await store.get_jobs()] == ["bad", "good"]


@pytest.mark.wire
@pytest.mark.parametrize("tier", ["wire"])
class TestOversized:
    """Arguments beyond MongoDB's 16 MB document limit fail clearly, writing nothing."""

    BIG = b"x" * (17 * 1024 * 1024)
    #: APScheduler types its ``args`` converter loosely; pass them untyped
    ARGS: Any = (BIG,)

    async def test_add_job(self, store: MongoDBDataStore) -> None:
        await store.add_task(Task(id="task", func="builtins:len", job_executor="async"))
        with pytest.raises(DocumentTooLarge, match="too large"):
            await store.add_job(Job(task_id="task", executor="async", args=self.ARGS))

        assert await store.get_jobs() == []

    @pytest.mark.parametrize(
        "policy", [ConflictPolicy.exception, ConflictPolicy.replace]
    )
    async def test_add_schedule(
        self, store: MongoDBDataStore, policy: ConflictPolicy
    ) -> None:
        trigger = DateTrigger(datetime.now(timezone.utc) + timedelta(days=1))
        schedule = Schedule(
            id="big",
            task_id="task",
            trigger=trigger,
            job_executor="async",
            args=self.ARGS,
        )
        with pytest.raises(DocumentTooLarge, match="too large"):
            await store.add_schedule(schedule, policy)

        assert await store.get_schedules() == []
