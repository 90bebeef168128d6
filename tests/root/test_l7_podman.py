"""HTTP rules for Podman containers: a container is the server of an L7 port, another
the client, across Podman's own bridge (a private Podman, tests/podman.py), through the
host's proxy; the agent discovers both through Podman's API."""
import json
import os
import socket
import textwrap

import pytest

from agentproc import AgentProcess
from podman import PrivatePodman, podman_available
from traffic import eventually

pytestmark = pytest.mark.root

PORT = 8080
TAG = os.getpid() % 1000
# the server: busybox httpd with one file, /public (any other path is its 404)
HTTPD = ["sh", "-c", "mkdir -p /www && echo ok > /www/public && exec httpd -f -p 8080 -h /www"]
POLICY = {"name": "api.yaml", "text": textwrap.dedent("""\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: api}
    spec:
      endpointSelector: {matchLabels: {app: api}}
      ingress:
        - fromEndpoints: [{matchLabels: {app: web}}]
          toPorts:
            - ports: [{port: "8080", protocol: TCP}]
              rules: {http: [{method: GET, path: "/public"}]}
        - fromEntities: [host]
          toPorts:
            - ports: [{port: "8080", protocol: TCP}]
              rules: {http: [{method: GET, path: "/public"}]}
    """)}


def l7_settings() -> dict:
    """Other numbers than test_l7_http.py's: the two agents never share steering."""
    return {"l7_run_dir": f"/run/stockade-l7-test-{os.getpid()}-podman",
            "l7_proxy_port": 16100 + TAG, "l7_nft_table": f"stockade_l7_p{os.getpid()}",
            "l7_route_table": 24000 + TAG, "l7_rule_priority": 24000 + TAG,
            "l7_mark": 0x5C000000 + (TAG << 16)}


def get(pp: PrivatePodman, cid: str, ip: str, path: str) -> str:
    """One HTTP/1.0 request from inside container ``cid`` (busybox nc); the raw answer."""
    cmd = f"printf 'GET {path} HTTP/1.0\\r\\nHost: api\\r\\n\\r\\n' | nc -w 3 {ip} {PORT}"
    return pp.podman("exec", cid, "sh", "-c", cmd, check=False, timeout=20).stdout


def host_get(ip: str, path: str) -> bytes:
    """The same request from the host itself."""
    with socket.create_connection((ip, PORT), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: api\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_container_server_behind_the_proxy_on_podmans_bridge():
    if not podman_available():
        pytest.fail("needs root, podman and /bin/busybox (busybox-static): make setup")
    with PrivatePodman(subnet="10.213.19.0/24") as pp, \
            AgentProcess(podman_socket=pp.socket, managed_bridges=[pp.bridge],
                         **l7_settings()) as agent:
        agent.client.put_policies([POLICY], replace_all=True)
        names = {"srv": f"skl7s{os.getpid()}", "cli": f"skl7c{os.getpid()}"}
        pp.run(names["srv"], {"app": "api"}, cmd=HTTPD)
        cli = pp.run(names["cli"], {"app": "web"})

        def ready():
            eps = {e["name"]: e for e in agent.client.endpoints()}
            return all((eps.get(n) or {}).get("state") == "ready" for n in names.values()) and eps
        eps = eventually(ready, timeout=30)
        assert eps, agent.client.endpoints()
        srv_ip = eps[names["srv"]]["ips"][0]

        def proxy_up():
            l7 = agent.client.health().get("l7_proxy") or {}
            return l7.get("running") and l7.get("l7_ports")
        assert eventually(proxy_up, timeout=15), agent.client.health()

        def allowed():
            answer = get(pp, cli, srv_ip, "/public")
            return answer if " 200 " in answer else None
        answer = eventually(allowed, timeout=10)
        assert answer and answer.rstrip().endswith("ok"), get(pp, cli, srv_ip, "/public")
        denied = get(pp, cli, srv_ip, "/private")
        # the proxy's 403 (busybox httpd would answer 404: it has no /private)
        assert " 403 " in denied.splitlines()[0] and denied.splitlines()[-1] == "Access denied", denied

        # host -> container, through the proxy too
        assert host_get(srv_ip, "/public").split(b"\r\n")[0].endswith(b" 200 OK")
        assert host_get(srv_ip, "/private").endswith(b"\r\n\r\nAccess denied\r\n")

        # the proxy answered the containers (flows of its request log), with their identities
        def flows():
            out = agent.cli("observe", "--type", "l7", "--since", "5m", "-o", "json").stdout
            got = [json.loads(x) for x in out.splitlines() if x.strip()]
            got = [f for f in got if f["l7"]["type"] == "REQUEST"]
            return got if len(got) >= 4 else None
        got = eventually(flows, timeout=10)
        assert got, agent.cli("observe", "--type", "l7", "--since", "5m").stdout
        from_host = [f for f in got if f["source"]["identity"] == 1]     # reserved: host
        assert sorted(f["verdict"] for f in from_host) == ["DROPPED", "FORWARDED"], from_host
        req = {f["l7"]["http"]["url"]: f for f in got if f not in from_host}
        assert req["http://api/public"]["verdict"] == "FORWARDED"
        assert req["http://api/private"]["verdict"] == "DROPPED"
        for f in req.values():
            assert f["source"]["endpoint"]["name"] == names["cli"]
            assert f["destination"]["endpoint"]["name"] == names["srv"]
            assert f["source"]["identity"] == eps[names["cli"]]["identity"]
        assert agent.client.health()["status"] == "ok", agent.client.health()
