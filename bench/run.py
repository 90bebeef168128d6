"""``make bench``: run every benchmark in its own process, write bench/results/<date>.json
and regenerate the tables in docs/performance.md."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = {
    "compiler": "bench.compile_bench",
    "datapath": "bench.datapath_bench",
    "bpfcost": "bench.bpf_cost_bench",
    "fuzz": "bench.fuzz_bench",
    "controlplane": "bench.controlplane_bench",
    "flows": "bench.flows_bench",  # written with the flows feature; skipped while absent
    "vm": "bench.vm_bench",
    "services": "bench.services_bench",
    "fleet": "bench.fleet_bench",
    "profile": "bench.profile",
    "loader": "bench.policy_fuzz_bench",
    "attach": "bench.attach_bench",
    "webui": "bench.webui_bench",
    "l7": "bench.l7_bench",
}
# Seconds a module may run; its own cap is below this (the loader fuzz stops at 30 min).
TIMEOUTS = {"loader": 2400}


def run_one(module: str, timeout: int = 1800) -> dict:
    """Run ``module`` in its own process; its last stdout line is its JSON result.
    A module that does not exist (yet) gives ``{"skipped": reason}``."""
    import importlib.util
    if importlib.util.find_spec(module) is None:
        return {"skipped": f"{module} does not exist yet"}
    try:
        out = subprocess.run([sys.executable, "-m", module], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True, check=True, timeout=timeout, **own_namespace())
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        # One failed benchmark must not lose the others' figures; its error is kept.
        return {"error": f"{module} failed: {exc}"}


def own_namespace() -> dict:
    """Popen arguments running a benchmark in a network namespace of its own (as the
    root tests run, tests/conftest.py): its agents, bridges and veths never meet a demo
    agent's (one agent per namespace, issue 14.4). It goes when the process exits.
    Unprivileged runs stay where they are."""
    if os.geteuid() != 0:
        return {}
    sys.path.insert(0, str(ROOT / "tests"))
    from netns import OUTER_ENV, unshare_net
    return {"preexec_fn": unshare_net,
            "env": {**os.environ, OUTER_ENV: f"/proc/{os.getpid()}/ns/net"}}


def main(argv=None) -> int:
    names = (argv or sys.argv[1:]) or list(BENCHES)
    day = datetime.date.today().isoformat()
    path = ROOT / "bench" / "results" / f"{day}.json"
    # A partial run (``bench.run datapath``) updates today's file instead of replacing it.
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "machine": _machine()})
    for name in names:
        print(f"bench: {name} ...", flush=True)
        load_before = os.getloadavg()[0]
        results[name] = run_one(BENCHES[name], TIMEOUTS.get(name, 1800))
        # The machine may be shared (other test runs): keep the load next to the figures.
        results[name]["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        results[name]["measured"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        # Each table names the commit its own figures came from: "machine" is the day's
        # last run, and a partial run rewrites it.
        results[name]["commit"] = results["machine"]["commit"]
        print(json.dumps(results[name], indent=1), flush=True)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
    from bench.report import update_performance_md
    update_performance_md(results)
    return 1 if any("error" in results[n] for n in names) else 0


def _machine() -> dict:
    import platform
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or os.environ.get("BENCH_COMMIT")
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "commit": commit}


if __name__ == "__main__":
    sys.exit(main())
