"""Rebinding by identity, never by name alone (binding.py): after a restart and when a
link appears, an endpoint from the state is bound to an interface only if the interface
is provably its own. A same-named other interface is reported and stays closed; it
never gets the old endpoint's identity (real traffic says so)."""
from __future__ import annotations

import json
import signal

import pytest

from agentproc import AgentProcess
from netns import Topology, run
from podman import PrivatePodman, podman_available
from stockade.discovery import find_host_veth
from traffic import eventually, tcp_ok

pytestmark = pytest.mark.root

NET4 = "10.213.43."
DB_FROM_WEB = {"name": "db.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: "5432", protocol: TCP}]}]}]
"""}


def endpoint(agent, name):
    return next((e for e in agent.client.endpoints() if e["name"] == name), None)


def mismatches(agent) -> list[str]:
    return agent.client.health()["binding_mismatches"]


@pytest.fixture
def topo():
    with Topology("rb") as t:
        t.add_workload("a", [f"{NET4}1/24"])
        t.add_workload("b", [f"{NET4}2/24"])
        yield t


@pytest.mark.parametrize("when", ["restart", "running"])
def test_a_static_endpoint_is_not_bound_to_another_interface_of_its_name(topo, when):
    """a (web) may reach b (db). a's veth is deleted and another namespace gets a veth of
    the same name: that interface does not become a, before or after a restart."""
    w = topo.workloads
    agent = AgentProcess()
    try:
        agent.start()
        agent.client.add_endpoint(name="a", interface=w["a"].host_if, ips=w["a"].ips, labels={"app": "web"})
        agent.client.add_endpoint(name="b", interface=w["b"].host_if, ips=w["b"].ips, labels={"app": "db"})
        agent.client.put_policies([DB_FROM_WEB])
        assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5432)
        old_mac = json.loads(run("ip", "-j", "link", "show", w["a"].host_if).stdout)[0]["address"]
        if when == "restart":
            agent.kill()
        topo.remove_workload("a")
        intruder = topo.add_workload("a", [f"{NET4}1/24"])      # same names, same address
        new_mac = json.loads(run("ip", "-j", "link", "show", intruder.host_if).stdout)[0]["address"]
        assert new_mac != old_mac
        if when == "restart":
            agent.start()
        assert eventually(lambda: mismatches(agent) == [
            f"endpoint a: interface {intruder.host_if} has MAC {new_mac}, not {old_mac} as recorded"])
        assert endpoint(agent, "a")["state"] == "waiting-for-interface"
        assert agent.client.health()["status"] == "degraded"
        assert not tcp_ok(intruder, w["b"], w["b"].ip4, 5432), "the other interface got a's identity"
        assert "not bound: endpoint a: interface" in agent.cli("status", check=False).stdout
        # The operator says this is a's interface now: registered again, it is bound.
        agent.client.add_endpoint(name="a", interface=intruder.host_if, ips=intruder.ips,
                                  labels={"app": "web"})
        assert endpoint(agent, "a")["state"] == "ready" and mismatches(agent) == []
        # (eventually: its neighbour entry for b may still wait for an ARP retry)
        assert eventually(lambda: tcp_ok(intruder, w["b"], w["b"].ip4, 5432), timeout=5)
        agent.kill()
        agent.start()                                   # its MAC is the one recorded now
        assert endpoint(agent, "a")["state"] == "ready" and mismatches(agent) == []
    finally:
        agent.stop()


def test_a_vm_is_bound_to_the_tap_of_its_guest_mac_only(topo):
    """A libvirt endpoint from the state (as a previous run left it): a tap with its name
    but another MAC stays closed; the tap whose MAC follows from the guest MAC binds."""
    from stockade.daemon.store import StateStore
    guest = "52:54:00:ab:43:07"
    tap = f"sk{topo.prefix[2:]}t"[:15]
    agent = AgentProcess()
    try:
        StateStore(agent.settings["state_dir"]).commit({"endpoints.json": [{
            "name": "vm1", "id": 1, "interface": tap, "ips": [f"{NET4}9"], "labels": {"libvirt:app": "vm"},
            "source": "libvirt", "runtime_id": f"0f9c2c1e-43aa-4b53-9d7e-1e2f3a4b5c6d/{guest}",
            "mac": guest}]})
        run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        run("ip", "link", "set", "dev", tap, "address", "fe:54:00:ab:43:99", "up")
        agent.start()
        assert endpoint(agent, "vm1")["state"] == "waiting-for-interface"
        assert mismatches(agent) == [f"endpoint vm1: interface {tap} is not the tap of guest MAC "
                                     f"{guest} (a tun link with MAC fe:54:00:ab:43:99)"]
        run("ip", "link", "del", tap)
        run("ip", "tuntap", "add", "dev", tap, "mode", "tap")   # the VM started again
        run("ip", "link", "set", "dev", tap, "address", "fe" + guest[2:], "up")
        assert eventually(lambda: endpoint(agent, "vm1")["state"] == "ready")
        assert mismatches(agent) == []
    finally:
        run("ip", "link", "del", tap, check=False)
        agent.stop()


def host_veth(agent, name) -> str:
    return endpoint(agent, name)["interface"]


def test_a_container_is_bound_by_its_network_namespace_not_its_veth_name():
    """Container A is removed while the agent is down; container B's veth gets A's old
    name. A's record does not take it: after the restart B is identified as B (it was 409
    before), A is removed once Podman lists without it, and a container that kept running
    is bound again at once, without Podman."""
    if not podman_available():
        pytest.fail("needs root, podman and /bin/busybox (busybox-static): make setup")
    with PrivatePodman(subnet="10.213.44.0/24") as pp:
        agent = AgentProcess(podman_socket=pp.socket, managed_bridges=[pp.bridge])
        try:
            agent.start()
            agent.client.put_policies([DB_FROM_WEB])
            a = pp.run("skrba", {"app": "web"})
            pp.run("skrbk", {"app": "keep"})
            assert eventually(lambda: all((endpoint(agent, n) or {}).get("state") == "ready"
                                          for n in ("skrba", "skrbk")))
            a_veth = host_veth(agent, "skrba")
            agent.kill()
            pp.remove(a)
            b = pp.run("skrbb", {"app": "other"})
            pid = json.loads(pp.podman("inspect", b).stdout)[0]["State"]["Pid"]
            b_veth = find_host_veth(pid).ifname
            run("ip", "link", "set", "dev", b_veth, "down")
            run("ip", "link", "set", "dev", b_veth, "name", a_veth)
            run("ip", "link", "set", "dev", a_veth, "up")

            # Without Podman: the state alone. keep is bound (its namespace is the one
            # recorded); A's record does not take B's veth.
            agent.settings["podman_socket"] = None
            agent.start()
            assert endpoint(agent, "skrbk")["state"] == "ready"
            assert endpoint(agent, "skrba")["state"] == "waiting-for-interface"
            [m] = mismatches(agent)
            assert m.startswith(f"endpoint skrba: interface {a_veth} does not lead into the network "
                                f"namespace of container {a[:12]}"), m
            # With Podman: B is announced on that veth and identified as itself; A goes.
            agent.kill(signal.SIGTERM)
            agent.settings["podman_socket"] = pp.socket
            agent.start()
            assert eventually(lambda: (endpoint(agent, "skrbb") or {}).get("state") == "ready", timeout=20)
            ep = endpoint(agent, "skrbb")
            assert ep["interface"] == a_veth and ep["labels"]["container:app"] == "other"
            assert eventually(lambda: endpoint(agent, "skrba") is None, timeout=20)
            assert mismatches(agent) == []
        finally:
            agent.stop()
