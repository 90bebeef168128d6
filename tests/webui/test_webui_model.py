"""The verdict model behind the matrix and the review, on inline policies (no agent)."""
from __future__ import annotations

import pytest

from stockade.policy.api.loader import load_text
from stockade_webui import model

WEB, DB, API, REMOTE = 256, 257, 258, 300
IDENTS = [
    {"id": 1, "labels": ["reserved:host"], "kind": "reserved", "local": True},
    {"id": 2, "labels": ["reserved:world"], "kind": "reserved", "local": False},
    {"id": WEB, "labels": ["static:app=web"], "kind": "workload", "local": True},
    {"id": DB, "labels": ["static:app=db"], "kind": "workload", "local": True},
    {"id": API, "labels": ["static:app=api"], "kind": "workload", "local": True},
    {"id": REMOTE, "labels": ["remote:app=web"], "kind": "workload", "local": False},
]


def pol(spec: str, name="p") -> list:
    return load_text(f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\n"
                     f"spec:\n{spec}", f"{name}.yaml")


DB_FROM_WEB = """\
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: "5432", protocol: TCP}]}]}]
"""
API_DENY_22 = """\
  endpointSelector: {matchLabels: {app: api}}
  ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]
  ingressDeny: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: "22", protocol: TCP}]}]}]
"""
WEB_EGRESS_DNS = """\
  endpointSelector: {matchLabels: {app: web}}
  egress: [{toEndpoints: [{matchLabels: {app: db}}], toPorts: [{ports: [{port: "5000", endPort: 5003, protocol: TCP}]}]}]
"""


@pytest.mark.parametrize("spec,src,dst,state,allow,deny", [
    ("", WEB, DB, "open", [], []),
    (DB_FROM_WEB, WEB, DB, "ports", ["5432/tcp"], []),
    (DB_FROM_WEB, API, DB, "closed", [], []),
    (DB_FROM_WEB, DB, WEB, "open", [], []),
    (DB_FROM_WEB, REMOTE, DB, "ports", ["5432/tcp"], []),   # a selector without source: any source
    (API_DENY_22, WEB, API, "any", [], ["22/tcp"]),
    (WEB_EGRESS_DNS, WEB, DB, "ports", ["5000-5003/tcp"], []),
    (WEB_EGRESS_DNS, WEB, API, "closed", [], []),
], ids=["no-policy", "allowed-port", "default-deny", "other-direction", "remote-source",
        "deny-rule", "port-range", "egress-default-deny"])
def test_cells(spec, src, dst, state, allow, deny):
    ev = model.Evaluator(pol(spec) if spec else [], IDENTS)
    c = ev.cell(src, dst)
    assert (c.state, c.allow, c.deny) == (state, allow, deny)


def test_remote_pairs_are_not_evaluated_here():
    ev = model.Evaluator(pol(DB_FROM_WEB), IDENTS)
    assert ev.cell(REMOTE, 2).remote


def test_audit_identities_make_denies_audit():
    ev = model.Evaluator(pol(DB_FROM_WEB), IDENTS, audit_ids={DB})
    c = ev.cell(API, DB)
    assert c.state == "closed" and c.audit and c.css == "audit"
    assert model.Evaluator(pol(DB_FROM_WEB), IDENTS).cell(API, DB).css == "deny"


@pytest.mark.parametrize("labels,text,ok", [
    (["static:app=web", "static:tier=front"], "app=web", True),
    (["static:app=web", "static:tier=front"], "app=web,tier=back", False),
    (["static:app=web"], "tier", False),
    (["static:app=web"], "app", True),
    (["static:app=web"], "static:app=web", True),
    (["static:app=web"], "podman:app=web", False),
    (["reserved:world"], "reserved:world", True),
    (["static:app=web"], "", True),
], ids=["kv", "and", "missing-key", "key-only", "with-source", "other-source", "reserved", "empty"])
def test_label_filter(labels, text, ok):
    assert model.label_filter_matches(labels, text) is ok


def flow(src, dst, port, verdict="FORWARDED", direction="ingress", sport=40000, reply=False):
    return {"time": "2026-01-01T00:00:00.000000Z", "verdict": verdict, "direction": direction,
            "ip": {"source": "10.0.0.1", "destination": "10.0.0.2"}, "is_reply": reply,
            "l4": {"protocol": "tcp", "source_port": sport, "destination_port": port},
            "source": {"identity": src, "labels": next(i["labels"] for i in IDENTS if i["id"] == src)},
            "destination": {"identity": dst, "labels": next(i["labels"] for i in IDENTS if i["id"] == dst)},
            "connection": f"tcp 10.0.0.1:{sport} -> 10.0.0.2:{port}"}


def test_connections_take_the_harshest_hook_and_skip_replies():
    flows = [flow(API, DB, 5432, "FORWARDED", "egress"), flow(API, DB, 5432, "DROPPED", "ingress"),
             flow(DB, API, 40000, reply=True), flow(WEB, DB, 5432, sport=1)]
    conns = model.connections(flows)
    assert [(c["source"]["identity"], c["verdict"]) for c in conns] == [(API, "DROPPED"), (WEB, "FORWARDED")]


def test_flow_changes_group_and_word_the_change():
    live = pol(DB_FROM_WEB, "db")
    proposed = pol(DB_FROM_WEB.replace("app: web", "app: api"), "db")
    old = model.Evaluator(live, IDENTS)
    new = model.Evaluator(model.merged(live, proposed, False), IDENTS)
    flows = [flow(WEB, DB, 5432, sport=s) for s in range(12)] + [flow(API, DB, 5432, "DROPPED")] \
        + [flow(WEB, API, 80)]
    got = model.flow_changes(flows, old, new)
    assert [g["text"] for g in got] == [
        "would block 12 connections seen in the last hour from app=web to app=db:5432",
        "would allow 1 connection seen in the last hour from app=api to app=db:5432"]
    pairs = model.pair_changes(old, new, model.matrix_identities(IDENTS))
    assert {(p["src"], p["dst"], tuple(p["allowed"]), tuple(p["denied"])) for p in pairs} == {
        ("app=web", "app=db", (), ("5432/tcp",)), ("app=api", "app=db", ("5432/tcp",), ())}


def test_merged_replace_all():
    a, b = pol(DB_FROM_WEB, "a"), pol(API_DENY_22, "b")
    assert [p.ref.name for p in model.merged(a, b, False)] == ["a", "b"]
    assert [p.ref.name for p in model.merged(a, b, True)] == ["b"]


def test_service_map_has_positions_and_distinct_edges():
    flows = [flow(WEB, DB, 5432), flow(API, DB, 5432, "DROPPED", sport=2)]
    m = model.service_map(flows, {i["id"]: i for i in IDENTS})
    assert {n["name"] for n in m["nodes"]} == {"app=web", "app=db", "app=api"}
    assert {(e["from"], e["verdict"]) for e in m["edges"]} == {("app=web", "FORWARDED"), ("app=api", "DROPPED")}
    for n in m["nodes"]:
        assert 0 < n["x"] < m["width"] and 0 < n["y"] < m["height"]
