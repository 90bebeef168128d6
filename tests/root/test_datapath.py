"""Real programs on real veths: policy, conntrack, anti-spoofing, audit, counters.

Topology (tests/netns.py): workloads A, B and C in their own namespaces, their
host-side veths on one bridge in the root namespace, both programs attached to every
host-side veth. A and B are endpoints (identities 1001 and 1002, in the ipcache);
C has no endpoints entry unless a test writes one. Map contents are built directly
from stockade.policy.mapstate types, no compiler involved.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import threading
import time

import pytest

import packets as P
import traffic
from dpenv import datapath_env  # tests/ is on sys.path (tests/conftest.py)
from stockade.datapath import CapacityError, Datapath, Reason, Verdict, attach, list_attached
from stockade.datapath import maps as m
from stockade.datapath.attachments import programs_on as attach_programs
from stockade.datapath.errors import InterfaceGone
from stockade.policy.mapstate import (
    ANY_PEER,
    EGRESS,
    INGRESS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    DirectionPolicy,
    Entry,
    Key,
    diff,
    lookup,
    port_prefixes,
)
from traffic import fam

pytestmark = pytest.mark.root

ID_A, ID_B, WORLD = 1001, 1002, 2
ALLOW, DENY = Entry(deny=False), Entry(deny=True)
DEFAULT_DENY = DirectionPolicy(enforced=True, default_deny=True)
ALLOW_ON_MISS = DirectionPolicy(enforced=True, default_deny=False)
FAIL_TIMEOUT = 0.6
SETTINGS = {
    "STOCKADE_PIN_DIR": f"/sys/fs/bpf/stockade-test-{os.getpid()}",
    "POLICY_MAX": 64,       # small, for the capacity test
    "CT_MAX": 4096,
}


# -- fixtures ------------------------------------------------------------------
@pytest.fixture(scope="module")
def env():
    """Compile once, build the topology, attach to every host-side veth."""
    with datapath_env(SETTINGS, {"a": ["10.213.7.1/24", "fd57:ade::1/64"],
                                 "b": ["10.213.7.2/24", "fd57:ade::2/64"],
                                 "c": ["10.213.7.3/24", "fd57:ade::3/64"]}) as env:
        yield env


@pytest.fixture
def e(env):
    env.reset()
    yield env
    env.reset()


# -- traffic helpers (tests/traffic.py), with this module's shorter timeout ------
def tcp_ok(client, server, addr, port, timeout=FAIL_TIMEOUT) -> bool:
    return traffic.tcp_ok(client, server, addr, port, timeout)


def udp_ok(client, server, addr, port, size=16, timeout=FAIL_TIMEOUT, src=None) -> bool:
    return traffic.udp_ok(client, server, addr, port, size, timeout, src)


def ping_ok(w, addr) -> bool:
    return traffic.ping_ok(w, addr)


def tcp_key(local, peer, direction, port, plen=16):
    return Key(local, peer, direction, PROTO_TCP, port, plen)


# -- policy decisions ----------------------------------------------------------
RANGE = {tcp_key(ID_A, ID_B, EGRESS, p, plen): ALLOW for p, plen in port_prefixes(8000, 8191)}
POLICY_CASES = [
    # id, entries, flags, port, allowed, (direction, reason) of the drop
    ("exact-port", {tcp_key(ID_A, ID_B, EGRESS, 8080): ALLOW}, {(ID_A, EGRESS): DEFAULT_DENY},
     8080, True, None),
    ("other-port", {tcp_key(ID_A, ID_B, EGRESS, 8080): ALLOW}, {(ID_A, EGRESS): DEFAULT_DENY},
     8081, False, (EGRESS, Reason.POLICY_DENIED)),
    ("range-last", RANGE, {(ID_A, EGRESS): DEFAULT_DENY}, 8191, True, None),
    ("range-outside", RANGE, {(ID_A, EGRESS): DEFAULT_DENY}, 8192, False,
     (EGRESS, Reason.POLICY_DENIED)),
    ("any-peer-allow", {tcp_key(ID_A, ANY_PEER, EGRESS, 8080): ALLOW},
     {(ID_A, EGRESS): DEFAULT_DENY}, 8080, True, None),
    ("exact-deny-beats-any-allow", {tcp_key(ID_A, ANY_PEER, EGRESS, 8080): ALLOW,
                                    Key(ID_A, ID_B, EGRESS): DENY},
     {(ID_A, EGRESS): DEFAULT_DENY}, 8080, False, (EGRESS, Reason.POLICY_DENY_RULE)),
    ("any-deny-beats-exact-allow", {tcp_key(ID_A, ID_B, EGRESS, 8080): ALLOW,
                                    Key(ID_A, ANY_PEER, EGRESS, PROTO_TCP): DENY},
     {(ID_A, EGRESS): DEFAULT_DENY}, 8080, False, (EGRESS, Reason.POLICY_DENY_RULE)),
    ("enforced-allow-on-miss", {}, {(ID_A, EGRESS): ALLOW_ON_MISS}, 8080, True, None),
    ("default-deny-miss", {}, {(ID_A, EGRESS): DEFAULT_DENY}, 8080, False,
     (EGRESS, Reason.POLICY_DENIED)),
    ("not-enforced-ignores-entries", {Key(ID_A, ID_B, EGRESS): DENY}, {}, 8080, True, None),
    ("world-entry-not-for-b", {Key(ID_A, WORLD, EGRESS): ALLOW}, {(ID_A, EGRESS): DEFAULT_DENY},
     8080, False, (EGRESS, Reason.POLICY_DENIED)),
    ("ingress-allow", {tcp_key(ID_B, ID_A, INGRESS, 8080): ALLOW},
     {(ID_B, INGRESS): DEFAULT_DENY}, 8080, True, None),
    ("ingress-other-port", {tcp_key(ID_B, ID_A, INGRESS, 8080): ALLOW},
     {(ID_B, INGRESS): DEFAULT_DENY}, 8081, False, (INGRESS, Reason.POLICY_DENIED)),
]


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("entries,flags,port,allowed,drop", [c[1:] for c in POLICY_CASES],
                         ids=[c[0] for c in POLICY_CASES])
def test_tcp_policy(e, family, entries, flags, port, allowed, drop):
    """A connects to B:port; the datapath agrees with mapstate.lookup()."""
    on_b = any(k[0] == ID_B for k in list(entries) + list(flags))
    local, peer, direction = (ID_B, ID_A, INGRESS) if on_b else (ID_A, ID_B, EGRESS)
    verdict, _ = lookup(entries, flags, local, peer, direction, PROTO_TCP, port)
    assert (verdict in ("allow", "not-enforced")) == allowed  # the table is consistent
    e.policy(entries, flags)
    addr = e.b.ip4 if family == 4 else e.b.ip6
    assert tcp_ok(e.a, e.b, addr, port) == allowed
    if drop:
        assert e.count(drop[0], Verdict.DROPPED, drop[1]) >= 1
    else:
        assert e.count(EGRESS, Verdict.DROPPED, Reason.POLICY_DENIED) == 0


def test_tcp_replies_pass_without_policy(e):
    """Only A->B:8080 is allowed; replies flow, B cannot open a connection to A."""
    e.policy({tcp_key(ID_A, ID_B, EGRESS, 8080): ALLOW},
             {(ID_A, EGRESS): DEFAULT_DENY, (ID_A, INGRESS): DEFAULT_DENY,
              (ID_B, EGRESS): DEFAULT_DENY})
    assert tcp_ok(e.a, e.b, e.b.ip4, 8080)
    assert e.count(EGRESS, Verdict.FORWARDED, Reason.CT_ESTABLISHED) >= 1  # B's replies
    assert e.count(INGRESS, Verdict.FORWARDED, Reason.CT_ESTABLISHED) >= 1  # to A
    assert not tcp_ok(e.b, e.a, e.a.ip4, 8080)
    states = {v.state for k, v in e.dp.ct_entries() if k.proto == PROTO_TCP}
    assert m.CT_STATE_ESTABLISHED in states or m.CT_STATE_CLOSING in states


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_udp_by_port_and_reply(e, family):
    e.policy({Key(ID_A, ID_B, EGRESS, PROTO_UDP, 5353, 16): ALLOW},
             {(ID_A, EGRESS): DEFAULT_DENY, (ID_A, INGRESS): DEFAULT_DENY})
    addr = e.b.ip4 if family == 4 else e.b.ip6
    assert udp_ok(e.a, e.b, addr, 5353)
    assert not udp_ok(e.a, e.b, addr, 5354)
    # B answers from 5353 to A's port: a reply, passes A's default-deny ingress
    srv = e.b.socket(fam(addr), socket.SOCK_DGRAM)
    cli = e.a.socket(fam(addr), socket.SOCK_DGRAM)
    try:
        srv.bind((addr, 5353))
        srv.settimeout(FAIL_TIMEOUT)
        cli.settimeout(FAIL_TIMEOUT)
        cli.sendto(b"q", (addr, 5353))
        data, peer = srv.recvfrom(16)
        srv.sendto(b"r", peer)
        assert cli.recv(16) == b"r"
    finally:
        srv.close()
        cli.close()


@pytest.mark.parametrize("family,proto,echo,other", [
    (4, PROTO_ICMP, 8, 13), (6, PROTO_ICMPV6, 128, 129)], ids=["icmp", "icmpv6"])
def test_icmp_echo_by_type(e, family, proto, echo, other):
    flags = {(ID_A, EGRESS): DEFAULT_DENY, (ID_A, INGRESS): DEFAULT_DENY}
    addr = e.b.ip4 if family == 4 else e.b.ip6
    e.policy({Key(ID_A, ID_B, EGRESS, proto, other, 16): ALLOW}, flags)
    assert not ping_ok(e.a, addr)
    e.policy({Key(ID_A, ID_B, EGRESS, proto, echo, 16): ALLOW}, flags)
    assert ping_ok(e.a, addr)   # echo reply passes A's ingress as a reply


ICMP_KINDS = {4: dict(proto=PROTO_ICMP, error=3, echo=8, other=13),
              6: dict(proto=PROTO_ICMPV6, error=1, echo=128, other=200)}


def _icmp_sock(w, family):
    if family == 4:
        return w.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    return w.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)


def _icmp_msg(family, type_, ident=0):
    rest = struct.pack("!HH", ident, 1)
    if family == 4:
        return P.icmp4(type_, 0, rest, b"stockade")
    return struct.pack("!BBH", type_, 0, 0) + rest + b"stockade"   # the kernel sums v6


def _icmp_arrives(sender, receiver, family, addr, type_, ident=0) -> bool:
    """``sender`` sends one ICMP message of ``type_``; does ``receiver`` get it?"""
    rx, tx = _icmp_sock(receiver, family), _icmp_sock(sender, family)
    try:
        rx.settimeout(FAIL_TIMEOUT)
        tx.sendto(_icmp_msg(family, type_, ident), (addr, 0))
        while True:
            try:
                data = rx.recv(2048)
            except socket.timeout:
                return False
            off = (data[0] & 0xF) * 4 if family == 4 else 0
            if data[off] == type_ and data[off + 4:off + 6] == struct.pack("!H", ident):
                return True
    finally:
        rx.close()
        tx.close()


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("first", ["error", "echo-id-0"])
def test_icmp_type_is_in_the_conntrack_key(e, family, first):
    """An allowed error (or an echo with identifier 0) from A to B opens nothing for
    other ICMP types from B: they are judged by A's default-deny ingress."""
    k = ICMP_KINDS[family]
    a, b = e.a, e.b
    addr_a, addr_b = (a.ip4, b.ip4) if family == 4 else (a.ip6, b.ip6)
    e.policy({Key(ID_A, ID_B, EGRESS, k["proto"], k[first.split("-")[0]], 16): ALLOW},
             {(ID_A, EGRESS): DEFAULT_DENY, (ID_A, INGRESS): DEFAULT_DENY})
    type_ = k["error"] if first == "error" else k["echo"]
    assert _icmp_arrives(a, b, family, addr_b, type_, 0)
    assert not _icmp_arrives(b, a, family, addr_a, k["other"], 0)
    assert e.count(INGRESS, Verdict.DROPPED, Reason.POLICY_DENIED) == 1


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_echo_request_is_not_a_reply(e, family):
    """A pings B (identifier 7): B's echo reply passes A's default-deny ingress, an
    echo request from B with the same identifier does not."""
    k = ICMP_KINDS[family]
    a, b = e.a, e.b
    addr_a, addr_b = (a.ip4, b.ip4) if family == 4 else (a.ip6, b.ip6)
    e.policy({Key(ID_A, ID_B, EGRESS, k["proto"], k["echo"], 16): ALLOW},
             {(ID_A, EGRESS): DEFAULT_DENY, (ID_A, INGRESS): DEFAULT_DENY})
    assert _icmp_arrives(a, b, family, addr_b, k["echo"], 7)
    assert not _icmp_arrives(b, a, family, addr_a, k["echo"], 7)
    assert e.count(INGRESS, Verdict.DROPPED, Reason.POLICY_DENIED) == 1
    assert _icmp_arrives(b, a, family, addr_a, k["echo"] - 8 if family == 4 else 129, 7)


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("closed,direction", [((ID_A, INGRESS), INGRESS),
                                              ((ID_B, EGRESS), EGRESS)],
                         ids=["a-ingress-default-deny", "b-egress-default-deny"])
def test_icmp_error_for_tracked_flow_passes(e, family, closed, direction):
    """B's port unreachable for A's UDP passes both hooks though policy would drop it."""
    e.policy({}, {closed: DEFAULT_DENY})
    addr = e.b.ip4 if family == 4 else e.b.ip6
    cli = e.a.socket(fam(addr), socket.SOCK_DGRAM)
    try:
        cli.settimeout(FAIL_TIMEOUT)
        cli.connect((addr, 9))
        cli.send(b"x")
        with pytest.raises(ConnectionRefusedError):
            cli.recv(16)
    finally:
        cli.close()
    assert e.count(direction, Verdict.FORWARDED, Reason.CT_RELATED) >= 1
    assert e.count(direction, Verdict.DROPPED, Reason.POLICY_DENIED) == 0


# -- fragments -------------------------------------------------------------------
FRAG_FLAGS = {(ID_A, EGRESS): DEFAULT_DENY, (ID_A, INGRESS): DEFAULT_DENY,
              (ID_B, INGRESS): DEFAULT_DENY}


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("port,received", [(5353, True), (5354, False)],
                         ids=["allowed-port", "denied-port"])
def test_fragmented_udp_judged_by_first_fragment_ports(e, family, port, received):
    """A 4,000-byte datagram leaves A in three fragments; only the first carries the
    UDP header. A's egress and B's ingress both allow UDP 5353 only: the later
    fragments are judged by the first one's ports, both ways (the reply too)."""
    e.policy({Key(ID_A, ID_B, EGRESS, PROTO_UDP, 5353, 16): ALLOW,
              Key(ID_B, ID_A, INGRESS, PROTO_UDP, 5353, 16): ALLOW}, FRAG_FLAGS)
    addr = e.b.ip4 if family == 4 else e.b.ip6
    assert udp_ok(e.a, e.b, addr, port, size=4000) == received
    assert e.count(EGRESS, Verdict.DROPPED, Reason.FRAGMENT_ORPHAN) == 0
    if received:
        assert e.count(EGRESS, Verdict.FORWARDED, Reason.CT_ESTABLISHED) >= 2
        assert e.count(INGRESS, Verdict.FORWARDED, Reason.CT_ESTABLISHED) >= 2
        assert e.count(EGRESS, Verdict.DROPPED, Reason.POLICY_DENIED) == 0
        # and the fragmented reply passes A's default-deny ingress as part of the flow
        srv = e.b.socket(fam(addr), socket.SOCK_DGRAM)
        cli = e.a.socket(fam(addr), socket.SOCK_DGRAM)
        try:
            srv.bind((addr, port))
            for s in (srv, cli):
                s.settimeout(FAIL_TIMEOUT)
            cli.sendto(b"q" * 3000, (addr, port))
            data, peer = srv.recvfrom(65535)
            srv.sendto(b"r" * 3000, peer)
            assert cli.recv(65535) == b"r" * 3000
        finally:
            srv.close()
            cli.close()
    else:
        # the first fragment and the later ones: all denied by port
        assert e.count(EGRESS, Verdict.DROPPED, Reason.POLICY_DENIED) >= 3


def test_truncated_headers_dropped_as_invalid(e):
    """Frames whose headers end early (the fuzz test cannot make a test skb of a short
    IP header, real frames can be that short): dropped as invalid."""
    a, b = e.a, e.b
    v4 = P.ipv4(a.ip4, b.ip4, P.UDP, P.udp(1, 2, b"x"))
    v6 = P.ipv6(a.ip6, b.ip6, P.UDP, P.udp(1, 2, b"x"))
    tcp4 = P.ipv4(a.ip4, b.ip4, P.TCP, P.tcp(1, 2))
    frames = [P.eth(b.mac, a.mac, P.ETH_IP, v4[:12]),                  # IPv4 header cut
              P.eth(b.mac, a.mac, P.ETH_IP, bytes([0x44]) + v4[1:]),   # ihl 4
              P.eth(b.mac, a.mac, P.ETH_IPV6, v6[:30]),                # IPv6 header cut
              P.eth(b.mac, a.mac, P.ETH_IP, tcp4[:20 + 10]),           # TCP header cut
              P.eth(b.mac, a.mac, P.ETH_IPV6,                          # extension header cut
                    P.ipv6(a.ip6, b.ip6, P.DSTOPTS, P.ext6(P.UDP)[:4]))]
    traffic.send_frames(a, frames)
    assert traffic.eventually(
        lambda: e.count(EGRESS, Verdict.DROPPED, Reason.INVALID) == len(frames), timeout=2)


def _later_fragment(e, family: int, ident: int) -> bytes:
    a, b = e.a, e.b
    data = b"z" * 64
    if family == 4:
        return P.eth(b.mac, a.mac, P.ETH_IP, P.ipv4(a.ip4, b.ip4, P.UDP, data, ident=ident,
                                                     offset=185))
    return P.eth(b.mac, a.mac, P.ETH_IPV6,
                 P.ipv6(a.ip6, b.ip6, P.FRAGMENT, P.frag6(P.UDP, 185, False, ident) + data))


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_orphan_fragment_dropped_and_counted(e, family):
    """A later fragment whose first fragment never passed: dropped even though A's
    egress is not enforced at all (its ports are unknown)."""
    with traffic.Capture(e.b) as cap:
        traffic.send_frames(e.a, [_later_fragment(e, family, 0x4242)])
        assert traffic.eventually(
            lambda: e.count(EGRESS, Verdict.DROPPED, Reason.FRAGMENT_ORPHAN) == 1, timeout=2)
        assert not cap.seen(lambda f: b"z" * 64 in f)


def _raw6(w, proto):
    return w.socket(socket.AF_INET6, socket.SOCK_RAW, proto)


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_parameter_problem_is_a_related_error(e, family):
    """B's kernel answers A's malformed packet with a parameter problem (v4: a bad IP
    option; v6: an unknown next header). A's ingress is default deny: the error passes
    as related to A's tracked flow."""
    e.policy({Key(ID_A, ID_B, EGRESS): ALLOW}, {(ID_A, EGRESS): DEFAULT_DENY,
                                                 (ID_A, INGRESS): DEFAULT_DENY})
    if family == 4:
        # record route with length 2 (< 3): option error at B
        pkt = P.ipv4(e.a.ip4, e.b.ip4, P.UDP, P.udp(4000, 4001, b"x"), options=b"\x07\x02")
        s = e.a.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        r = e.a.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        dst, want = (e.b.ip4, 0), (12, 0)
    else:
        pkt = b"hello"
        s = _raw6(e.a, 253)      # RFC 3692 experimental protocol: B has no handler
        r = _raw6(e.a, socket.IPPROTO_ICMPV6)
        dst, want = (e.b.ip6, 0), (4, 1)
    try:
        r.settimeout(FAIL_TIMEOUT)
        s.sendto(pkt, dst)
        while True:
            data = r.recv(2048)
            off = (data[0] & 0xF) * 4 if family == 4 else 0
            if (data[off], data[off + 1]) == want:
                break
    finally:
        s.close()
        r.close()
    assert e.count(INGRESS, Verdict.FORWARDED, Reason.CT_RELATED) >= 1
    assert e.count(INGRESS, Verdict.DROPPED, Reason.POLICY_DENIED) == 0


# -- anti-spoofing, ARP, ND ------------------------------------------------------
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_spoofed_source_dropped(e, family):
    a, b = e.a, e.b
    forged, dst, own = (("10.213.7.99", b.ip4, a.ip4) if family == 4
                        else ("fd57:ade::99", b.ip6, a.ip6))
    plen = "/32" if family == 4 else "/128"
    a.exec("ip", "neigh", "replace", dst, "lladdr", b.mac, "dev", "eth0", "nud", "permanent")
    a.exec("ip", "addr", "add", forged + plen, "dev", "eth0", *(["nodad"] if family == 6 else []))
    try:
        assert udp_ok(a, b, dst, 5353, src=own)              # control: real address
        assert not udp_ok(a, b, dst, 5353, src=forged)
        assert e.count(EGRESS, Verdict.DROPPED, Reason.SPOOFED) >= 1
    finally:
        a.exec("ip", "addr", "del", forged + plen, "dev", "eth0", check=False)
        a.exec("ip", "neigh", "del", dst, "dev", "eth0", check=False)


def _arp_request(mac: str, spa: str, tpa: str) -> bytes:
    hw = bytes.fromhex(mac.replace(":", ""))
    return (b"\xff" * 6 + hw + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + hw + socket.inet_aton(spa) + b"\0" * 6 + socket.inet_aton(tpa))


def test_arp_with_forged_sender_dropped(e):
    s = e.a.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    try:
        s.bind(("eth0", 0))
        s.send(_arp_request(e.a.mac, "10.213.7.99", e.b.ip4))
        assert e.count(EGRESS, Verdict.DROPPED, Reason.SPOOFED) == 1
        before = e.count(EGRESS, Verdict.FORWARDED, Reason.NEIGH)
        s.send(_arp_request(e.a.mac, e.a.ip4, e.b.ip4))
        assert e.count(EGRESS, Verdict.FORWARDED, Reason.NEIGH) >= before + 1
        assert e.count(EGRESS, Verdict.DROPPED, Reason.SPOOFED) == 1
    finally:
        s.close()


def test_neighbour_advertisement_with_forged_target_dropped(e):
    s = e.a.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    idx = e.a.eth0_ifindex()
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        for target in ("fd57:ade::99", e.a.ip6):
            na = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + socket.inet_pton(
                socket.AF_INET6, target)
            s.sendto(na, ("ff02::1", 0, 0, idx))
        time.sleep(0.1)
        assert e.count(EGRESS, Verdict.DROPPED, Reason.SPOOFED) == 1
        assert e.count(EGRESS, Verdict.FORWARDED, Reason.NEIGH) >= 1
    finally:
        s.close()


# -- unknown endpoints and audit -----------------------------------------------
def test_unknown_endpoint(e):
    c = e.c
    assert not ping_ok(c, e.b.ip4)
    assert e.count(EGRESS, Verdict.DROPPED, Reason.UNKNOWN_ENDPOINT) >= 1
    e.dp.set_config(forward_unidentified=True)
    # the failed ARP resolution above is retried by the kernel after a while: poll
    assert traffic.eventually(lambda: ping_ok(c, e.b.ip4), timeout=10)
    assert e.count(EGRESS, Verdict.FORWARDED, Reason.UNKNOWN_ENDPOINT) >= 1
    e.dp.set_config()
    e.dp.set_endpoint(c.host_ifindex, 3, 1003, c.ips, unidentified=True)
    assert not ping_ok(c, e.b.ip4)
    e.dp.set_endpoint(c.host_ifindex, 3, 1003, c.ips)
    assert traffic.eventually(lambda: ping_ok(c, e.b.ip4), timeout=10)


@pytest.mark.parametrize("how", ["global", "endpoint"])
def test_audit_forwards_and_counts(e, how):
    e.policy({Key(ID_A, ID_B, EGRESS): DENY}, {(ID_A, EGRESS): DEFAULT_DENY})
    if how == "global":
        e.dp.set_config(audit=True)
    else:
        e.dp.set_endpoint(e.a.host_ifindex, 1, ID_A, e.a.ips, audit=True)
    assert tcp_ok(e.a, e.b, e.b.ip4, 8080)
    assert e.count(EGRESS, Verdict.AUDIT, Reason.POLICY_DENY_RULE) == 1
    assert e.count(EGRESS, Verdict.DROPPED, Reason.POLICY_DENY_RULE) == 0


# -- counters, events, conntrack, capacity -------------------------------------
def test_counters_count_packets_and_bytes(e):
    n, size = 5, 100
    srv = e.b.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli = e.a.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        srv.bind((e.b.ip4, 5353))
        srv.settimeout(1)
        for _ in range(n):
            cli.sendto(b"x" * size, (e.b.ip4, 5353))
            srv.recv(1024)
    finally:
        srv.close()
        cli.close()
    c = e.dp.counters()
    for d in (EGRESS, INGRESS):
        first = c[(d, Verdict.FORWARDED, Reason.NONE)]
        rest = c[(d, Verdict.FORWARDED, Reason.CT_ESTABLISHED)]
        assert first == (1, 14 + 20 + 8 + size)
        assert rest == (n - 1, (n - 1) * (14 + 20 + 8 + size))


def test_events_for_new_flows_and_drops(e):
    got = []
    e.dp.open_events(lambda ev: got.append((ev.direction, ev.verdict, ev.reason, ev.proto,
                                            ev.dport, ev.src_identity, ev.dst_identity,
                                            ev.ip_version, ev.addresses())))
    e.policy({tcp_key(ID_A, ID_B, EGRESS, 8080): ALLOW}, {(ID_A, EGRESS): DEFAULT_DENY})
    assert tcp_ok(e.a, e.b, e.b.ip4, 8080)
    assert not tcp_ok(e.a, e.b, e.b.ip4, 8081)
    e.dp.poll_events(100)
    addrs = (e.a.ip4, e.b.ip4)
    assert (EGRESS, Verdict.FORWARDED, Reason.NONE, PROTO_TCP, 8080, ID_A, ID_B, 4, addrs) in got
    assert (INGRESS, Verdict.FORWARDED, Reason.NONE, PROTO_TCP, 8080, ID_A, ID_B, 4, addrs) in got
    assert (EGRESS, Verdict.DROPPED, Reason.POLICY_DENIED, PROTO_TCP, 8081, ID_A, ID_B, 4,
            addrs) in got


def test_conntrack_gc_and_expired_entries(e):
    e.policy({}, {(ID_A, INGRESS): DEFAULT_DENY})
    srv = e.b.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli = e.a.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        srv.bind((e.b.ip4, 5353))
        for s in (srv, cli):
            s.settimeout(FAIL_TIMEOUT)
        cli.sendto(b"q", (e.b.ip4, 5353))
        _, peer = srv.recvfrom(16)
        srv.sendto(b"r", peer)
        assert cli.recv(16) == b"r"              # reply of a tracked flow
        entries = e.dp.ct_entries()
        assert len(entries) >= 2                  # A's egress and B's ingress hook
        assert e.dp.ct_gc() == 0
        for k, v in entries:                      # expire them: the program must ignore them
            v.expires = 1
            e.dp._update("conntrack", k, v)
        srv.sendto(b"r", peer)
        with pytest.raises(socket.timeout):
            cli.recv(16)
        assert e.count(INGRESS, Verdict.DROPPED, Reason.POLICY_DENIED) == 1
    finally:
        srv.close()
        cli.close()
    live = m.CtKey(ifindex=999, proto=PROTO_UDP, family=4)
    e.dp._update("conntrack", live, m.CtValue(expires=time.clock_gettime_ns(
        time.CLOCK_MONOTONIC) + 10**12))
    expired = len([1 for _, v in e.dp.ct_entries() if v.expires < time.monotonic_ns()])
    assert expired >= 2
    assert e.dp.ct_gc() >= expired
    now = time.monotonic_ns()
    left = e.dp.ct_entries()
    assert all(v.expires >= now for _, v in left) and 999 in [k.ifindex for k, _ in left]


def test_ct_cut_moved_by_hook_and_peer_prefix(e, monkeypatch):
    """The walk of an identity change (read in batches, here of 64 keys): every entry
    at a relabelled endpoint's hooks; elsewhere the entries whose peer (the destination
    of a flow the endpoint opened, else the source) lies in a moved prefix and, by the
    agent's verdict asked once per address, resolves elsewhere now. No endpoint holds
    these hooks: every flow cut is revoked, the others are left as they were."""
    import ipaddress

    from stockade.datapath import pins
    monkeypatch.setattr(pins, "KEY_CHUNK", 64)
    e.dp.flush(("conntrack",))
    local4, local6 = ipaddress.ip_address("10.213.7.9"), ipaddress.ip_address("fd57:ade::9")
    live = m.CtValue(expires=time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 10**12)
    made = []
    for i in range(400):
        family = 4 if i % 3 else 6
        peer = ipaddress.ip_address(f"10.50.{i % 4}.{i % 50}" if family == 4 else f"fd99::{i % 300:x}")
        local = local4 if family == 4 else local6
        k = m.CtKey(ifindex=900 + (i // 7) % 4, proto=PROTO_TCP, family=family, sport=i, dport=80,
                    direction=EGRESS if i % 2 else INGRESS)
        src, dst = (local, peer) if k.direction == EGRESS else (peer, local)
        k.saddr[:] = src.packed.ljust(16, b"\0")
        k.daddr[:] = dst.packed.ljust(16, b"\0")
        e.dp._update("conntrack", k, live)
        made.append((k.ifindex, peer, bytes(k)))
    asked = []
    kept_addr = ipaddress.ip_address("10.50.1.7").packed   # inside, but held by a longer entry

    def changed(family, raw):
        asked.append(raw)
        return raw != kept_addr
    moved = {"10.50.1.0/24": None, "fd99::80/121": 3000}
    n = e.dp.ct_cut_moved({901}, moved, changed, lambda *flow: True)
    nets = [ipaddress.ip_network(p) for p in moved]
    want = {key for ifindex, peer, key in made
            if ifindex == 901 or (peer.packed != kept_addr and any(
                peer.version == net.version and peer in net for net in nets))}
    states = {bytes(k): v.state for k, v in e.dp.ct_entries()}
    revoked = {k for k, state in states.items() if state == m.CT_STATE_REVOKED}
    assert n == len(want) and want and revoked == want
    assert set(states) == {key for _, _, key in made}
    assert len(asked) == len(set(asked))            # once per address
    assert kept_addr in asked


def test_capacity_error_leaves_map_unchanged(e):
    before = {tcp_key(ID_A, ID_B, EGRESS, p): ALLOW for p in range(10)}
    e.policy(before, {(ID_A, EGRESS): DEFAULT_DENY})
    too_many = {tcp_key(ID_A, ID_B, EGRESS, 1000 + p): ALLOW for p in range(60)}
    with pytest.raises(CapacityError) as err:
        e.dp.apply_delta(diff(before, too_many, {}, {(ID_A, EGRESS): DEFAULT_DENY}))
    assert str(err.value) == "policy: 70 entries needed during the update, map holds 64"
    assert e.dp.policy_entries() == before
    assert e.dp.policy_flags() == {(ID_A, EGRESS): DEFAULT_DENY}


# -- restart: pins survive, programs swap atomically -----------------------------
def prog_ids(ifname: str) -> set[int]:
    """Ids of the BPF programs tc runs on ``ifname`` (both hooks)."""
    ids = set()
    for hook in ("ingress", "egress"):
        out = subprocess.run(["tc", "-j", "filter", "show", "dev", ifname, hook],
                             capture_output=True, text=True, check=True).stdout
        ids |= {f["options"]["prog"]["id"] for f in json.loads(out)
                if "prog" in f.get("options", {})}
    return ids


def test_reload_keeps_pins_and_swaps_program_under_load(e):
    e.policy({tcp_key(ID_A, ID_B, EGRESS, 8080): ALLOW}, {(ID_A, EGRESS): DEFAULT_DENY})
    srv = e.b.socket(socket.AF_INET, socket.SOCK_STREAM)
    cli = e.a.socket(socket.AF_INET, socket.SOCK_STREAM)
    received, errors, stop = [0], [], threading.Event()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((e.b.ip4, 8080))
    srv.listen(1)
    cli.settimeout(10)
    cli.connect((e.b.ip4, 8080))
    conn, _ = srv.accept()
    conn.settimeout(10)

    def sender():
        try:
            while not stop.is_set():
                cli.sendall(b"y" * 4096)
        except OSError as exc:
            errors.append(exc)

    def reader():
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                received[0] += len(data)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    dp2 = None
    try:
        time.sleep(0.2)
        # A restarted agent of another build (a changed setting: new programs), same pins.
        dp2 = Datapath({**SETTINGS, "EVENTS_NEW_RATE": 12345})
        assert dp2.compiled
        assert dp2.policy_entries() == e.dp.policy_entries()
        assert dp2.get_endpoint(e.a.host_ifindex).identity == ID_A
        old_ids = prog_ids(e.a.host_if)
        before = received[0]
        attach(e.a.host_ifindex, dp2.from_endpoint_fd, dp2.to_endpoint_fd)
        attach(e.b.host_ifindex, dp2.from_endpoint_fd, dp2.to_endpoint_fd)
        attached = list_attached(e.a.host_ifindex)
        assert sorted((a.hook, a.name) for a in attached) == [
            ("egress", "to_endpoint"), ("ingress", "from_endpoint")]
        new_ids = prog_ids(e.a.host_if)
        assert len(new_ids) == 2 and not (new_ids & old_ids)
        from traffic import eventually
        assert eventually(lambda: received[0] > before, timeout=5)   # the stream kept flowing
        assert not errors
        dp2.set_ipcache("10.213.99.0/24", 4242)   # a write through the new loader is seen
        assert e.dp.ipcache_entries()["10.213.99.0/24"] == 4242
    finally:
        stop.set()
        threads[0].join(5)                        # the sender, before shutting its socket
        cli.shutdown(socket.SHUT_WR)
        threads[1].join(5)
        for s in (cli, conn, srv):
            s.close()
        for w in (e.a, e.b):                      # back to the session's program
            attach(w.host_ifindex, e.dp.from_endpoint_fd, e.dp.to_endpoint_fd)
        if dp2 is not None:
            dp2.close()
    assert not errors


def test_list_attached_finds_ours_on_every_link_through_one_socket(e, monkeypatch):
    """Without an ifindex, list_attached reads every link of the namespace (links without
    clsact, as the bridge and lo, have none) on its one netlink socket, and finds what it
    finds link by link: our two filters, not another kind at our prio nor a bpf filter
    of another handle."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    from stockade import netlink
    from stockade.datapath.attach import ETH_P_ALL, HANDLE, PARENT_EGRESS, PRIO
    c = e.c.host_ifindex
    u32 = ["tc", "filter", "add", "dev", e.c.host_if, "ingress", "prio", str(PRIO + 1),
           "protocol", "ip", "u32", "match", "ip", "dst", "203.0.113.255/32", "flowid", "1:1"]
    try:
        with IPRoute() as ipr:
            ipr.tc("add-filter", "bpf", c, HANDLE + 1, fd=e.dp.to_endpoint_fd, name="other",
                   parent=PARENT_EGRESS, prio=PRIO, classid=1, direct_action=True,
                   protocol=ETH_P_ALL)
        subprocess.run(u32, check=True)
        per_link = [a for idx in netlink.link_indexes() for a in list_attached(idx)]

        def second_socket(*args, **kwargs):
            raise AssertionError("list_attached opened a second netlink socket")
        monkeypatch.setattr(netlink, "IPRoute", second_socket)
        every = list_attached()
        monkeypatch.undo()
        assert every == per_link
        ours = {(w.host_ifindex, hook) for w in (e.a, e.b, e.c) for hook in ("ingress", "egress")}
        assert {(a.ifindex, a.hook) for a in every} == ours
        assert {a.name for a in every} == {"from_endpoint", "to_endpoint"}
        assert len(every) == len(ours)
    finally:
        with IPRoute() as ipr:
            try:
                ipr.tc("del-filter", "bpf", c, HANDLE + 1, parent=PARENT_EGRESS, prio=PRIO,
                       protocol=ETH_P_ALL)
            except NetlinkError:
                pass                                 # never added
        subprocess.run(["tc", "filter", "del", "dev", e.c.host_if, "ingress", "prio",
                        str(PRIO + 1)], check=False)
    assert len(list_attached(c)) == 2


def test_checks_and_detaches_from_two_threads_never_share_a_link_fd(e):
    """The agent's guard checks interfaces from its own thread while an API call detaches
    one. A check seeing a just-detached link must not close the fd the detach is still
    using (that was 'cannot detach: Bad file descriptor', and with the fd number reused,
    a detach of someone else's link)."""
    w = e.topo.add_workload("race", ["10.213.7.9/24"])
    stop, errors = threading.Event(), []

    def checker():
        while not stop.is_set():
            try:
                e.dp.check_interface(w.host_ifindex)
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    t = threading.Thread(target=checker, daemon=True)
    t.start()
    try:
        for _ in range(150):
            e.dp.attach_interface(w.host_ifindex)
            e.dp.detach_interface(w.host_ifindex)
    finally:
        stop.set()
        t.join(timeout=10)
    assert errors == []
    assert attach_programs(w.host_ifindex) == {"ingress": [], "egress": []}


def test_attaching_to_an_interface_that_is_gone_says_so(e):
    """The kernel's ENODEV (a container that exited before the agent reached its veth) is
    InterfaceGone, which the agent does not report as a failure: nothing is left open."""
    taken = {i for i, _ in socket.if_nameindex()}
    gone = next(i for i in range(1 << 20, 1 << 21) if i not in taken)
    with pytest.raises(InterfaceGone):
        e.dp.attach_interface(gone)
