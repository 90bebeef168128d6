"""Established flows the new policy denies stop (issue 14.7): a flow opened while an
endpoint was in audit mode is cut when audit is switched off; a flow a policy change
revokes is cut; a flow of an endpoint relabelled out of what the policy allows is cut;
flows still allowed keep going. Real agent, real TCP streams."""
import ipaddress
import os
import select
import socket
import threading
import time

import pytest

from agentproc import AgentProcess
from netns import Topology
from pinned import dump_map
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
    receiver records when data arrives. With ``both_ways`` the server sends as well and
    the client records when its data arrives (``replied_since``)."""

    def __init__(self, client, server, port, both_ways=False):
        self.srv = server.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((server.ip4, port))
        self.srv.listen(1)
        self.cli = client.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.cli.settimeout(5)
        self.cli.connect((server.ip4, port))
        self.conn, _ = self.srv.accept()
        self.arrived: list[float] = []
        self.replied: list[float] = []
        self.stop = threading.Event()
        pairs = [(self.cli, self.conn, self.arrived)]
        if both_ways:
            pairs.append((self.conn, self.cli, self.replied))
        self.threads = []
        for sender, receiver, record in pairs:
            self.threads += [threading.Thread(target=self._send, args=(sender,), daemon=True),
                             threading.Thread(target=self._recv, args=(receiver, record),
                                              daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self, sock):
        while not self.stop.is_set():
            try:
                sock.send(b"x" * 100, socket.MSG_DONTWAIT)
            except (BlockingIOError, OSError):
                pass
            time.sleep(0.01)

    def _recv(self, sock, record):
        while not self.stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.2)
            if not ready:
                continue
            try:
                if sock.recv(65536, socket.MSG_DONTWAIT):
                    record.append(time.monotonic())
            except (BlockingIOError, OSError):
                continue

    def flowing_since(self, t: float) -> bool:
        return any(x > t for x in self.arrived)

    def replied_since(self, t: float) -> bool:
        return any(x > t for x in self.replied)

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


def entity_policy():
    return {"name": "b.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-ingress}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress: [{fromEntities: [world]}]
"""}


def register_b(agent, w):
    agent.client.add_endpoint(name="b", interface=w["b"].host_if, ips=w["b"].ips,
                              labels={"app": "b"})


def assert_cut(moved, kept, t_change):
    time.sleep(2.0)
    assert not moved.flowing_since(t_change + 1.0), "the flow of the address that moved kept flowing"
    assert kept.flowing_since(t_change + 1.5), "the allowed flow stopped"


@pytest.mark.parametrize("how", ["endpoint", "ipcache", "ipcache-batch"])
def test_flow_of_a_world_address_that_gains_an_identity_is_cut(topo, how):
    """b admits world only. c and a are nobody's endpoints (world) and open flows to b;
    then c's address becomes identity app=x (an endpoint added on it, or an ipcache
    entry given labels, POST or PATCH): b's flow from c was judged as world and goes;
    a's, still world, stays."""
    t, w = topo
    with AgentProcess() as agent:
        register_b(agent, w)
        agent.client.put_policies([entity_policy()])
        moved = Stream(w["c"], w["b"], 6031)
        kept = Stream(w["a"], w["b"], 6032)
        try:
            time.sleep(0.5)
            assert moved.flowing_since(0) and kept.flowing_since(0)
            prefix = f"{w['c'].ip4}/32"
            if how == "endpoint":
                agent.client.add_endpoint(name="c", interface=w["c"].host_if, ips=w["c"].ips,
                                          labels={"app": "x"})
            elif how == "ipcache":
                agent.client.add_ipcache(prefix, {"app": "x"}, host="elsewhere")
            else:
                agent.client.add_ipcache_entries([{"prefix": prefix, "labels": {"app": "x"},
                                                   "host": "elsewhere"}])
            t_change = time.monotonic()
            assert_cut(moved, kept, t_change)
            assert not tcp_ok(w["c"], w["b"], w["b"].ip4, 6033)
        finally:
            moved.close()
            kept.close()


def admit_x_only(agent, w):
    """b admits app=x only; a's and c's addresses are app=x (ipcache entries)."""
    register_b(agent, w)
    agent.client.put_policies([policy("x")])
    for n in "ac":
        agent.client.add_ipcache(f"{w[n].ip4}/32", {"app": "x"}, host="elsewhere")


def test_flow_of_an_address_that_loses_its_identity_to_world_is_cut(topo):
    """b admits app=x only; a's and c's addresses are app=x (ipcache). c's entry goes:
    c is world again, which b does not admit, so c's established flow goes; a's stays."""
    t, w = topo
    with AgentProcess() as agent:
        admit_x_only(agent, w)
        moved = Stream(w["c"], w["b"], 6041)
        kept = Stream(w["a"], w["b"], 6042)
        try:
            time.sleep(0.5)
            assert moved.flowing_since(0) and kept.flowing_since(0)
            agent.client.remove_ipcache(f"{w['c'].ip4}/32")
            t_change = time.monotonic()
            assert_cut(moved, kept, t_change)
            assert not tcp_ok(w["c"], w["b"], w["b"].ip4, 6043)
        finally:
            moved.close()
            kept.close()


def entries_created(agent, ifindex: int, peer: str) -> set[int]:
    """When the conntrack entries at ``ifindex``'s hooks with ``peer`` as either end were
    made (bpf_ktime ns): a deleted and re-made entry has a new time."""
    from stockade.datapath import maps as m
    from stockade.datapath.pins import pin_name
    raw = ipaddress.ip_address(peer).packed
    out = set()
    pins = os.path.join(agent.settings["bpffs_dir"], pin_name("conntrack"))
    for kb, vb in dump_map(pins).items():
        k, v = m.CtKey.from_buffer_copy(kb), m.CtValue.from_buffer_copy(vb)
        if k.ifindex == ifindex and raw in (bytes(k.saddr)[:4], bytes(k.daddr)[:4]):
            out.add(v.created)
    return out


def test_a_wider_entry_leaves_flows_of_addresses_a_narrower_one_holds(topo):
    """A CIDR entry over the workloads' subnet moves the addresses no endpoint holds
    (c: world -> the CIDR's identity, which b does not admit) and cuts their flows only:
    a, an endpoint, keeps its identity, so its flow's entries stay as they were."""
    t, w = topo
    with AgentProcess() as agent:
        register_b(agent, w)
        agent.client.add_endpoint(name="a", interface=w["a"].host_if, ips=w["a"].ips,
                                  labels={"app": "a"})
        agent.client.put_policies([{"name": "b.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-ingress}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress: [{fromEntities: [world]}, {fromEndpoints: [{matchLabels: {app: a}}]}]
"""}])
        moved = Stream(w["c"], w["b"], 6051)
        kept = Stream(w["a"], w["b"], 6052)
        try:
            time.sleep(0.5)
            assert moved.flowing_since(0) and kept.flowing_since(0)
            before = entries_created(agent, w["b"].host_ifindex, w["a"].ip4)
            assert before
            agent.client.add_ipcache(f"{NET4}0/24", {"app": "subnet"}, host="elsewhere")
            t_change = time.monotonic()
            assert_cut(moved, kept, t_change)
            assert entries_created(agent, w["b"].host_ifindex, w["a"].ip4) == before
        finally:
            moved.close()
            kept.close()


def revoked_entries(agent, ifindex: int, peer: str) -> int:
    from stockade.datapath import maps as m
    from stockade.datapath.pins import pin_name
    raw = ipaddress.ip_address(peer).packed
    pins = os.path.join(agent.settings["bpffs_dir"], pin_name("conntrack"))
    return sum(1 for kb, vb in dump_map(pins).items()
               if (k := m.CtKey.from_buffer_copy(kb)).ifindex == ifindex
               and raw in (bytes(k.saddr)[:4], bytes(k.daddr)[:4])
               and m.CtValue.from_buffer_copy(vb).state == m.CT_STATE_REVOKED)


def test_a_cut_flow_stays_cut_while_the_endpoint_keeps_sending(topo):
    """b admits app=x only and sends on its flows too. c's address loses app=x: b's own
    packets to c (which b's egress allows) must not open the flow again from b's side,
    letting c's packets in as their replies, as they would if the cut deleted the
    entry; the flow is revoked both ways. When c's address is app=x again, the revoked
    flow is let go and resumes (its packets are judged again, now allowed)."""
    t, w = topo
    with AgentProcess() as agent:
        admit_x_only(agent, w)
        moved = Stream(w["c"], w["b"], 6061, both_ways=True)
        kept = Stream(w["a"], w["b"], 6062, both_ways=True)
        try:
            time.sleep(0.5)
            assert moved.replied_since(0) and kept.replied_since(0)
            agent.client.remove_ipcache(f"{w['c'].ip4}/32")
            t_change = time.monotonic()
            time.sleep(2.5)
            assert not moved.flowing_since(t_change + 1.0), "c's data reached b after the cut"
            assert not moved.replied_since(t_change + 1.0), "b's data reached c after the cut"
            assert kept.flowing_since(t_change + 1.5) and kept.replied_since(t_change + 1.5)
            assert revoked_entries(agent, w["b"].host_ifindex, w["c"].ip4) >= 1
            agent.client.add_ipcache(f"{w['c'].ip4}/32", {"app": "x"}, host="elsewhere")
            t_back = time.monotonic()
            deadline = t_back + 15
            while time.monotonic() < deadline and not (
                    moved.flowing_since(t_back) and moved.replied_since(t_back)):
                time.sleep(0.2)
            assert moved.flowing_since(t_back) and moved.replied_since(t_back), \
                "the flow allowed again did not resume"
            assert revoked_entries(agent, w["b"].host_ifindex, w["c"].ip4) == 0
        finally:
            moved.close()
            kept.close()
