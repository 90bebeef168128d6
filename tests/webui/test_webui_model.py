"""What the web UI computes itself: names and the service map layout (presentation
only; every policy answer comes from the agent, tests/test_agent_answers.py)."""
from __future__ import annotations

from stockade.flows import connections
from stockade_webui import model

WEB, DB, API = 256, 257, 258
LABELS = {WEB: ["static:app=web"], DB: ["static:app=db"], API: ["static:app=api"]}


def flow(src, dst, port, verdict="FORWARDED", direction="ingress", sport=40000, reply=False):
    return {"time": "2026-01-01T00:00:00.000000Z", "verdict": verdict, "direction": direction,
            "ip": {"source": "10.0.0.1", "destination": "10.0.0.2"}, "is_reply": reply,
            "l4": {"protocol": "tcp", "source_port": sport, "destination_port": port},
            "source": {"identity": src, "labels": LABELS[src]},
            "destination": {"identity": dst, "labels": LABELS[dst]},
            "connection": f"tcp 10.0.0.1:{sport} -> 10.0.0.2:{port}"}


def test_connections_take_the_harshest_hook_and_skip_replies():
    flows = [flow(API, DB, 5432, "FORWARDED", "egress"), flow(API, DB, 5432, "DROPPED", "ingress"),
             flow(DB, API, 40000, reply=True), flow(WEB, DB, 5432, sport=1)]
    conns = connections(flows)
    assert [(c["source"]["identity"], c["verdict"]) for c in conns] == [(API, "DROPPED"), (WEB, "FORWARDED")]


def test_names():
    assert model.short_labels(["static:app=web", "static:tier=front"]) == "app=web,tier=front"
    assert model.identity_name({"kind": "cidr", "prefix": "10.0.0.0/8", "labels": []}) == "cidr:10.0.0.0/8"
    assert model.identity_name(None, 7) == "identity 7"


def test_service_map_has_positions_and_distinct_edges():
    flows = [flow(WEB, DB, 5432), flow(API, DB, 5432, "DROPPED", sport=2)]
    idents = {i: {"id": i, "labels": l, "kind": "workload"} for i, l in LABELS.items()}
    m = model.service_map(flows, idents)
    assert {n["name"] for n in m["nodes"]} == {"app=web", "app=db", "app=api"}
    assert {(e["from"], e["verdict"]) for e in m["edges"]} == {("app=web", "FORWARDED"), ("app=api", "DROPPED")}
    assert {p for e in m["edges"] for p in e["ports"]} == {"5432/tcp"}
    for n in m["nodes"]:
        assert 0 < n["x"] < m["width"] and 0 < n["y"] < m["height"]
