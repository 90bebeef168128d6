"""Regenerate the measured tables in docs/performance.md (between BEGIN/END markers)."""
from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"

TARGETS = {
    "compiler": [
        ("full compile, 1,000 identities x 2,000 rules", "full_compile_s", "s", "< 2 s", lambda v: v < 2),
        ("incremental: add one identity (p50)", "incremental_add_identity_ms_p50", "ms", "< 20 ms", lambda v: v < 20),
        ("incremental: add one identity (max of 50)", "incremental_add_identity_ms_max", "ms", "< 20 ms", lambda v: v < 20),
        ("incremental: remove one identity (p50)", "incremental_remove_identity_ms_p50", "ms", "< 20 ms", lambda v: v < 20),
        ("incremental: replace one policy", "incremental_one_policy_ms", "ms", "-", None),
        ("incremental / full (add identity)", "incremental_vs_full_ratio", "", "-", None),
        ("map entries compiled", "entries", "", "-", None),
        ("peak RSS of the benchmark process", "peak_rss_mb", "MB", "< 200 MB", lambda v: v < 200),
    ],
}


def table(name: str, data: dict) -> str:
    rows = ["| measure | value | target | met |", "|---|---|---|---|"]
    for label, key, unit, target, ok in TARGETS.get(name, []):
        if key not in data:
            continue
        v = data[key]
        met = "-" if ok is None else ("yes" if ok(v) else "**no**")
        rows.append(f"| {label} | {v} {unit} | {target} | {met} |")
    return "\n".join(rows)


def update_performance_md(results: dict) -> None:
    text = DOC.read_text()
    for name in TARGETS:
        if name not in results:
            continue
        block = (f"<!-- BEGIN {name} -->\n_Measured {results['date']} on {results['machine']['cpus']} "
                 f"CPUs, kernel {results['machine']['kernel']}, by `make bench`._\n\n"
                 f"{table(name, results[name])}\n<!-- END {name} -->")
        text = re.sub(rf"<!-- BEGIN {name} -->.*?<!-- END {name} -->", block, text, flags=re.S)
    DOC.write_text(text)
