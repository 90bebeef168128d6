"""Compiler benchmark: 1,000 identities x 2,000 rules, full compile and one-identity
incremental updates. Runs in a fresh process so peak memory is its own."""
from __future__ import annotations

import gc
import resource
import statistics
import time

from stockade.policy.api.validation import sanitize_document
from stockade.policy.compiler import Compiler
from stockade.policy.identity import IdentityAllocator, reserved_identities
from stockade.policy.labels import LabelSet

N_IDENTITIES = 1000
N_RULES = 2000


def make_policies(n_rules=N_RULES, n_ids=N_IDENTITIES):
    out = []
    for j in range(n_rules):
        peer = {"matchLabels": {"app": f"svc-{(j * 7 + 1) % n_ids}"}}
        if j % 10 == 0:  # a tenth select a whole tier of peers (100 identities)
            peer = {"matchExpressions": [{"key": "tier", "operator": "In", "values": [f"t{j % 10}"]}]}
        spec = {"endpointSelector": {"matchLabels": {"app": f"svc-{j % n_ids}"}},
                "ingress": [{"fromEndpoints": [peer],
                             "toPorts": [{"ports": [{"port": str(8000 + j % 50), "protocol": "TCP"}]}]}],
                "egress": [{"toEndpoints": [peer]}]}
        if j % 100 == 0:
            spec["ingressDeny"] = [{"fromCIDR": ["192.0.2.0/24"]}]
        out.append(sanitize_document({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                                      "metadata": {"name": f"p{j}"}, "spec": spec}))
    return out


def identities(alloc, n=N_IDENTITIES):
    return [alloc.workload(LabelSet.from_mapping({"app": f"svc-{i}", "tier": f"t{i % 10}"}))
            for i in range(n)]


def run() -> dict:
    policies = make_policies()
    alloc = IdentityAllocator()
    ids = identities(alloc)
    import ipaddress
    cidr = alloc.cidr(ipaddress.ip_network("192.0.2.0/24"))
    gc.collect()
    t0 = time.perf_counter()
    c = Compiler()
    for r in reserved_identities():
        c.add_identity(r)
    c.add_identity(cidr)
    for ident in ids:
        c.add_identity(ident, local=True)
    c.set_policies(policies)
    full_s = time.perf_counter() - t0
    entries = len(c.entries)

    add_ms, remove_ms, changed = [], [], []
    for i in range(50):
        ident = alloc.workload(LabelSet.from_mapping({"app": f"svc-{(i * 37) % N_IDENTITIES}",
                                                       "tier": f"t{i % 10}", "extra": f"x{i}"}))
        t = time.perf_counter()
        d = c.add_identity(ident, local=True)
        add_ms.append((time.perf_counter() - t) * 1000)
        changed.append(len(d.adds))
        t = time.perf_counter()
        c.remove_identity(ident.id)
        remove_ms.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    d = c.set_policy(make_policies(1)[0].__class__(**{**make_policies(1)[0].__dict__}))
    one_policy_ms = (time.perf_counter() - t) * 1000
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "identities": N_IDENTITIES, "rules": N_RULES, "entries": entries,
        "full_compile_s": round(full_s, 3),
        "incremental_add_identity_ms_p50": round(statistics.median(add_ms), 2),
        "incremental_add_identity_ms_max": round(max(add_ms), 2),
        "incremental_remove_identity_ms_p50": round(statistics.median(remove_ms), 2),
        "entries_changed_per_identity_p50": statistics.median(changed),
        "incremental_one_policy_ms": round(one_policy_ms, 2),
        "incremental_vs_full_ratio": round(statistics.median(add_ms) / 1000 / full_s, 5),
        "peak_rss_mb": round(peak_mb, 1),
    }


if __name__ == "__main__":
    import json
    print(json.dumps(run()))
