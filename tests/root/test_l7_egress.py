"""Egress HTTP rules, with real packets: the client's outgoing connections to an L7 port
go through the host's proxy, judged by the client's egress rules (and, when the server
has HTTP rules too, by its ingress ones in the same pass: both must hold).

Namespace workloads a (client, app=web), b (server, app=api) and c (server, app=other)
on one bridge with the host's address (.254), and r, a server on its own link routed
through the host (as another host's workloads are); b, c and r record what they
receive, with the address it came from.
"""
import json
import os
import signal
import time

import pytest

from agentproc import AgentProcess
from l7env import (
    Client,
    Recorder,
    Server,
    add_endpoints,
    apply,
    cnp,
    conversation,
    l7_settings,
    route_via_host,
    serving,
    tcp_frames,
    wait_proxy,
)
from netns import Topology, in_netns, link_mac, run
from traffic import Capture, eventually

pytestmark = pytest.mark.root

NET4 = "10.213.28."
FAR4 = "10.213.29."     # a network routed through the host (another host's workloads)
PORT = 8080


class ServerRecorder(Recorder):
    """Recorder, noting which server (b or c) got each request."""

    def _any(self):
        super()._any()
        Recorder.seen[-1]["server"] = self.server.server_address[0]

    do_GET = do_POST = do_PUT = do_DELETE = _any


@pytest.fixture(scope="module")
def env():
    with Topology("l7e") as topo:
        w = {t: topo.add_workload(t, [f"{NET4}{i}/24"]) for i, t in enumerate("abc", start=1)}
        route_via_host(topo, f"{NET4}254/24", w.values())
        # r: not an endpoint, not on the bridge; reached by routing through the host
        w["r"] = r = topo.add_workload("r", [f"{FAR4}1/24"])
        run("ip", "link", "set", r.host_if, "nomaster")
        run("ip", "addr", "add", f"{FAR4}254/24", "dev", r.host_if)
        r.exec("ip", "route", "add", "default", "via", f"{FAR4}254")
        with serving(*(in_netns(w[n].ns, Server, (w[n].ip4, PORT), ServerRecorder)
                       for n in "bcr")):
            with AgentProcess(**l7_settings("eg")) as agent:
                add_endpoints(agent, w)
                yield agent, w, topo


@pytest.fixture
def e(env):
    Recorder.seen.clear()
    yield env
    env[0].client.delete_all_policies()


WEB_EGRESS = """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toEndpoints: [{matchLabels: {app: api}}]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules:
          http:
            - {method: GET, path: "/public(/.*)?"}
            - {method: POST, path: "/submit", headers: ["X-Token: s3cret"]}
"""
OTHER_L4 = """
  - toEndpoints: [{matchLabels: {app: other}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


def seen(w, name):
    return [(r["method"], r["path"]) for r in Recorder.seen if r["client"] == w["a"].ip4
            and r["server"] == w[name].ip4]


def _l7_flows(agent, *args):
    out = agent.cli("observe", "--type", "l7", "--since", "5m", "-o", "json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_egress_rules_allow_and_deny(e):
    agent, w, _ = e
    apply(agent, cnp("web", WEB_EGRESS))
    wait_proxy(agent)
    tag = f"/public/eg-{time.monotonic_ns()}"
    c = Client(w["a"], w["b"].ip4)
    try:
        cases = [(("GET", tag), {}, 200), (("GET", "/private"), {}, 403),
                 (("PATCH", "/public"), {}, 403),
                 (("POST", "/submit"), {"headers": {"X-Token": "s3cret"}}, 200),
                 (("POST", "/submit"), {"headers": {"X-Token": "wrong"}}, 403)]
        for (method, path), kw, want in cases:
            status, _, body = c.request(method, path, **kw)     # one keep-alive connection
            assert status == want, (method, path, status, body)
            if want == 403:
                assert body == b"Access denied\r\n"
    finally:
        c.close()
    assert seen(w, "b") == [("GET", tag), ("POST", "/submit")]   # transparent: a's address
    # a port without HTTP rules and a peer without any rule: L4 policy as before
    with pytest.raises(OSError):
        Client(w["a"], w["c"].ip4, timeout=1.0).request("GET", "/public")

    def flows():
        got = _l7_flows(agent, "--http-path", f"^{tag}$")
        return got if len(got) == 2 else None
    got = eventually(flows, timeout=10)
    assert got, _l7_flows(agent)
    assert {f["direction"] for f in got} == {"egress"}
    assert {f["verdict"] for f in got} == {"FORWARDED"}
    req = next(f for f in got if f["l7"]["type"] == "REQUEST")
    assert req["policy"] == ["web"] and req["ip"] == {"source": w["a"].ip4, "destination": w["b"].ip4}
    assert "static:app=web" in req["source"]["labels"]
    assert "static:app=api" in req["destination"]["labels"]
    denied = [f for f in _l7_flows(agent, "--http-path", "^/private$") if f["direction"] == "egress"]
    assert denied and {f["verdict"] for f in denied} == {"DROPPED"}


def test_l4_only_egress_rule_on_the_same_port_is_unfiltered(e):
    agent, w, _ = e
    apply(agent, cnp("web", WEB_EGRESS + OTHER_L4))
    wait_proxy(agent)
    to_c, to_b = Client(w["a"], w["c"].ip4), Client(w["a"], w["b"].ip4)
    try:
        assert to_c.request("DELETE", "/anything")[0] == 200
        assert to_b.request("DELETE", "/anything")[0] == 403
    finally:
        to_c.close()
        to_b.close()
    assert seen(w, "c") == [("DELETE", "/anything")] and seen(w, "b") == []


def test_server_denying_the_client_at_l4_drops_it_before_the_proxy(e):
    """c's ingress allows only app=api: a's egress rules let a reach c's port, but its
    SYN is dropped (c's ingress decides at a's hook), never answered by the proxy."""
    agent, w, _ = e
    apply(agent, cnp("web", WEB_EGRESS + OTHER_L4), cnp("other", """
endpointSelector: {matchLabels: {app: other}}
ingress:
  - fromEndpoints: [{matchLabels: {app: api}}]
"""))
    wait_proxy(agent)
    s = w["a"].socket()
    s.settimeout(1.0)
    try:
        with pytest.raises(OSError):      # no handshake at all: the proxy never accepted it
            s.connect((w["c"].ip4, PORT))
    finally:
        s.close()
    ok = Client(w["a"], w["b"].ip4)
    try:
        assert ok.request("GET", "/public")[0] == 200
    finally:
        ok.close()
    assert seen(w, "c") == []


def test_replies_reach_the_client_only_through_the_proxy(e):
    """As for ingress rules (test_l7_http.py): every frame of the connection from b
    reaching a carries the bridge's MAC (the host sent it), never b's own."""
    agent, w, topo = e
    a, b = w["a"], w["b"]
    bridge_mac = link_mac(topo.bridge)
    apply(agent, cnp("web", WEB_EGRESS))
    wait_proxy(agent)
    statuses, port, at_a, from_b = conversation(a, b, b.ip4, ["/public", "/private"])
    assert statuses == [200, 403]
    conn = [t for t in at_a if t["src"] == (b.ip4, PORT) and t["dst"] == (a.ip4, port)]
    assert conn and {t["src_mac"] for t in conn} == {bridge_mac}, conn
    answered = [t for t in from_b if t["src"] == (b.ip4, PORT) and t["dst"][0] == a.ip4]
    assert answered and b" 200 " in b"".join(t["payload"] for t in answered)


def test_proxy_killed_egress_dropped_then_restored(e):
    """While the proxy is down, a's connections to the port are dropped, to the
    HTTP-filtered peer and to the L4-only one alike (never passed unfiltered). The agent
    (this test's own process) is held stopped meanwhile, so that its supervisor cannot
    restart the proxy before the connections are tried."""
    agent, w, _ = e
    apply(agent, cnp("web", WEB_EGRESS + OTHER_L4))
    wait_proxy(agent)
    pid = agent.client.health()["l7_proxy"]["pid"]
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        for name in "bc":
            with pytest.raises(OSError):       # the SYN is dropped: no answer at all
                Client(w["a"], w[name].ip4, timeout=1.0).request("GET", "/private")
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    assert not any(r["path"] == "/private" for r in Recorder.seen)

    def restarted():
        h = agent.client.health()["l7_proxy"]
        return h["running"] and h["pid"] != pid
    assert eventually(restarted, timeout=15)
    c = Client(w["a"], w["b"].ip4)
    try:
        assert c.request("GET", "/public")[0] == 200
        assert c.request("GET", "/private")[0] == 403
    finally:
        c.close()


API_INGRESS = """
endpointSelector: {matchLabels: {app: api}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules:
          http:
            - {method: GET, path: "/both"}
            - {method: GET, path: "/ingress-only"}
"""
WEB_BOTH = """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toEndpoints: [{matchLabels: {app: api}}]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules:
          http:
            - {method: GET, path: "/both"}
            - {method: GET, path: "/egress-only"}
"""


def test_client_egress_and_server_ingress_rules_must_both_pass(e):
    """One proxy pass judges both; the flows are those of Cilium's two passes: the
    client's egress, then (when egress let it through) the server's ingress."""
    agent, w, _ = e
    apply(agent, cnp("web", WEB_BOTH), cnp("api", API_INGRESS))
    wait_proxy(agent)
    c = Client(w["a"], w["b"].ip4)
    try:
        got = {p: c.request("GET", p)[0] for p in ("/both", "/egress-only", "/ingress-only")}
    finally:
        c.close()
    assert got == {"/both": 200, "/egress-only": 403, "/ingress-only": 403}
    assert seen(w, "b") == [("GET", "/both")]

    def flows(path, n):
        def f():
            r = [(x["direction"], x["verdict"], tuple(x["policy"]))
                 for x in _l7_flows(agent, "--http-path", f"^{path}$")
                 if x["l7"]["type"] == "REQUEST"]
            return sorted(r) if len(r) == n else None
        return eventually(f, timeout=10)
    assert flows("/both", 2) == [("egress", "FORWARDED", ("web",)), ("ingress", "FORWARDED", ("api",))]
    assert flows("/egress-only", 2) == [("egress", "FORWARDED", ("web",)),
                                        ("ingress", "DROPPED", ("api",))]
    assert flows("/ingress-only", 1) == [("egress", "DROPPED", ("web",))]


def test_live_trace_answers_for_egress_http(e):
    agent, w, _ = e
    apply(agent, cnp("web", WEB_BOTH), cnp("api", API_INGRESS))
    args = ("policy", "trace", "--live", "--src", "endpoint:a", "--dst", "endpoint:b",
            "--dport", f"{PORT}/tcp", "-o", "json", "--http-method", "GET", "--http-path")
    ok = json.loads(agent.cli(*args, "/both").stdout)
    assert ok["verdict"] == "allow" and ok["egress"]["http"]["matched"] == {"method": "GET",
                                                                           "path": "/both"}
    eg = json.loads(agent.cli(*args, "/ingress-only").stdout)
    assert eg["verdict"] == "deny" and "403" in eg["egress"]["reason"]
    ing = json.loads(agent.cli(*args, "/egress-only").stdout)
    assert ing["verdict"] == "deny" and ing["egress"]["verdict"] == "allow"
    assert "403" in ing["ingress"]["reason"]



def test_egress_to_a_routed_peer_and_its_replies_back_through_the_proxy(e):
    """A peer behind the host's routing (as another host's workload is): the proxy's
    upstream connection leaves with a's address, and r's replies to that address must
    come back into the proxy's socket (nft, the "clients" sets), not be routed on to a:
    otherwise the upstream connection never completes and no request reaches r."""
    agent, w, topo = e
    a, r = w["a"], w["r"]
    apply(agent, cnp("web", f"""
endpointSelector: {{matchLabels: {{app: web}}}}
egress:
  - toCIDR: ["{FAR4}0/24"]
    toPorts:
      - ports: [{{port: "8080", protocol: TCP}}]
        rules:
          http:
            - {{method: GET, path: "/public(/.*)?"}}
"""))
    wait_proxy(agent)
    bridge_mac = link_mac(topo.bridge)
    with Capture(a) as at_a:
        c = Client(a, r.ip4)
        try:
            assert c.request("GET", "/public/far")[0] == 200
            status, _, body = c.request("GET", "/private")
            assert (status, body) == (403, b"Access denied\r\n")
        finally:
            c.close()
    assert seen(w, "r") == [("GET", "/public/far")]      # r saw a's own address
    frames = [t for t in tcp_frames(at_a) if t["src"] == (r.ip4, PORT)]
    assert frames and {t["src_mac"] for t in frames} == {bridge_mac}


def test_egress_visibility_only_passes_and_records_everything(e):
    agent, w, _ = e
    apply(agent, cnp("web", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}], rules: {http: [{}]}}]
"""))
    wait_proxy(agent)
    tag = f"/anything/vis-{time.monotonic_ns()}"
    c = Client(w["a"], w["b"].ip4)
    try:
        assert [c.request(m, tag)[0] for m in ("GET", "DELETE")] == [200, 200]
    finally:
        c.close()
    assert seen(w, "b") == [("GET", tag), ("DELETE", tag)]

    def flows():
        got = [(f["l7"]["http"]["method"], f["direction"], f["verdict"])
               for f in _l7_flows(agent, "--http-path", f"^{tag}$") if f["l7"]["type"] == "REQUEST"]
        return sorted(got) if len(got) == 2 else None
    assert eventually(flows, timeout=10) == [("DELETE", "egress", "FORWARDED"),
                                             ("GET", "egress", "FORWARDED")]
