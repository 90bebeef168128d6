"""Flow benchmark: raw datapath events decoded in batches and stored in the flow ring,
filter queries over a full ring, and the memory of a full ring. Runs in a fresh
process so RSS figures are its own; needs no kernel (the events are built in memory
exactly as the BPF program writes them).

    python -m bench.flows_bench        # one JSON line
"""
from __future__ import annotations

import gc
import ipaddress
import os
import random
import resource
import time

from stockade.datapath import maps as m
from stockade.flows import EVENT, Decoder, FlowFilter, FlowRing, Resolver
from stockade.flows.record import RECORD_SIZE

RING = 65535
EVENTS = 400_000
BATCH = 512          # events per ring-buffer poll in the agent (one poll drains the ring)
N_ENDPOINTS = 200
N_IDENTITIES = 100


def _rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def make_events(n: int, seed: int = 1) -> list[bytes]:
    """n raw events between N_ENDPOINTS endpoints, a tenth of them drops."""
    rnd = random.Random(seed)
    addrs = [ipaddress.ip_address(f"10.{i // 250}.{i % 250}.1").packed.ljust(16, b"\0")
             for i in range(N_ENDPOINTS)]
    now = time.monotonic_ns()
    out = []
    for i in range(n):
        s, d = rnd.randrange(N_ENDPOINTS), rnd.randrange(N_ENDPOINTS)
        drop = i % 10 == 0
        egress = rnd.randrange(2)  # the hook is the local endpoint's: sender's or receiver's
        out.append(EVENT.pack(
            now + i, 100 + (s if egress else d), 1000 + s % N_IDENTITIES,
            1000 + d % N_IDENTITIES, egress, 1 if drop else 0, 1 if drop else 0, 4, addrs[s], addrs[d],
            rnd.randrange(32768, 61000), rnd.choice((80, 443, 5432, 53, 8080)),
            rnd.choice((6, 6, 6, 17)), 0x02, 0, 0, 74,
            m.MATCH_DEFAULT_DENY if drop else m.MATCH_ALLOW, 0))
    return out


def make_resolver() -> Resolver:
    by_addr = {ipaddress.ip_address(f"10.{i // 250}.{i % 250}.1").packed.ljust(16, b"\0"):
               (f"ep-{i}", "bench-host") for i in range(N_ENDPOINTS)}
    labels = {1000 + i: (f"k8s:app=svc-{i}", f"k8s:tier=t{i % 10}") for i in range(N_IDENTITIES)}
    policies = lambda local, peer, d, proto, port: [f"default/allow-{local}"]  # noqa: E731
    return Resolver({100 + i: f"ep-{i}" for i in range(N_ENDPOINTS)}, by_addr, labels,
                    policies, {100 + i: f"veth{i}" for i in range(N_ENDPOINTS)}, "bench-host")


def run() -> dict:
    events = make_events(EVENTS)
    batches = [events[i:i + BATCH] for i in range(0, len(events), BATCH)]
    gc.collect()
    rss_empty = _rss_kb()
    ring = FlowRing(RING)
    dec = Decoder(ring, make_resolver())
    rss_alloc = _rss_kb()
    # warm up interning and caches with one batch, as a running agent has them warm
    dec.decode_into_ring(batches[0])
    t, c = time.perf_counter(), time.process_time()
    for b in batches:
        dec.decode_into_ring(b)
    decode_s = time.perf_counter() - t
    decode_cpu_s = time.process_time() - c
    gc.collect()
    rss_full = _rss_kb()
    # queries over a full ring
    timings = {}
    for name, crit in (("verdict_dropped", {"verdict": ["DROPPED"]}),
                       ("label_and_port", {"from_label": ["app=svc-1", "app=svc-2"],
                                           "port": ["5432"]}),
                       ("last_100", {"last": 100})):
        t = time.perf_counter()
        rows = FlowFilter.parse(crit).select(ring)
        dicts = [ring.to_dict(r) for r in rows]
        timings[name] = (round((time.perf_counter() - t) * 1000, 1), len(dicts))
    return {
        "events": EVENTS, "batch": BATCH,
        "decode_store_events_per_s": round(EVENTS / decode_s),
        "decode_store_us_per_event": round(decode_s / EVENTS * 1e6, 2),
        "decode_store_events_per_cpu_s": round(EVENTS / decode_cpu_s),
        "load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
        "ring_records": len(ring), "record_bytes": RECORD_SIZE,
        "ring_buffer_mb": round(ring.nbytes / 2**20, 2),
        "ring_rss_mb": round((rss_full - rss_empty) / 1024, 1),
        "ring_rss_alloc_mb": round((rss_alloc - rss_empty) / 1024, 1),
        "interned_infos": len(ring.infos), "interned_policy_sets": len(ring.policies),
        "query_verdict_dropped_ms": timings["verdict_dropped"][0],
        "query_verdict_dropped_matches": timings["verdict_dropped"][1],
        "query_label_port_ms": timings["label_and_port"][0],
        "query_last_100_ms": timings["last_100"][0],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


if __name__ == "__main__":
    import json
    print(json.dumps(run()))
