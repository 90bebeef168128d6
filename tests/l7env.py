"""Shared by the L7 tests and the L7 benchmark (bench/l7_bench.py): agent settings that
keep a test agent's proxy, steering and run directory apart from any other agent's,
policies written as CNP text, the routed set-up the proxy needs, and waiting for it;
an HTTP server that records what it receives, a hand-made HTTP/1.1 client, a TCP
frame parser for captures, and the check that a proxied connection's replies reach the
client only through the proxy."""
from __future__ import annotations

import os
import socket
import textwrap
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from traffic import Capture, eventually

TAG = os.getpid() % 1000


def l7_settings(run_dir_tag: str, steering: int = 0) -> dict:
    """A test agent's L7 settings: its proxy's run directory, and a set of steering
    numbers (proxy port, nft table, route table and rule priority, skb mark), apart from
    other test processes' and a demo agent's. Set 0 is shared by the L7 test modules
    whose agents run one at a time; an agent that runs beside another, or whose module
    wants steering of its own, takes another: 1 test_l7_http's proxy-less agent,
    2 test_l7_podman, 3 test_l7_ipv6, 4 test_l7_ipv6_off."""
    assert 0 <= steering <= 4, steering
    n = 1000 * steering + TAG
    return {"l7_run_dir": f"/run/stockade-l7-test-{os.getpid()}-{run_dir_tag}",
            "l7_proxy_port": 15100 + n, "l7_nft_table": f"stockade_l7_t{steering}_{os.getpid()}",
            "l7_route_table": 23000 + n, "l7_rule_priority": 23000 + n,
            "l7_mark": (0x5E - steering) << 24 | TAG << 16}


def cnp(name: str, spec: str) -> dict:
    return {"name": f"{name}.yaml", "text": (
        f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\n"
        f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")}


# api's port 8080 for web: GET /public only (HTTP rules), or every request (L4 only)
API_GET_PUBLIC = """
endpointSelector: {matchLabels: {app: api}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules:
          http:
            - {method: GET, path: "/public(/.*)?"}
"""
API_L4 = """
endpointSelector: {matchLabels: {app: api}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


def route_via_host(topo, host4: str, workloads) -> None:
    """The host gets ``host4`` (with its prefix length) on the topology's bridge and
    each workload a default route to it: the proxy on the host reaches the workloads,
    and they reach the host."""
    from netns import run
    run("ip", "addr", "add", host4, "dev", topo.bridge)
    for w in workloads:
        w.exec("ip", "route", "add", "default", "via", host4.split("/")[0])


def wait_proxy(agent, timeout: float = 15) -> None:
    """Until the agent's proxy runs and steers at least one port."""
    def up():
        l7 = agent.client.health().get("l7_proxy") or {}
        return l7.get("running") and l7.get("l7_ports")
    assert eventually(up, timeout=timeout), agent.client.health()


APPS = {"a": "web", "b": "api", "c": "other"}


def add_endpoints(agent, workloads: dict, apps: dict = APPS) -> None:
    """Each named workload an endpoint of the agent, labelled app=<its app>."""
    for name, app in apps.items():
        w = workloads[name]
        agent.client.add_endpoint(name=name, interface=w.host_if, ips=w.ips,
                                  labels={"app": app})


def apply(agent, *docs) -> None:
    """The agent's policies are exactly ``docs`` (cnp() documents)."""
    agent.client.put_policies(list(docs), replace_all=True)


@contextmanager
def serving(*servers):
    """The servers answer (a thread each) until the block ends, then are closed."""
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        yield servers
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


PORT = 8080


class Recorder(BaseHTTPRequestHandler):
    """A server's handler that records every request it receives, with the address it
    came from (``seen``: one list per class; ``recorder()`` makes a class of its own)."""
    protocol_version = "HTTP/1.1"
    seen: list = []

    def _any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        type(self).seen.append({"client": self.client_address[0], "method": self.command,
                                "path": self.path, "headers": dict(self.headers), "body": body})
        payload = b"ok " + self.path.encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _any

    def log_message(self, *args):
        pass


def recorder() -> type[Recorder]:
    return type("Recorder", (Recorder,), {"seen": []})


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that reset (smuggling, slowloris) are expected here


class Server6(Server):
    """A ``Server`` on an IPv6 address."""
    address_family = socket.AF_INET6


class Client:
    """One TCP connection from a workload (or the host), HTTP/1.1 by hand; IPv6 when
    ``addr`` is an IPv6 address."""

    def __init__(self, w, addr, port=PORT, timeout=5.0):
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.sock = w.socket(family) if w is not None else socket.socket(family)
        self.sock.settimeout(timeout)
        self.sock.connect((addr, port))
        self.buf = b""

    def send(self, raw: bytes):
        self.sock.sendall(raw)

    def request(self, method="GET", path="/public", headers=None, body=b"", host="api"):
        hdrs = {"Host": host, **(headers or {})}
        if body:
            hdrs["Content-Length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        self.send(head.encode() + b"\r\n" + body)
        return self.response()

    def response(self):
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; got {self.buf!r}")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in body")
            rest += chunk
        self.buf = rest[length:]
        return status, headers, rest[:length]

    def close(self):
        self.sock.close()


def tcp_frame(frame: bytes) -> dict | None:
    """A TCP frame's MACs, TTL (IPv6: hop limit), addresses, flags, sequence number and
    payload, IPv4 or IPv6 (without extension headers); None: anything else."""
    if len(frame) >= 74 and frame[12:14] == b"\x86\xdd" and frame[20] == socket.IPPROTO_TCP:
        ip = frame[14:]
        tcp = ip[40:]
        src, dst = (socket.inet_ntop(socket.AF_INET6, ip[i:i + 16]) for i in (8, 24))
        ttl, end = ip[7], 40 + int.from_bytes(ip[4:6], "big")
    elif len(frame) >= 54 and frame[12:14] == b"\x08\x00" and frame[23] == socket.IPPROTO_TCP:
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        tcp = ip[ihl:]
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        ttl, end = ip[8], int.from_bytes(ip[2:4], "big")
    else:
        return None
    return {"dst_mac": frame[0:6].hex(":"), "src_mac": frame[6:12].hex(":"), "ttl": ttl,
            "src": (src, int.from_bytes(tcp[0:2], "big")),
            "dst": (dst, int.from_bytes(tcp[2:4], "big")),
            "flags": tcp[13], "seq": int.from_bytes(tcp[4:8], "big"),
            "payload": tcp[(tcp[12] >> 4) * 4:end - (len(ip) - len(tcp))]}


def tcp_frames(cap: Capture) -> list[dict]:
    """The TCP frames a capture holds, parsed (tcp_frame)."""
    return [t for t in map(tcp_frame, list(cap.frames)) if t is not None]


def conversation(client, server, addr: str, paths) -> tuple[list[int], int, list[dict], list[dict]]:
    """One keep-alive connection from the client workload to ``addr``:PORT (the server
    workload's address, IPv4 or IPv6) with a GET per path, closed by the client, and
    waited for until the server's side closes it too;
    -> (statuses, client port, TCP frames arriving at the client, TCP frames the server sent)."""
    with Capture(client) as at_client, Capture(server, outgoing=True) as from_server:
        c = Client(client, addr)
        mine = c.sock.getsockname()[:2]
        try:
            statuses = [c.request("GET", p)[0] for p in paths]
        finally:
            c.close()

        def server_fin(f):
            t = tcp_frame(f)
            return t is not None and t["src"] == (addr, PORT) and t["dst"] == mine \
                and t["flags"] & 0x01
        assert at_client.wait(server_fin, timeout=5), "the connection was not closed from the server's side"
    return statuses, mine[1], tcp_frames(at_client), tcp_frames(from_server)


def check_replies_only_through_the_proxy(agent, bridge_mac: str, a, b, family: int,
                                         l7_doc: dict, l4_doc: dict) -> None:
    """Under ``l7_doc`` (GET /public allowed, /private denied on b's PORT), every TCP
    frame from b:PORT arriving at a on a's connection carries the bridge's MAC (the
    host's stack sent it, from the proxy), none carries b's own, although b did answer
    a's own address (b's outgoing frames, to a's MAC). Under ``l4_doc`` (the port not
    steered) the same pair's frames come bridged, with b's MAC: the criterion can fail.
    ``family``: 4 or 6, which of the workloads' addresses the connection uses."""
    a_ip, b_ip = (getattr(x, f"ip{family}") for x in (a, b))
    assert len({bridge_mac, a.mac, b.mac}) == 3
    apply(agent, l7_doc)
    wait_proxy(agent)
    statuses, port, at_a, from_b = conversation(a, b, b_ip, ["/public", "/private"])
    assert statuses == [200, 403]
    conn = [t for t in at_a if t["src"] == (b_ip, PORT) and t["dst"] == (a_ip, port)]
    body = b"".join(t["payload"] for t in conn)
    assert conn[0]["flags"] & 0x12 == 0x12 and b" 200 " in body and b"Access denied\r\n" in body
    assert {t["src_mac"] for t in conn} == {bridge_mac}, conn    # every one came via the proxy
    assert not [t for t in at_a if t["src_mac"] == b.mac], "a frame of b reached a directly"
    answered = [t for t in from_b if t["src"] == (b_ip, PORT) and t["dst"][0] == a_ip]
    assert answered and {t["dst_mac"] for t in answered} == {a.mac}
    assert b" 200 " in b"".join(t["payload"] for t in answered)   # the allowed request's reply

    apply(agent, l4_doc)
    assert eventually(lambda: not agent.client.health()["l7_proxy"]["l7_ports"], timeout=10)
    statuses, port, at_a, _ = conversation(a, b, b_ip, ["/public", "/private"])
    assert statuses == [200, 200]
    direct = [t for t in at_a if t["src"] == (b_ip, PORT) and t["dst"] == (a_ip, port)]
    assert direct and {t["src_mac"] for t in direct} == {b.mac}, direct
