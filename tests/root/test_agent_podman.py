"""Real Podman containers under the agent: discovery through Podman's API socket,
identities from container labels, enforcement from the first packet."""
import time

import pytest

from agentproc import AgentProcess
from podman import bridge_name, podman, podman_image, podman_service, run_container, unique_name  # noqa: F401
from stockade.discovery import DEFAULT_EVENTS_LOG
from traffic import eventually

pytestmark = pytest.mark.root

N = {n: unique_name(n) for n in ("skdb1", "skweb1", "skoth1", "skdb2", "skweb2", "skbad2", "skgone")}
HTTPD = ["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www"]

POLICY = {"name": "shop.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: "8080", protocol: TCP}]}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: quarantine}
spec:
  endpointSelector: {matchLabels: {app: bad}}
  egress: [{}]
"""}


@pytest.fixture(scope="module")
def agent(podman_service):
    with AgentProcess(podman_socket=podman_service.socket_path,
                      podman_events_log=DEFAULT_EVENTS_LOG,
                      managed_bridges=[bridge_name()]) as a:
        a.client.put_policies([POLICY])
        yield a


# busybox-static's wget crashes (static glibc resolver); nc speaks HTTP/1.0 fine.
GET = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 8080"


def fetch(container, ip) -> bool:
    r = podman("exec", container, "sh", "-c", GET.format(ip=ip), check=False, timeout=20)
    return r.returncode == 0 and r.stdout.rstrip().endswith("ok")


def endpoint(agent, name):
    return next((e for e in agent.client.endpoints() if e["name"] == name), None)


def test_containers_get_identities_from_labels(agent, run_container):
    db = run_container(N["skdb1"], labels={"app": "db"}, cmd=HTTPD)
    web = run_container(N["skweb1"], labels={"app": "web"})
    other = run_container(N["skoth1"], labels={"app": "other"})
    for c in (db, web, other):
        assert eventually(lambda: (endpoint(agent, c.name) or {}).get("state") == "ready"), c.name
    ep = endpoint(agent, N["skdb1"])
    assert ep["labels"]["container:app"] == "db" and ep["ips"] == [db.ip] and ep["source"] == "podman"
    assert eventually(lambda: fetch(N["skweb1"], db.ip))
    assert not fetch(N["skoth1"], db.ip)


def test_new_container_never_sends_before_its_policy(agent, run_container):
    db = run_container(N["skdb2"], labels={"app": "db"}, cmd=HTTPD)
    web = run_container(N["skweb2"], labels={"app": "web"})
    assert eventually(lambda: fetch(N["skweb2"], db.ip))
    # From its first instruction this container tries to reach db; its own policy
    # (quarantine) closes its egress. Any success is written to /tmp/leak.
    loop = (f"i=0; while [ $i -lt 200 ]; do {GET.format(ip=db.ip)} | grep -q ok "
            f"&& echo leak >> /tmp/leak; i=$((i+1)); done; sleep 3600")
    bad = run_container(N["skbad2"], labels={"app": "bad"}, cmd=["sh", "-c", loop])
    assert eventually(lambda: (endpoint(agent, N["skbad2"]) or {}).get("state") == "ready")
    time.sleep(2)
    leak = podman("exec", N["skbad2"], "cat", "/tmp/leak", check=False)
    assert leak.stdout.strip() == "", "a packet from the new container got through"


def test_container_stop_removes_endpoint(agent, run_container):
    c = run_container(N["skgone"], labels={"app": "gone"})
    assert eventually(lambda: endpoint(agent, N["skgone"]) is not None)
    ident = endpoint(agent, N["skgone"])["identity"]
    podman("stop", "-t", "0", c.id)
    assert eventually(lambda: endpoint(agent, N["skgone"]) is None)
    assert all(i["id"] != ident for i in agent.client.identities())


def test_docker_api_path_is_the_same_code(podman_service, run_container):
    """No Docker engine runs here: point the agent's Docker source at Podman's
    Docker-compatible socket; containers arrive with source "docker"."""
    with AgentProcess(podman_socket=None, docker_socket=podman_service.socket_path,
                      managed_bridges=[bridge_name()]) as a:
        name = unique_name("skdock")
        run_container(name, labels={"app": "dock"})
        assert eventually(lambda: (endpoint(a, name) or {}).get("state") == "ready")
        ep = endpoint(a, name)
        assert ep["source"] == "docker" and ep["labels"]["container:app"] == "dock"
