"""The BPF fuzz run at scale: 10,000,000 frames through the real programs with
BPF_PROG_TEST_RUN, each verdict checked against the reference model
(tests/fuzz_harness.py, tests/bpf_model.py; ``make test`` runs 100,000).

    .venv/bin/python -m bench.fuzz_bench [--packets N] [--seed S]

A disagreement fails the benchmark (exit 1, the frame in the message). Prints one
JSON line (the last line): frames run, frames per second (generation, test run and
model together), and how many ended in each verdict/reason.
"""
from __future__ import annotations

import argparse
import json
import random
import sys

import bench.common  # noqa: F401  (puts tests/ on sys.path)

from fuzz_harness import FuzzEnv, Mismatch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packets", type=int, default=10_000_000)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    with FuzzEnv() as env:
        try:
            res = env.run(args.packets, seed)
        except Mismatch as exc:
            print(json.dumps({"error": str(exc), "seed": seed}))
            return 1
    res["seed"] = seed
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
