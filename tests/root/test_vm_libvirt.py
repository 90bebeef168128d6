"""A libvirt-defined VM (TCG, direct kernel boot, bridged to Podman's bridge) discovered
by the agent's libvirt source: identity from the domain's Stockade metadata, policy with
a real container and a namespace workload, re-attached and enforced after a restart via
virsh (new vnet tap, new ifindex), removed when the domain stops.

libvirtd and virtlogd are started without systemd when they are not running, and
stopped (by PID) at the end only if this module started them."""
import os
import subprocess
import threading
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
from vm import LIBVIRT_URI, BridgeNamespace, LibvirtVM, LinkWatch, libvirt_available, start_libvirtd, stop_pids, vm_get

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not libvirt_available(), reason="needs libvirt, python3-libvirt, qemu")]

TAG = f"{os.getpid() % 10000}"
DOMAIN = f"skvm-lv-{TAG}"
VM_MAC = "52:54:00:5e:00:21"
VM_IP = "10.88.250.21"

POLICY = {"name": "lv.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lvdb}
spec:
  endpointSelector: {matchLabels: {app: lvdb}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""}


def endpoint(agent, name):
    return next((e for e in agent.client.endpoints() if e["name"] == name), None)


def from_container(name, ip):
    r = podman("exec", name, "sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 1 {ip} 8080",
               check=False, timeout=20)
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None


def virsh(*args):
    return subprocess.run(["virsh", "-c", LIBVIRT_URI, *args], check=True, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def env(podman_service):
    started = start_libvirtd()
    web = None
    vm = None
    try:
        web = start_container(unique_name("sklvweb"), {"app": "web"},
                              ["sh", "-c", "mkdir -p /www && echo web > /www/index.html && "
                               "exec httpd -f -p 8080 -h /www"])
        bridge = bridge_name()
        with AgentProcess(podman_socket=podman_service.socket_path,
                          podman_events_log=DEFAULT_EVENTS_LOG, managed_bridges=[bridge],
                          libvirt_uri=LIBVIRT_URI) as agent, \
                BridgeNamespace(f"skl{TAG}b", bridge, "10.88.251.21/16") as nsb:
            agent.client.put_policies([POLICY])
            agent.client.add_endpoint(name="lvnsb", interface=nsb.host_if, ips=[nsb.ip],
                                      labels={"app": "nsb"})
            vm = LibvirtVM(DOMAIN, mac=VM_MAC, ip=f"{VM_IP}/16", bridge=bridge,
                           labels={"app": "lvdb", "tier": "back"})
            vm.define().start()
            vm.sh("httpd -p 8080 -h /www")
            yield {"agent": agent, "vm": vm, "web": web, "nsb": nsb}
    finally:
        if vm is not None:
            vm.close()
        if web is not None:
            remove_container(web.id)
        stop_pids(started)


def test_domain_discovered_with_metadata_identity(env):
    agent, vm = env["agent"], env["vm"]
    assert eventually(lambda: (endpoint(agent, DOMAIN) or {}).get("state") == "ready")
    ep = endpoint(agent, DOMAIN)
    assert ep["source"] == "libvirt" and ep["ips"] == [VM_IP] and ep["mac"] == VM_MAC
    assert ep["interface"] == vm.tap() and ep["ifindex"] == __import__("socket").if_nametoindex(vm.tap())
    assert ep["labels"]["libvirt:app"] == "lvdb" and ep["labels"]["libvirt:tier"] == "back"


def test_policy_on_libvirt_vm(env):
    vm, web, nsb = env["vm"], env["web"], env["nsb"]
    assert eventually(lambda: from_container(web.name, VM_IP) == "vm")
    assert nsb.get(VM_IP) is None
    assert eventually(lambda: vm_get(vm, web.ip) == "web")   # no egress policy on the VM


def test_metadata_change_updates_labels(env):
    agent, vm = env["agent"], env["vm"]
    import libvirt
    xml = ('<endpoint><label key="app">lvdb</label><label key="tier">front</label>'
           f'<ip>{VM_IP}</ip></endpoint>')
    vm.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, "stockade",
                       "https://stockade.dev/xmlns/endpoint/1", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    assert eventually(lambda: endpoint(agent, DOMAIN)["labels"].get("libvirt:tier") == "front")
    assert endpoint(agent, DOMAIN)["state"] == "ready"


# web's 8080 only for static:role=gateway (restored at the end of the test that uses it).
GATE = {"name": "gate.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lvgate}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {"static:role": gateway}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""}


def set_labels(vm, labels: dict) -> None:
    import libvirt
    xml = ("<endpoint>" + "".join(f'<label key="{k}">{v}</label>' for k, v in labels.items())
           + f"<ip>{VM_IP}</ip></endpoint>")
    vm.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, "stockade",
                       "https://stockade.dev/xmlns/endpoint/1", libvirt.VIR_DOMAIN_AFFECT_LIVE)


def test_metadata_claiming_another_source_gives_no_identity(env):
    """A domain's metadata saying static:role=gateway (or reserved:host) gets neither: the
    VM is denied what a policy grants static:role=gateway; a real static endpoint with
    role=gateway is allowed."""
    agent, vm, web, nsb = env["agent"], env["vm"], env["web"], env["nsb"]
    from prometheus_client.parser import text_string_to_metric_families

    def dropped():
        return {d["label"]: d["cause"] for d in endpoint(agent, DOMAIN)["dropped_labels"]}

    def count(cause):
        return sum(s.value for f in text_string_to_metric_families(agent.client.metrics())
                   for s in f.samples if s.name == "stockade_labels_dropped_total"
                   and s.labels == {"source": "libvirt", "cause": cause})

    before = {c: count(c) for c in ("other-source", "reserved")}
    set_labels(vm, {"app": "lvdb", "tier": "front", "static:role": "gateway", "reserved:host": ""})
    try:
        assert eventually(lambda: dropped() == {"static:role=gateway": "other-source",
                                                "reserved:host": "reserved"})
        ep = endpoint(agent, DOMAIN)
        assert ep["state"] == "ready" and ep["labels"] == {"libvirt:app": "lvdb", "libvirt:tier": "front"}
        assert count("other-source") == before["other-source"] + 1
        assert count("reserved") == before["reserved"] + 1
        agent.client.put_policies([GATE])
        agent.client.add_endpoint(name="lvnsb", interface=nsb.host_if, ips=[nsb.ip],
                                  labels={"app": "nsb", "role": "gateway"})
        assert eventually(lambda: nsb.get(web.ip) == "web"), "static role=gateway is allowed"
        assert vm_get(vm, web.ip) is None, "the VM's static:role=gateway gave it access"
    finally:
        agent.client.delete_policy("lvgate")
        agent.client.add_endpoint(name="lvnsb", interface=nsb.host_if, ips=[nsb.ip],
                                  labels={"app": "nsb"})
        set_labels(vm, {"app": "lvdb", "tier": "front"})
    assert eventually(lambda: endpoint(agent, DOMAIN)["dropped_labels"] == [])


def test_restart_via_virsh_reattaches_and_enforces(env):
    agent, vm, web, nsb = env["agent"], env["vm"], env["web"], env["nsb"]
    old_tap = vm.tap()
    old_ifindex = endpoint(agent, DOMAIN)["ifindex"]
    vm.console.close()
    vm.console = None
    virsh("destroy", DOMAIN)
    assert eventually(lambda: endpoint(agent, DOMAIN) is None), "stopped domain still an endpoint"
    watch = LinkWatch("vnet")
    starter = threading.Thread(target=virsh, args=("start", DOMAIN))
    try:
        # Poll while virsh start runs: libvirt creates the tap early, QEMU comes later.
        starter.start()
        assert eventually(lambda: watch.seen, timeout=30, interval=0.005), "no new vnet tap"
        (tap, ifindex), t_tap = next(iter(watch.seen.items()))
        assert ifindex != old_ifindex
        assert eventually(lambda: (endpoint(agent, DOMAIN) or {}).get("ifindex") == ifindex
                          and endpoint(agent, DOMAIN)["state"] == "ready", timeout=10, interval=0.01)
        ready_ms = (time.monotonic() - t_tap) * 1000
    finally:
        starter.join(timeout=60)
        watch.close()
    assert vm.tap() == tap
    print(f"libvirt restart: {old_tap} -> {tap}; endpoint ready {ready_ms:.0f} ms after the tap appeared")
    vm.connect_console()
    vm.sh("httpd -p 8080 -h /www")
    assert eventually(lambda: from_container(web.name, VM_IP) == "vm", timeout=10)
    assert nsb.get(VM_IP) is None
