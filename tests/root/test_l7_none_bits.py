"""The config map's L7 "none" bits (CFG_F_L7_NO_SERVERS, CFG_F_L7_NO_CLIENTS: the tc
programs skip that kind's l7_ports lookups), read from the real agent's pinned config
map at each step, with real HTTP traffic at each step: they follow the HTTP rules (and
so the l7_ports entries), and a stale bit left in the pinned map while the agent was
down is gone before the agent steers or proxies anything again.

Namespace workloads a (client, app=web), b (server, app=api) and c (server, app=other)
on one bridge with the host's address (.254); b and c record what they receive.
tests/test_l7_config_bits.py checks the same rules after every single map write,
without a kernel.
"""
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from agentproc import AgentProcess
from l7env import Client, Server, add_endpoints, apply, cnp, l7_settings, recorder, route_via_host, serving, wait_proxy
from netns import Topology, in_netns
from pinned import dump_map
from traffic import eventually

pytestmark = pytest.mark.root

NET4 = "10.213.38."
PORT = 8080
SEEN = {"b": recorder(), "c": recorder()}

# the proxy the agent starts, through a wrapper: while the file "hold" is in the proxy's
# run directory (its cwd), the wrapper says so ("held") and waits before it runs HAProxy,
# so that a test can look at the maps and send traffic while the agent starts its proxy
WRAPPER = """#!/bin/sh
if [ -e hold ]; then
  touch held
  i=0
  while [ -e hold ] && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
fi
exec /usr/sbin/haproxy "$@"
"""


@pytest.fixture(scope="module")
def env():
    wrap_dir = Path(f"/run/stockade-l7-none-bits-{os.getpid()}")
    wrap_dir.mkdir(mode=0o755)
    try:
        wrapper = wrap_dir / "haproxy"
        wrapper.write_text(WRAPPER)
        wrapper.chmod(0o755)
        with Topology("l7b") as topo:
            w = {t: topo.add_workload(t, [f"{NET4}{i}/24"]) for i, t in enumerate("abc", start=1)}
            route_via_host(topo, f"{NET4}254/24", w.values())
            with serving(*(in_netns(w[n].ns, Server, (w[n].ip4, PORT), SEEN[n]) for n in "bc")):
                with AgentProcess(**l7_settings("nb"), l7_haproxy=str(wrapper)) as agent:
                    add_endpoints(agent, w)
                    yield agent, w
    finally:
        shutil.rmtree(wrap_dir, ignore_errors=True)


@pytest.fixture
def e(env):
    for r in SEEN.values():
        r.seen.clear()
    yield env
    env[0].client.delete_all_policies()


def _config_pin(agent) -> str:
    from stockade.datapath.pins import pin_name
    return os.path.join(agent.settings["bpffs_dir"], pin_name("config"))


def l7_bits(agent) -> int:
    """The L7 bits of the agent's pinned config map, as the programs read them."""
    from stockade.datapath import maps as m
    (raw,) = dump_map(_config_pin(agent)).values()
    return m.ConfigValue.from_buffer_copy(raw).flags & m.CFG_L7_BITS


def write_config(agent, flags: int) -> None:
    """Write the pinned config map by hand (BPF_OBJ_GET on the pin, then one update)."""
    from stockade.datapath import maps as m
    from stockade.datapath.pins import fd_update, obj_get
    fd = obj_get(_config_pin(agent))
    try:
        assert fd_update(fd, m.ct.c_uint32(0), m.ConfigValue(flags=flags)) == 0
    finally:
        os.close(fd)


def config_flags(agent) -> int:
    from stockade.datapath import maps as m
    (raw,) = dump_map(_config_pin(agent)).values()
    return m.ConfigValue.from_buffer_copy(raw).flags


def requests(w, server, *paths) -> list[int]:
    """The status of a GET of each path from a to ``server`` on one connection."""
    c = Client(w["a"], w[server].ip4)
    try:
        out = []
        for p in paths:
            status, _, body = c.request("GET", p)
            if status == 403:
                assert body == b"Access denied\r\n"
            out.append(status)
        return out
    finally:
        c.close()


def dropped(w, server) -> bool:
    """a's SYN to ``server``'s port gets no answer at all (no handshake, no reset)."""
    s = w["a"].socket()
    s.settimeout(1.0)
    try:
        s.connect((w[server].ip4, PORT))
    except TimeoutError:
        return True
    finally:
        s.close()
    return False


def seen(server) -> list[str]:
    return [r["path"] for r in SEEN[server].seen]


API_HTTP = """
endpointSelector: {matchLabels: {app: api}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules: {http: [{method: GET, path: "/public(/.*)?"}]}
"""
WEB_HTTP = """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toEndpoints: [{matchLabels: {app: api}}]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules: {http: [{method: GET, path: "/(public|egress)(/.*)?"}]}
"""
API_L4 = """
endpointSelector: {matchLabels: {app: api}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""
OTHER_L4 = """
endpointSelector: {matchLabels: {app: other}}
ingress:
  - fromEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


def test_bits_follow_the_http_rules(e):
    from stockade.datapath.maps import CFG_F_L7_NO_CLIENTS as NO_CLIENTS
    from stockade.datapath.maps import CFG_F_L7_NO_SERVERS as NO_SERVERS
    agent, w = e
    # no HTTP rule: both kinds skipped, and the port is plain L4 (no policy: open)
    assert l7_bits(agent) == NO_SERVERS | NO_CLIENTS
    assert requests(w, "b", "/public", "/private") == [200, 200]
    # b's ingress HTTP rule: servers looked up, its port filtered
    apply(agent, cnp("api", API_HTTP))
    assert l7_bits(agent) == NO_CLIENTS
    wait_proxy(agent)
    assert requests(w, "b", "/public/1", "/private", "/egress") == [200, 403, 403]
    # and a's egress HTTP rule: clients looked up too, both rule sets must pass
    apply(agent, cnp("api", API_HTTP), cnp("web", WEB_HTTP))
    assert l7_bits(agent) == 0
    assert requests(w, "b", "/public/2", "/private", "/egress") == [200, 403, 403]
    # a's egress HTTP rule alone: servers skipped again, a's egress rules filter
    apply(agent, cnp("web", WEB_HTTP))
    assert l7_bits(agent) == NO_SERVERS
    assert requests(w, "b", "/public/3", "/private", "/egress") == [200, 403, 200]
    assert seen("b") == ["/public", "/private", "/public/1", "/public/2", "/public/3", "/egress"]
    # the same ports under L4 rules only: both skipped; L4 allows a -> b, denies a -> c
    apply(agent, cnp("api", API_L4), cnp("other", OTHER_L4))
    assert l7_bits(agent) == NO_SERVERS | NO_CLIENTS
    assert requests(w, "b", "/private", "/anything") == [200, 200]
    assert seen("b")[-2:] == ["/private", "/anything"]
    assert dropped(w, "c") and seen("c") == []
    # and no policy at all: both stay skipped, every port open
    agent.client.delete_all_policies()
    assert l7_bits(agent) == NO_SERVERS | NO_CLIENTS
    assert requests(w, "c", "/private") == [200] and seen("c") == ["/private"]


@pytest.mark.parametrize("policy,stale", [("api", "NO_SERVERS"), ("web", "NO_CLIENTS")])
def test_a_stale_bit_does_not_survive_a_start(e, policy, stale):
    """With the agent down (SIGTERM: pins, programs and host steering stay, the proxy
    stops), a "none" bit is set by hand for the kind whose entries the pinned l7_ports
    holds and the other kind's bit is cleared (both wrong): the programs skip the L7
    port, /private reaches b unfiltered. The agent is started again on the same pins and
    state; while it starts its proxy (held by the wrapper) the bits are already right:
    the port is steered again, to no proxy yet, so a's SYN is dropped, never passed."""
    from stockade.datapath import maps as m
    agent, w = e
    bit = getattr(m, f"CFG_F_L7_{stale}")
    other = m.CFG_L7_BITS & ~bit
    apply(agent, cnp(policy, API_HTTP if policy == "api" else WEB_HTTP))
    wait_proxy(agent)
    assert l7_bits(agent) == other
    assert requests(w, "b", "/public", "/private") == [200, 403]
    run_dir = Path(agent.settings["l7_run_dir"])
    hold, held = run_dir / "hold", run_dir / "held"
    agent.kill(signal.SIGTERM)
    write_config(agent, (config_flags(agent) & ~m.CFG_L7_BITS) | bit)
    assert l7_bits(agent) == bit
    assert requests(w, "b", "/private") == [200]       # what a stale bit does: no proxy
    assert seen("b") == ["/public", "/private"]
    hold.touch()
    started: list = []
    t = threading.Thread(target=lambda: started.append(agent.start()), daemon=True)
    t.start()
    try:
        assert eventually(held.exists, timeout=60), agent.log()
        assert l7_bits(agent) == other, "a stale bit outlived the agent's start"
        assert dropped(w, "b")
    finally:
        hold.unlink(missing_ok=True)
        t.join(timeout=90)
    held.unlink(missing_ok=True)
    assert started, agent.log()
    wait_proxy(agent)
    assert l7_bits(agent) == other
    assert requests(w, "b", "/public/after", "/private") == [200, 403]
    assert seen("b") == ["/public", "/private", "/public/after"]


def test_no_stale_bit_without_entries(e):
    """The other direction at start: no l7_ports entry and both bits cleared by hand
    (harmless: lookups that find nothing); after a start both kinds are skipped again."""
    from stockade.datapath import maps as m
    agent, w = e
    assert l7_bits(agent) == m.CFG_L7_BITS
    agent.kill(signal.SIGTERM)
    write_config(agent, config_flags(agent) & ~m.CFG_L7_BITS)
    agent.start()
    assert l7_bits(agent) == m.CFG_L7_BITS
    assert requests(w, "b", "/private") == [200]
