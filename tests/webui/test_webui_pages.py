"""Every page and API route against the fake agent: what an operator sees."""
from __future__ import annotations

import re

import pytest

from conftest import FlowAgent
from stockade.daemon.server import APIServer


def text(resp) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", resp.get_data(as_text=True)))


@pytest.mark.parametrize("path,needles", [
    ("/", ["h1", "enforcement: default", "Endpoints", "Policy revision", "Drops, 5 min"]),
    ("/endpoints", ["web1", "db1", "10.9.0.3", "vdb1", "app=db", "Identities", "IP cache"]),
    ("/policies", ["db", "endpoints {app=web}", "{app=db}", "5432/TCP", "source: db.yaml", "YAML"]),
    ("/matrix", ["from ↓ · to →", "app=web", "app=db", "5432/tcp"]),
    ("/review", ["Review a proposed policy set", "dry run"]),
    ("/flows", ["FORWARDED", "DROPPED", "app=web", "app=db", "tcp 10.9.0.2:40000 → 10.9.0.3:5432"]),
    ("/map", ["app=web", "app=db", "5432/tcp ×12"]),
], ids=["overview", "endpoints", "policies", "matrix", "review", "flows", "map"])
def test_page_shows_the_agent_state(logged_in, path, needles):
    r = logged_in.get(path)
    assert r.status_code == 200
    body = text(r)
    for n in needles:
        assert n in body, n


def test_overview_counts_drops_in_the_last_5_and_60_minutes(logged_in):
    body = text(logged_in.get("/"))
    assert re.search(r"Drops, 5 min 1 ", body) and re.search(r"Drops, 60 min 1 ", body)
    data = logged_in.get("/api/v1/overview").json[0]
    assert (data["drops_5m"], data["drops_60m"]) == (1, 1)
    assert data["health"]["policies"] == 1


def test_endpoint_search_filters_every_table(logged_in):
    body = text(logged_in.get("/endpoints?q=db"))
    assert "db1" in body and "web1" not in body
    data = logged_in.get("/api/v1/endpoints?q=10.9.0.2").json
    assert [e["name"] for e in data["endpoints"]] == ["web1"]


def test_endpoint_counters_count_the_last_hour_by_hook(logged_in):
    counters = logged_in.get("/api/v1/endpoints").json["counters"]
    assert counters["db1"]["ingress"] == {"FORWARDED": 12, "DROPPED": 1}
    assert "api1" not in counters                   # its only flow is two hours old
    assert "✓12" in text(logged_in.get("/endpoints"))


def test_endpoints_page_shows_dropped_labels(own_agent, auth_for):
    agent, sock = own_agent
    agent.add_endpoint({"name": "forger1", "interface": "vf1", "ips": ["10.9.0.9"],
                        "labels": {"app": "web", "container:role": "gateway"}})
    c = auth_for(sock)
    html = c.get("/endpoints").get_data(as_text=True)
    assert re.search(r'<span class="label dropped" title="source container is not static[^"]*">'
                     r'container:role=gateway</span> <span class="muted">\(other-source\)</span>', html)
    assert 'title="static:app=web">app=web<' in html
    [ep] = [e for e in c.get("/api/v1/endpoints").json["endpoints"] if e["name"] == "forger1"]
    assert [d["label"] for d in ep["dropped_labels"]] == ["container:role=gateway"]


def cell(data, src_name, dst_name):
    ids = {i["name"]: i["id"] for i in data["identities"]}
    row = next(r for r in data["rows"] if r["src"] == ids[src_name])
    return next(c for c in row["cells"] if c["dst"] == ids[dst_name])


def test_matrix_cells_list_allowed_ports(logged_in):
    data = logged_in.get("/api/v1/matrix").json
    assert cell(data, "app=web", "app=db")["allow"] == ["5432/tcp"]
    assert cell(data, "app=web", "app=db")["css"] == "allow"
    assert cell(data, "app=api", "app=db")["state"] == "closed"
    assert cell(data, "app=api", "app=db")["css"] == "deny"
    assert cell(data, "app=db", "app=web")["state"] == "open"


def test_matrix_label_filter(logged_in):
    data = logged_in.get("/api/v1/matrix?label=app=db").json
    assert [i["name"] for i in data["identities"]] == ["app=db"]
    assert "app=web" not in text(logged_in.get("/matrix?label=app%3Ddb")).split("Filter")[-1]


DENY_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-ssh}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: api}}]
  ingressDeny:
    - fromEndpoints: [{matchLabels: {app: api}}]
      toPorts: [{ports: [{port: "22", protocol: TCP}]}]
"""


def test_matrix_shows_deny_and_audit_distinctly(own_agent, auth_for):
    agent, sock = own_agent
    agent.put_policies([{"name": "deny.yaml", "text": DENY_POLICY}])
    c = auth_for(sock)
    data = c.get("/api/v1/matrix").json
    web = cell(data, "app=api", "app=web")
    assert web["state"] == "any" and web["deny"] == ["22/tcp"] and web["css"] == "open"
    # put db1 into audit: its denies are only logged
    db = next(e for e in agent.list_endpoints() if e["name"] == "db1")
    agent.add_endpoint({"name": "db1", "interface": db["interface"], "ips": db["ips"],
                        "labels": {"app": "db"}, "audit": True})
    data = c.get("/api/v1/matrix").json
    assert cell(data, "app=api", "app=db")["css"] == "audit"
    html = c.get("/matrix").get_data(as_text=True)
    assert 'class="cell audit"' in html and "✕ 22/tcp" in html
    assert "audit mode" in text(c.get("/policies"))


def test_flows_filters_and_verdict_colours(logged_in):
    html = logged_in.get("/flows?verdict=DROPPED").get_data(as_text=True)
    assert 'class="verdict-dropped"' in html and 'class="verdict-forwarded"' not in html
    rows = logged_in.get("/flows/rows?from_label=app%3Dapi").get_data(as_text=True)
    assert "10.9.0.4" in rows and "10.9.0.2:" not in rows
    assert "<html" not in rows            # a fragment for auto-refresh
    data = logged_in.get("/api/v1/flows?port=8080").json
    assert [f["l4"]["destination_port"] for f in data["flows"]] == [8080]


def test_flows_are_newest_first_and_limited(logged_in, app):
    app.config["FLOWS_PAGE_LIMIT"] = 3
    data = logged_in.get("/api/v1/flows").json
    assert len(data["flows"]) == 3
    times = [f["time"] for f in data["flows"]]
    assert times == sorted(times, reverse=True)


def test_service_map_is_svg_with_forwarded_and_dropped_edges(logged_in):
    html = logged_in.get("/map").get_data(as_text=True)
    assert "<svg" in html and 'class="edge fwd"' in html and 'class="edge drop"' in html
    data = logged_in.get("/api/v1/map").json
    edges = {(e["from"], e["to"], e["verdict"]): e["count"] for e in data["edges"]}
    assert edges == {("app=web", "app=db", "FORWARDED"): 12, ("app=api", "app=db", "DROPPED"): 1}


def test_unreachable_agent_shows_on_every_page(auth_for, tmp_path):
    c = auth_for(f"gone={tmp_path}/no-agent.sock")
    assert "Agent unreachable" in text(c.get("/"))
    for path in ("/endpoints", "/policies", "/matrix", "/flows", "/map"):
        r = c.get(path)
        assert r.status_code == 200 and "cannot reach the agent" in text(r), path
    assert c.get("/api/v1/flows").status_code == 503


def test_several_agents_each_show_their_state(auth_for, agent_socket, tmp_path):
    other = FlowAgent(str(tmp_path / "other"))
    other.add_endpoint({"name": "cache1", "interface": "vc1", "ips": ["10.8.0.9"], "labels": {"app": "cache"}})
    with APIServer(other, str(tmp_path / "b.sock")) as s:
        c = auth_for(f"alpha={agent_socket}", f"beta={s.socket_path}")
        body = text(c.get("/"))
        assert "alpha" in body and "beta" in body
        assert "cache1" in text(c.get("/endpoints?host=beta"))
        assert "cache1" not in text(c.get("/endpoints?host=alpha"))
        assert [h["name"] for h in c.get("/api/v1/hosts").json] == ["alpha", "beta"]
        assert c.get("/endpoints?host=nope").status_code == 404
        assert c.get("/api/v1/endpoints?host=nope").json["error"]["status"] == 404


def test_unknown_route_is_404(logged_in):
    assert logged_in.get("/nope").status_code == 404
    assert logged_in.get("/api/v1/nope").json["error"]["status"] == 404


def test_policies_page_shows_the_description(own_agent, auth_for):
    agent, sock = own_agent
    agent.put_policies([{"name": "d.yaml", "text": (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        "description: Only the web tier may reach the database\n"
        "metadata: {name: described}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n"
        "  ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]\n")}])
    c = auth_for(sock)
    assert "Only the web tier may reach the database" in text(c.get("/policies"))
