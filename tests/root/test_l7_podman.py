"""HTTP rules for Podman containers, across Podman's own bridge (a private Podman,
tests/podman.py), through the host's proxy; the agent discovers the containers through
Podman's API. A container is the server of an L7 port (ingress rules), or the client
whose egress rules are HTTP ones (the server then has no policy of its own)."""
import base64
import json
import os
import re
import socket
import textwrap

import pytest

from agentproc import AgentProcess
from l7env import l7_settings
from podman import PrivatePodman, podman_available
from traffic import eventually

pytestmark = pytest.mark.root

PORT = 8080
# the server: busybox httpd with one file, /public (any other path is its 404); -vv
# logs each request to its stderr (podman logs): "IP:PORT: url:/path", "...: response:N"
HTTPD = ["sh", "-c", "mkdir -p /www && echo ok > /www/public && exec httpd -f -vv -p 8080 -h /www"]
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
# the client's egress: HTTP rules to app=api; the server (app=api) has no policy
WEB_EGRESS = {"name": "web.yaml", "text": textwrap.dedent("""\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: web}
    spec:
      endpointSelector: {matchLabels: {app: web}}
      egress:
        - toEndpoints: [{matchLabels: {app: api}}]
          toPorts:
            - ports: [{port: "8080", protocol: TCP}]
              rules: {http: [{method: GET, path: "/public"}]}
    """)}


def request(pp: PrivatePodman, cid: str, ip: str, path: str, method: str = "GET") -> bytes:
    """One HTTP/1.0 request from inside container ``cid`` (busybox nc); the raw answer,
    byte for byte (base64 across podman exec, whose output is read as text)."""
    head = f"{method} {path} HTTP/1.0\\r\\nHost: api\\r\\n"
    if method == "POST":
        head += "Content-Length: 0\\r\\n"
    cmd = f"printf '{head}\\r\\n' | nc -w 3 {ip} {PORT} | base64"
    out = pp.podman("exec", cid, "sh", "-c", cmd, check=False, timeout=20).stdout
    return base64.b64decode(out)


def get(pp: PrivatePodman, cid: str, ip: str, path: str) -> bytes:
    return request(pp, cid, ip, path)


def status(answer: bytes) -> bytes:
    """The status line's code (b"" when there was no answer)."""
    parts = answer.split(None, 2)
    return parts[1] if len(parts) > 1 and parts[0].startswith(b"HTTP/") else b""


def host_get(ip: str, path: str) -> bytes:
    """The same request from the host itself."""
    with socket.create_connection((ip, PORT), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: api\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def server_log(pp: PrivatePodman, cid: str) -> list[tuple[str, str]]:
    """What busybox httpd in ``cid`` logged, in order: (client IPv4 address, "url:PATH"
    or "response:CODE"); it writes "[::ffff:10.0.0.3]:40000: url:/public"."""
    proc = pp.podman("logs", cid, check=False, timeout=20)
    line = r"^\[?(?:::ffff:)?([\d.]+)\]?:\d+: ((?:url|response):\S*)$"
    return [(m[1], m[2]) for m in re.finditer(line, proc.stdout + proc.stderr, re.M)]


def l7_requests(agent) -> list[dict]:
    out = agent.cli("observe", "--type", "l7", "--since", "5m", "-o", "json").stdout
    got = [json.loads(x) for x in out.splitlines() if x.strip()]
    return [f for f in got if f["l7"]["type"] == "REQUEST"]


@pytest.fixture(scope="module")
def env():
    """One private Podman and one agent for the module: server app=api (busybox httpd),
    client app=web; removed on exit (PrivatePodman: containers by ID, service by PID)."""
    if not podman_available():
        pytest.fail("needs root, podman and /bin/busybox (busybox-static): make setup")
    with PrivatePodman(subnet="10.213.19.0/24") as pp, \
            AgentProcess(podman_socket=pp.socket, managed_bridges=[pp.bridge],
                         **l7_settings("podman", steering=2)) as agent:
        names = {"srv": f"skl7s{os.getpid()}", "cli": f"skl7c{os.getpid()}"}
        ids = {"srv": pp.run(names["srv"], {"app": "api"}, cmd=HTTPD),
               "cli": pp.run(names["cli"], {"app": "web"})}

        def ready():
            eps = {e["name"]: e for e in agent.client.endpoints()}
            return all((eps.get(n) or {}).get("state") == "ready" for n in names.values()) and eps
        eps = eventually(ready, timeout=30)
        assert eps, agent.client.endpoints()
        yield {"pp": pp, "agent": agent, "names": names, "ids": ids,
               "eps": {k: eps[n] for k, n in names.items()}}


@pytest.fixture
def e(env):
    yield env
    env["agent"].client.delete_all_policies()


def wait_proxy(agent) -> None:
    def proxy_up():
        l7 = agent.client.health().get("l7_proxy") or {}
        return l7.get("running") and l7.get("l7_ports")
    assert eventually(proxy_up, timeout=15), agent.client.health()


def test_container_server_behind_the_proxy_on_podmans_bridge(e):
    pp, agent, names, eps = e["pp"], e["agent"], e["names"], e["eps"]
    cli = e["ids"]["cli"]
    agent.client.put_policies([POLICY], replace_all=True)
    srv_ip = eps["srv"]["ips"][0]
    wait_proxy(agent)

    def steered():         # the proxy's 403, not busybox httpd's 404 (it has no /private)
        return status(get(pp, cli, srv_ip, "/private")) == b"403"
    assert eventually(steered, timeout=15), get(pp, cli, srv_ip, "/private")
    answer = get(pp, cli, srv_ip, "/public")
    assert status(answer) == b"200" and answer.endswith(b"\r\n\r\nok\n"), answer
    denied = get(pp, cli, srv_ip, "/private")
    assert status(denied) == b"403" and denied.endswith(b"\r\n\r\nAccess denied\r\n"), denied

    # host -> container, through the proxy too
    assert host_get(srv_ip, "/public").split(b"\r\n")[0].endswith(b" 200 OK")
    assert host_get(srv_ip, "/private").endswith(b"\r\n\r\nAccess denied\r\n")

    # the proxy answered the containers (flows of its request log), with their identities
    def flows():
        got = [f for f in l7_requests(agent) if f["direction"] == "ingress"]
        return got if len(got) >= 4 else None
    got = eventually(flows, timeout=10)
    assert got, agent.cli("observe", "--type", "l7", "--since", "5m").stdout
    from_host = [f for f in got if f["source"]["identity"] == 1]     # reserved: host
    assert {f["verdict"] for f in from_host} == {"DROPPED", "FORWARDED"}, from_host
    req = {f["l7"]["http"]["url"]: f for f in got if f not in from_host}
    assert req["http://api/public"]["verdict"] == "FORWARDED"
    assert req["http://api/private"]["verdict"] == "DROPPED"
    for f in req.values():
        assert f["source"]["endpoint"]["name"] == names["cli"]
        assert f["destination"]["endpoint"]["name"] == names["srv"]
        assert f["source"]["identity"] == eps["cli"]["identity"]
    assert agent.client.health()["status"] == "ok", agent.client.health()


def test_container_client_under_an_egress_http_rule(e):
    """The client container's egress rules decide (the server has no policy): its GET
    /public passes, the rest gets the proxy's 403 and never reaches the server."""
    pp, agent, names, eps = e["pp"], e["agent"], e["names"], e["eps"]
    cli, srv = e["ids"]["cli"], e["ids"]["srv"]
    cli_ip, srv_ip = eps["cli"]["ips"][0], eps["srv"]["ips"][0]
    agent.client.put_policies([WEB_EGRESS], replace_all=True)
    wait_proxy(agent)

    def steered():         # the proxy's 403, not busybox httpd's 404 (it has no /probe)
        return status(get(pp, cli, srv_ip, "/probe")) == b"403"
    assert eventually(steered, timeout=15), get(pp, cli, srv_ip, "/probe")
    before = len(server_log(pp, srv))

    answer = get(pp, cli, srv_ip, "/public")
    assert status(answer) == b"200" and answer.endswith(b"\r\n\r\nok\n"), answer
    denied = get(pp, cli, srv_ip, "/private")
    assert status(denied) == b"403" and denied.endswith(b"\r\n\r\nAccess denied\r\n"), denied
    posted = request(pp, cli, srv_ip, "/public", method="POST")
    # (busybox httpd would answer a POST of a file 501)
    assert status(posted) == b"403" and posted.endswith(b"\r\n\r\nAccess denied\r\n"), posted

    # last, the GET again: the server logs in order, so whatever reached it in between
    # would show between the two GETs
    assert status(get(pp, cli, srv_ip, "/public")) == b"200"

    # the server got the GETs only, from the client's own address (the proxy is transparent)
    def since_probes():    # (a probe that reached the server before the steering may be
        log = server_log(pp, srv)     # written to its log late: skip it and its response)
        probes = [i for i, (_, what) in enumerate(log) if what == "url:/probe"]
        return log[max([before] + [i + 2 for i in probes]):]

    def logged():
        got = since_probes()
        return got if len(got) >= 4 else None
    assert eventually(logged, timeout=10) == [(cli_ip, "url:/public"), (cli_ip, "response:200")] * 2, \
        since_probes()

    # the proxy's request log: the client container's egress, by its identity
    def flows():
        got = [f for f in l7_requests(agent) if f["direction"] == "egress"
               and f["l7"]["http"]["url"] in ("http://api/public", "http://api/private")]
        return got if len(got) >= 4 else None
    got = eventually(flows, timeout=10)
    assert got, agent.cli("observe", "--type", "l7", "--since", "5m").stdout
    verdicts = sorted((f["l7"]["http"]["method"], f["l7"]["http"]["url"], f["verdict"]) for f in got)
    assert verdicts == [("GET", "http://api/private", "DROPPED"),
                        ("GET", "http://api/public", "FORWARDED"),
                        ("GET", "http://api/public", "FORWARDED"),
                        ("POST", "http://api/public", "DROPPED")], verdicts
    for f in got:
        assert f["source"]["endpoint"]["name"] == names["cli"], f
        assert f["source"]["identity"] == eps["cli"]["identity"], f
        assert f["destination"]["endpoint"]["name"] == names["srv"], f
        assert f["policy"] == ["web"], f
        assert f["ip"] == {"source": cli_ip, "destination": srv_ip}, f
    assert agent.client.health()["status"] == "ok", agent.client.health()
