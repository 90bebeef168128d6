"""The policy loader on hostile and on large input (issue 12).

1. The performance issue's 100,000-entry file (10,000 CiliumNetworkPolicy documents,
   about 5.4 MB, from ``common.stockade_policies``): CPU time of loading it the way the
   loader did before (PyYAML's ``load_all`` with libyaml's CSafeLoader, then the same
   validation) and with the loader now (``load_text``: safeload's one pass over libyaml's
   events), in the same run; median of 3 each.
2. Fuzzing: 1,000,000 random inputs (tests/policyfuzz.py: random structures, corpus
   mutations, text mutations, alias and nesting bombs, tags) loaded in 2 worker
   processes, stopped after 30 minutes if not done. A failure is any exception other
   than PolicyErrors, more than 1 s of CPU for one input, or a worker that dies (a
   crash). Reported: inputs run, failures, the slowest input and its CPU time.

Run alone: ``.venv/bin/python -m bench.run loader``; quick look:
``.venv/bin/python -m bench.policy_fuzz_bench --inputs 20000``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from bench.common import stockade_policies  # also puts tests/ on sys.path

INPUTS = 1_000_000
CAP_S = 30 * 60
CHUNK = 2000
WORKERS = 2
CPU_LIMIT_S = 1.0


def _old_load_text(text: str, name: str) -> list:
    """The loader before issue 12, for a valid file: PyYAML's constructor, then validation."""
    import yaml

    from stockade.policy.api.validation import sanitize_document
    docs = []
    for d in yaml.load_all(text, Loader=yaml.CSafeLoader):
        if isinstance(d, list):
            docs.extend(d)
        elif d is not None:
            docs.append(d)
    return [sanitize_document(d, source=name) for d in docs]


def bench_file() -> dict:
    from stockade.policy.api.loader import load_text
    text = stockade_policies([(f"p{i}", list(range(1000, 1010))) for i in range(10000)], "srv")
    out = {"bytes": len(text.encode()), "documents": 10000, "entries": 100000}
    for key, fn in (("before", _old_load_text), ("after", load_text)):
        cpu, wall = [], []
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            policies = fn(text, "bench.yaml")
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
            assert len(policies) == 10000
        out[f"{key}_cpu_s"] = round(statistics.median(cpu), 3)
        out[f"{key}_wall_s"] = round(statistics.median(wall), 3)
    out["after_vs_before"] = round(out["after_cpu_s"] / out["before_cpu_s"], 2)
    return out


def run_chunk(seed: int, count: int, deadline: float) -> dict:
    """``count`` inputs from ``random.Random(seed)`` (in a worker process)."""
    import policyfuzz
    rng = random.Random(seed)
    res = {"inputs": 0, "failures": [], "slowest": (0.0, "", "", ""), "families": {}}
    for _ in range(count):
        if time.time() > deadline:
            break
        family, text, name = policyfuzz.random_input(rng)
        res["inputs"] += 1
        res["families"][family] = res["families"].get(family, 0) + 1
        try:
            cpu = policyfuzz.check(text, name)
        except Exception as exc:  # noqa: BLE001 - the point: anything but PolicyErrors is a failure
            res["failures"].append({"seed": seed, "family": family, "name": name,
                                    "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                                    "input": repr(text[:300])})
            continue
        if cpu > CPU_LIMIT_S:
            res["failures"].append({"seed": seed, "family": family, "name": name,
                                    "error": f"{cpu:.2f} s of CPU", "input": repr(text[:300])})
        if cpu > res["slowest"][0]:
            res["slowest"] = (cpu, family, name, repr(text[:200]))
    return res


def fuzz(inputs: int, cap_s: float, workers: int) -> dict:
    start = time.time()
    deadline = start + cap_s
    total = {"inputs": 0, "failures": [], "slowest": (0.0, "", "", ""), "families": {}}
    chunks = iter(range((inputs + CHUNK - 1) // CHUNK))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = {}

        def submit():
            seed = next(chunks, None)
            if seed is not None and time.time() < deadline:
                count = min(CHUNK, inputs - seed * CHUNK)
                pending[pool.submit(run_chunk, seed, count, deadline)] = seed

        for _ in range(workers * 2):
            submit()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                seed = pending.pop(fut)
                try:
                    res = fut.result()
                except BrokenProcessPool as exc:  # a worker died: a crash in the loader
                    total["failures"].append({"seed": seed, "error": f"worker died: {exc}"})
                    pending.clear()
                    break
                total["inputs"] += res["inputs"]
                total["failures"] += res["failures"]
                for k, v in res["families"].items():
                    total["families"][k] = total["families"].get(k, 0) + v
                if res["slowest"][0] > total["slowest"][0]:
                    total["slowest"] = res["slowest"]
                submit()
    wall = time.time() - start
    cpu, family, name, text = total["slowest"]
    return {"inputs": total["inputs"], "target_inputs": inputs, "cap_s": cap_s,
            "stopped_by_cap": total["inputs"] < inputs, "workers": workers,
            "wall_s": round(wall, 1), "inputs_per_s": round(total["inputs"] / wall),
            "failures": len(total["failures"]), "failure_examples": total["failures"][:5],
            "slowest_cpu_s": round(cpu, 4), "slowest_family": family, "slowest_name": name,
            "slowest_input": text, "families": total["families"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=INPUTS)
    ap.add_argument("--cap-s", type=float, default=CAP_S)
    ap.add_argument("--workers", type=int, default=WORKERS)
    args = ap.parse_args(argv)
    result = {"bench": "loader", "bench_file": bench_file(),
              "fuzz": fuzz(args.inputs, args.cap_s, args.workers)}
    print(json.dumps(result), flush=True)
    return 0  # failures are figures (the report marks them), not a crash of the benchmark


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
