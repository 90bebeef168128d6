"""How long a removed filter leaves a protected interface open (issue 14.2).

    .venv/bin/python -m bench.attach_bench            # 20 trials per removal
    .venv/bin/python -m bench.attach_bench --quick    # 5

A real agent (tests/agentproc.py) in tc mode protects three namespace workloads on a
test bridge; b's policy admits only a. A sender in c sends numbered UDP probes to b
every 0.5 ms (tests/probe.py: denied, so none should arrive). Each trial runs
``tc filter del dev B egress`` or ``tc qdisc del dev B clsact`` and measures, from the
moment the command returned, the time to the first dropped probe after the last one
that got through (0 when none got through after the return), and the count of denied
probes that reached b from the moment the command started. The agent's guard restores
the filter (rtnetlink event + checks every 0.5 s). p50, p99 and max over the trials.

The same removals against an agent in tcx mode (BPF links) show what owned attachments
change: nothing is removed, no probe arrives.

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

# isort: off
from bench.common import median  # puts tests/ on sys.path

from agentproc import AgentProcess  # noqa: E402
from netns import Topology, run  # noqa: E402
from probe import Probe  # noqa: E402
from traffic import eventually, tcp_ok, udp_ok  # noqa: E402

from stockade.datapath.attachments import programs_on  # noqa: E402
# isort: on

NET4 = "10.213.73."
POLICY = {"name": "b.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-from-a}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress: [{fromEndpoints: [{matchLabels: {app: a}}]}]
"""}
REMOVALS = {"filter": ("tc", "filter", "del", "dev", "{dev}", "egress"),
            "qdisc": ("tc", "qdisc", "del", "dev", "{dev}", "clsact")}


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def trials(mode: str, n: int) -> dict:
    out: dict = {}
    with Topology("ab") as t:
        w = {k: t.add_workload(k, [f"{NET4}{i}/24"]) for i, k in enumerate("abc", start=1)}
        b = w["b"]
        with AgentProcess(attach_mode=mode) as agent:
            for k in "abc":
                agent.client.add_endpoint(name=k, interface=w[k].host_if, ips=w[k].ips,
                                          labels={"app": k})
            agent.client.put_policies([POLICY])
            assert tcp_ok(w["a"], b, b.ip4, 80) and not udp_ok(w["c"], b, b.ip4, 7100)
            for how, argv in REMOVALS.items():
                open_ms, leaked, repaired_ms, intervals = [], [], [], []
                for i in range(n):
                    with Probe(w["c"], b, b.ip4, 7101 + i) as p:
                        time.sleep(0.1)
                        t0 = time.monotonic()
                        run(*[a.format(dev=b.host_if) for a in argv], check=False)
                        t1 = time.monotonic()
                        ok = eventually(lambda: "to_endpoint" in programs_on(b.host_ifindex)["egress"],
                                        timeout=5, interval=0.001)
                        t2 = time.monotonic()
                        time.sleep(0.3)
                    assert ok, "not restored within 5 s"
                    open_ms.append(round(p.open_for(t1) * 1000, 2))
                    leaked.append(p.leaked_after(t0))
                    repaired_ms.append(round((t2 - t1) * 1000, 2))
                    intervals.append(p.max_interval(t0 - 0.05, t2 + 0.2) * 1000)
                    assert not udp_ok(w["c"], b, b.ip4, 7099)
                out[how] = {
                    "trials": n,
                    "open_ms_p50": median(open_ms), "open_ms_p99": p99(open_ms),
                    "open_ms_max": max(open_ms),
                    "leaked_probes_p50": median(leaked), "leaked_probes_p99": p99(leaked),
                    "leaked_probes_max": max(leaked), "leaked_probes_total": sum(leaked),
                    "seen_restored_ms_p99": p99(repaired_ms),
                    "probe_interval_ms_max": round(max(intervals), 2),
                }
            st = json.loads(agent.cli("status", "-o", "json", check=False).stdout)
            out["repairs"] = st["attach"]["repairs"]
            out["status_after"] = st["status"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    n = 5 if args.quick else 20
    tc = trials("tc", n)
    tcx = trials("tcx", max(3, n // 4))
    result = {"bench": "attach", "tc": tc, "tcx": tcx,
              "open_ms_p99": max(tc["filter"]["open_ms_p99"], tc["qdisc"]["open_ms_p99"]),
              "tcx_leaked_total": tcx["filter"]["leaked_probes_total"]
              + tcx["qdisc"]["leaked_probes_total"]}
    result["ok"] = result["open_ms_p99"] < 1000 and result["tcx_leaked_total"] == 0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
