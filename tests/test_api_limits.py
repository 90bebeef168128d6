"""Who may do what on the API socket, and the limits that keep any peer from exhausting
the agent: body sizes by peer, refusals before the body is read, per-uid connection
caps, read deadlines, the worker pool and its share kept for root, flow streams.

Most tests here run many peers of different uids from one process: a test peer binds
its socket to an abstract address that names its uid, and the server's SO_PEERCRED
lookup is swapped for one that reads it (``peers`` fixture). SO_PEERCRED itself is
proven with a real unprivileged process in test_api_server.py and tests/root/.
"""
from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import os
import socket
import threading
import time

import pytest

from fake_agent import FakeAgent
from stockade.daemon import server as srv
from stockade.daemon.apischema import ApiSchema
from stockade.daemon.connections import Limits, MiB
from stockade.daemon.routes import ROUTES, Access, PeerCred, Response, Route, grant
from stockade.errors import PermissionDenied

READ, DRY_RUN, CHANGE = Access.READ, Access.DRY_RUN, Access.CHANGE
ROOT, MEMBER = 0, 1000
PREFIX = b"\0stockade-test-uid-"
_names = itertools.count()

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEndpoints: [{matchLabels: {app: lb}}]}]
"""
FILES = {"files": [{"name": "web.yaml", "text": POLICY}]}
EP = {"name": "web1", "interface": "veth-web1", "ips": ["10.0.0.5"]}


# ---------------------------------------------------------------- the permission table

ACCESS = {
    ("GET", "/v1/health"): READ,
    ("GET", "/v1/endpoints"): READ,
    ("POST", "/v1/endpoints"): CHANGE,
    ("DELETE", "/v1/endpoints/{name}"): CHANGE,
    ("GET", "/v1/identities"): READ,
    ("GET", "/v1/ipcache"): READ,
    ("POST", "/v1/ipcache"): CHANGE,
    ("PATCH", "/v1/ipcache"): CHANGE,
    ("DELETE", "/v1/ipcache/{prefix}"): CHANGE,
    ("GET", "/v1/policies"): READ,
    ("PUT", "/v1/policies"): DRY_RUN,
    ("DELETE", "/v1/policies"): DRY_RUN,
    ("DELETE", "/v1/policies/{name}"): DRY_RUN,
    ("POST", "/v1/hooks/oci"): CHANGE,
    ("GET", "/v1/metrics"): READ,
    ("GET", "/metrics"): READ,  # Prometheus' default path, on the socket too
    ("GET", "/v1/services"): READ,
    ("PUT", "/v1/services"): DRY_RUN,
    ("GET", "/v1/flows"): READ,
    ("GET", "/v1/trace"): READ,
    ("GET", "/v1/matrix"): READ,
    ("POST", "/v1/review"): READ,
}
BODY_ROUTES = {("POST", "/v1/endpoints"), ("POST", "/v1/hooks/oci"), ("POST", "/v1/ipcache"), ("PATCH", "/v1/ipcache"), ("PUT", "/v1/policies"),
               ("PUT", "/v1/services"), ("POST", "/v1/review")}
LIMITS = Limits()
SCHEMA = ApiSchema()


def test_every_route_has_its_access():
    assert {(r.method, r.template): r.access for r in ROUTES} == ACCESS
    assert {(r.method, r.template) for r in ROUTES
            if SCHEMA.operation(r.method, r.template).body is not None} == BODY_ROUTES


PEERS = {"root": PeerCred(1, 0, 0), "member": PeerCred(2, MEMBER, 995), "unknown": None}
QUERIES = {"none": [], "dry-run": [("dry_run", "true")], "dry-run-false": [("dry_run", "false")],
           "dry-run-TRUE": [("dry_run", "TRUE")],
           "dry-run-twice": [("dry_run", "true"), ("dry_run", "true")]}


@pytest.mark.parametrize("query", QUERIES, ids=list(QUERIES))
@pytest.mark.parametrize("peer", PEERS, ids=list(PEERS))
@pytest.mark.parametrize("route", ROUTES, ids=[f"{r.method} {r.template}" for r in ROUTES])
def test_permission_of_every_route_for_every_peer(route, peer, query):
    """READ: anyone; DRY_RUN: anyone with exactly dry_run=true, else root; CHANGE: root.
    A body: root's up to 64 MiB anywhere it is taken, a member's up to 4 MiB."""
    key, cred, pairs = (route.method, route.template), PEERS[peer], QUERIES[query]
    read_only = ACCESS[key] is READ or (ACCESS[key] is DRY_RUN and query == "dry-run")
    takes_body = key in BODY_ROUTES
    if peer != "root" and not read_only:
        with pytest.raises(PermissionDenied, match="needs root"):
            grant(route, pairs, cred, LIMITS, takes_body)
        return
    g = grant(route, pairs, cred, LIMITS, takes_body)
    assert g.read_only == read_only
    assert g.max_body == (0 if not takes_body else 64 * MiB if peer == "root" else 4 * MiB)


@pytest.mark.parametrize("method,path,query,uid,allowed", [
    ("PUT", "/v1/policies", "dry_run=true", MEMBER, True),
    ("PUT", "/v1/policies", "dry_run=true&replace_all=true", MEMBER, True),
    ("PUT", "/v1/policies", "", MEMBER, False),
    ("PUT", "/v1/policies", "dry_run=false", MEMBER, False),
    ("PUT", "/v1/services", "dry_run=true", MEMBER, True),
    ("DELETE", "/v1/policies", "dry_run=true", MEMBER, True),
    ("DELETE", "/v1/policies/{name}", "dry_run=true&namespace=x", MEMBER, True),
    ("DELETE", "/v1/policies/{name}", "namespace=x", MEMBER, False),
    ("POST", "/v1/review", "", MEMBER, True),
    ("GET", "/v1/trace", "src=a=b&dst=c=d&dport=80/tcp", MEMBER, True),
    ("POST", "/v1/endpoints", "dry_run=true", MEMBER, False),
    ("POST", "/v1/endpoints", "", ROOT, True),
    ("DELETE", "/v1/ipcache/{prefix}", "", ROOT, True),
], ids=lambda v: v if isinstance(v, str) else None)
def test_permission_examples(method, path, query, uid, allowed):
    route = next(r for r in ROUTES if (r.method, r.template) == (method, path))
    pairs = [tuple(kv.split("=", 1)) for kv in query.split("&") if kv]
    cred = PeerCred(7, uid, uid)
    if allowed:
        grant(route, pairs, cred, LIMITS, False)
    else:
        with pytest.raises(PermissionDenied, match=f"uid {uid} "):
            grant(route, pairs, cred, LIMITS, False)


# ---------------------------------------------------------------- test peers

@pytest.fixture
def peers(monkeypatch):
    real = srv.peer_cred

    def cred(sock):
        try:
            name = sock.getpeername()
        except OSError:
            name = b""
        if isinstance(name, bytes) and name.startswith(PREFIX):
            return PeerCred(os.getpid(), int(name[len(PREFIX):].split(b"-")[0]), 0)
        return real(sock)
    monkeypatch.setattr(srv, "peer_cred", cred)


@pytest.fixture
def agent():
    return FakeAgent()


@pytest.fixture
def make_server(agent, tmp_path, peers):
    started = []

    def make(**limits):
        s = srv.APIServer(agent, str(tmp_path / f"a{len(started)}.sock"),
                          limits=dataclasses.replace(Limits(), **limits))
        s.start()
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()


class Peer:
    """A raw HTTP/1.1 client on its own connection, as ``uid``."""

    def __init__(self, server, uid: int):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(PREFIX + b"%d-%d-%d" % (uid, os.getpid(), next(_names)))
        self.sock.connect(server.socket_path)
        self.sock.settimeout(10)

    def send_head(self, method, path, headers=None, length=None):
        head = {"Host": "stockade", **(headers or {})}
        if length is not None:
            head["Content-Length"] = str(length)
        lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def response(self, timeout=10.0):
        self.sock.settimeout(timeout)
        r = http.client.HTTPResponse(self.sock, method="GET")
        r.begin()
        data = r.read()
        return r.status, r, data

    def request(self, method, path, body: bytes | dict | None = None, headers=None):
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_head(method, path, headers, None if body is None else len(body))
        if body:
            self.sock.sendall(body)
        return self.response()

    def closed_by_server(self, timeout=5.0) -> bool:
        """True once the server closed its end (EOF or reset), within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def close(self):
        self.sock.close()


def padded(body: dict, size: int) -> bytes:
    """``body`` as JSON, padded with trailing spaces (valid JSON) to ``size`` bytes."""
    raw = json.dumps(body).encode()
    return raw + b" " * (size - len(raw))


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# ---------------------------------------------------------------- members through the server

@pytest.mark.parametrize("method,path,body,status", [
    ("GET", "/v1/health", None, 200),
    ("GET", "/v1/policies", None, 200),
    ("GET", "/v1/metrics", None, 200),
    ("GET", "/v1/trace?src=app%3Dlb&dst=app%3Dweb&dport=80%2Ftcp", None, 200),
    ("GET", "/v1/matrix?limit=5", None, 200),
    ("PUT", "/v1/policies?dry_run=true", FILES, 200),
    ("PUT", "/v1/services?dry_run=true", {"services": {}}, 200),
    ("DELETE", "/v1/policies?dry_run=true", None, 200),
    ("POST", "/v1/review", FILES, 200),
    ("PUT", "/v1/policies", FILES, 403),
    ("PUT", "/v1/policies?dry_run=false", FILES, 403),
    ("PUT", "/v1/services", {"services": {}}, 403),
    ("POST", "/v1/endpoints", EP, 403),
    ("POST", "/v1/ipcache", {"prefix": "10.0.0.0/8", "labels": {"a": "b"}}, 403),
    ("DELETE", "/v1/policies", None, 403),
    ("DELETE", "/v1/endpoints/web1", None, 403),
], ids=lambda v: v if isinstance(v, str) else str(v) if isinstance(v, int) else None)
def test_member_may_read_review_and_dry_run_only(make_server, agent, method, path, body, status):
    s = make_server()
    p = Peer(s, MEMBER)
    got, _, data = p.request(method, path, body)
    assert got == status, data
    if status == 403:
        assert "needs root" in json.loads(data)["error"]["message"]
        assert agent.calls == [], "the agent was not asked"
    p.close()


# ---------------------------------------------------------------- refused before the body

@pytest.mark.parametrize("uid,method,path,headers,length,status,text", [
    (MEMBER, "PUT", "/v1/policies", {}, 8_000_000, 403, "needs root"),
    (MEMBER, "PUT", "/v1/policies", {"Expect": "100-continue"}, 8_000_000, 403, "needs root"),
    (MEMBER, "POST", "/v1/endpoints", {}, 100, 403, "needs root"),
    (MEMBER, "PUT", "/v1/policies", {"Transfer-Encoding": "chunked"}, None, 403, "needs root"),
    (MEMBER, "PUT", "/v1/policies?dry_run=true", {}, 8_000_000, 413, "4194304 bytes"),
    (MEMBER, "PUT", "/v1/policies?dry_run=true", {"Expect": "100-continue"}, 4 * MiB + 1, 413,
     "for a non-root peer"),
    (MEMBER, "POST", "/v1/review", {}, 8_000_000, 413, "over the limit"),
    (MEMBER, "GET", "/v1/health", {}, 8_000_000, 400, "takes no request body"),
    (MEMBER, "POST", "/v1/nothing", {}, 8_000_000, 404, "no such API route"),
    (MEMBER, "PUT", "/v1/policies?dry_run=true&force=1", {}, 100, 400, "unknown query"),
    (ROOT, "PUT", "/v1/policies", {}, 64 * MiB + 1, 413, "for root"),
    (ROOT, "PUT", "/v1/policies", {"Content-Type": "text/plain"}, 100, 415, "application/json"),
    (ROOT, "PUT", "/v1/policies", {"Transfer-Encoding": "chunked"}, None, 411, "Content-Length"),
    (ROOT, "PUT", "/v1/policies", {"Content-Length": "1, 2"}, None, 400, "Content-Length"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_refused_from_the_headers_alone(make_server, agent, uid, method, path, headers,
                                        length, status, text):
    """Only the headers are sent, never the body they announce: the refusal arrives all
    the same, the connection is closed, no 100 Continue went out, the agent was not
    asked."""
    s = make_server()
    p = Peer(s, uid)
    p.send_head(method, path, {"Content-Type": "application/json", **headers}, length)
    got, resp, data = p.response(timeout=5)
    assert got == status, data
    assert text in json.loads(data)["error"]["message"]
    assert resp.getheader("Connection") == "close"
    assert p.closed_by_server()
    assert agent.calls == []


def test_a_small_body_sent_after_the_refusal_does_not_break_the_pipe(make_server, agent):
    """The server answers 403 from the headers; the peer sends its small body only after
    that answer is out (as a client writing head and body separately may): the server
    reads and drops the body before it closes, so the peer's write succeeds and it reads
    the refusal, not EPIPE."""
    s = make_server()
    p = Peer(s, MEMBER)
    body = json.dumps({"services": {}}).encode()
    p.send_head("PUT", "/v1/services", {"Content-Type": "application/json"}, len(body))
    time.sleep(0.3)                     # the answer and the write shutdown are out by now
    p.sock.sendall(body)
    got, resp, data = p.response(timeout=5)
    assert got == 403, data
    assert resp.getheader("Connection") == "close"
    assert p.closed_by_server()
    assert agent.calls == []
    p.close()


def test_body_limits_by_peer(make_server, agent):
    s = make_server()
    member = Peer(s, MEMBER)
    got, _, data = member.request("PUT", "/v1/policies?dry_run=true",
                                  padded(FILES, 4 * MiB), {"Content-Type": "application/json"})
    assert got == 200, data
    got, _, data = member.request("POST", "/v1/review", padded(FILES, 4 * MiB),
                                  {"Content-Type": "application/json"})
    assert got == 200, data
    root = Peer(s, ROOT)
    got, _, data = root.request("PUT", "/v1/policies", padded(FILES, 20 * MiB),
                                {"Content-Type": "application/json"})
    assert got == 200, data
    assert [p["name"] for p in agent.list_policies()] == ["web"]


def test_expect_100_continue_once_the_body_is_wanted(make_server):
    s = make_server()
    p = Peer(s, ROOT)
    body = json.dumps(FILES).encode()
    p.send_head("PUT", "/v1/policies?dry_run=true",
                {"Content-Type": "application/json", "Expect": "100-continue"}, len(body))
    assert p.sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
    p.sock.sendall(body)
    assert p.response()[0] == 200


# ---------------------------------------------------------------- deadlines

def _dribble(sock, data: bytes, interval: float, stop: threading.Event):
    for i in range(len(data)):
        if stop.wait(interval):
            return
        try:
            sock.send(data[i:i + 1])
        except OSError:
            return


def test_headers_sent_a_byte_at_a_time_are_cut_off(make_server):
    """Each byte comes well within any per-read timeout; the deadline is for the whole
    request line and headers."""
    s = make_server(header_timeout=0.5)
    p = Peer(s, MEMBER)
    stop = threading.Event()
    t = threading.Thread(target=_dribble, args=(p.sock, b"GET /v1/health HTTP/1.1\r\n" + b"X" * 200,
                                                0.05, stop))
    start = time.monotonic()
    t.start()
    try:
        assert p.closed_by_server(timeout=5)
        assert 0.4 < time.monotonic() - start < 3
    finally:
        stop.set()
        t.join()
    assert Peer(s, MEMBER).request("GET", "/v1/health")[0] == 200


def test_body_sent_a_byte_at_a_time_is_408(make_server, agent):
    s = make_server(body_timeout=0.5, body_rate=1e12)
    p = Peer(s, ROOT)
    p.send_head("PUT", "/v1/policies", {"Content-Type": "application/json"}, 1000)
    stop = threading.Event()
    t = threading.Thread(target=_dribble, args=(p.sock, padded(FILES, 1000), 0.05, stop))
    start = time.monotonic()
    t.start()
    try:
        got, resp, data = p.response(timeout=5)
        assert got == 408 and "not received within" in json.loads(data)["error"]["message"]
        assert 0.4 < time.monotonic() - start < 3
        assert resp.getheader("Connection") == "close"
    finally:
        stop.set()
        t.join()
    assert not any(c[0] == "put_policies" for c in agent.calls)


def test_idle_connections_hold_no_worker_and_are_closed(make_server):
    s = make_server(workers=1, root_workers=0, idle_timeout=1.0)
    idle = [Peer(s, MEMBER) for _ in range(5)]
    busy = Peer(s, MEMBER)
    start = time.monotonic()
    assert busy.request("GET", "/v1/health")[0] == 200
    assert time.monotonic() - start < 2, "the idle connections hold no worker"
    assert all(p.closed_by_server(timeout=5) for p in idle)
    assert wait_for(lambda: s.pool.connections(MEMBER) == 0)


def test_a_peer_that_stops_reading_is_cut_off(make_server, agent):
    s = make_server(write_timeout=0.5)
    for i in range(200):  # a large answer
        agent.add_endpoint({"name": f"ep{i}", "interface": f"v{i}", "ips": [f"10.0.0.{i + 1}"],
                            "labels": {f"k{j}": "y" * 60 for j in range(30)}})
    p = Peer(s, MEMBER)
    p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(20):  # pipelined, never read
        p.send_head("GET", "/v1/endpoints")
    assert wait_for(lambda: s.pool.connections(MEMBER) == 0, timeout=10)
    assert Peer(s, MEMBER).request("GET", "/v1/health")[0] == 200


def test_headers_over_64_kib_are_431(make_server):
    s = make_server()
    p = Peer(s, MEMBER)
    p.send_head("GET", "/v1/health", {f"X-Pad-{i}": "p" * 4000 for i in range(20)})
    got, _, data = p.response()
    assert got == 431 and "headers are over 65536 bytes" in json.loads(data)["error"]["message"]
    assert p.closed_by_server()


# ---------------------------------------------------------------- connection caps

def test_connections_are_capped_per_uid_and_root_keeps_room(make_server):
    s = make_server(member_connections=3, members_connections=5, root_connections=4)
    mine = [Peer(s, MEMBER) for _ in range(3)]
    assert wait_for(lambda: s.pool.connections(MEMBER) == 3)
    over = Peer(s, MEMBER)
    got, _, data = over.response(timeout=5)  # answered at once, before any request
    assert got == 503
    assert "uid 1000 already has 3 connections" in json.loads(data)["error"]["message"]
    assert over.closed_by_server()
    other = Peer(s, 1001)
    assert other.request("GET", "/v1/health")[0] == 200, "other uids are not locked out"
    also = Peer(s, 1002)
    assert wait_for(lambda: s.pool.connections(1002) == 1)
    got, _, data = Peer(s, 1003).response(timeout=5)
    assert got == 503 and "non-root peers already have 5" in json.loads(data)["error"]["message"]
    roots = [Peer(s, ROOT) for _ in range(4)]
    assert all(r.request("GET", "/v1/health")[0] == 200 for r in roots), "root is never locked out"
    got, _, _ = Peer(s, ROOT).response(timeout=5)
    assert got == 503, "root has a cap too"
    mine[0].close()
    assert wait_for(lambda: s.pool.connections(MEMBER) == 2)
    assert Peer(s, MEMBER).request("GET", "/v1/health")[0] == 200
    for p in mine[1:] + [other, also] + roots:
        p.close()


# ---------------------------------------------------------------- the worker pool

@pytest.fixture
def gate():
    """A route whose requests wait until the gate opens."""
    opened = threading.Event()

    def wait(r):
        opened.wait(20)
        return Response(body={"uid": r.cred.uid})
    yield opened, Route("GET", "/v1/test-wait", wait)
    opened.set()


def _in_background(peer, path):
    out = {}
    t = threading.Thread(target=lambda: out.update(result=peer.request("GET", path)))
    t.start()
    return t, out


def test_members_never_take_roots_workers(make_server, gate):
    opened, route = gate
    s = make_server(workers=3, root_workers=1, member_workers=2)
    s.add_route(route)
    waiting = [_in_background(Peer(s, uid), "/v1/test-wait") for uid in (MEMBER, MEMBER, 1001)]
    assert wait_for(lambda: s.pool.stats()["busy"] == {MEMBER: 2}
                    and s.pool.stats()["queued"] == {1001: 1})
    start = time.monotonic()
    assert Peer(s, ROOT).request("GET", "/v1/health")[0] == 200
    assert time.monotonic() - start < 2
    opened.set()
    for t, out in waiting:
        t.join(10)
        assert out["result"][0] == 200


def test_one_member_uid_holds_at_most_its_share(make_server, gate):
    opened, route = gate
    s = make_server(workers=4, root_workers=1, member_workers=1)
    s.add_route(route)
    waiting = [_in_background(Peer(s, uid), "/v1/test-wait") for uid in (MEMBER, MEMBER)]
    assert wait_for(lambda: s.pool.stats()["busy"] == {MEMBER: 1}
                    and s.pool.stats()["queued"] == {MEMBER: 1})
    waiting.append(_in_background(Peer(s, 1001), "/v1/test-wait"))
    assert wait_for(lambda: s.pool.stats()["busy"] == {MEMBER: 1, 1001: 1})
    opened.set()
    for t, out in waiting:
        t.join(10)
        assert out["result"][0] == 200


@pytest.fixture
def ticker():
    """A streaming route: a line every 20 ms until the server stops or the peer leaves."""
    def follow(r):
        def lines():
            while not r.server.stopping.wait(0.02):
                yield b"tick\n"
        return Response(body=lines(), content_type="application/x-ndjson")
    return Route("GET", "/v1/test-follow", follow)


def _follow(peer):
    peer.send_head("GET", "/v1/test-follow")
    peer.sock.settimeout(5)
    head = peer.sock.recv(4096)
    return int(head.split(b" ", 2)[1])


def test_streams_leave_the_pool_and_are_capped(make_server, ticker):
    s = make_server(workers=2, root_workers=1, member_streams=2, members_streams=3,
                    root_streams=1)
    s.add_route(ticker)
    mine = [Peer(s, MEMBER) for _ in range(3)]
    assert [_follow(p) for p in mine] == [200, 200, 503]
    other, third = Peer(s, 1001), Peer(s, 1002)
    assert [_follow(other), _follow(third)] == [200, 503]
    root = Peer(s, ROOT)
    assert _follow(root) == 200
    assert _follow(Peer(s, ROOT)) == 503
    assert s.pool.stats()["streams"] == {MEMBER: 2, 1001: 1, ROOT: 1}
    assert s.pool.stats()["threads"] == 2 + 4, "every stream has a thread of its own"
    start = time.monotonic()
    assert Peer(s, 1003).request("GET", "/v1/health")[0] == 200, "followers starve nobody"
    assert Peer(s, ROOT).request("GET", "/v1/health")[0] == 200
    assert time.monotonic() - start < 2
    for p in mine + [other, root]:
        p.close()
    assert wait_for(lambda: s.pool.stats()["threads"] == 2 and not s.pool.stats()["streams"])
