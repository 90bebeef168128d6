"""``make bench-quick``: the issue-19 figures in one short run (< 6 minutes on the project's
machine): the datapath comparison at N = 100,000 (3 interleaved rounds), 20 container
starts, and a 100,000-entry import from the CLI. The last line holds every figure:

    throughput ratio stockade/nofilter: X  connection-rate ratio stockade/nofilter: X
    connection-rate ratio stockade/nftables: X  N: 100000  container start p99 ms: X
    import 100000 entries s: X

(on one line, two spaces between the pairs). The container start latency is the
controlplane benchmark's: from the call of ``podman start`` (Stockade's OCI hook installed
with ``--hooks-dir``) to the first allowed connection.
"""
from __future__ import annotations

import json
import os
import sys
import time

from bench.common import enter_own_namespace, median, rmtree, tmpdir
from bench.controlplane_bench import (add_peers, add_server, bench_podman, layout,
                                      stockade_import, write_policy)
from bench.datapath_bench import SUBNET, Bench

from agentproc import AgentProcess  # noqa: E402
from netns import Topology  # noqa: E402

N = 100000


def import_100000() -> float:
    tmp = tmpdir("stockade-bench-quick-")
    try:
        with Topology(tag="q") as topo:
            srv = topo.add_workload("s", [f"{SUBNET}.1/24"])
            with AgentProcess(managed_bridges=[], managed_interfaces=[]) as agent:
                c = agent.client
                lay = layout(N)
                add_peers(c, lay)
                add_server(c, srv)
                pol = write_policy(os.path.join(tmp, "bench.yaml"), lay)
                got = []
                for _ in range(3):
                    c.delete_all_policies()
                    got.append(stockade_import(agent, pol))
                return round(median(got), 3)
    finally:
        rmtree(tmp)


def main() -> int:
    enter_own_namespace()
    started = time.monotonic()
    dp = Bench([N], rounds=3, secs=2).run()
    print(json.dumps({"datapath": dp}), file=sys.stderr, flush=True)
    pm = bench_podman(starts=20)
    print(json.dumps({"podman": pm}), file=sys.stderr, flush=True)
    imp = import_100000()
    r = dp["n"][str(N)]["ratios"]["stockade"]
    vs_nft = dp["targets"]["conn_rate_vs_nftables"]   # median of the per-round ratios
    print(json.dumps({"import_100000_s": imp, "seconds": round(time.monotonic() - started)}))
    print(f"throughput ratio stockade/nofilter: {r['throughput_gbps']:.2f}  "
          f"connection-rate ratio stockade/nofilter: {r['conn_per_s']:.2f}  "
          f"connection-rate ratio stockade/nftables: {vs_nft:.2f}  N: {N}  "
          f"container start p99 ms: {pm['start_to_enforced_ms_p99']:.1f}  "
          f"import {N} entries s: {imp:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
