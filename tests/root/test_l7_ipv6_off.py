"""HTTP rules over IPv6 on a bridge whose own IPv6 is disabled, with real packets.

The steering delivers a connection to an HTTP-ruled port into the IP stack of the
endpoint's bridge (l7/proxy.py ``_delivery``), where the proxy takes it. A bridge with
``net.ipv6.conf.<bridge>.disable_ipv6 = 1`` (as Topology makes it; operators do too)
bridges IPv6 frames between its ports but its own stack drops every IPv6 packet: IPv6
connections to such a port are dropped, never passed unfiltered (fail closed), and the
agent says so in its health (degraded, the bridge and the sysctl named) until the
bridge's IPv6 is enabled; then the proxy filters them as over IPv4.

Workloads a (client, app=web), b (server, app=api) on one bridge with IPv4 and IPv6
addresses; the server in b answers on both. The host has an IPv4 address on the bridge
only, until the test enables the bridge's IPv6 and gives it one.
"""
import html
import os
import re
import time

import pytest

from agentproc import AgentProcess
from l7env import (
    API_GET_PUBLIC,
    API_L4,
    PORT,
    Client,
    Server,
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
from stockade_webui.auth import write_token_file
from traffic import eventually
from webuiproc import WebUIProcess, ui_user

pytestmark = pytest.mark.root

NET4, NET6 = "10.213.87.", "fd00:213:87::"
HOST4, HOST6 = f"{NET4}254", f"{NET6}fe"
SEEN = recorder()


def sysctl_path(dev: str) -> str:
    return f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"


@pytest.fixture(scope="module")
def env():
    with Topology("v6o") as topo:
        w = {t: topo.add_workload(t, [f"{NET4}{i}/24", f"{NET6}{i}/64"])
             for i, t in enumerate("ab", start=1)}
        route_via_host(topo, f"{HOST4}/24", w.values())
        b = w["b"]
        with serving(in_netns(b.ns, Server6, (b.ip6, PORT), SEEN),
                     in_netns(b.ns, Server, (b.ip4, PORT), SEEN)):
            with AgentProcess(**l7_settings("v6off", steering=4)) as agent:
                add_endpoints(agent, w, {"a": "web", "b": "api"})
                yield agent, w, topo


def _statuses(a, addr, paths) -> list[int]:
    c = Client(a, addr)
    try:
        return [c.request("GET", p)[0] for p in paths]
    finally:
        c.close()


def _ipv6_problems(agent) -> list[str]:
    l7 = agent.client.health().get("l7_proxy") or {}
    return [p for p in l7.get("problems") or [] if "disable_ipv6" in p]


def _metric(agent, kind: str) -> float | None:
    want = f'stockade_health_problems{{kind="{kind}"}} '
    for line in agent.client.metrics().splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    return None


def _overview(agent, tmp_path) -> str:
    """The web UI's overview, as an operator sees it: the UI run as an unprivileged user
    whose only access to the agent is the socket group; the page's text without tags."""
    os.chmod(agent.run_dir, 0o711)        # the socket's own mode and group decide
    token_file = tmp_path / "webui.token"
    token = write_token_file(str(token_file))
    with ui_user() as user, WebUIProcess({"h1": agent.socket}, str(token_file),
                                         user=user.pw_name) as ui:
        c = ui.login(token)
        try:
            r = c.get("/")
        finally:
            c.close()
        assert r.status_code == 200, r.text
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", r.text)))


def test_ipv6_to_an_http_port_on_a_bridge_without_ipv6_is_dropped_and_reported(env, tmp_path):
    agent, w, topo = env
    a, b = w["a"], w["b"]
    br = topo.bridge
    with open(sysctl_path(br)) as f:
        assert f.read().strip() == "1"            # the bridge's own IPv6 is off
    message = (f"bridge {br} has IPv6 disabled (net.ipv6.conf.{br}.disable_ipv6=1): IPv6 "
               "connections to HTTP ports of its endpoints are dropped (endpoints: b)")

    # L4 only: the bridge bridges IPv6 between its ports, nothing is steered, no problem
    apply(agent, cnp("api", API_L4))
    assert eventually(lambda: agent.client.health()["policies"] == 1, timeout=10)
    SEEN.seen.clear()
    assert _statuses(a, b.ip6, ["/public", "/private"]) == [200, 200]
    assert {r["client"] for r in SEEN.seen} == {a.ip6}
    assert _ipv6_problems(agent) == []
    assert agent.client.health()["status"] == "ok"

    # the HTTP rule: IPv4 goes through the proxy; IPv6 is dropped, the server sees none
    apply(agent, cnp("api", API_GET_PUBLIC))
    wait_proxy(agent)
    SEEN.seen.clear()
    assert _statuses(a, b.ip4, ["/public", "/private"]) == [200, 403]
    assert [(r["client"], r["path"]) for r in SEEN.seen] == [(a.ip4, "/public")]
    SEEN.seen.clear()
    t0 = time.monotonic()
    with pytest.raises(OSError):                  # no answer: the connect times out
        c = Client(a, b.ip6, timeout=2.0)
        try:
            c.request("GET", "/private")
        finally:
            c.close()
    assert time.monotonic() - t0 >= 1.5           # not refused: dropped
    assert not SEEN.seen, SEEN.seen               # never unfiltered

    # ... and said: health degraded with the bridge and the sysctl named, status, metric
    assert eventually(lambda: _ipv6_problems(agent), timeout=10), agent.client.health()
    h = agent.client.health()
    assert _ipv6_problems(agent) == [message], h["l7_proxy"]
    assert h["status"] == "degraded" and h["l7_proxy"]["running"], h
    out = agent.cli("status", check=False)
    assert out.returncode == 1 and message in out.stdout, out.stdout
    assert _metric(agent, "l7_ipv6_disabled") == 1
    page = _overview(agent, tmp_path)
    # b's port over IPv4 and IPv6; the two IPv4 requests logged; the problem a banner
    assert "HTTP proxy running" in page and "HTTP ports 2 " in page, page
    assert "Request log lines 2 Garbled 0 Dropped by the proxy 0 " in page, page
    assert message in page and "Agent unreachable" not in page, page

    # the bridge's IPv6 enabled (and a host address on it, for the proxy's route to b):
    # the problem clears without any other change, and the proxy filters IPv6
    with open(sysctl_path(br), "w") as f:
        f.write("0")
    run("ip", "-6", "addr", "add", f"{HOST6}/64", "dev", br, "nodad")
    assert eventually(lambda: not _ipv6_problems(agent), timeout=10), agent.client.health()
    assert eventually(lambda: agent.client.health()["status"] == "ok", timeout=10), \
        agent.client.health()
    assert message not in agent.cli("status").stdout
    assert _metric(agent, "l7_ipv6_disabled") == 0
    SEEN.seen.clear()
    c = Client(a, b.ip6)
    try:
        status, _, body = c.request("GET", "/public/v6")
        assert (status, body) == (200, b"ok /public/v6\n")
        status, _, body = c.request("GET", "/private")
        assert (status, body) == (403, b"Access denied\r\n")
    finally:
        c.close()
    assert [(r["client"], r["path"]) for r in SEEN.seen] == [(a.ip6, "/public/v6")]

    # disabled again (the kernel drops the bridge's IPv6 addresses): reported again
    with open(sysctl_path(br), "w") as f:
        f.write("1")
    assert eventually(lambda: _ipv6_problems(agent) == [message], timeout=10), \
        agent.client.health()
    assert agent.client.health()["status"] == "degraded"
