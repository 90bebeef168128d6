"""A real QEMU (TCG) VM under the agent as a static endpoint bound by MAC, on Podman's
bridge next to real containers and a namespace workload: identities from labels,
policy both ways, anti-spoofing, and a restart on a new tap enforced again."""
import os
import time

import pytest

from agentproc import AgentProcess
from podman import (  # noqa: F401
    bridge_name,
    podman,
    podman_image,
    podman_service,
    remove_container,
    start_container,
    unique_name,
)
from stockade.discovery import DEFAULT_EVENTS_LOG
from traffic import eventually
from vm import BridgeNamespace, QemuVM, host_mac, packets, qemu_available, vm_get

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not qemu_available(), reason="needs root, qemu-system-x86_64")]

TAG = f"{os.getpid() % 10000}"
VM_MAC = "52:54:00:5e:00:11"
VM_IP = "10.88.250.11"
HTTPD = ["sh", "-c", "mkdir -p /www && echo {} > /www/index.html && exec httpd -f -p 8080 -h /www"]

POLICY = {"name": "vm.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: vm}
spec:
  endpointSelector: {matchLabels: {app: vm}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}, {matchLabels: {app: nsa}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  egress:
  - toEndpoints: [{matchLabels: {app: web}}, {matchLabels: {app: nsa}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""}


def check(attempt, allowed: bool) -> bool:
    """Allowed: succeeds within 5 s (a TCG guest can be slow). Denied: one attempt fails
    (the 1 s connect timeout)."""
    return bool(eventually(attempt, timeout=5)) if allowed else not attempt()


def endpoint(agent, name):
    return next((e for e in agent.client.endpoints() if e["name"] == name), None)


def from_container(name, ip):
    r = podman("exec", name, "sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 1 {ip} 8080",
               check=False, timeout=20)
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None


@pytest.fixture(scope="module")
def env(podman_service):
    containers = []
    try:
        for app in ("web", "other"):
            c = start_container(unique_name(f"skvm{app}"), {"app": app}, [HTTPD[0], HTTPD[1], HTTPD[2].format(app)])
            containers.append(c)
        bridge = bridge_name()  # exists once a container runs
        with AgentProcess(podman_socket=podman_service.socket_path,
                          podman_events_log=DEFAULT_EVENTS_LOG, managed_bridges=[bridge]) as agent, \
                BridgeNamespace(f"skv{TAG}a", bridge, "10.88.251.11/16") as nsa, \
                BridgeNamespace(f"skv{TAG}b", bridge, "10.88.251.12/16") as nsb:
            agent.client.put_policies([POLICY])
            agent.client.add_endpoint(name="nsa", interface=nsa.host_if, ips=[nsa.ip], labels={"app": "nsa"})
            agent.client.add_endpoint(name="nsb", interface=nsb.host_if, ips=[nsb.ip], labels={"app": "nsb"})
            # The VM is known before its tap exists: bound by MAC when the tap appears.
            agent.client.add_endpoint(name="vm1", mac=VM_MAC, ips=[VM_IP], labels={"app": "vm"})
            vm = QemuVM(f"skvm{TAG}", tap=f"skvm{TAG}t0", mac=VM_MAC, ip=f"{VM_IP}/16",
                        bridge=bridge, tap_mac=host_mac(VM_MAC))
            try:
                vm.start()
                vm.sh("httpd -p 8080 -h /www")
                web, other = containers
                for c in containers:
                    assert eventually(lambda c=c: (endpoint(agent, c.name) or {}).get("state") == "ready")
                yield {"agent": agent, "vm": vm, "web": web, "other": other, "nsa": nsa, "nsb": nsb,
                       "bridge": bridge}
            finally:
                vm.close()
    finally:
        for c in containers:
            remove_container(c.id)


def test_vm_bound_by_mac_gets_identity(env):
    agent, vm = env["agent"], env["vm"]
    assert eventually(lambda: (endpoint(agent, "vm1") or {}).get("state") == "ready")
    ep = endpoint(agent, "vm1")
    assert ep["interface"] == vm.tap and ep["ifindex"] == vm.tap_ifindex
    assert ep["mac"] == VM_MAC and ep["ips"] == [VM_IP] and ep["source"] == "static"


@pytest.mark.parametrize("peer,allowed", [("web", True), ("other", False)], ids=["web", "other"])
def test_container_to_vm(env, peer, allowed):
    c = env[peer]
    assert check(lambda: from_container(c.name, VM_IP) == "vm", allowed)


@pytest.mark.parametrize("peer,allowed", [("web", True), ("other", False)], ids=["web", "other"])
def test_vm_to_container(env, peer, allowed):
    assert check(lambda: vm_get(env["vm"], env[peer].ip) == peer, allowed)


@pytest.mark.parametrize("peer,allowed", [("nsa", True), ("nsb", False)], ids=["nsa", "nsb"])
def test_namespace_to_vm(env, peer, allowed):
    assert check(lambda: env[peer].get(VM_IP) == "vm", allowed)


@pytest.mark.parametrize("peer,allowed", [("nsa", True), ("nsb", False)], ids=["nsa", "nsb"])
def test_vm_to_namespace(env, peer, allowed):
    ns = env[peer]
    assert check(lambda: vm_get(env["vm"], ns.ip) == ns.ns, allowed)


def test_vm_cannot_send_as_another_address(env):
    agent, vm, nsa = env["agent"], env["vm"], env["nsa"]
    before = packets(agent.client.metrics(), "spoofed")
    # Take another address as the VM's only one, and try an otherwise allowed flow.
    vm.sh(f"ip addr del {VM_IP}/16 dev eth0; ip addr add 10.88.250.99/16 dev eth0")
    try:
        assert vm_get(vm, nsa.ip) is None
        assert eventually(lambda: packets(agent.client.metrics(), "spoofed") > before, timeout=5)
    finally:
        vm.sh(f"ip addr del 10.88.250.99/16 dev eth0; ip addr add {VM_IP}/16 dev eth0")
    assert eventually(lambda: vm_get(vm, nsa.ip) == nsa.ns, timeout=10)


def test_vm_restart_on_new_tap_is_enforced_again(env):
    agent, vm, web, nsb = env["agent"], env["vm"], env["web"], env["nsb"]
    old_ifindex = vm.tap_ifindex
    vm.stop()
    assert eventually(lambda: (endpoint(agent, "vm1") or {}).get("state") == "waiting-for-interface")
    vm.start(tap=f"skvm{TAG}t1", wait=False)
    t_tap = time.monotonic()
    assert vm.tap_ifindex != old_ifindex
    assert eventually(lambda: (endpoint(agent, "vm1") or {}).get("ifindex") == vm.tap_ifindex
                      and endpoint(agent, "vm1")["state"] == "ready", timeout=10, interval=0.01)
    ready_s = time.monotonic() - t_tap
    vm.wait_console(str(vm.dir / "ctl.sock"))
    vm.sh("httpd -p 8080 -h /www")
    assert eventually(lambda: from_container(web.name, VM_IP) == "vm", timeout=10)
    assert nsb.get(VM_IP) is None
    assert vm_get(vm, nsb.ip) is None
    assert endpoint(agent, "vm1")["interface"] == f"skvm{TAG}t1"
    print(f"re-enforcement after restart: endpoint ready {ready_s * 1000:.0f} ms after the tap appeared")
