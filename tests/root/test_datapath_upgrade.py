"""Upgrade from the build before the layout change, with live connections (issue 14
item 7: layout versions; the robustness issue's upgrade case).

The previous build (tests/oldbuild.py: UPGRADE_FROM, the last commit whose pins have no layout versions:
conntrack without the ICMP type, endpoints without link-local addresses, 11
reasons) is taken out of this repository's history with ``git archive`` and its
agent started on its own PYTHONPATH. It enforces a policy on two namespace
endpoints, A (web) and B (db), while connections are open; then it stops (its
programs and pins stay, as on a package upgrade) and this build's agent starts on the
same pins, migrates them and replaces the programs.

The UDP flow is the proof that conntrack entries were carried over: B keeps sending
replies and A never sends again, so nothing re-creates A's entry, and A's ingress is
default deny.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from agentproc import STOCKADE, AgentProcess
from attached import program_ids
from netns import Topology
from oldbuild import RUN_AGENT, old_build
from traffic import eventually, tcp_ok

pytestmark = pytest.mark.root

NET4 = "10.213.30."


def cnp(name, spec):
    import textwrap
    return {"name": f"{name}.yaml", "text": (
        f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\n"
        f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")}


POLICIES = [cnp("db", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}, {port: "6000", protocol: UDP}]}]
"""), cnp("web", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toEndpoints: [{matchLabels: {app: db}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}, {port: "6000", protocol: UDP}]}]
ingress:
  - fromEndpoints: [{matchLabels: {app: nobody}}]
""")]


@pytest.fixture(scope="module")
def old_tree():
    with old_build() as tree:
        yield tree


class UdpPush:
    """A opens a UDP flow to B:6000 once; B then sends to A every 20 ms."""

    def __init__(self, a, b):
        self.srv = b.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.cli = a.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.srv.bind((b.ip4, 6000))
        self.cli.settimeout(0.2)
        self.srv.settimeout(2)
        self.cli.sendto(b"open", (b.ip4, 6000))
        _, self.peer = self.srv.recvfrom(16)
        self.got: list[float] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._recv, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self):
        while not self.stop.is_set():
            self.srv.sendto(b"push", self.peer)
            time.sleep(0.02)

    def _recv(self):
        while not self.stop.is_set():
            try:
                if self.cli.recv(16) == b"push":
                    self.got.append(time.monotonic())
            except OSError:
                pass

    def received_since(self, t: float) -> int:
        return sum(1 for g in list(self.got) if g > t)

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(2)
        self.srv.close()
        self.cli.close()


class TcpConn:
    def __init__(self, a, b, port=8080):
        self.srv = b.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((b.ip4, port))
        self.srv.listen(1)
        self.cli = a.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.cli.settimeout(3)
        self.cli.connect((b.ip4, port))
        self.conn, _ = self.srv.accept()
        self.conn.settimeout(3)
        self.srv.close()                 # the port is free for new connections

    def round_trip(self, data=b"ping") -> bool:
        try:
            self.cli.sendall(data)
            self.conn.sendall(self.conn.recv(64))
            return self.cli.recv(64) == data
        except OSError:
            return False

    def close(self):
        for s in (self.cli, self.conn):
            s.close()


def packets_total(agent, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in agent.client.metrics().splitlines():
        if line.startswith("stockade_packets_total{"):
            name, _, value = line.rpartition(" ")
            got = ",".join(sorted(name[name.index("{") + 1:-1].split(",")))
            if got == want:
                return float(value)
    return 0.0


def test_upgrade_keeps_connections_and_policy(old_tree):
    with Topology("u") as topo:
        a = topo.add_workload("a", [f"{NET4}1/24"])
        b = topo.add_workload("b", [f"{NET4}2/24"])
        agent = AgentProcess(command=RUN_AGENT,
                             env={"PYTHONPATH": f"{old_tree}/agent"})
        udp = tcp = None
        try:
            agent.start()
            assert Path(agent.settings["bpffs_dir"], "conntrack").exists()   # the v1 layout
            for name, w, app in (("a", a, "web"), ("b", b, "db")):
                agent.client.add_endpoint(name=name, interface=w.host_if, ips=w.ips,
                                          labels={"app": app})
            agent.client.put_policies(POLICIES, replace_all=True)
            assert tcp_ok(a, b, b.ip4, 8080) and not tcp_ok(b, a, a.ip4, 8080)
            tcp = TcpConn(a, b)
            udp = UdpPush(a, b)
            assert tcp.round_trip() and eventually(lambda: udp.received_since(0) > 5)
            forwarded = packets_total(agent, direction="egress", verdict="FORWARDED",
                                      reason="none")
            assert forwarded >= 3

            old_progs = prog_ids(a.host_if)
            agent.kill(signal.SIGTERM)                 # programs and pins stay
            stopped = time.monotonic()
            assert eventually(lambda: udp.received_since(stopped) > 5)   # old programs

            agent.command, agent.env = STOCKADE, None     # this build
            agent.start()
            pins = set(os.listdir(agent.settings["bpffs_dir"]))
            assert {"conntrack_v2", "endpoints_v2", "counters_v2"} <= pins
            assert not {"conntrack", "endpoints", "counters"} & pins      # migrated
            assert eventually(lambda: len(prog_ids(a.host_if) - old_progs) == 2, timeout=10)
            replaced = time.monotonic()
            # the pushed replies kept passing A's default-deny ingress: migrated entry
            assert eventually(lambda: udp.received_since(replaced) > 10, timeout=5)
            gap = _longest_gap(udp.got, stopped)
            assert gap < 1.0, f"replies stopped for {gap:.2f} s across the upgrade"
            assert tcp.round_trip(b"after the upgrade")
            # policy still holds, for new connections, both ways
            assert tcp_ok(a, b, b.ip4, 8080)
            assert not tcp_ok(b, a, a.ip4, 8080)
            assert not tcp_ok(a, b, b.ip4, 8081)
            assert packets_total(agent, direction="egress", verdict="FORWARDED",
                                 reason="none") > forwarded   # counters carried over
        finally:
            if udp is not None:
                udp.close()
            if tcp is not None:
                tcp.close()
            agent.stop()


def prog_ids(ifname: str) -> set[int]:
    """Ids of the BPF programs run on ``ifname`` (both hooks, tcx or tc)."""
    return set(program_ids(ifname))


def _longest_gap(times: list[float], since: float) -> float:
    ts = [since] + sorted(t for t in times if t > since)
    return max((b - a for a, b in zip(ts, ts[1:], strict=False)), default=0.0)
