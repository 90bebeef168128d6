"""The agent end to end on network namespaces: real agent process, real BPF, real packets.

Workloads a, b, c (and an unregistered "outside" namespace, which the agent sees as
world) share one bridge; a, b, c are static endpoints.
"""

import pytest

from agentproc import AgentProcess
from netns import Topology
from traffic import eventually, ping_ok, tcp_ok, udp_ok, udp_reply_ok

pytestmark = pytest.mark.root

NET4, NET6 = "10.213.20.", "fd57:ade:20::"


def cnp(name, spec):
    import textwrap
    return {"name": f"{name}.yaml", "text": (
        f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\n"
        f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")}


@pytest.fixture(scope="module")
def env():
    with Topology("p") as topo:
        w = {t: topo.add_workload(t, [f"{NET4}{i}/24", f"{NET6}{i}/64"])
             for i, t in enumerate(["a", "b", "c", "x"], start=1)}
        # The host's address on the bridge: traffic from the root namespace is "host".
        import subprocess
        subprocess.run(["ip", "addr", "add", f"{NET4}254/24", "dev", topo.bridge], check=True)
        with AgentProcess() as agent:
            for name, app in (("a", "web"), ("b", "db"), ("c", "other")):
                agent.client.add_endpoint(name=name, interface=w[name].host_if, ips=w[name].ips,
                                          labels={"app": app})
            yield agent, w


@pytest.fixture
def e(env):
    agent, w = env
    yield agent, w
    agent.client.delete_all_policies()


def apply(agent, *docs):
    return agent.client.put_policies(list(docs), replace_all=True)


DB_FROM_WEB = """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}, {port: "8000", endPort: 8100, protocol: TCP}]}]
"""


def test_endpoints_ready_with_identities(e):
    agent, w = e
    eps = {ep["name"]: ep for ep in agent.client.endpoints()}
    assert {n: eps[n]["state"] for n in "abc"} == {"a": "ready", "b": "ready", "c": "ready"}
    assert len({eps[n]["identity"] for n in "abc"}) == 3


@pytest.mark.parametrize("src,port,family,expected", [
    ("a", 5432, 4, True), ("a", 5432, 6, True), ("c", 5432, 4, False), ("c", 5432, 6, False),
    ("a", 5433, 4, False), ("a", 8000, 4, True), ("a", 8100, 4, True), ("a", 8101, 4, False),
    ("x", 5432, 4, False),
], ids=["web-v4", "web-v6", "other-v4", "other-v6", "wrong-port", "range-start", "range-end",
        "range-past", "world"])
def test_allow_by_labels_and_ports(e, src, port, family, expected):
    agent, w = e
    apply(agent, cnp("db", DB_FROM_WEB))
    addr = w["b"].ip4 if family == 4 else w["b"].ip6
    assert tcp_ok(w[src], w["b"], addr, port) is expected


def test_no_policy_is_open_and_removal_reopens(e):
    agent, w = e
    assert tcp_ok(w["c"], w["b"], w["b"].ip4, 5432)
    apply(agent, cnp("db", DB_FROM_WEB))
    assert not tcp_ok(w["c"], w["b"], w["b"].ip4, 5432)
    agent.client.delete_policy("db")
    assert tcp_ok(w["c"], w["b"], w["b"].ip4, 5432)


def test_udp_and_replies(e):
    agent, w = e
    apply(agent, cnp("db", """
        endpointSelector: {matchLabels: {app: db}}
        ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: "53", protocol: UDP}]}]}]
        egress: [{}]
    """))
    assert udp_reply_ok(w["a"], w["b"], w["b"].ip4, 53)     # reply passes b's closed egress
    assert not udp_ok(w["a"], w["b"], w["b"].ip4, 54)
    assert not udp_ok(w["b"], w["a"], w["a"].ip4, 53)         # b cannot start anything


def test_tcp_replies_pass_but_reverse_is_denied(e):
    agent, w = e
    apply(agent, cnp("web", """
        endpointSelector: {matchLabels: {app: web}}
        ingress: [{}]
        egress: [{toEndpoints: [{matchLabels: {app: db}}]}]
    """))
    assert tcp_ok(w["a"], w["b"], w["b"].ip4, 7000)
    assert not tcp_ok(w["b"], w["a"], w["a"].ip4, 7000)


def test_icmp_by_type(e):
    agent, w = e
    apply(agent, cnp("db", """
        endpointSelector: {matchLabels: {app: db}}
        ingress: [{fromEndpoints: [{matchLabels: {app: web}}], icmps: [{fields: [{type: EchoRequest}, {type: 128, family: IPv6}]}]}]
    """))
    assert ping_ok(w["a"], w["b"].ip4) and ping_ok(w["a"], w["b"].ip6)
    assert not ping_ok(w["c"], w["b"].ip4)
    assert not tcp_ok(w["a"], w["b"], w["b"].ip4, 80)


def test_deny_beats_allow(e):
    agent, w = e
    apply(agent, cnp("db", """
        endpointSelector: {matchLabels: {app: db}}
        ingress: [{fromEndpoints: [{}]}]
        ingressDeny: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: "5432", protocol: TCP}]}]}]
    """))
    assert not tcp_ok(w["a"], w["b"], w["b"].ip4, 5432)
    assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5433)
    assert tcp_ok(w["c"], w["b"], w["b"].ip4, 5432)


def test_cidr_with_except(e):
    agent, w = e
    apply(agent, cnp("web", f"""
        endpointSelector: {{matchLabels: {{app: web}}}}
        egress: [{{toCIDRSet: [{{cidr: {NET4}0/24, except: [{NET4}4/32]}}]}}]
    """))
    # x (.4) is excepted; b is a workload, so a CIDR rule does not select it.
    assert not tcp_ok(w["a"], w["x"], w["x"].ip4, 80)
    assert not tcp_ok(w["a"], w["b"], w["b"].ip4, 80)
    apply(agent, cnp("web", f"""
        endpointSelector: {{matchLabels: {{app: web}}}}
        egress: [{{toCIDR: [{NET4}4/32]}}]
    """))
    assert tcp_ok(w["a"], w["x"], w["x"].ip4, 80)


def test_entities_world_and_host(e):
    agent, w = e
    apply(agent, cnp("db", """
        endpointSelector: {matchLabels: {app: db}}
        ingress: [{fromEntities: [world]}]
    """), cnp("other", """
        endpointSelector: {matchLabels: {app: other}}
        ingress: [{fromEntities: [host]}]
    """))
    assert tcp_ok(w["x"], w["b"], w["b"].ip4, 80)       # x is not an endpoint: world
    assert not tcp_ok(w["a"], w["b"], w["b"].ip4, 80)   # a is a workload, not world
    from netns import run
    assert run("ping", "-c1", "-W1", w["c"].ip4, check=False).returncode == 0   # host
    assert run("ping", "-c1", "-W1", w["b"].ip4, check=False).returncode != 0


def test_an_address_the_host_gains_later_is_host(e):
    """As a bridge Podman creates with its first container, after the agent started:
    its gateway address is the host, not world; once removed, it is nothing."""
    agent, w = e
    apply(agent, cnp("other", """
        endpointSelector: {matchLabels: {app: other}}
        ingress: [{fromEntities: [host]}]
    """))
    import json

    from netns import run
    later = f"{NET4}253"
    dev = json.loads(run("ip", "-j", "addr", "show", "to", f"{NET4}254").stdout)[0]["ifname"]
    run("ip", "addr", "add", f"{later}/32", "dev", dev)
    try:
        def entry():
            return next((c for c in agent.client.ipcache() if c["prefix"] == f"{later}/32"), None)
        assert eventually(lambda: (entry() or {}).get("identity") == 1, timeout=5), entry()
        ping = ("ping", "-c1", "-W1", "-I", later, w["c"].ip4)
        assert run(*ping, check=False).returncode == 0
    finally:
        run("ip", "addr", "del", f"{later}/32", "dev", dev, check=False)
    assert eventually(lambda: entry() is None, timeout=5), entry()


def test_default_deny_per_direction(e):
    agent, w = e
    apply(agent, cnp("web", """
        endpointSelector: {matchLabels: {app: web}}
        egress: [{toEndpoints: [{matchLabels: {app: db}}]}]
    """))
    assert tcp_ok(w["a"], w["b"], w["b"].ip4, 80)
    assert not tcp_ok(w["a"], w["c"], w["c"].ip4, 80)   # egress now default-deny
    assert tcp_ok(w["c"], w["a"], w["a"].ip4, 80)       # ingress untouched
    ep = next(x for x in agent.client.endpoints() if x["name"] == "a")
    assert ep["enforcement"]["egress"] == {"enforced": True, "default_deny": True}
    assert ep["enforcement"]["ingress"]["enforced"] is False


def test_spoofed_source_dropped(e):
    agent, w = e
    w["a"].exec("ip", "addr", "add", f"{NET4}77/32", "dev", "eth0")
    try:
        assert not udp_ok(w["a"], w["x"], w["x"].ip4, 9000, src=f"{NET4}77")
        assert udp_ok(w["a"], w["x"], w["x"].ip4, 9000)
        assert "spoofed" in agent.client.metrics()
    finally:
        w["a"].exec("ip", "addr", "del", f"{NET4}77/32", "dev", "eth0", check=False)


def test_dry_run_changes_nothing(e):
    agent, w = e
    r = agent.client.put_policies([cnp("db", DB_FROM_WEB)], dry_run=True)
    assert r["dry_run"] and r["changed"] and r["diff"]["added"] == ["db"]
    assert r["diff"]["entries"]["added"] > 0
    assert agent.client.policies() == []
    assert tcp_ok(w["c"], w["b"], w["b"].ip4, 5432)


def test_invalid_policy_keeps_previous(e):
    agent, w = e
    apply(agent, cnp("db", DB_FROM_WEB))
    rev = agent.client.health()["policy_revision"]
    bad = cnp("db", "endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: http}]}]}]")
    from stockade.client import APIError
    with pytest.raises(APIError) as err:
        agent.client.put_policies([cnp("ok", "endpointSelector: {}\ningress: [{}]"), bad], replace_all=True)
    assert err.value.status == 400 and "spec.ingress[0].toPorts[0].ports[0].port" in str(err.value)
    assert agent.client.health()["policy_revision"] == rev
    assert [p["name"] for p in agent.client.policies()] == ["db"]
    assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5432) and not tcp_ok(w["c"], w["b"], w["b"].ip4, 5432)


def test_reimport_same_is_unchanged(e):
    agent, w = e
    first = apply(agent, cnp("db", DB_FROM_WEB))
    again = apply(agent, cnp("db", DB_FROM_WEB))
    assert first["changed"] and not again["changed"]
    assert again["revision"] == first["revision"]


def test_relabel_endpoint_changes_verdict(e):
    agent, w = e
    apply(agent, cnp("db", DB_FROM_WEB))
    assert not tcp_ok(w["c"], w["b"], w["b"].ip4, 5432)
    agent.client.add_endpoint(name="c", interface=w["c"].host_if, ips=w["c"].ips, labels={"app": "web"})
    try:
        assert eventually(lambda: tcp_ok(w["c"], w["b"], w["b"].ip4, 5432))
    finally:
        agent.client.add_endpoint(name="c", interface=w["c"].host_if, ips=w["c"].ips, labels={"app": "other"})
    assert not tcp_ok(w["c"], w["b"], w["b"].ip4, 5432)


@pytest.mark.parametrize("peers", ["fromEndpoints: []", "fromEntities: []", "fromCIDR: []",
                                   "fromCIDRSet: []"])
def test_empty_peer_list_allows_nobody(e, peers):
    """An explicitly empty peer list next to toPorts selects no peer (it was a fail-open:
    every peer was let in on the port)."""
    agent, w = e
    doc = cnp("db", f"""
endpointSelector: {{matchLabels: {{app: db}}}}
ingress:
  - {peers}
    toPorts: [{{ports: [{{port: "5432", protocol: TCP}}]}}]
""")
    result = apply(agent, doc)
    lines = result["diff"]["rules"]["added"]
    assert lines and all("any peer" not in line for line in lines), lines
    assert any("selects none" in line for line in lines), lines
    for src in ("a", "c", "x"):
        assert tcp_ok(w[src], w["b"], w["b"].ip4, 5432) is False, src


def test_empty_peer_list_egress_allows_nothing(e):
    agent, w = e
    apply(agent, cnp("web", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toEndpoints: []
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  - toCIDR: []
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"""))
    assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5432) is False
    assert tcp_ok(w["a"], w["x"], w["x"].ip4, 5432) is False


def test_stored_policy_this_version_refuses_stays_enforced():
    """A policy stored by an earlier version in a shape this one refuses (peer kinds
    combined) is not dropped at start, which would open what it denies: it is compiled as
    stored, named in status, refused if pushed again as is, and cleared by a fix."""
    with Topology("s") as topo:
        w = {t: topo.add_workload(t, [f"10.213.21.{i}/24"]) for i, t in enumerate("abcx", start=1)}
        with AgentProcess() as agent:
            for name, app in (("a", "web"), ("b", "db"), ("c", "other")):
                agent.client.add_endpoint(name=name, interface=w[name].host_if, ips=w[name].ips,
                                          labels={"app": app})
            apply(agent, cnp("db", DB_FROM_WEB))
            agent.kill()
            from stockade.daemon.store import StateStore  # as the version that stored it wrote it
            state = agent.run_dir / "state"
            records = StateStore(state, create=False).load()["policies.json"]
            combined = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                        "metadata": {"name": "db"},
                        "spec": {"endpointSelector": {"matchLabels": {"app": "db"}},
                                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}],
                                              "fromCIDR": [f"{w['x'].ip4}/32"],
                                              "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]}]}}
            records[0]["document"] = combined
            StateStore(state).commit({"policies.json": records})
            agent.start()
            health = agent.client.health()
            assert health["status"] == "degraded"
            assert health["policy_problems"] == [
                "policy db: spec.ingress[0]: Combining FromEndpoints and FromCIDR is not supported yet"]
            [info] = agent.client.policies()
            assert info["problems"] and info["name"] == "db"
            assert "REFUSED" in agent.cli("policy", "get").stdout
            assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5432) is True
            assert tcp_ok(w["x"], w["b"], w["b"].ip4, 5432) is True
            assert tcp_ok(w["c"], w["b"], w["b"].ip4, 5432) is False
            # Pushing it again as it is: refused, the stored one keeps working.
            import yaml as _yaml

            from stockade.client import ClientError
            with pytest.raises(ClientError, match="Combining FromEndpoints and FromCIDR"):
                apply(agent, {"name": "db.yaml", "text": _yaml.safe_dump(combined)})
            assert tcp_ok(w["x"], w["b"], w["b"].ip4, 5432) is True
            # A fix clears it.
            apply(agent, cnp("db", DB_FROM_WEB))
            health = agent.client.health()
            assert health["status"] == "ok" and health["policy_problems"] == []
            assert tcp_ok(w["x"], w["b"], w["b"].ip4, 5432) is False
            assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5432) is True


def test_cidr_rules_survive_a_restart():
    """A CIDR's identity reaches the ipcache again after a restart: before, the restart
    removed it, so a CIDR deny stopped denying (its addresses fell back to world)."""
    with Topology("r") as topo:
        w = {t: topo.add_workload(t, [f"10.213.22.{i}/24"]) for i, t in enumerate("ax", start=1)}
        with AgentProcess() as agent:
            agent.client.add_endpoint(name="a", interface=w["a"].host_if, ips=w["a"].ips,
                                      labels={"app": "web"})
            apply(agent, cnp("web", f"""
endpointSelector: {{matchLabels: {{app: web}}}}
egress: [{{toEntities: [world]}}]
egressDeny: [{{toCIDR: ["{w['x'].ip4}/32"]}}]
"""))
            assert tcp_ok(w["a"], w["x"], w["x"].ip4, 80) is False
            agent.kill()
            agent.start()
            assert f"{w['x'].ip4}/32" in {e["prefix"] for e in agent.client.ipcache()}
            assert tcp_ok(w["a"], w["x"], w["x"].ip4, 80) is False
