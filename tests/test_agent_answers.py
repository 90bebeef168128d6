"""What the agent answers from its own engine: the matrix, the review of a proposed set,
and the live trace, on the real agent in-process (inprocess_agent.py)."""
from __future__ import annotations

import pytest

from inprocess_agent import inprocess_agent
from stockade.errors import InvalidRequest, NotFound

pytestmark = pytest.mark.pure


def doc(name: str, spec: str) -> dict:
    return {"name": f"{name}.yaml", "text": f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
                                           f"metadata: {{name: {name}}}\nspec:\n{spec}"}


DB_FROM_WEB = """\
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: "5432", protocol: TCP}]}]}]
"""
API_DENY_22 = """\
  endpointSelector: {matchLabels: {app: api}}
  ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]
  ingressDeny: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: "22", protocol: TCP}]}]}]
"""
WEB_EGRESS_RANGE = """\
  endpointSelector: {matchLabels: {app: web}}
  egress: [{toEndpoints: [{matchLabels: {app: db}}], toPorts: [{ports: [{port: "5000", endPort: 5003, protocol: TCP}]}]}]
"""


@pytest.fixture
def api(tmp_path):
    a = inprocess_agent(str(tmp_path / "state"))
    ids = {}
    for name, app, ip in (("web1", "web", "10.9.0.2"), ("db1", "db", "10.9.0.3"), ("api1", "api", "10.9.0.4")):
        ids[app] = a.add_endpoint({"name": name, "interface": f"v{name}", "ips": [ip],
                                   "labels": {"app": app}})["identity"]
    ids["remote"] = a.add_ipcache({"prefix": "10.8.0.9", "labels": {"app": "web"}, "host": "h2"})["identity"]
    a.ids = ids
    yield a
    a.agent.stop()


def cell(matrix: dict, src: int, dst: int) -> dict:
    row = next(r for r in matrix["rows"] if r["src"] == src)
    return next(c for c in row["cells"] if c["dst"] == dst)


@pytest.mark.parametrize("spec,src,dst,state,allow,deny", [
    ("", "web", "db", "open", [], []),
    (DB_FROM_WEB, "web", "db", "ports", ["5432/tcp"], []),
    (DB_FROM_WEB, "api", "db", "closed", [], []),
    (DB_FROM_WEB, "db", "web", "open", [], []),
    (DB_FROM_WEB, "remote", "db", "ports", ["5432/tcp"], []),   # a selector without source: any
    (API_DENY_22, "web", "api", "any", [], ["22/tcp"]),
    (WEB_EGRESS_RANGE, "web", "db", "ports", ["5000-5003/tcp"], []),
    (WEB_EGRESS_RANGE, "web", "api", "closed", [], []),
], ids=["no-policy", "allowed-port", "default-deny", "other-direction", "remote-source",
        "deny-rule", "port-range", "egress-default-deny"])
def test_matrix_cells_are_exact(api, spec, src, dst, state, allow, deny):
    if spec:
        api.put_policies([doc("p", spec)])
    c = cell(api.matrix({}), api.ids[src], api.ids[dst])
    assert (c["state"], c["allow"], c["deny"]) == (state, allow, deny)


def test_matrix_for_one_port_and_paging(api):
    api.put_policies([doc("db", DB_FROM_WEB)])
    m = api.matrix({"port": "5432/tcp"})
    assert cell(m, api.ids["web"], api.ids["db"])["verdict"] == "allow"
    assert cell(m, api.ids["api"], api.ids["db"])["verdict"] == "default-deny"
    assert cell(api.matrix({"port": "5433/tcp"}), api.ids["web"], api.ids["db"])["verdict"] == "default-deny"
    page = api.matrix({"limit": "2", "offset": "1"})
    assert len(page["rows"]) == 2 and page["total"] == len(api.matrix({})["identities"])
    full = api.matrix({})
    cols = api.matrix({"dst_offset": "1", "dst_limit": "2"})
    assert [[c["dst"] for c in r["cells"]] for r in cols["rows"]] == \
        [[c["dst"] for c in r["cells"][1:3]] for r in full["rows"]]
    assert (cols["dst_offset"], cols["dst_limit"], full["dst_limit"]) == (1, 2, None)
    with pytest.raises(InvalidRequest):
        api.matrix({"dst_limit": "0"})
    with pytest.raises(InvalidRequest) as err:      # the API document's bound, in-process too
        api.matrix({"limit": 1001})
    assert err.value.field == "limit"
    assert (full["limit"], full["offset"], api.matrix({"cidrs": True})["limit"]) == (100, 0, 100)
    only = api.matrix({"label": "app=db"})
    assert [i["name"] for i in only["identities"]] == ["app=db"]
    with pytest.raises(InvalidRequest):
        api.matrix({"port": "5432"})


def test_matrix_marks_audited_denies(tmp_path):
    a = inprocess_agent(str(tmp_path / "s"))
    web = a.add_endpoint({"name": "web1", "interface": "vw", "ips": ["10.9.0.2"], "labels": {"app": "web"}})
    db = a.add_endpoint({"name": "db1", "interface": "vd", "ips": ["10.9.0.3"], "labels": {"app": "db"},
                         "audit": True})
    api_ = a.add_endpoint({"name": "api1", "interface": "va", "ips": ["10.9.0.4"], "labels": {"app": "api"}})
    a.put_policies([doc("db", DB_FROM_WEB)])
    m = a.matrix({})
    assert cell(m, api_["identity"], db["identity"])["audit"] is True
    assert cell(m, web["identity"], db["identity"])["audit"] is False
    a.agent.stop()


def test_review_is_the_agents_plan_and_changes_nothing(api):
    api.put_policies([doc("db", DB_FROM_WEB)])
    before = api.list_policies()
    entries = dict(api.agent.engine.entries)
    writes = len(api.agent.dp.log)
    proposed = doc("db", DB_FROM_WEB.replace("app: web", "app: api"))
    r = api.review([proposed])
    assert r["diff"]["changed"] == ["db"]
    pairs = {(p["src"], p["dst"], tuple(p["allowed"]), tuple(p["denied"])) for p in r["pairs"]}
    assert ("app=web", "app=db", (), ("5432/tcp",)) in pairs
    assert ("app=api", "app=db", ("5432/tcp",), ()) in pairs
    assert api.list_policies() == before and dict(api.agent.engine.entries) == entries
    assert len(api.agent.dp.log) == writes  # nothing written
    assert r["policies"][0]["clauses"][0]["text"] == "endpoints {app=api} may reach {app=db} on 5432/TCP"


def test_review_with_replace_all_and_bad_input(api):
    api.put_policies([doc("db", DB_FROM_WEB)])
    r = api.review([doc("other", API_DENY_22)], replace_all=True)
    assert r["diff"]["removed"] == ["db"] and r["diff"]["added"] == ["other"]
    from stockade.errors import PolicyErrors
    with pytest.raises(PolicyErrors):
        api.review([{"name": "bad.yaml", "text": "kind: [unclosed\n"}])


def flow(src: int, dst: int, port: int, verdict="FORWARDED", sport=40000) -> dict:
    return {"time": "2099-01-01T00:00:00.000000Z", "verdict": verdict, "direction": "ingress",
            "ip": {"source": "10.9.0.2", "destination": "10.9.0.3"}, "is_reply": False,
            "l4": {"protocol": "tcp", "source_port": sport, "destination_port": port},
            "source": {"identity": src}, "destination": {"identity": dst},
            "connection": f"tcp 10.9.0.2:{sport} -> 10.9.0.3:{port}"}


def test_review_words_the_observed_connections_it_would_change(api):
    api.put_policies([doc("db", DB_FROM_WEB)])
    ring = [flow(api.ids["web"], api.ids["db"], 5432, sport=s) for s in range(12)]
    ring += [flow(api.ids["api"], api.ids["db"], 5432, "DROPPED", sport=99)]

    class Flows:
        def query(self, criteria):
            return {"flows": ring}
    api.agent.flow_source = Flows()
    r = api.review([doc("db", DB_FROM_WEB.replace("app: web", "app: api"))])
    assert [g["text"] for g in r["flows"]] == [
        "would block 12 connections seen in the last hour from app=web to app=db:5432",
        "would allow 1 connection seen in the last hour from app=api to app=db:5432"]
    assert r["flows_checked"] == 13


def test_live_trace_has_the_offline_shape(api):
    api.put_policies([doc("db", DB_FROM_WEB)])
    t = api.trace("endpoint:web1", "app=db", "5432/tcp")
    assert t["verdict"] == "allow" and t["ingress"]["rules"][0]["policy"] == "db"
    assert set(t) == {"verdict", "src", "dst", "port", "egress", "ingress"}
    assert api.trace("app=api", "endpoint:db1", "5432/tcp")["verdict"] == "deny"
    # labels that no workload has: a hypothetical one, planned and discarded
    ids = set(api.agent.engine.identities)
    assert api.trace("app=web,tier=new", "app=db", "5432/tcp")["verdict"] == "allow"
    assert set(api.agent.engine.identities) == ids
    assert api.trace("cidr:10.8.0.9/32", "app=db", "5432/tcp")["verdict"] == "allow"  # the remote web
    with pytest.raises(NotFound):
        api.trace("endpoint:nope", "app=db", "5432/tcp")
    with pytest.raises(InvalidRequest):
        api.trace("app=web", "app=db", "5432")


def test_host_addresses_that_come_and_go_are_the_host_identity(tmp_path):
    """An address the host gains later (a bridge's gateway, made with a runtime's first
    container) is the host, as those found at start are; one it loses is not."""
    from stockade.daemon.changes import HostAddresses
    api = inprocess_agent(str(tmp_path))
    agent = api.agent
    try:
        api.add_endpoint({"name": "w1", "interface": "vw1", "ips": ["10.0.0.5"], "labels": {"app": "web"}})
        own = agent.state.ipcache["10.0.0.5/32"].identity
        with agent.locked():
            agent.submit_locked(HostAddresses(("10.0.0.5", "10.89.0.1", "fe80::1")))
        assert agent.dp.ipcache["10.89.0.1/32"] == 1 and agent.dp.ipcache["fe80::1/128"] == 1
        assert agent.dp.ipcache["10.0.0.5/32"] == own      # an endpoint's address stays its own
        with agent.locked():
            agent.submit_locked(HostAddresses(("fe80::1",)))
        assert "10.89.0.1/32" not in agent.dp.ipcache and agent.dp.ipcache["10.0.0.5/32"] == own
        assert agent.state.meta["host_ips"] == ("fe80::1",)
    finally:
        agent.stop()


def test_only_the_agent_touches_its_lock():
    """Other modules hold it through Agent.locked(), never by reaching into _lock."""
    import ast
    import pathlib

    import stockade
    found = []
    for path in sorted(pathlib.Path(stockade.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "_lock" and not (
                    isinstance(node.value, ast.Name) and node.value.id == "self"):
                found.append(f"{path.name}:{node.lineno}")
    assert found == []
