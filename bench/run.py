"""``make bench``: run every benchmark in its own process, write bench/results/<date>.json
and regenerate the tables in docs/performance.md."""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = {"compiler": "bench.compile_bench"}


def run_one(module: str) -> dict:
    out = subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    names = (argv or sys.argv[1:]) or list(BENCHES)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": _machine()}
    for name in names:
        print(f"bench: {name} ...", flush=True)
        results[name] = run_one(BENCHES[name])
        print(json.dumps(results[name], indent=1))
    day = datetime.date.today().isoformat()
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / f"{day}.json").write_text(json.dumps(results, indent=1) + "\n")
    from bench.report import update_performance_md
    update_performance_md(results)
    return 0


def _machine() -> dict:
    import os
    import platform
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
