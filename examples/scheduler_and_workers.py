"""
One scheduler process and several worker processes sharing one database.

APScheduler's ``role`` splits its two jobs: a scheduler with
``role=SchedulerRole.scheduler`` only processes schedules (it adds a job each time
one fires) and a scheduler with ``role=SchedulerRole.worker`` only runs jobs. Here
they are separate processes on ``MongoDBDataStore`` and ``MongoDBEventBroker`` on the
same database: each job is claimed by exactly one worker, and the broker wakes the
workers as soon as the scheduler adds a job. Start them by hand, on one machine or
many, each until Ctrl+C (or for ``--seconds``)::

    python examples/scheduler_and_workers.py scheduler --uri mongodb://127.0.0.1:27017/
    python examples/scheduler_and_workers.py worker --uri mongodb://127.0.0.1:27017/
    python examples/scheduler_and_workers.py worker --uri mongodb://127.0.0.1:27017/

or let the launcher start one scheduler and two workers for a few seconds, show what
each printed, and count which process ran which job::

    python examples/scheduler_and_workers.py launch --uri mongodb://127.0.0.1:27017/

The URI defaults to ``MONGODB_URI`` and then to ``mongodb://127.0.0.1:27017/``; the
database (``--database``) to ``apscheduler_workers_example``. The scheduler prints
``added job=ID`` for each job it adds; a worker prints ``ran job=ID ... pid=PID``
for each job it finished.

Every process gives APScheduler the task's function under a fixed task id
(:func:`configure`), so the workers need not import it by its module name; in your
application, keep the task functions in an importable module all processes share.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from typing import IO

import anyio
from apscheduler import (
    AsyncScheduler,
    ConflictPolicy,
    Event,
    JobAdded,
    SchedulerRole,
    current_job,
)
from apscheduler.triggers.interval import IntervalTrigger

from apscheduler_mongo import MongoDBDataStore, MongoDBEventBroker

DEFAULT_URI = "mongodb://127.0.0.1:27017/"
DEFAULT_DATABASE = "apscheduler_workers_example"
TASK_ID = "work"
#: How often the schedule fires, and how long each job works: longer than the
#: interval, so one worker alone (running one job at a time) would fall behind
INTERVAL = timedelta(seconds=0.5)
WORK_SECONDS = 0.8
#: How much longer than the scheduler the launcher lets the workers run, so that
#: they finish the last jobs
DRAIN_SECONDS = 4.0


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def work() -> int:
    """The task: work for a moment, then say which process ran which job."""
    await anyio.sleep(WORK_SECONDS)
    job = current_job.get()
    fire_time = job.scheduled_fire_time.isoformat() if job.scheduled_fire_time else "-"
    say(f"ran job={job.id} fire={fire_time} pid={os.getpid()}")
    return os.getpid()


async def configure(scheduler: AsyncScheduler) -> None:
    """Register the task the same way in every process (scheduler and workers)."""
    await scheduler.configure_task(TASK_ID, func=work, max_running_jobs=None)


async def run(role: SchedulerRole, uri: str, database: str, seconds: float) -> None:
    """Run a scheduler in ``role`` for ``seconds`` (until interrupted if 0)."""
    store = MongoDBDataStore(uri, database=database)
    broker = MongoDBEventBroker(uri, database=database, poll_interval=0.1)
    # A worker runs one job at a time here, to show the jobs spreading over workers
    async with AsyncScheduler(
        data_store=store, event_broker=broker, role=role, max_concurrent_jobs=1
    ) as scheduler:
        await configure(scheduler)
        if role is SchedulerRole.scheduler:

            def added(event: Event) -> None:
                assert isinstance(event, JobAdded)
                say(f"added job={event.job_id}")

            scheduler.subscribe(added, {JobAdded})
            await scheduler.add_schedule(
                TASK_ID,
                IntervalTrigger(seconds=INTERVAL.total_seconds()),
                id="every-half-second",
                conflict_policy=ConflictPolicy.replace,
            )

        await scheduler.start_in_background()
        say(f"started role={role.name} pid={os.getpid()}")
        if seconds:
            await anyio.sleep(seconds)
        else:
            await anyio.sleep_forever()

        if role is SchedulerRole.scheduler:
            await scheduler.remove_schedule("every-half-second")

    say(f"stopped role={role.name} pid={os.getpid()}")


def launch(uri: str, database: str, workers: int, seconds: float) -> int:
    """Run one scheduler and ``workers`` workers as child processes; report."""
    common = ["--uri", uri, "--database", database]
    script = os.path.abspath(__file__)
    commands = {"scheduler": [script, "scheduler", *common, "--seconds", str(seconds)]}
    for number in range(1, workers + 1):
        commands[f"worker-{number}"] = [
            script,
            "worker",
            *common,
            "--seconds",
            str(seconds + DRAIN_SECONDS),
        ]

    ran: Counter[str] = Counter()
    pids: dict[str, int] = {}
    processes: dict[str, subprocess.Popen[str]] = {}
    readers: list[threading.Thread] = []

    def relay(name: str, stream: IO[str]) -> None:
        for line in stream:
            say(f"{name:<10}| {line.rstrip()}")
            if line.startswith("ran "):
                ran[name] += 1
            elif line.startswith("started "):
                pids[name] = int(line.rpartition("pid=")[2])

    try:
        for name, command in commands.items():
            process = subprocess.Popen(
                [sys.executable, *command], stdout=subprocess.PIPE, text=True
            )
            processes[name] = process
            assert process.stdout is not None
            reader = threading.Thread(target=relay, args=(name, process.stdout))
            reader.start()
            readers.append(reader)

        status = 0
        for process in processes.values():
            status = status or process.wait(seconds + DRAIN_SECONDS + 60)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
                process.wait()

        for reader in readers:
            reader.join()

    for name in commands:
        say(f"summary: {name} (pid {pids.get(name, '?')}) ran {ran[name]} job(s)")

    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a scheduler, a worker, or a launcher starting both."
    )
    parser.add_argument("command", choices=["scheduler", "worker", "launch"])
    parser.add_argument("--uri", default=os.environ.get("MONGODB_URI", DEFAULT_URI))
    parser.add_argument("--database", default=DEFAULT_DATABASE)
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="how long to run (scheduler and worker: until Ctrl+C; launch: 6)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes to launch"
    )
    args = parser.parse_args(argv)
    if args.command == "launch":
        seconds = 6.0 if args.seconds is None else args.seconds
        return launch(args.uri, args.database, args.workers, seconds)

    role = SchedulerRole[args.command]
    try:
        anyio.run(run, role, args.uri, args.database, args.seconds or 0)
    except KeyboardInterrupt:
        pass

    return 0


if __name__ == "__main__":
    sys.exit(main())
