"""HTTP rules on the routed multi-host path (docs/multihost.md): a client workload on
host h1 reaches a server workload on host h2 whose policy has an HTTP rule.

Hosts are network namespaces on a fabric bridge (tests/fleetnet.py), each with its own
agent and a workload subnet routed to it without NAT: web (10.78.1.10, app=web) and
other (10.78.1.11) on h1, api (10.78.2.10, app=api) on h2. h2's ipcache knows h1's
workloads by their addresses (remote entries, as stockade.fleet.site or the fleet store
give them). The client's packets reach h2 routed, not bridged: h2's nft steering takes
connections to api's L7 port to the proxy as they enter h2; the server's replies are
steered by api's tc program into h2's proxy, which answers the client.
"""
import contextlib
import json
import os
import signal

import pytest

from agentproc import STOCKADE, AgentProcess
from fleetnet import Fabric
from l7env import (
    PORT,
    Client,
    Server,
    cnp,
    conversation,
    l7_settings,
    recorder,
    serving,
    wait_proxy,
)
from netns import in_netns
from traffic import eventually

pytestmark = pytest.mark.root

API_L7 = cnp("api", """
endpointSelector: {matchLabels: {app: api}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules: {http: [{method: GET, path: "/public(/.*)?"}]}
""")
API_L4 = cnp("api", """
endpointSelector: {matchLabels: {app: api}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
""")
SEEN = recorder()


def agent_on(host) -> AgentProcess:
    return AgentProcess(command=["ip", "netns", "exec", host.ns, *STOCKADE], host_name=host.name,
                        bpffs_dir=f"{host.bpffs}/sk", managed_bridges=["wbr0"],
                        **l7_settings(f"mh{host.name}"))


@pytest.fixture(scope="module")
def env():
    with Fabric("l7m") as fab:
        h1, h2 = fab.add_host("h1", 1), fab.add_host("h2", 2)
        fab.route_all()
        # h2 filters reverse paths strictly (as some distributions do): the agent
        # loosens it on the bridge its steering delivers into, and only there
        h2.exec("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
        web, other = h1.add_workload("web", 10), h1.add_workload("other", 11)
        api = h2.add_workload("api", 10)
        a1, a2 = agent_on(h1), agent_on(h2)
        with serving(in_netns(api.ns, Server, (api.ip, PORT), SEEN)):
            try:
                a1.start()
                a2.start()
                a1.client.add_endpoint(name="web", interface="web-h", ips=[web.ip],
                                       labels={"app": "web"})
                a1.client.add_endpoint(name="other", interface="other-h", ips=[other.ip],
                                       labels={"app": "other"})
                a2.client.add_endpoint(name="api", interface="api-h", ips=[api.ip],
                                       labels={"app": "api"})
                a2.client.add_ipcache_entries([
                    {"prefix": f"{web.ip}/32", "labels": {"app": "web"}, "host": "h1"},
                    {"prefix": f"{other.ip}/32", "labels": {"app": "other"}, "host": "h1"}])
                yield {"h1": a1, "h2": a2, "h2_host": h2, "web": web, "other": other,
                       "api": api}
            finally:
                a2.stop()
                a1.stop()


@pytest.fixture
def e(env):
    SEEN.seen.clear()
    yield env
    env["h2"].client.delete_all_policies()


def l7_flows(agent, *args) -> list[dict]:
    out = agent.cli("observe", "--type", "l7", "--since", "5m", "-o", "json", *args).stdout
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def test_remote_client_is_filtered_and_the_server_sees_its_address(e):
    h2, web, api = e["h2"], e["web"], e["api"]
    h2.client.put_policies([API_L7], replace_all=True)
    wait_proxy(h2)
    c = Client(web, api.ip)
    try:
        assert c.request("GET", "/public/a")[0] == 200
        status, _, body = c.request("GET", "/private")     # the same keep-alive connection
        assert (status, body) == (403, b"Access denied\r\n")
        assert c.request("POST", "/public/a")[0] == 403
        assert c.request("GET", "/public/b")[0] == 200
    finally:
        c.close()
    assert [(r["method"], r["path"]) for r in SEEN.seen] == [("GET", "/public/a"), ("GET", "/public/b")]
    assert {r["client"] for r in SEEN.seen} == {web.ip}     # transparent across hosts

    # h2's proxy recorded the requests, with the remote client's identity from h2's ipcache
    def flows():
        got = [f for f in l7_flows(h2, "--http-path", "^/p") if f["l7"]["type"] == "REQUEST"]
        return got if len(got) >= 4 else None
    got = eventually(flows, timeout=10)
    assert got, l7_flows(h2)
    by = {(f["l7"]["http"]["method"], f["l7"]["http"]["url"]): f for f in got}
    assert by[("GET", "http://api/public/a")]["verdict"] == "FORWARDED"
    assert by[("GET", "http://api/private")]["verdict"] == "DROPPED"
    assert by[("POST", "http://api/public/a")]["verdict"] == "DROPPED"
    web_id = next(x["identity"] for x in h2.client.ipcache() if x["prefix"] == f"{web.ip}/32")
    for f in by.values():
        assert f["ip"] == {"source": web.ip, "destination": api.ip}
        assert f["source"]["identity"] == web_id and "remote:app=web" in f["source"]["labels"]
        assert f["destination"]["endpoint"]["name"] == "api" and f["policy"] == ["api"]
    assert h2.client.health()["status"] == "ok", h2.client.health()
    rp = {dev: int(e["h2_host"].exec("sysctl", "-n", f"net.ipv4.conf.{dev}.rp_filter").stdout)
          for dev in ("all", "wbr0", "fab0")}
    assert rp == {"all": 1, "wbr0": 2, "fab0": 0}, rp


def test_remote_peer_denied_at_l4_is_dropped_not_answered(e):
    """other has no rule on 8080 at all: h2 drops its SYN, as it would without the HTTP
    rule; the proxy never answers it (a 403 would tell it the port is there)."""
    h2, other, api = e["h2"], e["other"], e["api"]
    h2.client.put_policies([API_L7], replace_all=True)
    wait_proxy(h2)
    c = Client(e["web"], api.ip)
    try:
        assert c.request("GET", "/public")[0] == 200      # the proxy is in the path
    finally:
        c.close()
    SEEN.seen.clear()
    s = other.socket()
    s.settimeout(1.0)
    try:
        with pytest.raises(OSError):
            s.connect((api.ip, PORT))
            s.sendall(b"GET /public HTTP/1.1\r\nHost: api\r\n\r\n")
            assert not s.recv(65536), "the proxy answered a peer denied at L4"
    finally:
        s.close()
    assert not [r for r in SEEN.seen if r["client"] == other.ip]


def test_replies_come_back_through_the_servers_proxy(e):
    """Asserted at the client. Both ways to the client are routed, so a frame's source
    MAC (h1's bridge) tells nothing; its TTL and its connection do. api sends with TTL 64:
    bridged past h2's proxy, its replies are forwarded by h2 and h1 and arrive with 62.
    h2's proxy sends its own (64), which only h1 forwards: 63. And the proxy's connection
    to the client is not the server's: the client's SYN-ACK carries another initial
    sequence number than the one api sent. The same pair under an L4-only rule (the
    port not steered) shows that both criteria can fail."""
    h2, web, api = e["h2"], e["web"], e["api"]
    h2.client.put_policies([API_L7], replace_all=True)
    wait_proxy(h2)
    statuses, port, at_web, from_api = conversation(web, api, api.ip, ["/public", "/private"])
    assert statuses == [200, 403]
    conn = [t for t in at_web if t["src"] == (api.ip, PORT) and t["dst"] == (web.ip, port)]
    body = b"".join(t["payload"] for t in conn)
    assert conn[0]["flags"] & 0x12 == 0x12 and b" 200 " in body and b"Access denied\r\n" in body
    assert {t["ttl"] for t in conn} == {63}, conn            # every one came from h2's proxy
    answered = [t for t in from_api if t["src"] == (api.ip, PORT) and t["dst"][0] == web.ip]
    assert answered and b" 200 " in b"".join(t["payload"] for t in answered)
    syn_ack = [t["seq"] for t in answered if t["flags"] & 0x12 == 0x12]
    assert syn_ack and conn[0]["seq"] not in syn_ack         # two connections, spliced
    assert not {t["seq"] for t in conn if t["flags"] & 0x02} & set(syn_ack)

    h2.client.put_policies([API_L4], replace_all=True)
    assert eventually(lambda: not h2.client.health()["l7_proxy"]["l7_ports"], timeout=10)
    statuses, port, at_web, from_api = conversation(web, api, api.ip, ["/public", "/private"])
    assert statuses == [200, 200]
    direct = [t for t in at_web if t["src"] == (api.ip, PORT) and t["dst"] == (web.ip, port)]
    assert direct and {t["ttl"] for t in direct} == {62}, direct
    sent = [t["seq"] for t in from_api if t["src"] == (api.ip, PORT) and t["flags"] & 0x12 == 0x12]
    assert direct[0]["seq"] in sent


def test_proxy_killed_closes_the_port_to_remote_clients_too(e):
    """An established connection from h1 loses its proxy: its next request never
    reaches the server unfiltered (the server host has no socket for it any more, and
    steered packets no socket takes are dropped or reset); after the agent restarted
    the proxy, a new connection is filtered again."""
    h2, web, api = e["h2"], e["web"], e["api"]
    h2.client.put_policies([API_L7], replace_all=True)
    wait_proxy(h2)
    c = Client(web, api.ip, timeout=1.0)
    try:
        assert c.request("GET", "/public/before")[0] == 200
        pid = h2.client.health()["l7_proxy"]["pid"]
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            c.send(b"GET /private HTTP/1.1\r\nHost: api\r\n\r\n")
            c.response()
    finally:
        c.close()

    def restarted():
        h = h2.client.health()["l7_proxy"]
        return h["running"] and h["pid"] != pid
    assert eventually(restarted, timeout=15), h2.client.health()
    c = Client(web, api.ip)
    try:
        assert c.request("GET", "/public/after")[0] == 200
        assert c.request("GET", "/private")[0] == 403
    finally:
        c.close()
    assert [r["path"] for r in SEEN.seen] == ["/public/before", "/public/after"]
