"""The ready-made ops files name only metrics the library exports, as exported."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from apscheduler_mongo.metrics import prometheus_names

OPS = Path(__file__).parent.parent / "ops"
#: Labels Prometheus itself puts on every series it scrapes
TARGET_LABELS = {"instance", "job"}


def _alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((OPS / "prometheus-alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((OPS / "grafana-dashboard.json").read_text())
    return [
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    ]


def _metric_uses(expression: str) -> list[tuple[str, set[str]]]:
    """Return each metric an expression names, with the label names it selects on
    or groups by (``by (...)`` applies to the metrics inside its aggregation, which
    is close enough for the expressions of these files)."""
    grouped = {
        label.strip()
        for labels in re.findall(r"\bby \(([^)]*)\)", expression)
        for label in labels.split(",")
    }
    uses = []
    for name, selector in re.findall(
        r"\b(apscheduler_mongo_[a-z_]+)(\{[^}]*\})?", expression
    ):
        selected = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector))
        uses.append((name, selected | grouped))
    return uses


EXPRESSIONS = [rule["expr"] for rule in _alert_rules()] + _dashboard_queries()


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_names_exported_metrics(expression: str) -> None:
    exported = prometheus_names()
    uses = _metric_uses(expression)
    assert uses, "names no metric of ours"
    for name, labels in uses:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert base in exported, f"{name} is no metric apscheduler-mongo exports"
        kind, declared = exported[base]
        if base != name:
            assert kind == "histogram", f"{name}: {base} is a {kind}"
        elif kind == "histogram":
            pytest.fail(f"{name} is a histogram: name its _bucket, _sum or _count")
        if "rate(" in expression and kind == "gauge":
            assert f"rate({name}" not in expression, f"rate() of gauge {name}"
        allowed = set(declared) | TARGET_LABELS | ({"le"} if base != name else set())
        assert labels <= allowed, f"{name} has no label {labels - allowed}"


def test_alert_rules_are_complete() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        # Balanced parentheses and braces: the typo Prometheus would refuse
        for opening, closing in ("()", "{}", "[]"):
            assert rule["expr"].count(opening) == rule["expr"].count(closing)

    # What the operations issue asked alerts for
    for wanted in ("schedulers", "lateness", "released", "delivery_lag", "offset"):
        assert any(wanted in rule["expr"] for rule in rules), wanted


def test_dashboard_covers_every_metric() -> None:
    named = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for expression in _dashboard_queries()
        for name, _ in _metric_uses(expression)
    }
    assert named == set(prometheus_names())
