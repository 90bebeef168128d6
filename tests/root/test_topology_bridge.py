"""The tests' bridges keep their MAC when a port with a lower one joins.

A Linux bridge left to choose its MAC takes its lowest port's and changes it when a
lower one joins. A workload whose ARP cache holds the old one (another port's MAC) then
has its frames to the host passed up as PACKET_OTHERHOST and dropped by IP, silently,
until it resolves the host again. The kvstore Molecule scenario lost web's calls to db
this way after web2 joined h1's bridge. ``netns.bridge_mac`` fixes the MAC of the
bridges of Topology, fleetnet and molecule/default/topology.sh.
"""
import pytest

from netns import Topology, bridge_mac, link_mac, run
from traffic import ping_ok

pytestmark = pytest.mark.root

HOST = "10.213.95.254"
LOWEST = "02:00:00:00:00:01"


def test_a_bridge_that_chooses_its_mac_loses_a_workloads_frames_when_a_lower_port_joins():
    """The kernel's behaviour, on a bridge without a set MAC: a's frames to the host,
    sent to the bridge's old MAC (b's port), are lost once c's lower MAC takes over."""
    with Topology("bq", fixed_mac=False) as topo:
        run("ip", "addr", "add", f"{HOST}/24", "dev", topo.bridge)
        a = topo.add_workload("a", ["10.213.95.1/24"])
        b = topo.add_workload("b", ["10.213.95.2/24"])
        run("ip", "link", "set", a.host_if, "address", "0e:00:00:00:00:0a")
        run("ip", "link", "set", b.host_if, "address", "0a:00:00:00:00:0b")
        assert link_mac(topo.bridge) == "0a:00:00:00:00:0b"          # b's, the lowest
        assert ping_ok(a, HOST), "a cannot reach the host before c joins"
        c = topo.add_workload("c", ["10.213.95.3/24"])
        run("ip", "link", "set", c.host_if, "address", LOWEST)
        assert link_mac(topo.bridge) == LOWEST                        # c's now
        assert not ping_ok(a, HOST), "a's frames to b's MAC were not lost: the premise is gone"


def test_topology_bridge_keeps_its_mac_and_a_workloads_frames_when_a_lower_port_joins():
    with Topology("bm") as topo:
        run("ip", "addr", "add", f"{HOST}/24", "dev", topo.bridge)
        a = topo.add_workload("a", ["10.213.95.1/24"])
        topo.add_workload("b", ["10.213.95.2/24"])
        assert link_mac(topo.bridge) == bridge_mac(topo.bridge)
        assert ping_ok(a, HOST)
        c = topo.add_workload("c", ["10.213.95.3/24"])
        run("ip", "link", "set", c.host_if, "address", LOWEST)
        assert link_mac(topo.bridge) == bridge_mac(topo.bridge)
        assert ping_ok(a, HOST)
