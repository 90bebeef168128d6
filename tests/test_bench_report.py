"""bench/report.py: each table in docs/performance.md names the commit its own figures
were measured at, not the day's last run (a partial `bench.run` rewrites "machine")."""
from __future__ import annotations

import pytest
from bench import report

pytestmark = pytest.mark.pure


def test_each_table_names_its_own_commit(tmp_path, monkeypatch):
    doc = tmp_path / "performance.md"
    doc.write_text("<!-- BEGIN fleet-detail -->\nold\n<!-- END fleet-detail -->\n"
                   "<!-- BEGIN services -->\nold\n<!-- END services -->\n")
    monkeypatch.setattr(report, "DOC", doc)
    machine = {"cpus": 2, "kernel": "6.1", "commit": "lastrun"}
    report.update_performance_md({
        "date": "2026-12-02T20:17:10+00:00", "machine": machine,
        "fleet": {"keys": 20000, "measured": "2026-12-02T17:07:11+00:00", "commit": "abef0ed"},
        "services": {"rounds": 3, "measured": "2026-12-02T04:30:06+00:00"}})   # before the field
    fleet, services = doc.read_text().split("<!-- BEGIN services -->")
    assert "_Measured 2026-12-02T17:07:11+00:00 on 2 CPUs, kernel 6.1, commit abef0ed," in fleet
    assert "| keys | 20000 |" in fleet and "| commit |" not in fleet
    assert "commit lastrun," in services
