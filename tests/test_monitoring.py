"""The shipped alert rules and dashboard: promtool checks the rules and runs their unit
tests (one firing test per alert), and every dashboard query is valid PromQL."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from monitoring_files import DASHBOARD, RULE_TESTS, RULES, dashboard_exprs, rule_exprs, used_metrics

pytestmark = pytest.mark.pure
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args, cwd=None):
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_rules_check():
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in r.stdout


def test_rule_unit_tests_pass():
    r = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing, quiet = set(), set()
    for t in tests:
        for case in t["alert_rule_test"]:
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    required = {"StockadeMapNearlyFull", "StockadeFlowEventsLost", "StockadeAgentDown",
                "StockadeDropRateSpike", "StockadeUnprotectedInterfaces", "StockadeKvstoreDegraded"}
    assert required <= set(rule_exprs())
    assert firing == quiet == set(rule_exprs())


def test_a_broken_rule_unit_test_fails(tmp_path):
    """The unit tests can fail: the map alert's threshold moved to 0.99 no longer fires."""
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    (tmp_path / RULES.name).write_text(RULES.read_text().replace(
        "(stockade_map_fill_ratio) > 0.9", "(stockade_map_fill_ratio) > 0.99"))
    r = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert r.returncode != 0 and "StockadeMapNearlyFull" in r.stdout + r.stderr


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query as a recording rule (Grafana's variables filled in)."""
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["panels"] and all(p.get("targets") for p in doc["panels"])
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            expr = re.sub(r"label_values\((\w+), \w+\)", r"\1", expr)
        expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_names_used_are_found():
    names = used_metrics()
    assert {"stockade_map_fill_ratio", "stockade_flow_events_lost_total", "up",
            "stockade_packets_total", "stockade_unprotected_interfaces", "stockade_kvstore_state",
            "stockade_endpoint_drop_events_total", "process_cpu_seconds_total"} <= names
