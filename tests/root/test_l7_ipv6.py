"""HTTP rules enforced by the host's transparent proxy over IPv6, with real packets.

Namespace workloads a (client, app=web), b (server, app=api) and c (app=other) on one
bridge with IPv6 (and IPv4) addresses; the host has an address of each family on the
bridge (::fe, .254). The server in b listens on its IPv6 address only and records every
request with the address it came from: the proxy is transparent over IPv6 too (the
server sees the client's own IPv6 address). Workload -> workload across the bridge and
host -> workload.
"""
import json
import os
import time

import pytest

from agentproc import AgentProcess
from l7env import (
    PORT,
    TAG,
    Client,
    Server6,
    add_endpoints,
    apply,
    cnp,
    l7_settings,
    recorder,
    route_via_host,
    serving,
    wait_proxy,
)
from netns import Topology, in_netns, run
from traffic import eventually

pytestmark = pytest.mark.root

NET4, NET6 = "10.213.86.", "fd00:213:86::"
HOST4, HOST6 = f"{NET4}254", f"{NET6}fe"
SEEN = recorder()


def v6_settings() -> dict:
    """Steering of its own (proxy port, nft table, route table, rule, mark), apart from
    every other L7 test module's (l7_settings alone shares them)."""
    return {**l7_settings("v6"), "l7_proxy_port": 17100 + TAG,
            "l7_nft_table": f"stockade_l7_v6{os.getpid()}", "l7_route_table": 25000 + TAG,
            "l7_rule_priority": 25000 + TAG, "l7_mark": 0x5B000000 + (TAG << 16)}


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
            with AgentProcess(**v6_settings()) as agent:
                add_endpoints(agent, w)
                yield agent, w


@pytest.fixture
def e(env):
    SEEN.seen.clear()
    yield env
    env[0].client.delete_all_policies()


API_L7 = """
endpointSelector: {matchLabels: {app: api}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules:
          http:
            - {method: GET, path: "/public(/.*)?"}
"""


def _l7_flows(agent, *args) -> list[dict]:
    out = agent.cli("observe", "--type", "l7", "--since", "5m", "-o", "json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_http_rule_over_ipv6_allows_denies_and_keeps_the_connection(e):
    agent, w = e
    a, b = w["a"], w["b"]
    apply(agent, cnp("api", API_L7))
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


def test_host_to_workload_over_ipv6_is_filtered(e):
    agent, w = e
    b = w["b"]
    apply(agent, cnp("api", API_L7.replace("fromEndpoints: [{matchLabels: {app: web}}]",
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
    agent, w = e
    apply(agent, cnp("api", API_L7))
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
