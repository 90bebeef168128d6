"""Established flows the new policy denies stop (issue 14.7): a flow opened while an
endpoint was in audit mode is cut when audit is switched off; a flow a policy change
revokes is cut; a flow of an endpoint relabelled out of what the policy allows is cut;
flows still allowed keep going. Real agent, real TCP streams."""
import socket
import threading
import time

import pytest

from agentproc import AgentProcess
from netns import Topology
from traffic import tcp_ok

pytestmark = pytest.mark.root

NET4 = "10.213.74."


def policy(*apps):
    peers = ", ".join(f"{{matchLabels: {{app: {a}}}}}" for a in apps)
    return {"name": "b.yaml", "text": f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: b-ingress}}
spec:
  endpointSelector: {{matchLabels: {{app: b}}}}
  ingress: [{{fromEndpoints: [{peers}]}}]
"""}


class Stream:
    """A TCP connection client -> server:port sending 100 bytes every 10 ms; the
    receiver records when data arrives."""

    def __init__(self, client, server, port):
        self.srv = server.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((server.ip4, port))
        self.srv.listen(1)
        self.cli = client.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.cli.settimeout(5)
        self.cli.connect((server.ip4, port))
        self.conn, _ = self.srv.accept()
        self.conn.settimeout(0.2)
        self.arrived: list[float] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._recv, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self):
        self.cli.setblocking(False)
        while not self.stop.is_set():
            try:
                self.cli.send(b"x" * 100)
            except (BlockingIOError, OSError):
                pass
            time.sleep(0.01)

    def _recv(self):
        while not self.stop.is_set():
            try:
                if self.conn.recv(65536):
                    self.arrived.append(time.monotonic())
            except (TimeoutError, OSError):
                continue

    def flowing_since(self, t: float) -> bool:
        return any(x > t for x in self.arrived)

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)
        for s in (self.cli, self.conn, self.srv):
            s.close()


@pytest.fixture
def topo():
    with Topology("cc") as t:
        yield t, {n: t.add_workload(n, [f"{NET4}{i}/24"]) for i, n in enumerate("abc", start=1)}


def register(agent, w, audit_b=False):
    for n in "abc":
        agent.client.add_endpoint(name=n, interface=w[n].host_if, ips=w[n].ips,
                                  labels={"app": n}, audit=(n == "b" and audit_b))


def test_flow_opened_in_audit_mode_is_cut_when_audit_is_switched_off(topo):
    t, w = topo
    with AgentProcess() as agent:
        register(agent, w, audit_b=True)
        agent.client.put_policies([policy("a")])
        denied = Stream(w["c"], w["b"], 6001)         # would be dropped: audited, forwarded
        allowed = Stream(w["a"], w["b"], 6002)
        try:
            time.sleep(0.5)
            assert denied.flowing_since(0) and allowed.flowing_since(0)
            agent.client.add_endpoint(name="b", interface=w["b"].host_if, ips=w["b"].ips,
                                      labels={"app": "b"}, audit=False)
            t_off = time.monotonic()
            time.sleep(2.0)
            assert not denied.flowing_since(t_off + 1.0), "the audited flow kept flowing"
            assert allowed.flowing_since(t_off + 1.5), "the allowed flow stopped"
            assert not tcp_ok(w["c"], w["b"], w["b"].ip4, 6003)
        finally:
            denied.close()
            allowed.close()


def test_flow_a_policy_change_revokes_is_cut(topo):
    t, w = topo
    with AgentProcess() as agent:
        register(agent, w)
        agent.client.put_policies([policy("a", "c")])
        revoked = Stream(w["c"], w["b"], 6011)
        kept = Stream(w["a"], w["b"], 6012)
        try:
            time.sleep(0.5)
            assert revoked.flowing_since(0) and kept.flowing_since(0)
            agent.client.put_policies([policy("a")])
            t_change = time.monotonic()
            time.sleep(2.0)
            assert not revoked.flowing_since(t_change + 1.0), "the revoked flow kept flowing"
            assert kept.flowing_since(t_change + 1.5), "the allowed flow stopped"
        finally:
            revoked.close()
            kept.close()


def test_flow_of_an_endpoint_relabelled_out_of_the_policy_is_cut(topo):
    """Its flows were judged under its old identity: they go with it (both the
    client's own hook and the server's, which knew it by address)."""
    t, w = topo
    with AgentProcess() as agent:
        register(agent, w)
        agent.client.put_policies([policy("a", "c")])
        moved = Stream(w["c"], w["b"], 6021)
        kept = Stream(w["a"], w["b"], 6022)
        try:
            time.sleep(0.5)
            assert moved.flowing_since(0) and kept.flowing_since(0)
            agent.client.add_endpoint(name="c", interface=w["c"].host_if, ips=w["c"].ips,
                                      labels={"app": "x"})
            t_change = time.monotonic()
            time.sleep(2.0)
            assert not moved.flowing_since(t_change + 1.0), "the relabelled endpoint's flow kept flowing"
            assert kept.flowing_since(t_change + 1.5), "the allowed flow stopped"
            assert not tcp_ok(w["c"], w["b"], w["b"].ip4, 6023)
        finally:
            moved.close()
            kept.close()
