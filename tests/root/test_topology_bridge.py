"""The tests' bridges keep their MAC when a port with a lower one joins.

A Linux bridge left to choose its MAC takes its lowest port's and changes it when a
lower one joins. A workload whose ARP cache holds the old one (another port's MAC) then
has its frames to the host passed up as PACKET_OTHERHOST and dropped by IP, silently,
until it resolves the host again. The kvstore Molecule scenario lost web's calls to db
this way after web2 joined h1's bridge. ``netns.bridge_mac`` fixes the MAC of the
bridges of Topology, fleetnet and molecule/default/topology.sh.
"""
import os
import subprocess

import pytest

from netns import Topology, bridge_mac, run
from traffic import ping_ok

pytestmark = pytest.mark.root

HOST = "10.213.95.254"
LOWEST = "02:00:00:00:00:01"


def mac_of(dev: str, ns: str | None = None) -> str:
    where = ["-n", ns] if ns else []
    out = run("ip", *where, "-o", "link", "show", dev).stdout
    return out.split("link/ether ")[1].split()[0]


def test_a_bridge_that_chooses_its_mac_loses_a_workloads_frames_when_a_lower_port_joins():
    """The kernel's behaviour, on a bridge without a set MAC: a's frames to the host,
    sent to the bridge's old MAC (b's port), are lost once c's lower MAC takes over."""
    tag = f"sk{os.getpid()}bq"
    host, ns = f"{tag}h", {w: f"{tag}{w}" for w in "abc"}
    try:
        run("ip", "netns", "add", host)
        run("ip", "-n", host, "link", "add", "wbr0", "type", "bridge", "stp_state", "0")
        run("ip", "-n", host, "addr", "add", f"{HOST}/24", "dev", "wbr0")
        run("ip", "-n", host, "link", "set", "wbr0", "up")
        for i, (w, mac) in enumerate([("a", "0e:00:00:00:00:0a"), ("b", "0a:00:00:00:00:0b")], 1):
            _port(host, ns[w], f"{w}-h", mac, f"10.213.95.{i}/24")
        assert mac_of("wbr0", host) == "0a:00:00:00:00:0b"          # b's, the lowest
        assert _ping(ns["a"]), "a cannot reach the host before c joins"
        _port(host, ns["c"], "c-h", LOWEST, "10.213.95.3/24")
        assert mac_of("wbr0", host) == LOWEST                        # c's now
        assert not _ping(ns["a"]), "a's frames to b's MAC were not lost: the premise is gone"
    finally:
        for n in [*ns.values(), host]:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def test_topology_bridge_keeps_its_mac_and_a_workloads_frames_when_a_lower_port_joins():
    with Topology("bm") as topo:
        run("ip", "addr", "add", f"{HOST}/24", "dev", topo.bridge)
        a = topo.add_workload("a", ["10.213.95.1/24"])
        topo.add_workload("b", ["10.213.95.2/24"])
        assert mac_of(topo.bridge) == bridge_mac(topo.bridge)
        assert ping_ok(a, HOST)
        c = topo.add_workload("c", ["10.213.95.3/24"])
        run("ip", "link", "set", c.host_if, "address", LOWEST)
        assert mac_of(topo.bridge) == bridge_mac(topo.bridge)
        assert ping_ok(a, HOST)


def _port(host: str, ns: str, name: str, mac: str, addr: str) -> None:
    run("ip", "netns", "add", ns)
    run("ip", "-n", host, "link", "add", name, "address", mac, "type", "veth",
        "peer", "name", "eth0", "netns", ns)
    run("ip", "-n", host, "link", "set", name, "master", "wbr0", "up")
    run("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
    run("ip", "-n", ns, "link", "set", "eth0", "up")


def _ping(ns: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", HOST],
                          capture_output=True).returncode == 0
