"""HTTP rules for a VM: a real QEMU (TCG) guest (tests/vm.py) on a bridge of this test,
bound to its endpoint by MAC, next to namespace workloads (web: a, other: c) and the
host (.254 on the bridge). One boot for the module.

The VM as the server: busybox httpd in the guest with one file (/public) and a CGI
(/cgi-bin/whoami) that prints the address it was called from; the guest's tap is where
the steering meets its replies. The VM as the client: busybox nc in the guest against a
recording server in b.
"""
import json
import os

import pytest

from agentproc import AgentProcess
from l7env import (
    PORT,
    Client,
    Server,
    add_endpoints,
    cnp,
    l7_settings,
    recorder,
    route_via_host,
    serving,
    tcp_frames,
    wait_proxy,
)
from netns import Topology, in_netns, link_mac
from traffic import Capture, eventually
from vm import QemuVM, host_mac, qemu_available

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not qemu_available(), reason="needs root, qemu-system-x86_64")]

NET4 = "10.213.21."
HOST4 = f"{NET4}254"
VM_IP, VM_MAC = f"{NET4}20", "52:54:00:5e:21:20"
TAG = os.getpid() % 10000
# busybox httpd: /public is a file, /cgi-bin/whoami prints REMOTE_ADDR; any other path 404
GUEST_HTTPD = ("mkdir -p /www/cgi-bin && echo ok > /www/public && "
               "printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho $REMOTE_ADDR\\n' "
               "> /www/cgi-bin/whoami && chmod +x /www/cgi-bin/whoami && httpd -p 8080 -h /www")
VM_L7 = cnp("vm", """
endpointSelector: {matchLabels: {app: vm}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules: {http: [{method: GET, path: "/public"}, {method: GET, path: "/cgi-bin/whoami"}]}
  - fromEntities: [host]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules: {http: [{method: GET, path: "/cgi-bin/whoami"}]}
""")
API_FROM_VM = cnp("api", """
endpointSelector: {matchLabels: {app: api}}
ingress:
  - fromEndpoints: [{matchLabels: {app: vm}}]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules: {http: [{method: GET, path: "/public(/.*)?"}]}
""")
VM_EGRESS = cnp("vm", """
endpointSelector: {matchLabels: {app: vm}}
egress:
  - toEndpoints: [{matchLabels: {app: api}}]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules: {http: [{method: GET, path: "/public(/.*)?"}, {method: PUT, path: "/submit"}]}
""")
SEEN = recorder()


@pytest.fixture(scope="module")
def env():
    with Topology("l7v") as topo:
        w = {t: topo.add_workload(t, [f"{NET4}{i}/24"]) for i, t in enumerate("abc", start=1)}
        route_via_host(topo, f"{HOST4}/24", w.values())
        server = serving(in_netns(w["b"].ns, Server, (w["b"].ip4, PORT), SEEN))
        vm = QemuVM(f"skl7vm{TAG}", tap=f"skl7v{TAG}t", mac=VM_MAC, ip=f"{VM_IP}/24",
                    bridge=topo.bridge, tap_mac=host_mac(VM_MAC))
        with server:
            try:
                proc = AgentProcess(managed_bridges=[topo.bridge], **l7_settings("vm"))
                proc.settings["flow_log_path"] = str(proc.run_dir / "flows.log")
                with proc as agent:
                    add_endpoints(agent, w)
                    agent.client.add_endpoint(name="vm", mac=VM_MAC, ips=[VM_IP], labels={"app": "vm"})
                    vm.start()
                    vm.sh(GUEST_HTTPD)
                    assert eventually(lambda: next(e for e in agent.client.endpoints()
                                                   if e["name"] == "vm")["state"] == "ready")
                    yield agent, w, topo, vm
            finally:
                vm.close()


@pytest.fixture
def e(env):
    SEEN.seen.clear()
    yield env
    env[0].client.delete_all_policies()


def get(w, path: str, host: str = "api"):
    """One request on a connection of its own (busybox httpd closes after each answer)."""
    c = Client(w, VM_IP, timeout=10)
    try:
        status, headers, body = c.request("GET", path, host=host)
        if "content-length" not in headers:       # a CGI's answer: the body ends at close
            body = c.buf
            while chunk := c.sock.recv(65536):
                body += chunk
        return status, headers, body
    finally:
        c.close()


def caller(body: bytes) -> str:
    """The whoami CGI's REMOTE_ADDR (busybox httpd listens on IPv6: v4-mapped, bracketed)."""
    return body.decode().strip().removeprefix("[::ffff:").removesuffix("]")


def answer(w, path: str):
    """``get``, or None while the guest's server is not up."""
    try:
        return get(w, path)
    except OSError:
        return None


def l7_requests(agent, *args) -> list[dict]:
    out = agent.cli("observe", "--type", "l7", "--since", "5m", "-o", "json", *args).stdout
    return [f for f in map(json.loads, filter(str.strip, out.splitlines()))
            if f["l7"]["type"] == "REQUEST"]


def test_vm_server_behind_the_proxy(e):
    agent, w, _, _ = e
    agent.client.put_policies([VM_L7], replace_all=True)
    wait_proxy(agent)
    a = w["a"]
    status, _, body = eventually(lambda: answer(a, "/public"), timeout=10) or get(a, "/public")
    assert (status, body) == (200, b"ok\n")
    status, _, body = get(a, "/cgi-bin/whoami")
    assert (status, caller(body)) == (200, a.ip4)      # the guest saw a's address
    status, _, body = get(a, "/index.html")        # a file the guest has: the proxy's 403
    assert (status, body) == (403, b"Access denied\r\n")

    # host -> VM: the host's own connection loops through the proxy too
    status, _, body = get(None, "/cgi-bin/whoami")
    assert (status, caller(body)) == (200, HOST4)
    assert get(None, "/public")[0] == 403

    # the other workload has no rule on 8080: dropped at its own hook, never answered
    with pytest.raises(OSError):
        Client(w["c"], VM_IP, timeout=1.0).request("GET", "/public")

    def flows():
        got = [f for f in l7_requests(agent) if (f["destination"].get("endpoint") or {}).get("name") == "vm"]
        return got if len(got) >= 5 else None
    got = eventually(flows, timeout=10)
    assert got, l7_requests(agent)
    vm_ep = next(x for x in agent.client.endpoints() if x["name"] == "vm")
    from_a = [f for f in got if f["ip"]["source"] == a.ip4]
    assert {(f["l7"]["http"]["url"], f["verdict"]) for f in from_a} == {
        ("http://api/public", "FORWARDED"), ("http://api/cgi-bin/whoami", "FORWARDED"),
        ("http://api/index.html", "DROPPED")}
    for f in from_a:
        assert f["destination"]["identity"] == vm_ep["identity"] and f["policy"] == ["vm"]
        assert f["source"]["endpoint"]["name"] == "a" and f["ip"]["destination"] == VM_IP
    from_host = [f for f in got if f["source"]["identity"] == 1]
    assert sorted(f["verdict"] for f in from_host) == ["DROPPED", "FORWARDED"]
    assert agent.client.health()["status"] == "ok", agent.client.health()


def test_vm_replies_reach_the_client_only_through_the_proxy(e):
    """As test_l7_http.py's test of the same name: every frame of the proxied
    connection arriving at the client carries the bridge's MAC (the host's stack sent
    it), none the guest's."""
    agent, w, topo, _ = e
    agent.client.put_policies([VM_L7], replace_all=True)
    wait_proxy(agent)
    a = w["a"]
    bridge_mac = link_mac(topo.bridge)
    with Capture(a) as at_a:
        c = Client(a, VM_IP, timeout=10)
        port = c.sock.getsockname()[1]
        try:
            assert c.request("GET", "/public")[0] == 200
        finally:
            c.close()

        def conn():
            got = [t for t in tcp_frames(at_a)
                   if t["src"] == (VM_IP, PORT) and t["dst"] == (a.ip4, port)]
            return got if any(t["flags"] & 0x01 for t in got) else None
        frames = eventually(conn, timeout=5)
    assert frames and b" 200 " in b"".join(t["payload"] for t in frames)
    assert {t["src_mac"] for t in frames} == {bridge_mac}, frames
    assert not [t for t in tcp_frames(at_a) if t["src_mac"] == VM_MAC]


def vm_request(vm, ip: str, method: str, path: str, body: str = "") -> str:
    """One HTTP/1.0 request from the guest (busybox nc), its answer with LF line ends."""
    req = f"{method} {path} HTTP/1.0\\r\\nHost: api\\r\\nContent-Length: {len(body)}\\r\\n\\r\\n{body}"
    out, _ = vm.run(f"printf '{req}' | nc -w 3 {ip} {PORT}", timeout=20)
    return out.replace("\r\n", "\n").lstrip("\n")


def test_vm_client_is_filtered(e):
    agent, w, _, vm = e
    agent.client.put_policies([API_FROM_VM], replace_all=True)
    wait_proxy(agent)
    b = w["b"]

    def vm_get(path):
        return vm_request(vm, b.ip4, "GET", path)
    assert eventually(lambda: " 200 " in vm_get("/public/vm"), timeout=10)
    denied = vm_get("/private")
    assert " 403 " in denied.splitlines()[0] and denied.endswith("\n\nAccess denied\n"), denied
    assert {(r["path"], r["client"]) for r in SEEN.seen} == {("/public/vm", VM_IP)}

    def flows():
        got = [f for f in l7_requests(agent) if (f["source"].get("endpoint") or {}).get("name") == "vm"]
        return got if len(got) >= 2 else None
    got = eventually(flows, timeout=10)
    assert got and {(f["l7"]["http"]["url"], f["verdict"]) for f in got} >= {
        ("http://api/public/vm", "FORWARDED"), ("http://api/private", "DROPPED")}


def test_vm_client_egress_rules(e):
    """The VM's own egress HTTP rules, the server (b) with no policy: the guest's requests
    pass the proxy at its tap, judged by the VM's rules; the server sees the VM's address."""
    agent, w, _, vm = e
    agent.client.put_policies([VM_EGRESS], replace_all=True)
    wait_proxy(agent)
    b = w["b"]
    assert eventually(lambda: " 200 " in vm_request(vm, b.ip4, "GET", "/public/eg"), timeout=10)
    for method, path, body in [("GET", "/private", ""), ("POST", "/public/eg", "x=1"),
                               ("POST", "/submit", "x=1")]:
        denied = vm_request(vm, b.ip4, method, path, body)
        assert " 403 " in denied.splitlines()[0] and denied.endswith("\n\nAccess denied\n"), \
            (method, path, denied)
    assert " 200 " in vm_request(vm, b.ip4, "PUT", "/submit", "x=1").splitlines()[0]
    assert {(r["method"], r["path"], r["client"]) for r in SEEN.seen} == {
        ("GET", "/public/eg", VM_IP), ("PUT", "/submit", VM_IP)}
    # c is no egress peer of the VM at all: dropped at the tap, never proxied nor answered
    out = vm_request(vm, w["c"].ip4, "GET", "/public")
    assert "HTTP/" not in out, out

    def flows():
        got = [f for f in l7_requests(agent) if (f["source"].get("endpoint") or {}).get("name") == "vm"
               and f["direction"] == "egress"]
        return got if len(got) >= 5 else None
    got = eventually(flows, timeout=10)
    assert got, l7_requests(agent)
    assert {(f["l7"]["http"]["method"], f["l7"]["http"]["url"], f["verdict"]) for f in got} == {
        ("GET", "http://api/public/eg", "FORWARDED"), ("GET", "http://api/private", "DROPPED"),
        ("POST", "http://api/public/eg", "DROPPED"), ("POST", "http://api/submit", "DROPPED"),
        ("PUT", "http://api/submit", "FORWARDED")}
    for f in got:
        assert f["policy"] == ["vm"] and f["ip"] == {"source": VM_IP, "destination": b.ip4}
        assert "static:app=api" in f["destination"]["labels"]
