"""HTTP rules enforced by the host's transparent proxy (HAProxy), with real packets.

Namespace workloads a (client, app=web), b (server, app=api) and c (app=other) on one
bridge, which has the host's address (.254): workload -> workload across the bridge,
and host -> workload. The server in b records every request it receives, with the
address it came from: the proxy is transparent (the server sees the client's address),
and smuggling attempts are judged by what the server saw.
"""
import collections
import json
import os
import socket
import subprocess
import time

import pytest

from agentproc import AgentProcess
from l7env import (
    API_GET_PUBLIC,
    API_L4,
    Client,
    Recorder,
    Server,
    add_endpoints,
    apply,
    check_replies_only_through_the_proxy,
    cnp,
    l7_settings,
    route_via_host,
    serving,
    wait_proxy,
)
from netns import Topology, in_netns, link_mac
from traffic import eventually

pytestmark = pytest.mark.root

NET4 = "10.213.18."
HOST4 = f"{NET4}254"
PORT = 8080


@pytest.fixture(scope="module")
def env():
    # the bridge chooses its MAC, as Podman's does: test_steering_follows_the_bridges_mac
    with Topology("l7", fixed_mac=False) as topo:
        w = {t: topo.add_workload(t, [f"{NET4}{i}/24"]) for i, t in enumerate("abc", start=1)}
        route_via_host(topo, f"{HOST4}/24", w.values())
        with serving(in_netns(w["b"].ns, Server, (w["b"].ip4, PORT), Recorder)):
            proc = AgentProcess(**l7_settings("a"))
            proc.settings["flow_log_path"] = str(proc.run_dir / "flows.log")
            with proc as agent:
                add_endpoints(agent, w)
                yield agent, w, topo


@pytest.fixture
def e(env):
    Recorder.seen.clear()
    yield env
    env[0].client.delete_all_policies()


API_L7 = API_GET_PUBLIC.rstrip("\n") + """
            - {method: POST, path: "/submit", headers: ["X-Token: s3cret"]}
            - {method: PUT, path: "/host-only", host: "api\\\\.example(:8080)?"}
            - {method: DELETE, path: "/hdr", headers: ["X-Trace"]}
"""


def test_rules_allow_and_deny_each_matcher(e):
    agent, w, _ = e
    apply(agent, cnp("api", API_L7))
    wait_proxy(agent)
    c = Client(w["a"], w["b"].ip4)
    try:
        cases = [
            (("GET", "/public"), {}, 200), (("GET", "/public/x?q=1"), {}, 200),
            (("GET", "/private"), {}, 403), (("PATCH", "/public"), {}, 403),    # method
            (("GET", "/publicity"), {}, 403),                                   # full match
            (("POST", "/submit"), {"headers": {"X-Token": "s3cret"}}, 200),
            (("POST", "/submit"), {"headers": {"X-Token": "wrong"}}, 403),      # header value
            (("POST", "/submit"), {}, 403),
            (("PUT", "/host-only"), {"host": "api.example"}, 200),
            (("PUT", "/host-only"), {"host": "api.example:8080"}, 200),
            (("PUT", "/host-only"), {"host": "evil.example"}, 403),             # host
            (("DELETE", "/hdr"), {"headers": {"X-Trace": "1"}}, 200),           # presence
            (("DELETE", "/hdr"), {}, 403),
        ]
        for (method, path), kw, want in cases:
            status, _, body = c.request(method, path, **kw)   # one keep-alive connection
            assert status == want, (method, path, kw, status, body)
            if want == 403:
                assert body == b"Access denied\r\n"
    finally:
        c.close()
    allowed = [(r["method"], r["path"]) for r in Recorder.seen]
    assert allowed == [("GET", "/public"), ("GET", "/public/x?q=1"), ("POST", "/submit"),
                       ("PUT", "/host-only"), ("PUT", "/host-only"), ("DELETE", "/hdr")]
    # transparent: the server saw the client's own address
    assert {r["client"] for r in Recorder.seen} == {w["a"].ip4}


def test_pipelining_keeps_order_and_connection(e):
    agent, w, _ = e
    apply(agent, cnp("api", API_L7))
    wait_proxy(agent)
    c = Client(w["a"], w["b"].ip4)
    try:
        c.send(b"GET /public/1 HTTP/1.1\r\nHost: api\r\n\r\n"
               b"GET /nope HTTP/1.1\r\nHost: api\r\n\r\n"
               b"GET /public/3 HTTP/1.1\r\nHost: api\r\n\r\n")
        got = [c.response() for _ in range(3)]
        assert [s for s, _, _ in got] == [200, 403, 200]
        assert got[0][2] == b"ok /public/1\n" and got[2][2] == b"ok /public/3\n"
        assert c.request("GET", "/public/4")[0] == 200     # still usable
    finally:
        c.close()


def test_host_to_workload_is_filtered(e):
    agent, w, _ = e
    apply(agent, cnp("api", API_L7.replace("fromEndpoints: [{matchLabels: {app: web}}]",
                                           "fromEntities: [host]")))
    wait_proxy(agent)
    c = Client(None, w["b"].ip4)
    try:
        assert c.request("GET", "/public")[0] == 200
        assert c.request("GET", "/private")[0] == 403
    finally:
        c.close()
    assert [r["path"] for r in Recorder.seen] == ["/public"]
    assert Recorder.seen[0]["client"] == HOST4


def test_replies_reach_the_client_only_through_the_proxy(e):
    """Asserted at the client (an AF_PACKET socket on a's eth0, every frame arriving
    there): every TCP frame of the proxied connection from b:8080 comes from the proxy.

    The criterion is the source MAC. Both paths deliver frames across the same bridge,
    but a frame b sends is bridged with b's own MAC as its source (a bridge never
    rewrites it), while the proxy's are sent by the host's IP stack out of the bridge
    device, with the bridge's MAC. The steering (bpf/lib/l7.h) sends b's replies into
    the host stack (they get the bridge's MAC as destination), so no frame with b's MAC
    may reach a. To show that the server did answer the client's address (transparent
    proxying: its replies would have reached a if they were bridged), b's own outgoing
    frames are captured too: b:8080 -> a's address, to a's MAC. And to show the
    criterion can fail: the same pair under an L4-only rule (the port not steered) gives
    frames with b's MAC at a.
    """
    agent, w, topo = e
    check_replies_only_through_the_proxy(agent, link_mac(topo.bridge), w["a"], w["b"], 4,
                                         cnp("api", API_L7), cnp("api", API_L4))


def test_l4_only_peer_is_unfiltered(e):
    agent, w, _ = e
    apply(agent, cnp("api", API_L7 + """
  - fromEndpoints: [{matchLabels: {app: other}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""))
    wait_proxy(agent)
    c = Client(w["c"], w["b"].ip4)
    a = Client(w["a"], w["b"].ip4)
    try:
        assert c.request("GET", "/private")[0] == 200
        assert a.request("GET", "/private")[0] == 403
    finally:
        c.close()
        a.close()


def test_peer_denied_at_l4_on_an_l7_port_is_dropped_not_proxied(e):
    """c has no rule on 8080: its SYN is dropped by the datapath at its own hook (the
    server's ingress policy decides there, as the server's hook would), so it never
    gets a proxied answer and the server sees nothing of it."""
    agent, w, _ = e
    apply(agent, cnp("api", API_L7))
    wait_proxy(agent)
    allowed = Client(w["a"], w["b"].ip4)
    try:
        assert allowed.request("GET", "/public")[0] == 200   # the proxy is in the path
    finally:
        allowed.close()
    Recorder.seen.clear()
    with pytest.raises(OSError):
        c = Client(w["c"], w["b"].ip4, timeout=1.0)
        try:
            c.request("GET", "/public")
        finally:
            c.close()
    assert not [r for r in Recorder.seen if r["client"] == w["c"].ip4]


def test_policy_change_mid_connection(e):
    agent, w, _ = e
    apply(agent, cnp("api", API_L7))
    wait_proxy(agent)
    c = Client(w["a"], w["b"].ip4)
    try:
        assert c.request("GET", "/private")[0] == 403
        assert c.request("GET", "/public")[0] == 200
        apply(agent, cnp("api", API_L7.replace('path: "/public(/.*)?"', 'path: "/private"')))
        time.sleep(0.2)
        assert c.request("GET", "/private")[0] == 200      # same connection, new rules
        assert c.request("GET", "/public")[0] == 403
    finally:
        c.close()


def test_request_smuggling_never_reaches_server_as_two(e):
    agent, w, _ = e
    apply(agent, cnp("api", API_L7.replace('path: "/public(/.*)?"', 'path: "/.*"')))
    wait_proxy(agent)
    attempts = [
        # CL + TE: the body hides a second request
        b"GET /public HTTP/1.1\r\nHost: api\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: api\r\n\r\n",
        # obs-fold (a header continued on the next line)
        b"GET /public HTTP/1.1\r\nHost: api\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n",
        # two Content-Length values
        b"POST /public HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\n"
        b"hello",
    ]
    for raw in attempts:
        c = Client(w["a"], w["b"].ip4)
        try:
            c.send(raw)
            try:
                while True:
                    c.response()
            except (ConnectionError, socket.timeout, OSError):
                pass
        finally:
            c.close()
    assert not any(r["path"] == "/smuggled" for r in Recorder.seen)
    assert len(Recorder.seen) <= len(attempts)


def test_slowloris_does_not_exhaust_proxy(e):
    agent, w, _ = e
    apply(agent, cnp("api", API_L7))
    wait_proxy(agent)
    slow = []
    try:
        for _ in range(50):
            s = w["a"].socket()
            s.settimeout(5)
            s.connect((w["b"].ip4, PORT))
            s.sendall(b"GET /public HTTP/1.1\r\nHost: api\r\n")   # never finishes
            slow.append(s)
        c = Client(w["a"], w["b"].ip4)
        try:
            assert c.request("GET", "/public")[0] == 200
        finally:
            c.close()
    finally:
        for s in slow:
            s.close()


def test_catastrophic_backtracking_is_bounded(e):
    agent, w, _ = e
    apply(agent, cnp("api", API_L7.replace('path: "/public(/.*)?"', 'path: "/(a+)+$"')))
    wait_proxy(agent)
    c = Client(w["a"], w["b"].ip4, timeout=10)
    try:
        started = time.monotonic()
        status, _, _ = c.request("GET", "/" + "a" * 40 + "!")
        took = time.monotonic() - started
        assert status == 403 and took < 2.0, took
        assert c.request("GET", "/aaaa")[0] == 200          # the pattern still works
    finally:
        c.close()


def test_a_proxy_death_a_commit_finds_first_is_counted(e):
    """Any commit (a link event, an API call) restarts a dead proxy before the
    supervisor's next look: the death must still be counted and shown."""
    agent, w, _ = e
    apply(agent, cnp("api", API_L7))
    wait_proxy(agent)
    before = agent.client.health()["l7_proxy"]
    os.kill(before["pid"], 9)
    time.sleep(0.05)
    agent.client.add_ipcache("10.214.250.1/32", {"app": "far"}, "h9")   # a commit, at once
    try:
        after = agent.client.health()["l7_proxy"]
        assert after["running"] and after["pid"] != before["pid"]
        assert after["restarts"] == before["restarts"] + 1, after
    finally:
        agent.client.remove_ipcache("10.214.250.1/32")


def test_proxy_killed_port_closed_then_restored(e):
    agent, w, _ = e
    apply(agent, cnp("api", API_L7))
    wait_proxy(agent)
    pid = agent.client.health()["l7_proxy"]["pid"]
    os.kill(pid, 9)
    # while it is down: nothing reaches the server unfiltered
    down_seen = False
    for _ in range(20):
        h = agent.client.health()
        if not h["l7_proxy"]["running"]:
            down_seen = True
            assert h["status"] == "degraded"
            break
        time.sleep(0.05)
    try:
        s = w["a"].socket()
        s.settimeout(0.3)
        s.connect((w["b"].ip4, PORT))
        s.sendall(b"GET /private HTTP/1.1\r\nHost: api\r\n\r\n")
        data = s.recv(100)
        s.close()
        assert b"200" not in data
    except OSError:
        pass
    assert not any(r["path"] == "/private" for r in Recorder.seen)

    def restarted():
        h = agent.client.health()["l7_proxy"]
        return h["running"] and h["pid"] != pid
    assert eventually(restarted, timeout=15)
    assert agent.client.health()["l7_proxy"]["restarts"] >= 1 or down_seen
    c = Client(w["a"], w["b"].ip4)
    try:
        assert c.request("GET", "/public")[0] == 200
        assert c.request("GET", "/private")[0] == 403
    finally:
        c.close()


def _l7_flows(agent, *args):
    out = agent.cli("observe", "--type", "l7", "--since", "5m", "-o", "json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_requests_become_l7_flows_with_metrics(e):
    agent, w, _ = e
    apply(agent, cnp("api", API_L7))
    wait_proxy(agent)
    tag = f"/public/flow-{time.monotonic_ns()}"
    c = Client(w["a"], w["b"].ip4)
    try:
        assert c.request("GET", tag, headers={"User-Agent": "tester\t\"x"})[0] == 200
        assert c.request("DELETE", tag)[0] == 403
    finally:
        c.close()

    def both():
        got = _l7_flows(agent, "--http-path", f"^{tag}$")
        return got if len(got) == 4 else None
    flows = eventually(both, timeout=10)
    assert flows, _l7_flows(agent)
    by = {(f["l7"]["type"], f["l7"]["http"]["method"]): f for f in flows}
    req, resp = by[("REQUEST", "GET")], by[("RESPONSE", "GET")]
    assert req["verdict"] == resp["verdict"] == "FORWARDED"
    assert req["l7"] == {"type": "REQUEST", "latency_ns": 0, "http": {
        "method": "GET", "url": f"http://api{tag}", "protocol": "HTTP/1.1", "code": 0,
        "headers": [{"key": "host", "value": "api"}, {"key": "user-agent", "value": "tester\t\"x"}]}}
    assert resp["l7"]["type"] == "RESPONSE" and resp["l7"]["http"]["code"] == 200
    assert resp["l7"]["latency_ns"] >= 0 and set(resp["l7"]) == {"type", "latency_ns", "http"}
    assert req["ip"] == {"source": w["a"].ip4, "destination": w["b"].ip4}
    assert req["l4"]["destination_port"] == PORT and resp["is_reply"]
    assert resp["ip"] == {"source": w["b"].ip4, "destination": w["a"].ip4}
    eps = {ep["name"]: ep for ep in agent.client.endpoints()}
    assert "static:app=web" in req["source"]["labels"]
    assert "static:app=api" in req["destination"]["labels"]
    assert req["source"]["endpoint"]["name"] == "a" and req["destination"]["endpoint"]["name"] == "b"
    assert req["source"]["identity"] == eps["a"]["identity"]
    assert req["destination"]["identity"] == eps["b"]["identity"]
    assert req["policy"] == ["api"] and req["direction"] == "ingress"
    denied = [by[("REQUEST", "DELETE")], by[("RESPONSE", "DELETE")]]
    assert [f["verdict"] for f in denied] == ["DROPPED", "DROPPED"]
    assert denied[0]["drop_reason"] == "policy_denied" and denied[1]["l7"]["http"]["code"] == 403
    # the filters
    assert len(_l7_flows(agent, "--http-path", f"^{tag}$", "--http-status", "4+")) == 1
    assert len(_l7_flows(agent, "--http-path", f"^{tag}$", "--http-method", "delete")) == 2
    assert len(_l7_flows(agent, "--http-path", f"^{tag}$", "--http-host", "api",
                         "--verdict", "FORWARDED")) == 2
    assert not _l7_flows(agent, "--http-path", f"^{tag}$", "--http-host", "other")
    # the flow log has them too
    logged = [json.loads(x) for x in open(agent.settings["flow_log_path"]) if tag in x]
    assert sorted((f["l7"]["type"], f["verdict"]) for f in logged) == [
        ("REQUEST", "DROPPED"), ("REQUEST", "FORWARDED"), ("RESPONSE", "DROPPED"),
        ("RESPONSE", "FORWARDED")]
    # metrics: requests by verdict and status code
    text = agent.client.metrics()
    assert 'stockade_l7_requests_total{code="200",verdict="FORWARDED"}' in text
    assert 'stockade_l7_requests_total{code="403",verdict="DROPPED"}' in text
    assert agent.client.health()["l7_proxy"]["request_log"]["received"] >= 2
    assert "request log: " in agent.cli("status", check=False).stdout


def test_garbled_log_lines_are_counted_and_dropped(e):
    agent, w, _ = e
    apply(agent, cnp("api", API_L7))
    wait_proxy(agent)
    # the request log is the proxy's stdout, a pipe: no socket another user could write to
    run_dir = l7_settings("a")["l7_run_dir"]
    assert not [n for n in os.listdir(run_dir) if n.endswith(".sock") and n != "admin.sock"]
    before = agent.client.health()["l7_proxy"]["request_log"]
    assert before["pipe_bytes"] >= 1 << 20
    c = Client(w["a"], w["b"].ip4)
    tag = f"/public/after-{time.monotonic_ns()}"
    try:
        # a line longer than the proxy writes (8 KB): cut short, garbled, counted
        assert c.request("GET", "/public/" + "x" * 9000)[0] == 200
        assert eventually(lambda: agent.client.health()["l7_proxy"]["request_log"]["garbled"]
                          == before["garbled"] + 1, timeout=5)
        assert c.request("GET", tag)[0] == 200        # the reader still reads
    finally:
        c.close()
    assert eventually(lambda: len(_l7_flows(agent, "--http-path", tag)) == 2, timeout=10)
    assert 'stockade_l7_log_lines_total{result="garbled"}' in agent.client.metrics()
    assert 'stockade_l7_log_lines_total{result="dropped"} 0.0' in agent.client.metrics()


def test_every_request_of_a_burst_is_a_flow(e):
    """2,000 requests as fast as the proxy takes them (pipelined on 4 keep-alive
    connections, most refused by the proxy itself, so not paced by the server): exactly
    2,000 REQUEST flows, none dropped (a unix datagram socket lost most of them)."""
    agent, w, _ = e
    apply(agent, cnp("api", API_L7))
    wait_proxy(agent)
    n_conn, per_conn = 4, 500
    tag = f"/burst-{time.monotonic_ns()}"

    def path(k: int, i: int) -> str:
        return f"/public{tag}/{k}/{i}" if i % 10 == 0 else f"{tag}/{k}/{i}"

    conns = [Client(w["a"], w["b"].ip4, timeout=30) for _ in range(n_conn)]
    try:
        for k, c in enumerate(conns):
            c.send(b"".join(f"GET {path(k, i)} HTTP/1.1\r\nHost: api\r\n\r\n".encode()
                            for i in range(per_conn)))
        codes = collections.Counter(c.response()[0] for c in conns for _ in range(per_conn))
    finally:
        for c in conns:
            c.close()
    assert codes == {200: n_conn * per_conn // 10, 403: n_conn * per_conn * 9 // 10}
    want = {"http://api" + path(k, i) for k in range(n_conn) for i in range(per_conn)}

    def requests() -> list[str]:
        flows = _l7_flows(agent, "--http-path", tag + "/")
        return [f["l7"]["http"]["url"] for f in flows if f["l7"]["type"] == "REQUEST"]
    eventually(lambda: len(requests()) >= len(want), timeout=20)
    got = requests()
    rl = agent.client.health()["l7_proxy"]["request_log"]
    assert len(got) == len(want), f"{len(got)} REQUEST flows of {len(want)} requests; {rl}"
    assert set(got) == want
    assert eventually(lambda: agent.client.health()["l7_proxy"]["request_log"]["dropped"] == 0)


def test_live_trace_answers_for_http(e):
    agent, w, _ = e
    apply(agent, cnp("api", API_L7))
    args = ("policy", "trace", "--live", "--src", "endpoint:a", "--dst", "endpoint:b",
            "--dport", f"{PORT}/tcp", "-o", "json")
    ok = json.loads(agent.cli(*args, "--http-method", "GET", "--http-path", "/public/x").stdout)
    assert ok["verdict"] == "allow" and ok["ingress"]["http"]["matched"] == {
        "method": "GET", "path": "/public(/.*)?"}
    no = json.loads(agent.cli(*args, "--http-method", "GET", "--http-path", "/private").stdout)
    assert no["verdict"] == "deny" and "403" in no["ingress"]["reason"]
    hdr = json.loads(agent.cli(*args, "--http-method", "POST", "--http-path", "/submit",
                               "--http-header", "X-Token: s3cret").stdout)
    assert hdr["verdict"] == "allow"

def test_cleanup_of_an_agent_whose_proxy_never_ran_leaves_the_steering_alone():
    """The steering is per namespace: a second (debugging, test) agent's --cleanup must
    not remove the running agent's nft table and ip rule."""
    table = f"stockade_l7_other{os.getpid()}"
    subprocess.run(["nft", "add", "table", "inet", table], check=True)
    try:
        agent = AgentProcess(l7_nft_table=table)
        agent.start()
        agent.stop()
        r = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True)
        assert r.returncode == 0, "the cleanup removed a steering table it never made"
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)


def test_steering_follows_the_bridges_mac(e):
    """A bridge without a MAC of its own takes its lowest port's: a new port (a new
    container on Podman's bridge) can change it. Steered frames carry the bridge's MAC
    as destination, so the agent must follow the change, or the port stays closed."""
    agent, w, topo = e
    apply(agent, cnp("api", API_L7))
    wait_proxy(agent)
    before = link_mac(topo.bridge)
    d = topo.add_workload("d", [f"{NET4}4/24"])
    try:
        subprocess.run(["ip", "link", "set", d.host_if, "address", "02:00:00:00:00:01"], check=True)
        assert link_mac(topo.bridge) == "02:00:00:00:00:01" != before
        assert eventually(lambda: steered_to(agent, w["a"]) == "02:00:00:00:00:01", timeout=10)

        def works():
            try:
                c = Client(w["a"], w["b"].ip4, timeout=1.0)
            except OSError:
                return False
            try:
                return c.request("GET", "/public")[0] == 200
            except OSError:
                return False
            finally:
                c.close()
        assert eventually(works, timeout=10)
    finally:
        topo.remove_workload("d")
    assert link_mac(topo.bridge) == before
    assert eventually(lambda: steered_to(agent, w["a"]) == before, timeout=10)
    assert eventually(works, timeout=10)


def steered_to(agent, workload) -> str | None:
    """The destination MAC the datapath writes into frames it steers from ``workload``
    (its l7_host entry: device ifindex, MAC)."""
    from pinned import dump_map
    from stockade.datapath.pins import pin_name
    entries = dump_map(os.path.join(agent.settings["bpffs_dir"], pin_name("l7_host")))
    value = entries.get(workload.host_ifindex.to_bytes(4, "little"))
    return value[4:10].hex(":") if value else None


def test_without_the_proxy_user_http_ports_are_dropped_and_l4_works():
    """A host without HAProxy (no proxy user): the agent starts, enforces L3/L4, drops
    traffic to the ports with HTTP rules (never passes it unfiltered) and says why."""
    from traffic import tcp_ok
    with Topology("l7u") as topo:
        w = {t: topo.add_workload(t, [f"10.213.23.{i}/24"]) for i, t in enumerate("ab", 1)}
        route_via_host(topo, "10.213.23.254/24", w.values())
        own = {**l7_settings("u", steering=1),        # beside env's agent
               "l7_user": "stockade-test-no-such-user"}
        with AgentProcess(**own) as agent:
            add_endpoints(agent, w, {"a": "web", "b": "api"})
            apply(agent, cnp("api-l7", API_L7 + """
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "9090", protocol: TCP}]}]
"""))
            assert tcp_ok(w["a"], w["b"], w["b"].ip4, 9090)
            assert not tcp_ok(w["a"], w["b"], w["b"].ip4, PORT)

            def said():
                l7 = agent.client.health().get("l7_proxy") or {}
                return not l7.get("ok") and "does not exist" in (l7.get("last_error") or "")
            assert eventually(said, timeout=10), agent.client.health()
            st = json.loads(agent.cli("status", "-o", "json", check=False).stdout)
            assert st["status"] != "ok", st
