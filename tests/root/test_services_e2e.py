"""Inventory-defined services on a real agent: containers, namespaces and taps get the
service's identity by matching (no relabelling), CIDR services, definition changes,
conflicts."""
import pytest

from agentproc import AgentProcess
from netns import Topology, run
from podman import IMAGE, bridge_name, podman, podman_image, podman_service, run_container, unique_name  # noqa: F401
from stockade.discovery import DEFAULT_EVENTS_LOG
from traffic import eventually, tcp_ok

pytestmark = pytest.mark.root

DB_IMAGE = "localhost/stockade-svcdb:1"
HTTPD = ["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www"]
GET = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 8080"
POLICY = {"name": "svc.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {service: db}}
  ingress: [{fromEndpoints: [{matchLabels: {service: web}}], toPorts: [{ports: [{port: "8080", protocol: TCP}]}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: nas}
spec:
  endpointSelector: {matchLabels: {service: nas}}
  egress:
  - toCIDRSet: [{cidrGroupRef: backup}]
  - toEndpoints: [{matchLabels: {service: backup}}]
    toPorts: [{ports: [{port: "873", protocol: TCP}]}]
"""}


@pytest.fixture(scope="module")
def env(podman_service):
    podman("tag", IMAGE, DB_IMAGE)
    names = {n: unique_name(n) for n in ("svcweb", "svcdb", "svcplain")}
    try:
        with Topology("v") as topo:
            nas = topo.add_workload("a", ["10.213.30.1/24"])
            backup = topo.add_workload("b", ["10.213.30.2/24"])   # outside the fleet: a CIDR service
            other = topo.add_workload("c", ["10.213.30.3/24"])
            tap = f"tapsv{__import__('os').getpid() % 100000}"
            run("ip", "tuntap", "add", tap, "mode", "tap")
            try:
                with AgentProcess(podman_socket=podman_service.socket_path,
                                  podman_events_log=DEFAULT_EVENTS_LOG,
                                  managed_bridges=[bridge_name()]) as agent:
                    services = {
                        "web": {"members": [{"container_name": f"{names['svcweb']}*"}]},
                        "db": {"labels": {"tier": "data"}, "members": [{"image": "*/stockade-svcdb:*"}]},
                        "nas": {"members": [{"endpoint": "nas-ns"}]},
                        "vm": {"members": [{"interface": "tapsv*"}]},
                        "backup": {"cidrs": ["10.213.30.2/32"]},
                    }
                    agent.client.put_services(services)
                    agent.client.put_policies([POLICY])
                    agent.client.add_endpoint(name="nas-ns", interface=nas.host_if, ips=nas.ips)
                    agent.client.add_endpoint(name="other-ns", interface=other.host_if, ips=other.ips)
                    agent.client.add_endpoint(name="erp-vm", interface=tap, ips=["10.213.31.9"])
                    yield agent, names, services, {"nas": nas, "backup": backup, "other": other}
            finally:
                run("ip", "link", "del", tap, check=False)
    finally:
        podman("rmi", DB_IMAGE, check=False)


def ep(agent, name):
    return next((e for e in agent.client.endpoints() if e["name"] == name), None)


def fetch(container, ip) -> bool:
    r = podman("exec", container, "sh", "-c", GET.format(ip=ip), check=False, timeout=20)
    return r.returncode == 0 and r.stdout.rstrip().endswith("ok")


def test_containers_without_labels_get_identities_by_name_and_image(env, run_container):
    agent, names, _, _ = env
    db = run_container(names["svcdb"], cmd=HTTPD, image=DB_IMAGE)
    run_container(names["svcweb"])
    run_container(names["svcplain"])
    assert eventually(lambda: (ep(agent, names["svcdb"]) or {}).get("service") == "db")
    assert eventually(lambda: (ep(agent, names["svcweb"]) or {}).get("service") == "web")
    labels = ep(agent, names["svcdb"])["labels"]
    assert labels["service:service"] == "db" and labels["service:tier"] == "data"
    assert eventually(lambda: fetch(names["svcweb"], db.ip))
    assert not fetch(names["svcplain"], db.ip)
    members = {s["name"]: s["members"] for s in agent.client.services()["services"]}
    assert members["db"] == [names["svcdb"]] and members["web"] == [names["svcweb"]]

    # A definition change moves the running web container from allowed to denied.
    changed = dict(env[2], web={"members": [{"container_name": "nothing-*"}]})
    r = agent.client.put_services(changed, dry_run=True)
    assert [c["endpoint"] for c in r["relabeled"]] == [names["svcweb"]]
    assert (ep(agent, names["svcweb"]) or {}).get("service") == "web"      # dry run
    agent.client.put_services(changed)
    try:
        assert eventually(lambda: not fetch(names["svcweb"], db.ip))
        assert ep(agent, names["svcweb"])["service"] is None
    finally:
        agent.client.put_services(env[2])
    assert eventually(lambda: fetch(names["svcweb"], db.ip))


def test_namespace_and_tap_by_name(env):
    agent, _, _, _ = env
    assert ep(agent, "nas-ns")["service"] == "nas"
    assert ep(agent, "erp-vm")["service"] == "vm"
    assert ep(agent, "other-ns")["service"] is None


def test_cidr_service_in_policy(env):
    agent, _, _, w = env
    # nas may reach the backup appliance (a CIDR service) but nothing else
    assert tcp_ok(w["nas"], w["backup"], w["backup"].ip4, 873)
    assert tcp_ok(w["nas"], w["backup"], w["backup"].ip4, 22)        # cidrGroupRef: all ports
    assert not tcp_ok(w["nas"], w["other"], w["other"].ip4, 873)
    ipc = {e["prefix"]: e for e in agent.client.ipcache()}
    assert "service:service=backup" in ipc["10.213.30.2/32"]["labels"]


def test_conflict_is_reported_and_resolved_by_name(env):
    agent, _, services, _ = env
    both = dict(services, aaa={"members": [{"endpoint": "nas-ns"}]})
    r = agent.client.put_services(both, dry_run=True)
    assert {"endpoint": "nas-ns", "services": ["aaa", "nas"], "chosen": "aaa"} in r["conflicts"]
    agent.client.put_services(both)
    try:
        assert ep(agent, "nas-ns")["service"] == "aaa"
        assert agent.client.services()["conflicts"][0]["endpoint"] == "nas-ns"
        r = agent.cli("service", "list", check=False)
        assert "conflict: endpoint nas-ns matches aaa, nas; it gets aaa" in r.stderr
    finally:
        agent.client.put_services(services)
    assert ep(agent, "nas-ns")["service"] == "nas"
