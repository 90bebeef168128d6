"""IPv6 neighbour discovery and MLD on real veths (issue 14 item 4): the covert
channel and neighbour-cache poisoning with real packets, and link-local addresses
learned from the workload's namespace.

Topology (tests/dpenv.py): A, B and C are endpoints (identities 1001-1003) on one
bridge; R ("router", no programs on its veth) stands for the host or a gateway. B
also holds fd57:beef::2 in another /64: the "global host" a covert channel would
reach. Frames are hand-built (tests/packets.py) and sent raw from the workloads'
namespaces; whether they arrive is seen by a packet socket at the receiver.
"""
from __future__ import annotations

import json
import os
import socket
import time

import pytest

import packets as P
import traffic
from dpenv import ID_A, ID_B, ID_C, datapath_env
from netns import run
from stockade.datapath import Reason, Verdict, attach, detach
from stockade.datapath.writer import eui64_link_local
from stockade.discovery import link_local_addresses, peer_link_local_addresses
from stockade.policy.mapstate import EGRESS, INGRESS, DirectionPolicy

pytestmark = pytest.mark.root

DEFAULT_DENY = DirectionPolicy(enforced=True, default_deny=True)
SETTINGS = {"STOCKADE_PIN_DIR": f"/sys/fs/bpf/stockade-test-{os.getpid()}-nd", "CT_MAX": 4096}
OFFLINK = "fd57:beef::2"
QUIET = 0.3   # how long a frame that must not arrive is waited for


@pytest.fixture(scope="module")
def env():
    with datapath_env(SETTINGS, {"a": ["10.213.9.1/24", "fd57:9::1/64"],
                                 "b": ["10.213.9.2/24", "fd57:9::2/64", f"{OFFLINK}/64"],
                                 "c": ["10.213.9.3/24", "fd57:9::3/64"],
                                 "r": ["fd57:9::fe/64"]},
                      tag="n", unattached=("r",)) as env:
        env.endpoints = {"a": ID_A, "b": ID_B, "c": ID_C}
        for w in env.w.values():
            w.ll = str(eui64_link_local(P.mac_bytes(w.mac)))
        # duplicate address detection of the link-local addresses must be over
        assert traffic.eventually(lambda: not any(
            w.exec("ip", "-6", "addr", "show", "dev", "eth0", "tentative").stdout.strip()
            for w in env.w.values()), timeout=10)
        yield env


@pytest.fixture
def e(env):
    env.reset()
    yield env
    env.reset()


def arrives(sender, receiver, frame: bytes, timeout: float = QUIET) -> bool:
    with traffic.Capture(receiver) as cap:
        traffic.send_frames(sender, [frame])
        return cap.wait(lambda f: f == frame, timeout)


def mc(addr):
    return P.multicast_mac(addr)


# -- the covert channel: ND/MLD from an endpoint must stay on the link ---------------
def _mld2(e, dst, hop):
    a = e.a
    return P.nd_frame(a.mac, mc(dst) if dst.startswith("ff") else e.b.mac, a.ll, dst,
                      P.MLD2_REPORT, b"", hop=hop, rest=b"\0\0\0\0")


EGRESS_CASES = [
    # id, frame builder, arrives at B, (reason of the drop)
    ("ns-to-offlink-global", lambda e: P.ns_frame(e.a.mac, e.b.mac, e.a.ll, OFFLINK, OFFLINK),
     False, Reason.POLICY_DENIED),
    ("ns-from-global-to-offlink", lambda e: P.ns_frame(e.a.mac, e.b.mac, e.a.ip6, OFFLINK, OFFLINK),
     False, Reason.POLICY_DENIED),
    ("na-to-offlink-global", lambda e: P.na_frame(e.a.mac, e.b.mac, e.a.ip6, OFFLINK, e.a.ip6),
     False, Reason.POLICY_DENIED),
    ("rs-to-offlink-global", lambda e: P.nd_frame(e.a.mac, e.b.mac, e.a.ll, OFFLINK, P.RS,
                                                  P.lladdr_opt(1, e.a.mac)),
     False, Reason.POLICY_DENIED),
    ("mld-report-to-global-unicast", lambda e: _mld2(e, OFFLINK, 1), False, Reason.POLICY_DENIED),
    ("ns-hop-limit-64", lambda e: P.ns_frame(e.a.mac, mc(P.solicited_node(e.b.ip6)), e.a.ll,
                                             P.solicited_node(e.b.ip6), e.b.ip6, hop=64),
     False, Reason.POLICY_DENIED),
    ("mld-report-hop-limit-255", lambda e: _mld2(e, "ff02::16", 255), False, Reason.POLICY_DENIED),
    ("ns-to-site-scope-multicast", lambda e: P.ns_frame(e.a.mac, mc("ff05::1:ff00:2"), e.a.ll,
                                                        "ff05::1:ff00:2", e.b.ip6),
     False, Reason.POLICY_DENIED),
    ("router-advertisement", lambda e: P.nd_frame(e.a.mac, mc("ff02::1"), e.a.ll, "ff02::1", P.RA,
                                                  b"\0" * 8, rest=b"\x40\0\x07\x08"),
     False, Reason.SPOOFED),
    ("redirect", lambda e: P.nd_frame(e.a.mac, e.b.mac, e.a.ll, e.b.ll, P.REDIRECT,
                                      P.ip6(e.c.ll) + P.ip6(OFFLINK)), False, Reason.SPOOFED),
    ("ns-solicited-node", lambda e: P.ns_frame(e.a.mac, mc(P.solicited_node(e.b.ip6)), e.a.ll,
                                               P.solicited_node(e.b.ip6), e.b.ip6), True, None),
    ("ns-unicast-same-64", lambda e: P.ns_frame(e.a.mac, e.b.mac, e.a.ip6, e.b.ip6, e.b.ip6),
     True, None),
    ("na-to-link-local", lambda e: P.na_frame(e.a.mac, e.b.mac, e.a.ll, e.b.ll, e.a.ip6,
                                              P.NA_SOLICITED), True, None),
    ("mld2-report", lambda e: _mld2(e, "ff02::16", 1), True, None),
    ("rs-all-routers", lambda e: P.nd_frame(e.a.mac, mc("ff02::2"), e.a.ll, "ff02::2", P.RS,
                                            P.lladdr_opt(1, e.a.mac)), True, None),
    ("dad-own-address", lambda e: P.ns_frame(e.a.mac, mc(P.solicited_node(e.a.ip6)), "::",
                                             P.solicited_node(e.a.ip6), e.a.ip6), True, None),
]


@pytest.mark.parametrize("build,arrive,reason", [c[1:] for c in EGRESS_CASES],
                         ids=[c[0] for c in EGRESS_CASES])
def test_nd_from_endpoint_stays_on_link(e, build, arrive, reason):
    """A's egress is default deny with no rule: ND passes only as link traffic."""
    e.policy({}, {(ID_A, EGRESS): DEFAULT_DENY})
    assert arrives(e.a, e.b, build(e), timeout=1.0 if arrive else QUIET) == arrive
    if arrive:
        assert e.count(EGRESS, Verdict.FORWARDED, Reason.NEIGH) >= 1
    else:
        assert e.count(EGRESS, Verdict.DROPPED, reason) == 1


def test_covert_frame_reaches_the_global_host_without_stockade(e):
    """Control: the same NS to the off-link address does arrive when A's veth carries
    no programs, so the drop above is the datapath's doing."""
    frame = EGRESS_CASES[0][1](e)
    detach(e.a.host_ifindex)
    try:
        assert arrives(e.a, e.b, frame, timeout=1.0)
    finally:
        attach(e.a.host_ifindex, e.dp.from_endpoint_fd, e.dp.to_endpoint_fd)


INGRESS_CASES = [
    # id, (sender tag, frame builder), arrives at B
    ("ns-hop-limit-64-to-global", "a",
     lambda e: P.ns_frame(e.a.mac, e.b.mac, e.a.ip6, e.b.ip6, e.b.ip6, hop=64), False),
    ("ns-hop-limit-255-to-global", "a",
     lambda e: P.ns_frame(e.a.mac, e.b.mac, e.a.ip6, e.b.ip6, e.b.ip6), True),
    ("ra-from-link-local", "r",
     lambda e: P.nd_frame(e.r.mac, mc("ff02::1"), e.r.ll, "ff02::1", P.RA, b"\0" * 8,
                          rest=b"\x40\0\x07\x08"), True),
    ("ra-from-global", "r",
     lambda e: P.nd_frame(e.r.mac, mc("ff02::1"), e.r.ip6, "ff02::1", P.RA, b"\0" * 8,
                          rest=b"\x40\0\x07\x08"), False),
    ("ra-hop-limit-64", "r",
     lambda e: P.nd_frame(e.r.mac, mc("ff02::1"), e.r.ll, "ff02::1", P.RA, b"\0" * 8,
                          hop=64, rest=b"\x40\0\x07\x08"), False),
    ("redirect-from-link-local", "r",
     lambda e: P.nd_frame(e.r.mac, e.b.mac, e.r.ll, e.b.ll, P.REDIRECT,
                          P.ip6(e.r.ll) + P.ip6(OFFLINK)), True),
    ("redirect-hop-limit-64", "r",
     lambda e: P.nd_frame(e.r.mac, e.b.mac, e.r.ll, e.b.ll, P.REDIRECT,
                          P.ip6(e.r.ll) + P.ip6(OFFLINK), hop=64), False),
    ("mld-query-hop-limit-1", "r",
     lambda e: P.nd_frame(e.r.mac, mc("ff02::1"), e.r.ll, "ff02::1", P.MLD_QUERY,
                          b"\0" * 16, hop=1), True),
    ("mld-query-hop-limit-255", "r",
     lambda e: P.nd_frame(e.r.mac, mc("ff02::1"), e.r.ll, "ff02::1", P.MLD_QUERY,
                          b"\0" * 16, hop=255), False),
]


@pytest.mark.parametrize("sender,build,arrive", [c[1:] for c in INGRESS_CASES],
                         ids=[c[0] for c in INGRESS_CASES])
def test_nd_toward_endpoint_must_be_link_traffic(e, sender, build, arrive):
    """B's ingress is default deny: ND reaches it only with the right hop limit and
    scope; router advertisements and redirects only from a link-local source."""
    e.policy({}, {(ID_B, INGRESS): DEFAULT_DENY})
    assert arrives(e.w[sender], e.b, build(e), timeout=1.0 if arrive else QUIET) == arrive
    if not arrive:
        assert e.count(INGRESS, Verdict.DROPPED, Reason.POLICY_DENIED) == 1


# -- neighbour-cache poisoning ----------------------------------------------------------
def neigh_mac(w, addr: str) -> str | None:
    out = w.exec("ip", "-j", "-6", "neigh", "show", addr, "dev", "eth0").stdout
    entries = json.loads(out or "[]")
    return entries[0].get("lladdr") if entries else None


def _poison_na(e, owner):
    """Unsolicited NA (override) claiming ``owner``'s link-local for A's MAC."""
    return P.na_frame(e.a.mac, mc("ff02::1"), e.a.ll, "ff02::1", e.w[owner].ll, P.NA_OVERRIDE)


def _poison_ns(e, owner):
    """NS to C from ``owner``'s link-local with A's MAC as source link-layer address."""
    c = e.c
    return P.eth(mc(P.solicited_node(c.ll)), e.a.mac, P.ETH_IPV6,
                 P.ipv6(e.w[owner].ll, P.solicited_node(c.ll), P.ICMPV6,
                        P.icmp6(e.w[owner].ll, P.solicited_node(c.ll), P.NS, 0, b"\0" * 4,
                                P.ip6(c.ll) + P.lladdr_opt(1, e.a.mac)), hop=255))


def _poison_dad(e, owner):
    """Duplicate address detection for ``owner``'s address: would make it give it up."""
    target = e.w[owner].ll
    return P.ns_frame(e.a.mac, mc(P.solicited_node(target)), "::", P.solicited_node(target),
                      target)


POISON = [("na-target", _poison_na), ("ns-source", _poison_ns), ("dad-for-other", _poison_dad)]


@pytest.mark.parametrize("owner", ["b", "r"], ids=["neighbour-ll", "gateway-ll"])
@pytest.mark.parametrize("build", [p[1] for p in POISON], ids=[p[0] for p in POISON])
def test_neighbour_cache_poisoning_dropped(e, owner, build):
    """A claims another machine's link-local address (a neighbour's, or the gateway's):
    dropped as spoofed, and C's neighbour entry keeps the owner's MAC."""
    c, addr, real = e.c, e.w[owner].ll, e.w[owner].mac
    c.exec("ip", "-6", "neigh", "replace", addr, "lladdr", real, "dev", "eth0", "nud", "stale")
    try:
        traffic.send_frames(e.a, [build(e, owner)])
        assert traffic.eventually(
            lambda: e.count(EGRESS, Verdict.DROPPED, Reason.SPOOFED) == 1, timeout=2)
        time.sleep(QUIET)
        assert neigh_mac(c, addr) == real
    finally:
        c.exec("ip", "-6", "neigh", "del", addr, "dev", "eth0", check=False)


@pytest.mark.parametrize("build", [_poison_na, _poison_ns], ids=["na-target", "ns-source"])
def test_poisoning_works_without_stockade(e, build):
    """Control: without programs on A's veth the same frames do poison C's cache."""
    c, addr = e.c, e.b.ll
    c.exec("ip", "-6", "neigh", "replace", addr, "lladdr", e.b.mac, "dev", "eth0", "nud", "stale")
    detach(e.a.host_ifindex)
    try:
        traffic.send_frames(e.a, [build(e, "b")])
        assert traffic.eventually(lambda: neigh_mac(c, addr) == e.a.mac, timeout=2)
    finally:
        attach(e.a.host_ifindex, e.dp.from_endpoint_fd, e.dp.to_endpoint_fd)
        c.exec("ip", "-6", "neigh", "del", addr, "dev", "eth0", check=False)


def test_own_advertisement_still_updates_caches(e):
    """A's NA for its own link-local address is ordinary ND: C learns it."""
    c = e.c
    c.exec("ip", "-6", "neigh", "replace", e.a.ll, "lladdr", "02:00:00:00:00:01", "dev", "eth0",
           "nud", "stale")
    try:
        frame = P.na_frame(e.a.mac, mc("ff02::1"), e.a.ll, "ff02::1", e.a.ll, P.NA_OVERRIDE)
        traffic.send_frames(e.a, [frame])
        assert traffic.eventually(lambda: neigh_mac(c, e.a.ll) == e.a.mac, timeout=2)
        assert e.count(EGRESS, Verdict.DROPPED, Reason.SPOOFED) == 0
    finally:
        c.exec("ip", "-6", "neigh", "del", e.a.ll, "dev", "eth0", check=False)


# -- link-local addresses learned from the namespace --------------------------------------
@pytest.fixture
def stable_privacy(e):
    """C with a stable-privacy (RFC 7217) link-local address instead of the EUI-64 one."""
    c = e.c
    c.exec("ip", "link", "set", "eth0", "down")
    c.exec("sysctl", "-qw", "net.ipv6.conf.eth0.stable_secret=fd57::1:2:3:4")
    c.exec("ip", "link", "set", "eth0", "addrgenmode", "stable_secret")
    c.exec("ip", "link", "set", "eth0", "up")
    for a in c.addrs:  # addresses given without nodad again after the link went down
        c.exec("ip", "addr", "replace", a, "dev", "eth0", *(["nodad"] if ":" in a else []))
    assert traffic.eventually(lambda: not c.exec("ip", "-6", "addr", "show", "dev", "eth0",
                                                 "tentative").stdout.strip(), timeout=10)
    try:
        yield c
    finally:
        c.exec("ip", "link", "set", "eth0", "down")
        c.exec("ip", "link", "set", "eth0", "addrgenmode", "eui64")
        c.exec("ip", "link", "set", "eth0", "up")
        for a in c.addrs:
            c.exec("ip", "addr", "replace", a, "dev", "eth0", *(["nodad"] if ":" in a else []))
        traffic.eventually(lambda: not c.exec("ip", "-6", "addr", "show", "dev", "eth0",
                                              "tentative").stdout.strip(), timeout=10)


def stable_privacy_bridge(w) -> str:
    """The bridge ``w``'s host veth is enslaved to (not a veth: no peer namespace)."""
    return json.loads(run("ip", "-j", "link", "show", w.host_if).stdout)[0]["master"]


def test_link_local_addresses_read_in_the_namespace(stable_privacy):
    c = stable_privacy
    shown = json.loads(c.exec("ip", "-j", "-6", "addr", "show", "dev", "eth0", "scope",
                              "link").stdout)[0]["addr_info"]
    want = [a["local"] for a in shown if a.get("family") == "inet6"]
    assert len(want) == 1 and want[0] != c.ll        # not the MAC-derived one
    assert link_local_addresses(netns_path=f"/run/netns/{c.ns}") == want
    assert link_local_addresses(netns_path=f"/run/netns/{c.ns}", ifname="nope") == []
    assert link_local_addresses(netns_path="/run/netns/no-such-namespace") == []
    # from the host end of the veth, as the agent has it for any endpoint
    assert peer_link_local_addresses(c.host_ifindex) == want
    assert peer_link_local_addresses(socket.if_nametoindex(stable_privacy_bridge(c))) == []


def test_stable_privacy_link_local_needs_learning(e, stable_privacy):
    """C pings B's link-local address from its stable-privacy one: its neighbour
    solicitation is spoofed until the endpoint carries the learned address."""
    c = stable_privacy
    learned = link_local_addresses(netns_path=f"/run/netns/{c.ns}")
    c.exec("ip", "-6", "neigh", "flush", "dev", "eth0")
    target = f"{e.b.ll}%eth0"
    assert not traffic.ping_ok(c, target)
    assert e.count(EGRESS, Verdict.DROPPED, Reason.SPOOFED) >= 1
    e.dp.set_endpoint(c.host_ifindex, 3, ID_C, c.ips, mac=c.mac, link_local=learned)
    assert traffic.eventually(lambda: traffic.ping_ok(c, target), timeout=10)


def test_link_local_must_be_link_local(e):
    from stockade.datapath import DatapathError
    with pytest.raises(DatapathError, match="fd57:9::1 is not an IPv6 link-local address"):
        e.dp.set_endpoint(e.a.host_ifindex, 1, ID_A, e.a.ips, link_local=["fd57:9::1"])
    with pytest.raises(DatapathError, match="too many IPv6 link-local addresses"):
        e.dp.set_endpoint(e.a.host_ifindex, 1, ID_A, e.a.ips, mac=e.a.mac,
                          link_local=[f"fe80::{i}" for i in range(1, 5)])
    info = e.dp.get_endpoint(e.a.host_ifindex)
    assert info.n_ll == 1 and bytes(info.ll[0].w) == socket.inet_pton(socket.AF_INET6, e.a.ll)


def test_unknown_bridge_port_gets_host_ifindex(e):
    """set_endpoint finds the bridge an interface belongs to (DHCP goes there)."""
    bridge = socket.if_nametoindex(e.topo.bridge)
    assert e.dp.get_endpoint(e.a.host_ifindex).host_ifindex == bridge
    run("ip", "link", "set", e.r.host_if, "nomaster")
    try:
        e.dp.set_endpoint(e.r.host_ifindex, 9, 1009, e.r.ips)
        assert e.dp.get_endpoint(e.r.host_ifindex).host_ifindex == e.r.host_ifindex
    finally:
        e.dp.del_endpoint(e.r.host_ifindex)
        run("ip", "link", "set", e.r.host_if, "master", e.topo.bridge)
