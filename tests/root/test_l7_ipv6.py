"""HTTP rules enforced by the host's transparent proxy over IPv6, with real packets.

Namespace workloads a (client, app=web), b (server, app=api) and c (app=other) on one
bridge with IPv6 (and IPv4) addresses; the host has an address of each family on the
bridge (::fe, .254). The server in b listens on its IPv6 address only and records every
request with the address it came from: the proxy is transparent over IPv6 too (the
server sees the client's own IPv6 address). Workload -> workload across the bridge and
host -> workload.

And the routed multi-host path (docs/multihost.md, tests/root/test_l7_multihost.py for
IPv4) over IPv6: hosts h1 and h2 are namespaces on a fabric (tests/fleetnet.py,
``ipv6=True``); web (fd00:78:1::10) on h1 calls api (fd00:78:2::10) on h2, whose policy
has the HTTP rule: h2's steering takes the routed connection to its proxy.
"""
import json
import time

import pytest

from agentproc import STOCKADE, AgentProcess
from fleetnet import Fabric
from l7env import (
    API_GET_PUBLIC,
    API_L4,
    PORT,
    Client,
    Server6,
    add_endpoints,
    apply,
    check_replies_only_through_the_proxy,
    cnp,
    l7_settings,
    recorder,
    route_via_host,
    serving,
    tcp_frames,
    wait_proxy,
)
from netns import Topology, in_netns, link_mac, run
from traffic import Capture, eventually

pytestmark = pytest.mark.root

NET4, NET6 = "10.213.86.", "fd00:213:86::"
HOST4, HOST6 = f"{NET4}254", f"{NET6}fe"
SEEN = recorder()


def route_via_host6(topo, host6: str, workloads) -> None:
    """As route_via_host, for IPv6: the bridge (which Topology leaves without IPv6) gets
    the host's ``host6`` and each workload an IPv6 default route to it."""
    with open(f"/proc/sys/net/ipv6/conf/{topo.bridge}/disable_ipv6", "w") as f:
        f.write("0")
    run("ip", "-6", "addr", "add", host6, "dev", topo.bridge, "nodad")
    for w in workloads:
        w.exec("ip", "-6", "route", "add", "default", "via", host6.split("/")[0])


@pytest.fixture(scope="module")
def env():
    with Topology("v6h") as topo:
        w = {t: topo.add_workload(t, [f"{NET4}{i}/24", f"{NET6}{i}/64"])
             for i, t in enumerate("abc", start=1)}
        route_via_host(topo, f"{HOST4}/24", w.values())
        route_via_host6(topo, f"{HOST6}/64", w.values())
        with serving(in_netns(w["b"].ns, Server6, (w["b"].ip6, PORT), SEEN)):
            with AgentProcess(**l7_settings("v6", steering=3)) as agent:
                add_endpoints(agent, w)
                yield agent, w, topo


@pytest.fixture
def e(env):
    SEEN.seen.clear()
    yield env
    env[0].client.delete_all_policies()


def _l7_flows(agent, *args) -> list[dict]:
    out = agent.cli("observe", "--type", "l7", "--since", "5m", "-o", "json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_http_rule_over_ipv6_allows_denies_and_keeps_the_connection(e):
    agent, w, _ = e
    a, b = w["a"], w["b"]
    apply(agent, cnp("api", API_GET_PUBLIC))
    wait_proxy(agent)
    # the steering holds the server's IPv6 address (and its IPv4 one)
    table = agent.settings["l7_nft_table"]
    targets6 = run("nft", "list", "set", "inet", table, "targets6").stdout
    assert f"{b.ip6} . {PORT}" in targets6, targets6
    tag = f"/public/v6-{time.monotonic_ns()}"
    c = Client(a, b.ip6)
    try:
        assert c.sock.getsockname()[0] == a.ip6
        status, _, body = c.request("GET", tag)
        assert (status, body) == (200, f"ok {tag}\n".encode())
        status, _, body = c.request("GET", "/private")       # the same keep-alive connection
        assert (status, body) == (403, b"Access denied\r\n")
        assert c.request("POST", tag)[0] == 403              # the method
        status, _, body = c.request("GET", tag + "/again")   # still usable after the 403s
        assert (status, body) == (200, f"ok {tag}/again\n".encode())
    finally:
        c.close()
    assert [(r["method"], r["path"]) for r in SEEN.seen] == [("GET", tag), ("GET", tag + "/again")]
    assert {r["client"] for r in SEEN.seen} == {a.ip6}        # transparent over IPv6

    # the proxy's request log: flows with the IPv6 addresses, the identities and verdicts
    def flows():
        got = _l7_flows(agent, "--http-path", "^/p")
        return got if len([f for f in got if f["l7"]["type"] == "REQUEST"]) >= 4 else None
    got = eventually(flows, timeout=10)
    assert got, _l7_flows(agent)
    by = {(f["l7"]["type"], f["l7"]["http"]["method"], f["l7"]["http"]["url"]): f for f in got}
    want = {("GET", f"http://api{tag}"): "FORWARDED", ("GET", "http://api/private"): "DROPPED",
            ("POST", f"http://api{tag}"): "DROPPED", ("GET", f"http://api{tag}/again"): "FORWARDED"}
    eps = {ep["name"]: ep for ep in agent.client.endpoints()}
    for (method, url), verdict in want.items():
        req, resp = by[("REQUEST", method, url)], by[("RESPONSE", method, url)]
        assert req["verdict"] == resp["verdict"] == verdict, (method, url, req, resp)
        assert req["ip"] == {"source": a.ip6, "destination": b.ip6}, req
        assert resp["ip"] == {"source": b.ip6, "destination": a.ip6} and resp["is_reply"], resp
        assert req["l4"]["destination_port"] == PORT
        assert req["source"]["identity"] == eps["a"]["identity"], req["source"]
        assert req["destination"]["endpoint"]["name"] == "b" and req["policy"] == ["api"]
        assert resp["l7"]["http"]["code"] == (200 if verdict == "FORWARDED" else 403)
        if verdict == "DROPPED":
            assert req["drop_reason"] == "policy_denied"


def test_ipv6_replies_reach_the_client_only_through_the_proxy(e):
    """As test_l7_http's IPv4 test: a frame b sends is bridged with b's MAC as source,
    the proxy's come from the host's stack with the bridge's. Steered, b's IPv6 replies
    go into the host stack (to the proxy's socket), so every TCP frame of the connection
    arriving at a has the bridge's MAC, although b did answer a's own address; under an
    L4-only rule (the port not steered) they have b's MAC."""
    agent, w, topo = e
    check_replies_only_through_the_proxy(agent, link_mac(topo.bridge), w["a"], w["b"], 6,
                                         cnp("api", API_GET_PUBLIC), cnp("api", API_L4))


def test_host_to_workload_over_ipv6_is_filtered(e):
    agent, w, _ = e
    b = w["b"]
    apply(agent, cnp("api", API_GET_PUBLIC.replace("fromEndpoints: [{matchLabels: {app: web}}]",
                                                   "fromEntities: [host]")))
    wait_proxy(agent)
    c = Client(None, b.ip6)
    try:
        assert c.request("GET", "/public")[0] == 200
        status, _, body = c.request("GET", "/private")
        assert (status, body) == (403, b"Access denied\r\n")
        assert c.request("GET", "/public/2")[0] == 200
    finally:
        c.close()
    assert [r["path"] for r in SEEN.seen] == ["/public", "/public/2"]
    assert {r["client"] for r in SEEN.seen} == {HOST6}


def test_peer_without_a_rule_is_dropped_over_ipv6_not_proxied(e):
    """c has no rule on 8080: its SYN is dropped by the datapath, never answered by the
    proxy (a 403 would tell it the port is there); the server sees nothing of it."""
    agent, w, _ = e
    apply(agent, cnp("api", API_GET_PUBLIC))
    wait_proxy(agent)
    ok = Client(w["a"], w["b"].ip6)
    try:
        assert ok.request("GET", "/public")[0] == 200      # the proxy is in the path
    finally:
        ok.close()
    SEEN.seen.clear()
    with pytest.raises(OSError):
        c = Client(w["c"], w["b"].ip6, timeout=1.0)
        try:
            c.request("GET", "/public")
        finally:
            c.close()
    assert not SEEN.seen


def agent_on(host) -> AgentProcess:
    return AgentProcess(command=["ip", "netns", "exec", host.ns, *STOCKADE], host_name=host.name,
                        bpffs_dir=f"{host.bpffs}/sk", managed_bridges=["wbr0"],
                        **l7_settings(f"mh6{host.name}"))


@pytest.fixture
def fleet6():
    with Fabric("l6m", ipv6=True) as fab:
        h1, h2 = fab.add_host("h1", 1), fab.add_host("h2", 2)
        fab.route_all()
        web, api = h1.add_workload("web", 10), h2.add_workload("api", 10)
        a1, a2 = agent_on(h1), agent_on(h2)
        with serving(in_netns(api.ns, Server6, (api.ip6, PORT), SEEN)):
            try:
                a1.start()
                a2.start()
                a1.client.add_endpoint(name="web", interface="web-h", ips=[web.ip, web.ip6],
                                       labels={"app": "web"})
                a2.client.add_endpoint(name="api", interface="api-h", ips=[api.ip, api.ip6],
                                       labels={"app": "api"})
                a2.client.add_ipcache_entries([
                    {"prefix": f"{web.ip}/32", "labels": {"app": "web"}, "host": "h1"},
                    {"prefix": f"{web.ip6}/128", "labels": {"app": "web"}, "host": "h1"}])
                yield a2, web, api
            finally:
                a2.stop()
                a1.stop()


def test_remote_client_over_ipv6_is_filtered_and_the_server_sees_its_address(fleet6):
    h2, web, api = fleet6
    SEEN.seen.clear()
    h2.client.put_policies([cnp("api", API_GET_PUBLIC)], replace_all=True)
    wait_proxy(h2)
    with Capture(web) as at_web:
        c = Client(web, api.ip6)
        port = c.sock.getsockname()[1]
        try:
            assert c.request("GET", "/public/a")[0] == 200
            status, _, body = c.request("GET", "/private")     # the same keep-alive connection
            assert (status, body) == (403, b"Access denied\r\n")
            assert c.request("GET", "/public/b")[0] == 200
        finally:
            c.close()
    # api sends with hop limit 64: bridged past h2's proxy, its replies would arrive with
    # 62 (forwarded by h2 and h1); h2's proxy sends its own, which only h1 forwards: 63
    conn = [t for t in tcp_frames(at_web)
            if t["src"] == (api.ip6, PORT) and t["dst"] == (web.ip6, port)]
    assert conn and {t["ttl"] for t in conn} == {63}, conn
    assert [(r["method"], r["path"]) for r in SEEN.seen] == [("GET", "/public/a"), ("GET", "/public/b")]
    assert {r["client"] for r in SEEN.seen} == {web.ip6}     # transparent across hosts

    # h2's proxy judged them, with the remote client's identity from h2's ipcache
    def flows():
        got = [f for f in _l7_flows(h2, "--http-path", "^/p") if f["l7"]["type"] == "REQUEST"]
        return got if len(got) >= 3 else None
    got = eventually(flows, timeout=10)
    assert got, _l7_flows(h2)
    web_id = next(x["identity"] for x in h2.client.ipcache() if x["prefix"] == f"{web.ip6}/128")
    verdicts = {f["l7"]["http"]["url"]: f["verdict"] for f in got}
    assert verdicts == {"http://api/public/a": "FORWARDED", "http://api/private": "DROPPED",
                        "http://api/public/b": "FORWARDED"}, verdicts
    for f in got:
        assert f["ip"] == {"source": web.ip6, "destination": api.ip6}, f
        assert f["source"]["identity"] == web_id and "remote:app=web" in f["source"]["labels"]
