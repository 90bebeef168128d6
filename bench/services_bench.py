"""Service definition change -> datapath: how soon relabelling a running workload is in
force, with no workload restarted (issue 9 target: < 1 s).

A real agent process with two namespace workloads (static endpoints, no labels of their
own): "client" becomes a member of service web by a definition change, and db allows
ingress only from service=web. Measured per round: PUT /v1/services returned and
(a) the agent reports the endpoint's new service, (b) the first allowed TCP connection
succeeds; then the membership is removed and the first denied connection is timed.

Prints one JSON line: bench, rounds, apply_ms_p50, allowed_ms_p50, allowed_ms_max,
denied_ms_p50, denied_ms_max, target_ms, ok.
"""
from __future__ import annotations

import json
import time

from bench.common import median  # puts tests/ on sys.path

from agentproc import AgentProcess  # noqa: E402
from netns import Topology  # noqa: E402
from traffic import tcp_ok  # noqa: E402

TARGET_MS = 1000
ROUNDS = 10
POLICY = {"name": "svc.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {service: db}}
  ingress: [{fromEndpoints: [{matchLabels: {service: web}}]}]
"""}


def until(fn, timeout=5.0) -> float:
    """Milliseconds until the start of the first call of fn() that is true (inf if
    never): a denied probe's own connect timeout is not counted."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        started = time.monotonic()
        if fn():
            return (started - t0) * 1000
    return float("inf")


def main() -> dict:
    with Topology("sb") as topo:
        client = topo.add_workload("c", ["10.213.60.1/24"])
        db = topo.add_workload("d", ["10.213.60.2/24"])
        with AgentProcess() as agent:
            base = {"db": {"members": [{"endpoint": "db"}]}}
            member = {**base, "web": {"members": [{"endpoint": "client"}]}}
            agent.client.put_services(base)
            agent.client.put_policies([POLICY])
            agent.client.add_endpoint(name="client", interface=client.host_if, ips=client.ips)
            agent.client.add_endpoint(name="db", interface=db.host_if, ips=db.ips)
            ok = lambda: tcp_ok(client, db, db.ip4, 7000, timeout=0.2)  # noqa: E731
            apply_ms, allowed, denied = [], [], []
            for _ in range(ROUNDS):
                t0 = time.monotonic()
                agent.client.put_services(member)
                apply_ms.append((time.monotonic() - t0) * 1000)
                allowed.append(apply_ms[-1] + until(ok))
                t0 = time.monotonic()
                agent.client.put_services(base)
                denied.append((time.monotonic() - t0) * 1000 + until(lambda: not ok()))
    return {"bench": "services", "rounds": ROUNDS, "apply_ms_p50": round(median(apply_ms), 2),
            "allowed_ms_p50": round(median(allowed), 2), "allowed_ms_max": round(max(allowed), 2),
            "denied_ms_p50": round(median(denied), 2), "denied_ms_max": round(max(denied), 2),
            "target_ms": TARGET_MS, "ok": max(allowed + denied) < TARGET_MS}


if __name__ == "__main__":
    print(json.dumps(main()))
