"""The metric names the shipped alert rules and Grafana dashboard use (monitoring/)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "monitoring/prometheus/stockade-alerts.yml"
RULE_TESTS = ROOT / "monitoring/prometheus/stockade-alerts.test.yml"
DASHBOARD = ROOT / "monitoring/grafana/stockade.json"
# Prometheus makes `up` itself
NOT_FROM_AN_AGENT = {"up"}
_NAME = re.compile(r"\b((?:stockade|process)_[a-zA-Z0-9_]+|up)\b(?!\s*[=!~])")


def rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])] + [
        v["query"]["query"] for v in doc["templating"]["list"] if isinstance(v.get("query"), dict)]


def metric_names(exprs) -> set[str]:
    return {m for e in exprs for m in _NAME.findall(e)}


def used_metrics() -> set[str]:
    return metric_names(list(rule_exprs().values()) + dashboard_exprs())
