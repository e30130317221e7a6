"""Turn the benchmark's results into Markdown, JSON, a chart and a list of targets."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from _common import STORE_NAMES, StoreKind

#: Above this loaded/empty time ratio, acquisition is not "independent" of the
#: finished and leased documents present (timings on a shared machine are noisy)
INDEPENDENCE_TOLERANCE = 1.5


def ratio(ours: float, builtin: float) -> float | None:
    return ours / builtin if builtin else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _by_case(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["case"]: row for row in rows}


def _job_counts(counts: dict[str, Any]) -> list[str]:
    builtin = _by_case(counts["builtin"]["jobs"])
    ours = _by_case(counts["ours"]["jobs"])
    lines = [
        "## Server commands per job",
        "",
        "Per job; the lifecycle is add_job + acquire_jobs + release_job. APScheduler's "
        "scheduler also calls get_task once per acquired job, so the lifecycle is "
        "given without and with that call. Counted with pymongo's command monitoring "
        "after start() (no index creation), results not kept "
        "(result_expiration_time=0, the scheduler's default).",
        "",
    ]
    rows = []
    for case, b in builtin.items():
        o = ours[case]
        rows.append(
            [
                case,
                fmt(b["lifecycle"]),
                fmt(o["lifecycle"]),
                fmt(ratio(o["lifecycle"], b["lifecycle"])),
                fmt(b["lifecycle_with_get_task"]),
                fmt(o["lifecycle_with_get_task"]),
                fmt(ratio(o["lifecycle_with_get_task"], b["lifecycle_with_get_task"])),
            ]
        )

    lines += table(
        [
            "case",
            "built-in",
            "ours",
            "ours / built-in",
            "built-in + get_task",
            "ours + get_task",
            "ours / built-in (+ get_task)",
        ],
        rows,
    )
    lines += ["", "Per phase, per job, and the commands sent for the whole batch:", ""]
    rows = []
    for case, b in builtin.items():
        for kind, row in (("built-in", b), ("ours", ours[case])):
            per = row["per_job"]
            detail = "; ".join(
                f"{phase}: {text or '-'}" for phase, text in row["detail"].items()
            )
            rows.append(
                [
                    case,
                    kind,
                    fmt(per["add"]),
                    fmt(per["acquire"]),
                    fmt(per["release"]),
                    fmt(per["get_task"]),
                    detail,
                ]
            )

    lines += table(
        ["case", "store", "add", "acquire", "release", "get_task", "commands"], rows
    )
    return lines


def _schedule_counts(counts: dict[str, Any]) -> list[str]:
    builtin = _by_case(counts["builtin"]["schedules"])
    ours = _by_case(counts["ours"]["schedules"])
    lines = [
        "## Server commands per schedule firing",
        "",
        "Per firing: acquire_schedules, add_job for the fire time, release_schedules "
        "with a ScheduleResult (as the scheduler's schedule loop does). A re-read is "
        "a read of the schedules collection after the claim.",
        "",
    ]
    rows = []
    for case, b in builtin.items():
        o = ours[case]
        rows.append(
            [
                case,
                fmt(b["total"]),
                fmt(o["total"]),
                fmt(ratio(o["total"], b["total"])),
                sum(b["rereads"].values()),
                sum(o["rereads"].values()),
            ]
        )

    lines += table(
        [
            "case",
            "built-in",
            "ours",
            "ours / built-in",
            "built-in re-reads",
            "ours re-reads",
        ],
        rows,
    )
    lines += [""]
    rows = []
    for case, b in builtin.items():
        for kind, row in (("built-in", b), ("ours", ours[case])):
            per = row["per_firing"]
            detail = "; ".join(
                f"{phase}: {text or '-'}" for phase, text in row["detail"].items()
            )
            rows.append(
                [
                    case,
                    kind,
                    fmt(per["acquire"]),
                    fmt(per["add_job"]),
                    fmt(per["release"]),
                    detail,
                ]
            )

    lines += table(["case", "store", "acquire", "add_job", "release", "commands"], rows)
    return lines


def _drain(rows: list[dict[str, Any]]) -> list[str]:
    first = rows[0]
    lines = [
        f"## Jobs per second, {first['jobs']} queued jobs drained by worker processes",
        "",
        f"Each worker is a separate process (spawn) with its own store, looping "
        f"acquire_jobs(limit={first['limit']}) + release_job per job; jobs/s from "
        f"the common start to the last release. Duplicates are ownerships beyond one "
        f"per job; lost are jobs nobody owned; empty acquires are calls that got no "
        f"job (lost the race for the oldest jobs) and were retried after "
        f"5 ms.",
        "",
    ]
    by_key = {(row["store"], row["workers"]): row for row in rows}
    table_rows = []
    for workers in sorted({row["workers"] for row in rows}):
        b = by_key.get(("builtin", workers))
        o = by_key.get(("ours", workers))
        if b is None or o is None:
            continue

        table_rows.append(
            [
                workers,
                fmt(b["jobs_per_second"], 1),
                fmt(o["jobs_per_second"], 1),
                fmt(ratio(o["jobs_per_second"], b["jobs_per_second"])),
                f"{b['duplicates']} / {o['duplicates']}",
                f"{b['lost']} / {o['lost']}",
                f"{b['empty_acquires']} / {o['empty_acquires']}",
                f"{b['per_worker']} / {o['per_worker']}",
            ]
        )

    lines += table(
        [
            "workers",
            "built-in jobs/s",
            "ours jobs/s",
            "ours / built-in",
            "duplicates (built-in / ours)",
            "lost",
            "empty acquires",
            "jobs per worker",
        ],
        table_rows,
    )
    return lines


def _schedules(rows: list[dict[str, Any]]) -> list[str]:
    first = rows[0]
    lines = [
        f"## Schedules per second, {first['schedules']} due schedules, one process",
        "",
        "acquire_schedules(100), next fire time computed, release_schedules; with "
        "and without add_job per firing. Commands per schedule include the last, "
        "empty, acquire.",
        "",
    ]
    by_key = {(row["store"], row["with_jobs"]): row for row in rows}
    table_rows = []
    for with_jobs in (False, True):
        b = by_key.get(("builtin", with_jobs))
        o = by_key.get(("ours", with_jobs))
        if b is None or o is None:
            continue

        table_rows.append(
            [
                "acquire + add_job + release" if with_jobs else "acquire + release",
                fmt(b["per_second"], 1),
                fmt(o["per_second"], 1),
                fmt(ratio(o["per_second"], b["per_second"])),
                f"{fmt(b['commands_per_schedule'], 3)} / "
                f"{fmt(o['commands_per_schedule'], 3)}",
                f"{b['processed']} / {o['processed']}",
            ]
        )

    lines += table(
        [
            "loop",
            "built-in schedules/s",
            "ours schedules/s",
            "ours / built-in",
            "commands per schedule (built-in / ours)",
            "processed",
        ],
        table_rows,
    )
    return lines


def _acquisition(results: dict[str, Any]) -> list[str]:
    some = next(iter(results.values()))
    loaded = some["loaded"]
    lines = [
        "## Acquisition cost with finished and leased jobs present",
        "",
        f"acquire_jobs(limit=100) with {loaded['queued']} queued jobs, in an otherwise "
        f"empty store and with {loaded['finished']} finished jobs (results kept) plus "
        f"{loaded['leased']} jobs leased by another scheduler; median of "
        f"{loaded['rounds']} calls. The built-in store keeps results in a separate "
        f"collection (job_results) and deletes finished jobs; ours keeps finished "
        f"jobs in the jobs collection.",
        "",
    ]
    rows = []
    for kind, result in results.items():
        rows.append(
            [
                "built-in" if kind == "builtin" else "ours",
                fmt(result["empty"]["median_ms"], 1),
                fmt(result["loaded"]["median_ms"], 1),
                fmt(result["time_ratio"]),
                f"{fmt(result['empty']['commands_per_call'], 0)} / "
                f"{fmt(result['loaded']['commands_per_call'], 0)}",
                result["loaded"]["detail"],
                fmt(result["loaded"]["seed_seconds"], 0),
            ]
        )

    lines += table(
        [
            "store",
            "ms, empty",
            "ms, loaded",
            "loaded / empty",
            "commands (empty / loaded)",
            "commands per call",
            "seconds to build loaded",
        ],
        rows,
    )
    if "ours" in results and "builtin" in results:
        empty, loaded = (
            fmt(
                ratio(
                    results["ours"][case]["median_ms"],
                    results["builtin"][case]["median_ms"],
                )
            )
            for case in ("empty", "loaded")
        )
        lines += [
            "",
            f"Time per call, ours / built-in: {empty} empty, {loaded} loaded.",
        ]

    return lines


def _history(rows: list[dict[str, Any]]) -> list[str]:
    timed = any(row["job"]["ms"] is not None for row in rows)
    lines = [
        "## Cost versus history",
        "",
        "One job's life (add, acquire, get_task, release), one schedule firing and "
        "one cleanup, with this many finished jobs (results kept) already stored. "
        "Commands sent / documents the server returned"
        + ("; milliseconds." if timed else "; times only on a real server."),
        "",
    ]
    header = ["store", "finished jobs", "job", "firing", "cleanup"]

    def cell(measure: dict[str, Any]) -> str:
        text = f"{measure['commands']} / {measure['documents']}"
        return f"{text} / {measure['ms']:.1f} ms" if measure["ms"] is not None else text

    lines += table(
        header,
        [
            [
                STORE_NAMES[row["store"]].split(" ")[0],
                f"{row['history']:,}",
                cell(row["job"]),
                cell(row["firing"]),
                cell(row["cleanup"]),
            ]
            for row in rows
        ],
    )
    return lines


def _latency(rows: list[dict[str, Any]]) -> list[str]:
    first = rows[0]
    lines = [
        "## Event broker publish-to-delivery latency (ours only)",
        "",
        f"{first['events']} events at {first['rate']:g}/s, publisher and receiver in "
        f"separate processes (benchmarks/broker_latency.py). APScheduler has no "
        f"MongoDB event broker to compare with.",
        "",
    ]
    lines += table(
        ["mode", "poll interval s", "p50 ms", "p99 ms", "max ms"],
        [
            [
                row["mode"],
                fmt(row["poll_interval"]),
                fmt(row["p50_ms"], 1),
                fmt(row["p99_ms"], 1),
                fmt(row["max_ms"], 1),
            ]
            for row in rows
        ],
    )
    return lines


def _target(name: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"target": name, "measured": measured, "met": met}


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the measurements against issue #6's targets and reference counts."""
    targets: list[dict[str, Any]] = []
    if counts := results.get("counts"):
        builtin = _by_case(counts["builtin"]["jobs"])
        ours = _by_case(counts["ours"]["jobs"])
        o = ours["uncapped, batch of 100"]["lifecycle"]
        targets.append(
            _target(
                "uncapped, batch of 100: at most 2.05 commands per job",
                f"{o:.2f} (with get_task "
                f"{ours['uncapped, batch of 100']['lifecycle_with_get_task']:.2f})",
                o <= 2.05 + 1e-9,
            )
        )
        capped = "capped (max_running_jobs=100), batch of 100"
        single_capped = "capped (max_running_jobs=100), single job"
        o, b = ours[capped]["lifecycle"], builtin[capped]["lifecycle"]
        og, bg = (
            ours[capped]["lifecycle_with_get_task"],
            builtin[capped]["lifecycle_with_get_task"],
        )
        targets.append(
            _target(
                "capped, batch of 100: at most 0.6x the built-in's commands per job",
                f"{o:.2f} vs {b:.2f} = {o / b:.2f}x (with get_task {og:.2f} vs "
                f"{bg:.2f} = {og / bg:.2f}x; a single capped job: "
                f"{ours[single_capped]['lifecycle']:.0f} vs "
                f"{builtin[single_capped]['lifecycle']:.0f})",
                o <= 0.6 * b + 1e-9,
            )
        )
        for case in ("uncapped, single job", single_capped):
            row = ours[case]
            targets.append(
                _target(
                    f"{case}: add + acquire + release in at most 4 commands",
                    f"{row['lifecycle']:.0f} (with get_task "
                    f"{row['lifecycle_with_get_task']:.0f})",
                    row["lifecycle"] <= 4,
                )
            )
        b_sched = _by_case(counts["builtin"]["schedules"])
        o_sched = _by_case(counts["ours"]["schedules"])
        pairs = [(case, o_sched[case], b_sched[case]) for case in b_sched]
        rereads = sum(sum(row["rereads"].values()) for _, row, _ in pairs)
        targets.append(
            _target(
                "schedule firing: no more commands than the built-in, no re-read "
                "after the claim",
                "; ".join(
                    f"{case}: {o['total']:.2f} vs {b['total']:.2f}"
                    for case, o, b in pairs
                )
                + f"; re-reads: {rereads}",
                all(o["total"] <= b["total"] + 1e-9 for _, o, b in pairs)
                and rereads == 0,
            )
        )
        targets.append(
            _target(
                "reference: built-in single lifecycle = 7 commands",
                f"{builtin['uncapped, single job']['lifecycle']:.0f} without "
                f"get_task, "
                f"{builtin['uncapped, single job']['lifecycle_with_get_task']:.0f} "
                f"with it",
                builtin["uncapped, single job"]["lifecycle_with_get_task"] == 7,
            )
        )
        batch = builtin["uncapped, batch of 100"]
        targets.append(
            _target(
                "reference: built-in batch of 100 = 4.02 commands per job",
                f"{batch['lifecycle']:.2f} without get_task, "
                f"{batch['lifecycle_with_get_task']:.2f} with it",
                abs(batch["lifecycle"] - 4.02) < 1e-9,
            )
        )
        firing = b_sched["single schedule"]["total"]
        targets.append(
            _target(
                "reference: built-in single schedule firing = 4 commands",
                f"{firing:.0f}",
                firing == 4,
            )
        )

    if drain := results.get("drain"):
        by_key = {(row["store"], row["workers"]): row for row in drain}
        most = max(row["workers"] for row in drain)
        b, o = by_key.get(("builtin", most)), by_key.get(("ours", most))
        if b is not None and o is not None:
            r = ratio(o["jobs_per_second"], b["jobs_per_second"])
            targets.append(
                _target(
                    f"{most} workers: at least 2x the built-in's jobs/s, 0 duplicates",
                    f"{o['jobs_per_second']:.1f} vs {b['jobs_per_second']:.1f} "
                    f"jobs/s = {fmt(r)}x; duplicates {o['duplicates']} (built-in "
                    f"{b['duplicates']}), lost {o['lost']}",
                    r is not None
                    and r >= 2
                    and o["duplicates"] == 0
                    and o["lost"] == 0,
                )
            )

    if (acquisition := results.get("acquisition")) and "ours" in acquisition:
        o = acquisition["ours"]
        builtin_ratio = acquisition.get("builtin", {}).get("time_ratio", float("nan"))
        same_commands = (
            o["empty"]["commands_per_call"] == o["loaded"]["commands_per_call"]
        )
        targets.append(
            _target(
                "acquisition cost independent of finished/leased documents "
                f"(same commands, time ratio <= {INDEPENDENCE_TOLERANCE})",
                f"{o['loaded']['finished'] + o['loaded']['leased']} extra documents: "
                f"time x{o['time_ratio']:.2f}, commands "
                f"{o['empty']['commands_per_call']:.0f} -> "
                f"{o['loaded']['commands_per_call']:.0f} (built-in time x"
                f"{builtin_ratio:.2f})",
                same_commands and o["time_ratio"] <= INDEPENDENCE_TOLERANCE,
            )
        )

    return targets


def markdown(results: dict[str, Any]) -> str:
    """Render all the results as one Markdown document."""
    sizes = ", ".join(f"{key}={value}" for key, value in results["sizes"].items())
    versions = ", ".join(f"{key} {value}" for key, value in results["versions"].items())
    lines = [
        "# apscheduler_mongo vs APScheduler's built-in MongoDB store",
        "",
        f"- server: {results['server']}",
        f"- sizes: {sizes}",
        f"- {versions}; Python {results['python']}; {results['cpus']} CPUs",
        f"- stores: {STORE_NAMES['builtin']}; {STORE_NAMES['ours']}, from "
        f"{results['source']}",
        f"- started {results['started']}, took {results['seconds']:.0f} s",
        "",
    ]
    sections: list[tuple[str, Callable[[Any], list[str]]]] = [
        ("counts", _job_counts),
        ("counts", _schedule_counts),
        ("drain", _drain),
        ("schedules", _schedules),
        ("acquisition", _acquisition),
        ("history", _history),
        ("latency", _latency),
    ]
    for key, render in sections:
        if results.get(key):
            lines += [*render(results[key]), ""]

    if targets := results.get("targets"):
        lines += ["## Targets (issue #6)", ""]
        lines += table(
            ["target", "measured", "met"],
            [
                [
                    t["target"],
                    t["measured"],
                    "n/a" if t["met"] is None else ("yes" if t["met"] else "NO"),
                ]
                for t in targets
            ],
        )
        lines.append("")

    if notes := results.get("notes"):
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]

    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def plot_throughput(results: dict[str, Any], path: Path) -> str | None:
    """
    Draw jobs/s against worker count for both stores into ``path`` (a PNG).

    :return: why no chart was drawn, or ``None`` if it was
    """
    drain = results.get("drain")
    if not drain:
        return "no drain measurements"

    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"

    matplotlib.use("Agg")
    pyplot: Any = importlib.import_module("matplotlib.pyplot")
    figure, axes = pyplot.subplots(figsize=(6.4, 4.2))
    styles: tuple[tuple[StoreKind, str], ...] = (("builtin", "s--"), ("ours", "o-"))
    for kind, style in styles:
        rows = sorted(
            (row for row in drain if row["store"] == kind), key=lambda r: r["workers"]
        )
        if rows:
            axes.plot(
                [row["workers"] for row in rows],
                [row["jobs_per_second"] for row in rows],
                style,
                label=STORE_NAMES[kind],
            )

    workers = sorted({row["workers"] for row in drain})
    axes.set_xticks(workers)
    axes.set_xlabel("worker processes")
    axes.set_ylabel("jobs per second")
    axes.set_ylim(bottom=0)
    duplicates = {
        kind: sum(row["duplicates"] for row in drain if row["store"] == kind)
        for kind in STORE_NAMES
    }
    axes.set_title(
        f"Draining {drain[0]['jobs']} jobs on {results['server_short']} "
        f"(duplicates: built-in {duplicates['builtin']}, ours {duplicates['ours']})",
        fontsize="medium",
    )
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return None
