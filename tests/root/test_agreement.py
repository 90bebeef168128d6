"""The agreement table (tests/agreement_cases.py) through everything that answers a policy
question, on one real agent: real packets between namespaces, the offline trace (the
case's files), the live trace (GET /v1/trace) and the web UI's matrix API for the port
(GET /api/v1/matrix?port=...). All four must give the verdict worked out by hand.

Each case: its policies replace the agent's, its (at most two) workloads are the
namespaces w1 and w2 with the case's labels (static endpoints), and a ``cidr:`` peer or
``entity:world`` is the unregistered namespace x with that address (world: an address
no case names); ``entity:host`` is this (root) namespace's address on the bridge.
"""
from __future__ import annotations

import ipaddress
import socket
import subprocess

import pytest

from agentproc import AgentProcess
from agreement_cases import CASES
from netns import Topology
from stockade.policy.api.loader import load_text
from stockade.policy.sel import parse_port, parse_sel
from stockade.policy.trace import Tracer

pytestmark = pytest.mark.root

NET = "10.213.40."
HOST_IP = NET + "254"
WORLD_IP = "203.0.113.77"  # no case names 203.0.113.0/24
TIMEOUT = 0.8
TOKEN = "agreement-test-token-0123456789"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with Topology("g") as topo:
        w = {t: topo.add_workload(t, [f"{NET}{i}/24"]) for i, t in enumerate(("w1", "w2", "x"), start=1)}
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", topo.bridge], check=True)
        for t in w:  # every address is on the link: the case's CIDR peers live on it
            w[t].exec("ip", "route", "add", "default", "dev", "eth0")
        with AgentProcess() as agent:
            from stockade_webui import create_app
            app = create_app({"TOKEN": TOKEN, "AGENTS": [f"h1={agent.socket}"], "TESTING": True})
            yield agent, w, app.test_client()


def set_peer_address(x, addr: str | None) -> None:
    """x gets exactly one extra address: the case's CIDR peer (or world)."""
    x.exec("ip", "addr", "flush", "dev", "eth0", "scope", "global")
    x.exec("ip", "addr", "add", f"{NET}3/24", "dev", "eth0")
    if addr:
        x.exec("ip", "addr", "add", f"{addr}/32", "dev", "eth0")
    x.exec("ip", "route", "replace", "default", "dev", "eth0")


class Side:
    """One end of a case's connection: a namespace (or the host) and its address."""

    def __init__(self, ns, addr: str):
        self.ns, self.addr = ns, addr

    def socket(self, kind):
        if self.ns is None:
            return socket.socket(socket.AF_INET, kind)
        return self.ns.socket(socket.AF_INET, kind)


def sides(case, w) -> tuple[Side, Side, list[tuple[str, str]]]:
    """(source, destination, workloads to register as (namespace name, labels))."""
    out, regs, free = [], [], ["w1", "w2"]
    for sel in (case.src, case.dst):
        spec = parse_sel(sel)
        if spec.kind == "workload":
            labels = ",".join(f"{l.key}={l.value}" for l in spec.labels)
            done = next((n for n, lab in regs if lab == labels), None)
            name = done or free.pop(0)
            if not done:
                regs.append((name, labels))
            out.append(Side(w[name], w[name].ip4))
        elif spec.kind == "entity" and spec.entity == "host":
            out.append(Side(None, HOST_IP))
        else:
            out.append(Side(w["x"], spec.prefix.split("/")[0] if spec.kind == "cidr" else WORLD_IP))
    return out[0], out[1], regs


def connects(src: Side, dst: Side, proto: int, port: int) -> bool:
    """A new connection (TCP handshake and a byte back, a UDP datagram received, an ICMP
    echo answered) from src to dst."""
    if proto == 1:
        if src.ns is None:
            r = subprocess.run(["ping", "-c1", "-W1", "-I", src.addr, dst.addr], capture_output=True)
        else:
            r = src.ns.exec("ping", "-c1", "-W1", "-I", src.addr, dst.addr, check=False)
        return r.returncode == 0
    kind = socket.SOCK_STREAM if proto == 6 else socket.SOCK_DGRAM
    srv, cli = dst.socket(kind), src.socket(kind)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((dst.addr, port))
        srv.settimeout(TIMEOUT)
        cli.settimeout(TIMEOUT)
        cli.bind((src.addr, 0))
        if kind == socket.SOCK_STREAM:
            srv.listen(4)
            try:
                cli.connect((dst.addr, port))
                conn, _ = srv.accept()
                conn.sendall(b"ok")
                ok = cli.recv(2) == b"ok"
                conn.close()
                return ok
            except OSError:
                return False
        cli.sendto(b"ping", (dst.addr, port))
        try:
            return srv.recvfrom(16)[0] == b"ping"
        except OSError:
            return False
    finally:
        srv.close()
        cli.close()


def matrix_verdict(ui, agent, src_sel: str, dst_sel: str, src_addr: str, dst_addr: str,
                   port: str) -> str:
    """The web UI matrix API's answer for the pair, for that port."""
    ids = {}
    for sel, addr in ((src_sel, src_addr), (dst_sel, dst_addr)):
        spec = parse_sel(sel)
        if spec.kind == "entity":
            ids[sel] = {"host": 1, "world": 2}[spec.entity]
        else:  # the identity the datapath gives the address: the ipcache's longest match
            ipc = {ipaddress.ip_network(e["prefix"]): e["identity"] for e in agent.client.ipcache()}
            addr_net = ipaddress.ip_network(addr)
            best = max((p for p in ipc if p.version == 4 and addr_net.subnet_of(p)),
                       key=lambda p: p.prefixlen, default=None)
            ids[sel] = ipc[best] if best is not None else 2
    r = ui.get(f"/api/v1/matrix?port={port}&cidrs=true&per_page=100", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.get_data(as_text=True)
    data = r.json
    row = next(x for x in data["rows"] if x["src"] == ids[src_sel])
    cell = next(c for c in row["cells"] if c["dst"] == ids[dst_sel])
    return "allow" if cell["verdict"] == "allow" else "deny"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_all_four_agree(env, case):
    agent, w, ui = env
    src, dst, regs = sides(case, w)
    peer = next((s.addr for s in (src, dst) if s.ns is w["x"]), None)
    set_peer_address(w["x"], peer)
    wanted = {name for name, _ in regs}
    for ep in agent.client.endpoints():
        if ep["name"] not in wanted:
            agent.client.remove_endpoint(ep["name"])
    for name, labels in regs:
        agent.client.add_endpoint(name=name, interface=w[name].host_if, ips=w[name].ips,
                                  labels=dict(kv.split("=", 1) for kv in labels.split(",")))
    agent.client.put_policies([{"name": f"{case.name}.yaml", "text": case.policies}], replace_all=True)
    proto, port = parse_port(case.port)

    offline = Tracer(load_text(case.policies, "p.yaml")).trace(parse_sel(case.src), parse_sel(case.dst),
                                                                proto, port)["verdict"]
    live_src = f"endpoint:{next(n for n, l in regs if src.ns is w[n])}" if src.ns in (w["w1"], w["w2"]) else (
        case.src if not case.src.startswith("entity:world") else f"cidr:{WORLD_IP}/32")
    live_dst = f"endpoint:{next(n for n, l in regs if dst.ns is w[n])}" if dst.ns in (w["w1"], w["w2"]) else (
        case.dst if not case.dst.startswith("entity:world") else f"cidr:{WORLD_IP}/32")
    live = agent.client.trace(live_src, live_dst, case.port)["verdict"]
    matrix = matrix_verdict(ui, agent, live_src, live_dst, src.addr, dst.addr, case.port)
    traffic = "allow" if connects(src, dst, proto, port) else "deny"
    got = {"traffic": traffic, "offline trace": offline, "live trace": live, "matrix": matrix}
    assert set(got.values()) == {case.expect}, f"{got} expected {case.expect}: {case.why}"
