"""
The per-tier summary at the end of a test run: what ran, what was skipped, and why.

A run that skipped a whole tier would otherwise end as green as one that ran it; the
summary says which tiers ran and, when the wire tier did not, says so loudly, with
what was not tested and how to get it tested.
"""

from __future__ import annotations

from collections import Counter

import attrs
import pytest

#: The tiers, as the summary names them, and what runs in each
TIERS = {
    "in-process": "mongomock-motor, in this process",
    "wire": "a MongoDB wire-protocol server over real sockets (pymongo and Motor, "
    "several processes, the connection-cutting proxy, SIGKILL/SIGSTOP, lost replies)",
    "real-server": "tests that need a real replica set (change streams, fail points)",
}
#: Worse outcomes win when a test reports several phases (setup, call, teardown)
_RANK = {"passed": 0, "skipped": 1, "xfailed": 1, "failed": 2, "error": 2}


@attrs.define
class _Outcome:
    tier: str
    outcome: str
    reason: str = ""


def tier_of(report: pytest.TestReport) -> str:
    """Return the tier of the test a report is about, from its markers."""
    if "real_server" in report.keywords:
        return "real-server"

    return "wire" if "wire" in report.keywords else "in-process"


def _phase_outcome(report: pytest.TestReport) -> tuple[str, str] | None:
    """Return a phase's outcome and skip reason, or None for a passing setup."""
    if report.skipped:
        if hasattr(report, "wasxfail"):
            return "xfailed", ""

        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        return "skipped", reason.removeprefix("Skipped: ")

    if report.failed:
        return ("failed" if report.when == "call" else "error"), ""

    return ("passed", "") if report.when == "call" else None


@attrs.define
class TierReport:
    """A pytest plugin: note each test's outcome by tier, summarize at the end."""

    #: Says what the wire tier talks to
    wire_server: str
    _outcomes: dict[str, _Outcome] = attrs.field(init=False, factory=dict)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        phase = _phase_outcome(report)
        if phase is None:
            return

        outcome, reason = phase
        known = self._outcomes.get(report.nodeid)
        if known is None or _RANK[outcome] > _RANK[known.outcome]:
            self._outcomes[report.nodeid] = _Outcome(tier_of(report), outcome, reason)

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(
        self, terminalreporter: pytest.TerminalReporter
    ) -> None:
        """Write the per-tier section; say loudly if the wire tier did not run."""
        if not self._outcomes:
            return

        terminal = terminalreporter
        terminal.section("test tiers")
        for tier, what in TIERS.items():
            outcomes = [o for o in self._outcomes.values() if o.tier == tier]
            counts = Counter(o.outcome for o in outcomes)
            figures = ", ".join(f"{counts[name]} {name}" for name in sorted(counts))
            server = f"; server: {self.wire_server}" if tier == "wire" else ""
            terminal.write_line(f"{tier}: {figures or 'no tests'} ({what}{server})")
            reasons = Counter(o.reason for o in outcomes if o.outcome == "skipped")
            for reason, count in reasons.most_common():
                terminal.write_line(f"    {count} skipped: {reason}")

        wire = [o for o in self._outcomes.values() if o.tier == "wire"]
        if wire and all(o.outcome == "skipped" for o in wire):
            terminal.write_line(
                f"THE WIRE TIER DID NOT RUN: its {len(wire)} tests were skipped "
                f"({wire[0].reason}). Nothing was tested over real sockets, in "
                "several processes or under network faults. Run the README's test "
                "command (nox finds a Python >= 3.13 for the server), or set "
                "MONGODB_URI.",
                red=True,
                bold=True,
            )
