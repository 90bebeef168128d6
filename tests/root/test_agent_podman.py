"""Real Podman containers under the agent: discovery through Podman's API socket,
identities from container labels, enforcement from the first packet; labels that claim
another source or come from the image do not give an identity."""
import json
import signal
import time

import pytest

from agentproc import AgentProcess
from podman import (  # noqa: F401
    IMAGE_LABELS,
    bridge_name,
    labelled_image,
    podman,
    podman_image,
    podman_service,
    run_container,
    unique_name,
)
from stockade.discovery import DEFAULT_EVENTS_LOG
from traffic import eventually

pytestmark = pytest.mark.root

N = {n: unique_name(n) for n in ("skdb1", "skweb1", "skoth1", "skdb2", "skweb2", "skbad2", "skgone",
                                  "skvault", "skgw", "skfpay", "skimg", "skldb", "skpay",
                                  "skvault2", "skimg2")}
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
        assert eventually(lambda c=c: (endpoint(agent, c.name) or {}).get("state") == "ready"), c.name
    ep = endpoint(agent, N["skdb1"])
    assert ep["labels"]["container:app"] == "db" and ep["ips"] == [db.ip] and ep["source"] == "podman"
    assert eventually(lambda: fetch(N["skweb1"], db.ip))
    assert not fetch(N["skoth1"], db.ip)


def test_new_container_never_sends_before_its_policy(agent, run_container):
    db = run_container(N["skdb2"], labels={"app": "db"}, cmd=HTTPD)
    run_container(N["skweb2"], labels={"app": "web"})
    assert eventually(lambda: fetch(N["skweb2"], db.ip))
    # From its first instruction this container tries to reach db; its own policy
    # (quarantine) closes its egress. Any success is written to /tmp/leak.
    loop = (f"i=0; while [ $i -lt 200 ]; do {GET.format(ip=db.ip)} | grep -q ok "
            f"&& echo leak >> /tmp/leak; i=$((i+1)); done; sleep 3600")
    run_container(N["skbad2"], labels={"app": "bad"}, cmd=["sh", "-c", loop])
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


# vault takes 8080 from whoever is static:role=gateway, the payments service, or app=db.
VAULT = {"name": "vault.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: vault}
spec:
  endpointSelector: {matchLabels: {app: vault}}
  ingress:
  - fromEndpoints:
    - {matchLabels: {"static:role": gateway}}
    - {matchLabels: {"service:service": payments}}
    - {matchLabels: {app: db}}
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""}


def metric(agent, name, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for fam in text_string_to_metric_families(agent.client.metrics())
               for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def dropped(agent, name) -> dict[str, str]:
    """label -> cause of an endpoint's dropped labels."""
    return {d["label"]: d["cause"] for d in (endpoint(agent, name) or {}).get("dropped_labels", [])}


def ready(agent, *containers):
    for c in containers:
        assert eventually(lambda c=c: (endpoint(agent, c.name) or {}).get("state") == "ready"), c.name


def test_forged_label_sources_do_not_get_the_identity(agent, run_container, labelled_image):
    """Containers claiming static:role=gateway, service:service=payments, or an app=db
    their image sets are denied what the policy grants those labels; a container with its
    own app=db and a real member of the payments service are allowed."""
    before = {c: metric(agent, "stockade_labels_dropped_total", source="podman", cause=c)
              for c in ("other-source", "image")}
    agent.client.put_policies([VAULT])
    agent.client.put_services({"payments": {"members": [{"container_name": N["skpay"]}]}})
    try:
        vault = run_container(N["skvault"], labels={"app": "vault"}, cmd=HTTPD)
        gw = run_container(N["skgw"], labels={"static:role": "gateway"})
        fpay = run_container(N["skfpay"], labels={"service:service": "payments"})
        img = run_container(N["skimg"], image=labelled_image)
        ldb = run_container(N["skldb"], labels={"app": "db"})
        pay = run_container(N["skpay"])
        ready(agent, vault, gw, fpay, img, ldb, pay)
        assert eventually(lambda: fetch(ldb.name, vault.ip)), "own app=db label"
        assert eventually(lambda: fetch(pay.name, vault.ip)), "payments service member"
        for forger in (gw, fpay, img):
            assert not fetch(forger.name, vault.ip), forger.name

        assert dropped(agent, gw.name) == {"static:role=gateway": "other-source"}
        assert dropped(agent, fpay.name) == {"service:service=payments": "other-source"}
        assert endpoint(agent, fpay.name)["service"] is None
        assert endpoint(agent, pay.name)["labels"]["service:service"] == "payments"
        img_ep = endpoint(agent, img.name)
        assert {f"{k}={v}" for k, v in IMAGE_LABELS.items()} <= set(dropped(agent, img.name))
        assert set(dropped(agent, img.name).values()) == {"image"}  # io.buildah.version too
        assert not any(k in img_ep["labels"] for k in ("container:app", "container:tier"))
        assert "static:role" not in endpoint(agent, gw.name)["labels"]
        ident = {i["id"]: i for i in agent.client.identities()}[endpoint(agent, gw.name)["identity"]]
        assert not any(l.startswith(("static:", "service:")) for l in ident["labels"])

        eps = {e["name"]: e for e in json.loads(agent.cli("endpoint", "list", "-o", "json").stdout)}
        assert eps[gw.name]["dropped_labels"] == [{
            "label": "static:role=gateway", "cause": "other-source",
            "reason": "source static is not container: labels of containers have source container"}]
        table = agent.cli("endpoint", "list").stdout.splitlines()
        col = table[0].index("DROPPED")
        assert next(l for l in table if l.startswith(gw.name))[col:].split()[0] == "1"
        assert metric(agent, "stockade_labels_dropped_total", source="podman",
                      cause="other-source") >= before["other-source"] + 2
        assert metric(agent, "stockade_labels_dropped_total", source="podman",
                      cause="image") >= before["image"] + len(IMAGE_LABELS)
        assert "static:role=gateway" in agent.log()
    finally:
        agent.client.put_services({})
        agent.client.delete_policy("vault")


def restart(agent, **settings) -> None:
    """Stop the agent as an upgrade would (the datapath stays), start it with ``settings``."""
    agent.kill(signal.SIGTERM)
    agent.settings.update(settings)
    agent.start()


def test_dropped_labels_survive_restart_and_trust_image_labels_restores_them(
        agent, run_container, labelled_image):
    socket = agent.settings["podman_socket"]
    agent.client.put_policies([VAULT])
    try:
        vault = run_container(N["skvault2"], labels={"app": "vault"}, cmd=HTTPD)
        img = run_container(N["skimg2"], image=labelled_image)
        ready(agent, vault, img)
        assert dropped(agent, img.name).get("app=db") == "image"
        assert not fetch(img.name, vault.ip)

        # No runtime source: what the agent knows of the container is its endpoints.json.
        restart(agent, podman_socket=None)
        assert dropped(agent, img.name).get("app=db") == "image"
        assert endpoint(agent, img.name)["state"] == "ready"

        restart(agent, podman_socket=socket, trust_image_labels=True)
        assert eventually(lambda: endpoint(agent, img.name)["labels"].get("container:app") == "db")
        assert dropped(agent, img.name) == {}
        assert eventually(lambda: fetch(img.name, vault.ip)), "trusted image label app=db"
    finally:
        agent.client.delete_policy("vault")
        agent.settings.pop("trust_image_labels", None)
        restart(agent, podman_socket=socket)


def test_docker_api_path_is_the_same_code(podman_service, run_container, labelled_image):
    """No Docker engine runs here: point the agent's Docker source at Podman's
    Docker-compatible socket; containers arrive with source "docker", their labels get
    source container, and the image's labels are read through the same API."""
    with AgentProcess(podman_socket=None, docker_socket=podman_service.socket_path,
                      managed_bridges=[bridge_name()]) as a:
        name = unique_name("skdock")
        run_container(name, labels={"app": "dock"})
        forger = run_container(unique_name("skdockf"), image=labelled_image,
                               labels={"static:role": "gateway", "reserved:host": ""})
        assert eventually(lambda: (endpoint(a, name) or {}).get("state") == "ready")
        ep = endpoint(a, name)
        assert ep["source"] == "docker" and ep["labels"]["container:app"] == "dock"
        assert ep["dropped_labels"] == []
        assert eventually(lambda: (endpoint(a, forger.name) or {}).get("state") == "ready")
        got = dropped(a, forger.name)
        assert got["static:role=gateway"] == "other-source" and got["reserved:host"] == "reserved"
        assert got["app=db"] == "image" and got["tier=from-image"] == "image"
        labels = endpoint(a, forger.name)["labels"]
        assert set(labels) == {"container:stockade.test.session"}, labels
        for cause, least in (("other-source", 1), ("reserved", 1), ("image", 2)):
            assert metric(a, "stockade_labels_dropped_total", source="docker", cause=cause) >= least
