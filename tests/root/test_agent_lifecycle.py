"""Agent modes and lifecycle: enforcement modes, audit, fail-closed new interfaces,
restart continuity (kill -9), cleanup."""
import socket
import subprocess
import threading
import time

import pytest

from agentproc import AgentProcess
from attached import attached
from netns import Topology
from traffic import eventually, tcp_ok, udp_ok

pytestmark = pytest.mark.root

NET4 = "10.213.21."
ISOLATE_DB = {"name": "db.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]
"""}


def register(agent, w, apps):
    for name, app in apps.items():
        agent.client.add_endpoint(name=name, interface=w[name].host_if, ips=w[name].ips, labels={"app": app})


@pytest.fixture
def topo():
    with Topology("l") as t:
        yield t, {n: t.add_workload(n, [f"{NET4}{i}/24"]) for i, n in enumerate("abc", start=1)}


@pytest.mark.parametrize("mode,expect_ab,expect_cb", [
    ("always", False, False),   # nothing allows a -> b's... b has a policy; a's egress is closed too
    ("never", True, True),
    ("default", True, False),
])
def test_enforcement_modes(topo, mode, expect_ab, expect_cb):
    t, w = topo
    with AgentProcess(enforcement=mode) as agent:
        register(agent, w, {"a": "web", "b": "db", "c": "other"})
        agent.client.put_policies([ISOLATE_DB])
        assert tcp_ok(w["a"], w["b"], w["b"].ip4, 80) is expect_ab
        assert tcp_ok(w["c"], w["b"], w["b"].ip4, 80) is expect_cb


def drop_and_audit_counts(agent):
    from stockade.client import Client  # noqa: F401 (metrics come as text)
    text = agent.client.metrics()
    audit = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                if l.startswith("stockade_packets_total") and 'verdict="AUDIT"' in l)
    return audit


@pytest.mark.parametrize("how", ["agent", "endpoint"])
def test_audit_forwards_and_counts(topo, how):
    t, w = topo
    with AgentProcess(audit=(how == "agent")) as agent:
        register(agent, w, {"a": "web", "c": "other"})
        agent.client.add_endpoint(name="b", interface=w["b"].host_if, ips=w["b"].ips,
                                  labels={"app": "db"}, audit=(how == "endpoint"))
        agent.client.put_policies([ISOLATE_DB])
        assert tcp_ok(w["c"], w["b"], w["b"].ip4, 80)        # would be dropped: forwarded
        assert drop_and_audit_counts(agent) > 0
        ep = next(x for x in agent.client.endpoints() if x["name"] == "b")
        assert ep["audit"] is True


@pytest.mark.parametrize("unknown,expected", [("drop", False), ("forward", True)])
def test_new_interface_on_managed_bridge_is_closed_until_identified(topo, unknown, expected):
    t, w = topo
    with AgentProcess(managed_bridges=[t.bridge], unknown_endpoint=unknown) as agent:
        register(agent, w, {"a": "web"})
        late = t.add_workload("d", [f"{NET4}4/24"])   # appears while the agent runs
        assert eventually(lambda: any(ep["interface"] == late.host_if for ep in []) or
                          _attached(late.host_if), timeout=5)
        assert udp_ok(late, w["a"], w["a"].ip4, 9100) is expected
        # unregistered b and c existed before the agent started: also closed (or forwarded)
        assert udp_ok(w["b"], w["a"], w["a"].ip4, 9101) is expected
        agent.client.add_endpoint(name="d", interface=late.host_if, ips=late.ips, labels={"app": "x"})
        assert eventually(lambda: udp_ok(late, w["a"], w["a"].ip4, 9102), timeout=5)
        if unknown == "drop":
            assert 'reason="unknown_endpoint"' in agent.client.metrics()


_attached = attached


def test_unprotected_is_live(topo):
    """Interfaces found unprotected at start are protected once attached: the list is
    what is unprotected now, not what was at start."""
    t, w = topo
    with AgentProcess(managed_bridges=[t.bridge]) as agent:
        assert all(_attached(w[n].host_if) for n in "abc")
        assert eventually(lambda: agent.client.health()["unprotected_interfaces"] == [], timeout=5)
        assert agent.client.health()["status"] == "ok"


def test_restart_keeps_enforcing(topo):
    """kill -9 the agent while an allowed stream and a denied sender run."""
    t, w = topo
    agent = AgentProcess()
    try:
        agent.start()
        register(agent, w, {"a": "web", "b": "db", "c": "other"})
        agent.client.put_policies([ISOLATE_DB])
        srv = w["b"].socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind((w["b"].ip4, 5000))
        srv.listen(1)
        cli = w["a"].socket(socket.AF_INET, socket.SOCK_STREAM)
        cli.settimeout(5)
        cli.connect((w["b"].ip4, 5000))
        conn, _ = srv.accept()
        conn.settimeout(5)
        received = []
        stop = threading.Event()

        def pump():
            while not stop.is_set():
                cli.sendall(b"x" * 1000)
                time.sleep(0.01)

        def drain():
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                received.append((time.monotonic(), len(data)))

        threads = [threading.Thread(target=pump), threading.Thread(target=drain)]
        for th in threads:
            th.start()
        try:
            time.sleep(0.5)
            agent.kill()                          # SIGKILL: maps and filters stay
            t_kill = time.monotonic()
            assert not udp_ok(w["c"], w["b"], w["b"].ip4, 5001)
            time.sleep(1.0)
            assert any(ts > t_kill + 0.5 for ts, _ in received), "stream stalled while agent was down"
            agent.start()                         # adopts pins, replaces programs
            t_start = time.monotonic()
            time.sleep(1.0)
            assert any(ts > t_start + 0.5 for ts, _ in received), "stream stalled after restart"
            assert not udp_ok(w["c"], w["b"], w["b"].ip4, 5001)
            assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5002)
            eps = {e["name"]: e["state"] for e in agent.client.endpoints()}
            assert eps == {"a": "ready", "b": "ready", "c": "ready"}
            assert [p["name"] for p in agent.client.policies()] == ["db"]
        finally:
            stop.set()
            cli.close()
            conn.close()
            srv.close()
            for th in threads:
                th.join(timeout=5)
    finally:
        agent.stop()


def test_cleanup_detaches_and_unpins(topo):
    t, w = topo
    agent = AgentProcess()
    try:
        agent.start()
        register(agent, w, {"a": "web"})
        pins = agent.settings["bpffs_dir"]
        assert _attached(w["a"].host_if)
        agent.kill()
        r = subprocess.run([*__import__("agentproc").STOCKADE, "agent", "--config",
                            str(agent.config_path), "--cleanup"], capture_output=True, text=True,
                           env=agent.environ())
        assert r.returncode == 0, r.stderr
        assert not _attached(w["a"].host_if)
        import os
        assert not os.path.exists(pins)
    finally:
        agent.stop()


def test_full_policy_map_is_refused_and_previous_policy_kept(topo):
    t, w = topo
    with AgentProcess(policy_map_size=16) as agent:
        register(agent, w, {"a": "web", "b": "db", "c": "other"})
        agent.client.put_policies([ISOLATE_DB])
        many = {"name": "big.yaml", "text": ISOLATE_DB["text"].replace(
            "ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]",
            "ingress: [{fromEndpoints: [{}], toPorts: [{ports: ["
            + ", ".join(f'{{port: "{1000 + 7 * i}", protocol: TCP}}' for i in range(20)) + "]}]}]")}
        from stockade.client import APIError
        with pytest.raises(APIError) as err:
            agent.client.put_policies([many])
        assert err.value.status == 507 and "policy" in str(err.value)
        assert tcp_ok(w["a"], w["b"], w["b"].ip4, 80) and not tcp_ok(w["c"], w["b"], w["b"].ip4, 80)
        assert "policy apply failed" in " ".join(agent.client.health()["errors"])
