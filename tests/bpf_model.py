"""A reference model of the tc programs (bpf/lib/datapath.h), in Python, for the fuzz
test: the same decisions on the same raw frames, with the same state (conntrack and
its budgets, first fragments), written from the C's documented rules rather than
from its code paths.

    model = Model(endpoints, ipcache, entries, flags, cfg_flags, settings)
    verdict, reason, action = model.handle(frame, ifindex, direction, ingress_ifindex)

Simplifications that hold in the fuzz build: nothing expires (every lifetime is
hours), the frag LRU never evicts (its key space is kept small), and no VLAN tag is in
skb metadata (a test run cannot set one). ``action`` is the tc return value.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from stockade.datapath.maps import Reason, Verdict
from stockade.policy.mapstate import lookup

INGRESS, EGRESS = 0, 1
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
FRAG_NONE, FRAG_FIRST, FRAG_LATER = 0, 1, 2
ICMP, TCP, UDP, ICMPV6, SCTP = 1, 6, 17, 58, 132
EXT_HEADERS = (0, 43, 60, 44, 51)
WORLD = 2
Z16 = bytes(16)


@dataclass
class Ep:
    """An endpoints entry as the agent writes it."""
    ifindex: int
    identity: int
    ip4: list[bytes] = field(default_factory=list)       # 4 bytes each
    ip6: list[bytes] = field(default_factory=list)       # 16 bytes each
    ll: list[bytes] = field(default_factory=list)
    mac: bytes = bytes(6)
    audit: bool = False
    unidentified: bool = False
    host_ifindex: int = 0


@dataclass
class Pkt:
    family: int = 0
    saddr: bytes = Z16
    daddr: bytes = Z16
    proto: int = 0
    sport: int = 0            # host order here
    dport: int = 0
    has_ports: bool = False
    tcp_flags: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    fragment: int = FRAG_NONE
    hop: int = 0
    frag_proto: int = 0
    frag_id: bytes = b"\0\0\0\0"
    l4_off: int = 0


def _icmp_is_query(family, t):
    return (t in (8, 0) or 13 <= t <= 18) if family == 4 else t in (128, 129)


def _icmp_request_of(family, t):
    if family == 4:
        return {0: 8, 14: 13, 16: 15, 18: 17}.get(t)
    return 128 if t == 129 else None


def _icmp_is_error(family, t):
    return t in (3, 11, 12) if family == 4 else 1 <= t <= 4


def _is_icmp(proto):
    return proto in (ICMP, ICMPV6)


class Model:
    def __init__(self, endpoints: dict[int, Ep], ipcache: dict[str, int], entries, flags,
                 cfg_audit=False, cfg_forward_unidentified=False, ct_max=65536,
                 ct_endpoint_max=1 << 30, ct_owners_max=1 << 30, ct_pressure=0):
        self.eps = endpoints
        self.ipc4 = sorted(((ipaddress.ip_network(p), i) for p, i in ipcache.items()
                            if ipaddress.ip_network(p).version == 4),
                           key=lambda x: -x[0].prefixlen)
        self.ipc6 = sorted(((ipaddress.ip_network(p), i) for p, i in ipcache.items()
                            if ipaddress.ip_network(p).version == 6),
                           key=lambda x: -x[0].prefixlen)
        self.entries, self.flags = entries, flags
        self.cfg_audit, self.cfg_fwd = cfg_audit, cfg_forward_unidentified
        self.ct: dict[tuple, int] = {}          # key -> owner peer
        self.owners: dict[tuple, int] = {}      # (ifindex, dir, peer) -> live entries
        self.frag: dict[tuple, tuple] = {}
        self.ct_max, self.ct_endpoint_max = ct_max, ct_endpoint_max
        self.ct_owners_max, self.ct_pressure = ct_owners_max, ct_pressure
        self.counters: dict[tuple, list[int]] = {}

    # -- bookkeeping ---------------------------------------------------------------
    def _finish(self, frame, d, verdict, reason, action=None):
        c = self.counters.setdefault((d, verdict, reason), [0, 0])
        c[0] += 1
        c[1] += len(frame)
        if action is None:
            action = TC_ACT_SHOT if verdict == Verdict.DROPPED else TC_ACT_OK
        return verdict, reason, action

    def _drop(self, frame, d, reason):
        return self._finish(frame, d, Verdict.DROPPED, reason)

    # -- parsing (parse.h) ---------------------------------------------------------------
    @staticmethod
    def _ipv4(f, off, p) -> bool:
        if len(f) < off + 20:
            return False
        if f[off] >> 4 != 4 or f[off] & 0xF < 5:
            return False
        p.family = 4
        p.saddr = f[off + 12:off + 16] + bytes(12)
        p.daddr = f[off + 16:off + 20] + bytes(12)
        p.proto = p.frag_proto = f[off + 9]
        p.hop = f[off + 8]
        p.frag_id = f[off + 4:off + 6] + b"\0\0"
        fo = struct.unpack("!H", f[off + 6:off + 8])[0]
        if fo & 0x1FFF:
            p.fragment = FRAG_LATER
        elif fo & 0x2000:
            p.fragment = FRAG_FIRST
        p.l4_off = off + (f[off] & 0xF) * 4
        return True

    @staticmethod
    def _ipv6(f, off, p, walk) -> bool:
        if len(f) < off + 40 or f[off] >> 4 != 6:
            return False
        p.family = 6
        p.saddr, p.daddr = f[off + 8:off + 24], f[off + 24:off + 40]
        p.hop = f[off + 7]
        nh = f[off + 6]
        off += 40
        if walk:
            for _ in range(6):
                if nh not in EXT_HEADERS:
                    break
                if len(f) < off + 8:
                    return False
                ext = f[off:off + 8]
                if nh == 44:
                    fo = (ext[2] << 8) | ext[3]
                    nh = ext[0]
                    off += 8
                    p.frag_proto = nh
                    p.frag_id = ext[4:8]
                    if fo & 0xFFF8:
                        p.fragment = FRAG_LATER
                        p.proto, p.l4_off = nh, off
                        return True
                    if fo & 1:
                        p.fragment = FRAG_FIRST
                elif nh == 51:
                    nh = ext[0]
                    off += (ext[1] + 2) * 4
                else:
                    nh = ext[0]
                    off += (ext[1] + 1) * 8
            if nh in EXT_HEADERS:
                return False
        p.proto, p.l4_off = nh, off
        return True

    @staticmethod
    def _l4(f, p, quoted) -> bool:
        if p.fragment == FRAG_LATER:
            return True
        o = p.l4_off
        if p.proto == TCP:
            need = 8 if quoted else 14
        elif p.proto in (UDP, SCTP, ICMP, ICMPV6):
            need = 8
        else:
            return True
        if len(f) < o + need:
            return False
        if _is_icmp(p.proto):
            p.icmp_type, p.icmp_code = f[o], f[o + 1]
            if _icmp_is_query(p.family, f[o]):
                p.sport = struct.unpack("!H", f[o + 4:o + 6])[0]
            p.has_ports = True
            return True
        p.sport, p.dport = struct.unpack("!HH", f[o:o + 4])
        if p.proto == TCP and not quoted:
            p.tcp_flags = f[o + 13]
        p.has_ports = True
        return True

    # -- endpoint checks (endpoint.h) ------------------------------------------------------
    @staticmethod
    def _owns6(ep, a):
        return a in ep.ip6 or a in ep.ll

    @staticmethod
    def _ll(a):
        return a[0] == 0xFE and a[1] & 0xC0 == 0x80

    @staticmethod
    def _mc(a):
        return a[0] == 0xFF

    def _link_mc(self, a):
        return self._mc(a) and a[1] & 0xF <= 2

    @staticmethod
    def _solicited(a):
        return a[:13] == bytes.fromhex("ff0200000000000000000001ff")

    def _source_ok(self, ep, p):
        if p.family == 4:
            return p.saddr[:4] in ep.ip4
        if self._owns6(ep, p.saddr):
            return True
        return (p.saddr == Z16 and p.proto == ICMPV6 and p.fragment == FRAG_NONE
                and p.icmp_type in (133, 135, 131, 143))

    def _nd_on_link(self, ep, p, d):
        mld = 130 <= p.icmp_type <= 132 or p.icmp_type == 143
        if p.hop != (1 if mld else 255):
            return False
        if self._mc(p.daddr):
            return mld or self._link_mc(p.daddr)
        if self._ll(p.daddr):
            return True
        if mld or p.icmp_type not in (135, 136):
            return False
        if d == INGRESS:
            return p.daddr in ep.ip6
        return any(p.daddr[:8] == a[:8] for a in ep.ip6)

    def _target(self, f, p):
        o = p.l4_off + 8
        return f[o:o + 16] if len(f) >= o + 16 else None

    def _check_nd(self, f, ep, p, d):
        unspec = p.saddr == Z16
        if d == INGRESS:
            if not self._nd_on_link(ep, p, d):
                return Reason.NONE
            if p.icmp_type in (134, 137) and not self._ll(p.saddr):
                return Reason.NONE
            return Reason.NEIGH
        if p.icmp_type in (134, 137):
            return Reason.SPOOFED
        if not self._nd_on_link(ep, p, d):
            return Reason.SPOOFED if unspec else Reason.NONE
        if p.icmp_type == 136:
            t = self._target(f, p)
            if t is None or unspec:
                return Reason.INVALID
            return Reason.NEIGH if self._owns6(ep, t) else Reason.SPOOFED
        if p.icmp_type == 135 and unspec:
            t = self._target(f, p)
            if t is None or not self._solicited(p.daddr):
                return Reason.INVALID
            return Reason.NEIGH if self._owns6(ep, t) else Reason.SPOOFED
        return Reason.NEIGH

    def _unidentified_nd_ok(self, f, p, d):
        t = p.icmp_type
        if p.family != 6 or p.proto != ICMPV6 or p.fragment != FRAG_NONE:
            return False
        if t not in (133, 135, 136) and not (d == INGRESS and t == 134):
            return False
        if p.hop != 255 or not (self._ll(p.daddr) or self._link_mc(p.daddr)):
            return False
        if d == INGRESS:
            return self._ll(p.saddr) or (t == 135 and p.saddr == Z16)
        if t == 136:
            if not self._ll(p.saddr):
                return False
            return self._target(f, p) == p.saddr
        return self._ll(p.saddr) or p.saddr == Z16

    def _dhcp_client(self, ep, p):
        if p.proto != UDP or p.fragment != FRAG_NONE or not p.has_ports:
            return False
        if p.family == 4:
            return ((p.sport, p.dport) == (68, 67) and p.daddr[:4] == b"\xff" * 4
                    and (p.saddr[:4] == bytes(4) or p.saddr[:4] in ep.ip4))
        return ((p.sport, p.dport) == (546, 547) and p.daddr == bytes.fromhex(
            "ff020000000000000000000000010002") and self._ll(p.saddr))

    @staticmethod
    def _dhcp_server(p):
        if p.proto != UDP or p.fragment != FRAG_NONE or not p.has_ports:
            return False
        return (p.sport, p.dport) == ((67, 68) if p.family == 4 else (547, 546))

    def _from_host(self, iif):
        return iif == 0 or iif not in self.eps

    def _deliver(self, ep, ifindex):
        if ep.host_ifindex == 0:
            return None
        return TC_ACT_OK if ep.host_ifindex == ifindex else TC_ACT_REDIRECT

    def _dhcp(self, f, ep, d, p, ifindex, iif):
        if d == EGRESS:
            if not self._dhcp_client(ep, p):
                return None
            act = self._deliver(ep, ifindex)
            if act is None:
                return self._drop(f, d, Reason.UNKNOWN_ENDPOINT)
            return self._finish(f, d, Verdict.FORWARDED, Reason.DHCP, act)
        if not self._dhcp_server(p) or not self._from_host(iif):
            return None
        if not ep.unidentified:
            dst = f[:6]
            if any(ep.mac) and dst != ep.mac and not dst[0] & 1:
                return None
        return self._finish(f, d, Verdict.FORWARDED, Reason.DHCP)

    # -- conntrack (conntrack.h) ---------------------------------------------------------
    def _ct_key(self, p, ifindex, d, reverse):
        s, t = (p.daddr, p.saddr) if reverse else (p.saddr, p.daddr)
        if _is_icmp(p.proto):
            typ = _icmp_request_of(p.family, p.icmp_type) if reverse else p.icmp_type
            return (ifindex, s, t, p.sport, 0, p.proto, (1 - d) if reverse else d, p.family, typ)
        if reverse:
            return (ifindex, s, t, p.dport, p.sport, p.proto, 1 - d, p.family, 0)
        return (ifindex, s, t, p.sport, p.dport, p.proto, d, p.family, 0)

    def _ct_lookup(self, p, ifindex, d):
        if self._ct_key(p, ifindex, d, False) in self.ct:
            return True
        if _is_icmp(p.proto) and _icmp_request_of(p.family, p.icmp_type) is None:
            return False
        return self._ct_key(p, ifindex, d, True) in self.ct

    def _ct_create(self, p, ifindex, d, peer):
        k = self._ct_key(p, ifindex, d, False)
        if k in self.ct:
            return True
        owner, table = (ifindex, d, peer if d == INGRESS else 0), (0, 0, 0)
        for o in (owner, table):
            if o not in self.owners and len(self.owners) < self.ct_owners_max:
                self.owners[o] = 0
        if owner not in self.owners or table not in self.owners:
            return False
        if (self.owners[owner] >= self.ct_endpoint_max
                and self.owners[table] >= self.ct_pressure):
            return False
        if len(self.ct) >= self.ct_max:
            return False
        self.ct[k] = owner[2]
        self.owners[owner] += 1
        self.owners[table] += 1
        return True

    # -- identities and policy ----------------------------------------------------------
    def _identity(self, family, a):
        addr = ipaddress.ip_address(a[:4] if family == 4 else a)
        for net, ident in (self.ipc4 if family == 4 else self.ipc6):
            if addr in net:
                return ident
        return WORLD

    def _policy(self, local, peer, d, p):
        port = None
        if p.has_ports:
            port = p.icmp_type if _is_icmp(p.proto) else p.dport
        verdict, _ = lookup(self.entries, self.flags, local, peer, d, p.proto, port)
        return {"allow": Reason.NONE, "not-enforced": Reason.NONE,
                "deny": Reason.POLICY_DENY_RULE, "default-deny": Reason.POLICY_DENIED}[verdict]

    # -- the pipeline (datapath.h) --------------------------------------------------------
    def handle(self, f: bytes, ifindex: int, d: int, iif: int = 0):
        ep = self.eps.get(ifindex)
        unident = ep is None or ep.unidentified
        if unident and self.cfg_fwd:
            return self._finish(f, d, Verdict.FORWARDED, Reason.UNKNOWN_ENDPOINT)
        if ep is None:
            return self._drop(f, d, Reason.UNKNOWN_ENDPOINT)
        bad = Reason.UNKNOWN_ENDPOINT if unident else Reason.INVALID
        et = struct.unpack("!H", f[12:14])[0]
        if et == 0x0806:
            if unident:
                return self._drop(f, d, Reason.UNKNOWN_ENDPOINT)
            return self._arp(f, ep, d)
        p = Pkt()
        if et == 0x0800:
            ok = self._ipv4(f, 14, p)
        elif et == 0x86DD:
            ok = self._ipv6(f, 14, p, True)
        else:
            return self._drop(f, d, bad if unident else Reason.UNSUPPORTED)
        if not ok or not self._l4(f, p, False):
            return self._drop(f, d, bad)
        if unident:
            r = self._dhcp(f, ep, d, p, ifindex, iif)
            if r is not None:
                return r
            if self._unidentified_nd_ok(f, p, d):
                if d == INGRESS:
                    if self._from_host(iif):
                        return self._finish(f, d, Verdict.FORWARDED, Reason.NEIGH)
                else:
                    act = self._deliver(ep, ifindex)
                    if act is not None:
                        return self._finish(f, d, Verdict.FORWARDED, Reason.NEIGH, act)
            return self._drop(f, d, Reason.UNKNOWN_ENDPOINT)
        if p.fragment != FRAG_NONE:
            key = (p.family, p.frag_proto, p.frag_id, p.saddr, p.daddr)
            if p.fragment == FRAG_FIRST:
                self.frag[key] = (p.sport, p.dport, p.proto, p.has_ports, p.icmp_type, p.icmp_code)
            else:
                if key not in self.frag:
                    return self._drop(f, d, Reason.FRAGMENT_ORPHAN)
                (p.sport, p.dport, p.proto, p.has_ports, p.icmp_type,
                 p.icmp_code) = self.frag[key]
        return self._ip(f, ep, d, p, ifindex, iif)

    def _arp(self, f, ep, d):
        if len(f) < 14 + 28:
            return self._drop(f, d, Reason.INVALID)
        a = f[14:42]
        if d == INGRESS:
            return self._finish(f, d, Verdict.FORWARDED, Reason.NEIGH)
        if a[:6] != b"\x00\x01\x08\x00\x06\x04":
            return self._drop(f, d, Reason.INVALID)
        spa = a[14:18]
        if spa == bytes(4) or spa in ep.ip4:
            return self._finish(f, d, Verdict.FORWARDED, Reason.NEIGH)
        return self._drop(f, d, Reason.SPOOFED)

    def _ip(self, f, ep, d, p, ifindex, iif):
        local = ep.identity
        r = self._dhcp(f, ep, d, p, ifindex, iif)
        if r is not None:
            return r
        if d == EGRESS and not self._source_ok(ep, p):
            return self._drop(f, d, Reason.SPOOFED)
        if (p.family == 6 and p.proto == ICMPV6 and p.fragment == FRAG_NONE
                and (130 <= p.icmp_type <= 137 or p.icmp_type == 143)):
            reason = self._check_nd(f, ep, p, d)
            if reason == Reason.NEIGH:
                return self._finish(f, d, Verdict.FORWARDED, reason)
            if reason != Reason.NONE:
                return self._drop(f, d, reason)
        icmp_error = (_is_icmp(p.proto) and p.fragment == FRAG_NONE
                      and _icmp_is_error(p.family, p.icmp_type))
        if icmp_error:
            inner = Pkt()
            off = p.l4_off + 8
            ok = self._ipv4(f, off, inner) if p.family == 4 else self._ipv6(f, off, inner, False)
            if ok and self._l4(f, inner, True) and inner.family == p.family and \
                    self._ct_lookup(inner, ifindex, 1 - d):
                return self._finish(f, d, Verdict.FORWARDED, Reason.CT_RELATED)
        elif self._ct_lookup(p, ifindex, d):
            return self._finish(f, d, Verdict.FORWARDED, Reason.CT_ESTABLISHED)
        peer = self._identity(p.family, p.daddr if d == EGRESS else p.saddr)
        reason = self._policy(local, peer, d, p)
        verdict = Verdict.FORWARDED
        if reason != Reason.NONE:
            if self.cfg_audit or ep.audit:
                verdict = Verdict.AUDIT
            else:
                return self._drop(f, d, reason)
        if not icmp_error and not self._ct_create(p, ifindex, d, peer):
            return self._drop(f, d, Reason.CT_FULL)
        return self._finish(f, d, verdict, reason)
