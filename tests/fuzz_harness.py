"""Fuzzing the real programs with BPF_PROG_TEST_RUN against tests/bpf_model.py.

    with FuzzEnv() as env:
        stats = env.run(100_000, seed=1)     # raises Mismatch on the first disagreement

One program build with long lifetimes (nothing expires during a run), small conntrack
budgets (so ct_full happens), its own pins; three host-side veths of a
tests/netns.Topology stand for the interfaces (a test run needs real devices): E1
(identity 1001, default deny both ways), E2 (1002, audit, allow on miss for egress),
E3 (not identified, DHCP to the bridge) and the bridge itself (no endpoints entry).
Remote peers are ipcache entries (four /32 and one /24 per family), the rest is world.

Frames: a fixed list of hand-built ones first (one per rule the pipeline has), then
random ones from small pools of addresses, ports, ICMP types and hop limits, so that
flows repeat and replies, fragments and ICMP errors find their state: TCP/UDP/SCTP
with IPv4 options and every IPv6 extension header (chains, long ones read beyond the
linear-access limit, fragments first and later), ICMP queries and errors quoting
earlier flows, ND/MLD (claiming other endpoints' addresses), ARP (claiming other
endpoints' addresses), DHCP, VLAN tags, unknown ethertypes; then truncated at a
random length or with bytes flipped. Each frame goes to a random hook of a random
interface with a random skb->ingress_ifindex. Per frame the program's return value
must equal the model's; every CHECK_EVERY frames, every counter (direction, verdict,
reason: packets and bytes) must too. Every EPOCH frames the state starts afresh.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import time

import packets as P
from bpf_model import EGRESS, INGRESS, Ep, Model
from netns import Topology
from stockade.datapath import Datapath
from stockade.datapath import maps as m
from stockade.datapath.testrun import ProgTestRun
from stockade.datapath.writer import eui64_link_local
from stockade.policy.mapstate import (
    ANY_PEER,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    DirectionPolicy,
    Entry,
    Key,
    diff,
    port_prefixes,
)

CHECK_EVERY = 2000
EPOCH = 200_000     # then conntrack, fragments and counters start empty again (long runs
                    # would otherwise end with a full table and mostly ct_full)
MAX_FRAME = 3000    # a test run takes one page, head- and tailroom included
SETTINGS = {"CT_MAX": 65536, "CT_ENDPOINT_MAX": 1500, "CT_PRESSURE_PCT": 5, "FRAG_MAX": 65536,
            "CT_TIMEOUT_SYN_S": 10**6, "CT_TIMEOUT_TCP_S": 10**6, "CT_TIMEOUT_CLOSE_S": 10**6,
            "CT_TIMEOUT_OTHER_S": 10**6, "EVENTS_PAGES": 1}
DD = DirectionPolicy(True, True)
AOM = DirectionPolicy(True, False)
PORTS = [53, 67, 68, 80, 443, 546, 547, 5353, 8080, 40000, 40001, 40002]
ICMP4 = [0, 3, 5, 8, 9, 10, 11, 12, 13, 14, 17, 18]
ICMP6 = [1, 2, 3, 4, 128, 129, 130, 131, 132, 133, 134, 135, 136, 137, 139, 143, 200]
HOPS = [255, 255, 1, 64]


class Mismatch(AssertionError):
    pass


def _mac(i: int) -> str:
    return f"02:99:00:00:00:{i:02x}"


class FuzzEnv:
    def __init__(self):
        self.topo = Topology("z")
        self.dp = None
        self.pin_dir = f"/sys/fs/bpf/stockade-test-{os.getpid()}-fz"

    # -- setup ---------------------------------------------------------------------
    def __enter__(self) -> "FuzzEnv":
        try:
            self.topo.__enter__()
            ws = [self.topo.add_workload(t, []) for t in ("e1", "e2", "e3")]
            self.bridge = socket.if_nametoindex(self.topo.bridge)
            self.dp = Datapath({**SETTINGS, "STOCKADE_PIN_DIR": self.pin_dir})
            self.ifs = [w.host_ifindex for w in ws]
            self._configure()
            self.runs = {EGRESS: ProgTestRun(self.dp.from_endpoint_fd),
                         INGRESS: ProgTestRun(self.dp.to_endpoint_fd)}
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.dp is not None:
            self.dp.remove_pins()
            self.dp.close()
            self.dp = None
        # pins of a Datapath interrupted while it was being built (no object to ask)
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        self.topo.close()

    def _configure(self) -> None:
        dp, (i1, i2, i3) = self.dp, self.ifs
        self.v4 = {1: "10.99.0.1", 2: "10.99.0.2"}
        self.v6 = {1: "fd99::1", 2: "fd99::2"}
        dp.flush()
        dp.set_endpoint(i1, 1, 1001, ["10.99.0.1", "fd99::1"], mac=_mac(1))
        dp.set_endpoint(i2, 2, 1002, ["10.99.0.2", "fd99::2"], mac=_mac(2), audit=True,
                        link_local=["fe80::2:2"])
        dp.set_endpoint(i3, 0, 0, unidentified=True, host_ifindex=self.bridge)
        ll = {n: eui64_link_local(P.mac_bytes(_mac(n))).packed for n in (1, 2)}
        a4 = lambda s: socket.inet_aton(s)                      # noqa: E731
        a6 = lambda s: socket.inet_pton(socket.AF_INET6, s)     # noqa: E731
        self.eps = {
            i1: Ep(i1, 1001, [a4("10.99.0.1")], [a6("fd99::1")], [ll[1]], P.mac_bytes(_mac(1)),
                   host_ifindex=self.bridge),
            i2: Ep(i2, 1002, [a4("10.99.0.2")], [a6("fd99::2")], [ll[2], a6("fe80::2:2")],
                   P.mac_bytes(_mac(2)), audit=True, host_ifindex=self.bridge),
            i3: Ep(i3, 0, unidentified=True, host_ifindex=self.bridge),
        }
        self.ipcache = {"10.99.0.1/32": 1001, "10.99.0.2/32": 1002, "fd99::1/128": 1001,
                        "fd99::2/128": 1002, "10.99.2.0/24": 3000, "fd99:2::/64": 3000}
        for i in range(1, 5):
            self.ipcache[f"10.99.1.{i}/32"] = 2000 + i
            self.ipcache[f"fd99:1::{i}/128"] = 2000 + i
        for prefix, ident in self.ipcache.items():
            dp.set_ipcache(prefix, ident)
        self.entries, self.flags = self._policy()
        dp.apply_delta(diff(dp.policy_entries(), self.entries, dp.policy_flags(), self.flags))
        dp.reset_counters()

    @staticmethod
    def _policy():
        rnd = random.Random(14)
        peers = [ANY_PEER, 2, 1001, 1002, 2001, 2002, 2003, 2004, 3000]
        entries = {}
        for local in (1001, 1002):
            for direction in (INGRESS, EGRESS):
                for _ in range(25):
                    peer = rnd.choice(peers)
                    kind = rnd.random()
                    deny = rnd.random() < 0.15
                    if kind < 0.35:
                        proto = rnd.choice([PROTO_TCP, PROTO_UDP, PROTO_SCTP])
                        lo = rnd.choice(PORTS)
                        hi = lo + rnd.choice([0, 0, 7, 100])
                        for port, plen in port_prefixes(lo, min(hi, 65535)):
                            entries[Key(local, peer, direction, proto, port, plen)] = Entry(deny)
                    elif kind < 0.6:
                        proto = rnd.choice([PROTO_ICMP, PROTO_ICMPV6])
                        t = rnd.choice(ICMP4 if proto == PROTO_ICMP else ICMP6)
                        entries[Key(local, peer, direction, proto, t, 16)] = Entry(deny)
                    elif kind < 0.85:
                        proto = rnd.choice([PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6, 47])
                        entries[Key(local, peer, direction, proto)] = Entry(deny)
                    elif kind < 0.95:
                        entries[Key(local, peer, direction)] = Entry(deny)
        flags = {(1001, INGRESS): DD, (1001, EGRESS): DD, (1002, EGRESS): AOM,
                 (1002, INGRESS): DD}
        return entries, flags

    def model(self) -> Model:
        st = self.dp.settings
        return Model(self.eps, self.ipcache, self.entries, self.flags,
                     ct_max=st["CT_MAX"], ct_endpoint_max=st["CT_ENDPOINT_MAX"],
                     ct_owners_max=st["CT_OWNERS_MAX"], ct_pressure=st["CT_PRESSURE_ENTRIES"])

    def reset_state(self) -> None:
        """Empty conntrack, fragments and counters (between runs)."""
        self.dp.ct_flush()
        for k, _ in self.dp._items("frag", m.FragKey, m.FragValue):
            self.dp._delete("frag", k)
        self.dp.reset_counters()

    # -- running ----------------------------------------------------------------------
    def run(self, n: int, seed: int) -> dict:
        """Send the hand-built frames, then random ones up to ``n`` in all; compare each.
        Returns {"packets", "seconds", "packets_per_s", "verdicts": {...}}."""
        self.reset_state()
        model = self.model()
        gen = Frames(self, random.Random(seed))
        verdicts: dict[str, int] = {}
        skipped = 0
        t0 = time.perf_counter()
        for i, (frame, d, ifindex, iif) in enumerate(gen.stream(n)):
            if not test_run_accepts(frame):
                skipped += 1
                continue
            got, _ = self.runs[d](frame, ifindex, iif)
            verdict, reason, want = model.handle(frame, ifindex, d, iif)
            if got != want:
                raise Mismatch(f"seed {seed} frame {i}: program returned {got}, model {want} "
                               f"({verdict.name}, {reason.name}); dir {d} ifindex {ifindex} "
                               f"ingress_ifindex {iif}\n{frame.hex()}")
            key = f"{verdict.name.lower()}/{reason.name.lower()}"
            verdicts[key] = verdicts.get(key, 0) + 1
            if (i + 1) % CHECK_EVERY == 0 or i + 1 == n:
                self._check_counters(model, seed, i)
            if (i + 1) % EPOCH == 0:
                self._check_counters(model, seed, i)
                self.reset_state()
                model = self.model()
        secs = time.perf_counter() - t0
        return {"packets": n - skipped, "not_runnable": skipped, "seconds": round(secs, 2),
                "packets_per_s": round((n - skipped) / secs),
                "verdicts": dict(sorted(verdicts.items()))}

    def _check_counters(self, model, seed, i) -> None:
        have = {k: v for k, v in self.dp.counters().items()}
        want = {k: tuple(v) for k, v in model.counters.items()}
        if have != want:
            diffs = {k: (have.get(k), want.get(k)) for k in set(have) | set(want)
                     if have.get(k) != want.get(k)}
            raise Mismatch(f"seed {seed}: counters differ after frame {i} (within the last "
                           f"{CHECK_EVERY}): (program, model) {diffs}")


def test_run_accepts(frame: bytes) -> bool:
    """The kernel builds a test skb of an IPv4 / IPv6 frame only when the whole IP
    header is there (EINVAL otherwise); shorter ones are covered by real packets
    (tests/root/test_datapath.py, truncated headers)."""
    et = frame[12:14]
    if et == b"\x08\x00":
        return len(frame) >= 14 + 20
    if et == b"\x86\xdd":
        return len(frame) >= 14 + 40
    return True


class Frames:
    """Frames and where they go; see the module docstring."""

    def __init__(self, env: FuzzEnv, rnd: random.Random):
        self.env, self.r = env, rnd
        self.recent: list[tuple] = []   # (family, src, dst, proto, sport, dport, dir, ifindex)
        self.hook = (EGRESS, env.ifs[0])
        e = env
        self.v4 = ["10.99.0.1", "10.99.0.2", "10.99.1.1", "10.99.1.2", "10.99.1.3", "10.99.2.7",
                   "10.99.9.9", "0.0.0.0", "255.255.255.255", "10.99.0.77"]
        ll1, ll2 = (str(eui64_link_local(P.mac_bytes(_mac(n)))) for n in (1, 2))
        self.v6 = ["fd99::1", "fd99::2", "fd99:1::1", "fd99:1::2", "fd99:2::5", "fd99:9::9", "::",
                   ll1, ll2, "fe80::2:2", "fe80::99", "ff02::1", "ff02::2", "ff02::16",
                   "ff02::1:2", P.solicited_node("fd99::1"), P.solicited_node("fd99::2"),
                   "ff05::1:ff00:1", "fd99::77"]
        self.macs = [_mac(1), _mac(2), _mac(3), P.BROADCAST, "33:33:00:00:00:01",
                     "02:99:00:00:00:99"]
        # E1 and E2 (identified) get most frames, E3 and the bridge fewer
        self.ifs = [e.ifs[0]] * 4 + [e.ifs[1]] * 3 + [e.ifs[2]] * 2 + [e.bridge]
        self.iifs = [0, 0, e.ifs[0], e.ifs[1], e.bridge]

    # -- pools ---------------------------------------------------------------------
    def port(self):
        return self.r.choice(PORTS) if self.r.random() < 0.9 else self.r.randrange(65536)

    def addr(self, family):
        return self.r.choice(self.v4 if family == 4 else self.v6)

    # -- L4 ------------------------------------------------------------------------
    def l4(self, family, src, dst, proto):
        r = self.r
        if proto == P.TCP:
            sp, dp_ = self.port(), self.port()
            return sp, dp_, P.tcp(sp, dp_, r.choice([0x02, 0x10, 0x12, 0x11, 0x04, 0x18]),
                                  b"d" * r.choice([0, 10]))
        if proto in (P.UDP, P.SCTP):
            sp, dp_ = self.port(), self.port()
            return sp, dp_, P.udp(sp, dp_, b"u" * r.choice([0, 8, 40]))
        if proto in (P.ICMP, P.ICMPV6):
            types = ICMP4 if family == 4 else ICMP6
            t = r.choice(types) if r.random() < 0.95 else r.randrange(256)
            ident = r.choice([0, 7, 9])
            body = b""
            if t in (135, 136):
                body = P.ip6(self.addr(6))
            elif 130 <= t <= 132:
                body = P.ip6(self.addr(6))
            rest = struct.pack("!HH", ident, 1) if t not in (136,) else struct.pack(
                "!I", r.choice([0, P.NA_OVERRIDE, P.NA_SOLICITED]))
            if family == 4:
                return ident, 0, P.icmp4(t, 0, rest, body)
            return ident, 0, P.icmp6(src, dst, t, 0, rest, body)
        return 0, 0, b"x" * r.choice([0, 4, 20])

    def icmp_error(self, family):
        """An error about a recent flow, back through the hook the flow passed (the
        other direction), quoting the flow's packet; or about nothing in particular."""
        r = self.r
        flows = [f for f in self.recent if f[0] == family]
        etype = r.choice([3, 11, 12] if family == 4 else [1, 2, 3, 4])
        if flows and r.random() < 0.8:
            _, s, d, proto, sp, dp_, hd, hif = r.choice(flows)
            self.hook = (1 - hd, hif)
            inner = P.udp(sp, dp_) if proto != P.TCP else P.tcp(sp, dp_)[:8]
            if proto in (P.ICMP, P.ICMPV6):
                inner = struct.pack("!BBHHH", 8 if family == 4 else 128, 0, 0, sp, 1)
            quoted = P.ipv4(s, d, proto, inner) if family == 4 else P.ipv6(s, d, proto, inner)
            src, dst = d, s
        else:
            quoted = bytes(r.randrange(256) for _ in range(r.choice([8, 28, 48])))
            src, dst = self.addr(family), self.addr(family)
        if family == 4:
            return P.ipv4(src, dst, P.ICMP, P.icmp4(etype, 0, b"\0" * 4, quoted))
        return P.ipv6(src, dst, P.ICMPV6, P.icmp6(src, dst, etype, 0, b"\0" * 4, quoted))

    def ip_frame(self):
        r = self.r
        family = 4 if r.random() < 0.5 else 6
        if r.random() < 0.08:
            return family, self.icmp_error(family)
        proto = r.choice([P.TCP, P.UDP, P.UDP, P.ICMP if family == 4 else P.ICMPV6,
                          P.ICMPV6 if family == 4 else P.ICMP, P.SCTP, 47])
        flows = [f for f in self.recent if f[0] == family and f[3] == proto]
        if flows and r.random() < 0.4:
            _, s, d, _, sp, dp_, hd, hif = r.choice(flows)
            if r.random() < 0.6:             # the reply, back through the same hook
                s, d, sp, dp_, hd = d, s, dp_, sp, 1 - hd
            self.hook = (hd, hif)
            if proto == P.TCP:
                payload = P.tcp(sp, dp_, r.choice([0x10, 0x12, 0x11, 0x04]))
            elif proto in (P.UDP, P.SCTP):
                payload = P.udp(sp, dp_, b"r")
            elif proto in (P.ICMP, P.ICMPV6):
                t = r.choice([0, 8, 13, 14] if family == 4 else [128, 129, 200])
                rest = P.echo_rest(sp)
                payload = P.icmp4(t, 0, rest) if family == 4 else P.icmp6(s, d, t, 0, rest)
            else:
                payload = b"x" * 8
            return family, self.ip_packet(family, s, d, proto, payload)
        src, dst = self.addr(family), self.addr(family)
        sp, dp_, payload = self.l4(family, src, dst, proto)
        self.recent.append((family, src, dst, proto, sp, dp_, *self.hook))
        del self.recent[:-64]
        return family, self.ip_packet(family, src, dst, proto, payload)

    def ip_packet(self, family, src, dst, proto, payload):
        r = self.r
        hop = r.choice(HOPS)
        frag = r.random() < 0.12
        ident = r.randrange(1, 9)
        if family == 4:
            opts = b""
            if r.random() < 0.1:
                opts = r.choice([b"\x01" * 4, b"\x07\x07\x04" + b"\0" * 4, b"\x94\x04\0\0",
                                 bytes(r.randrange(256) for _ in range(r.choice([4, 8, 40])))])
            if frag:
                later = r.random() < 0.6
                return P.ipv4(src, dst, proto, payload if not later else payload[8:] + b"f" * 8,
                              ttl=hop, ident=ident, flags=0 if later and r.random() < 0.5 else 1,
                              offset=r.choice([1, 185]) if later else 0, options=opts)
            return P.ipv4(src, dst, proto, payload, ttl=hop, ident=r.randrange(65536),
                          options=opts, flags=r.choice([0, 0, 2]))
        chain = []
        while r.random() < 0.25 and len(chain) < 8:
            chain.append(r.choice([P.HOPOPTS, P.ROUTING, P.DSTOPTS, P.AH, P.FRAGMENT]))
        if frag:
            chain.insert(r.randrange(len(chain) + 1), P.FRAGMENT)
        body = payload
        later_frag = frag and r.random() < 0.6
        nh = proto
        for kind in reversed(chain):
            if kind == P.FRAGMENT:
                if later_frag:      # what follows a later fragment's header is payload
                    body = b"f" * r.choice([8, 16, 64])
                body = P.frag6(nh, r.choice([1, 185]) if later_frag else 0,
                               more=r.random() < 0.9, ident=ident) + body
            elif kind == P.AH:
                body = P.ah6(nh) + body
            else:
                opt = r.choice([b"\0" * 6, b"\x01\xfd" + b"\0" * 253,
                                b"".join(b"\x01\xfd" + b"\0" * 253 for _ in range(5))])
                body = P.ext6(nh, opt) + body
            nh = kind
        return P.ipv6(src, dst, nh, body, hop=hop)

    # -- other L2 -----------------------------------------------------------------
    def arp_frame(self):
        r = self.r
        spa = r.choice(self.v4[:3] + ["0.0.0.0", "10.99.0.77"])
        body = P.arp(r.choice([1, 2]), _mac(1), spa, "00:00:00:00:00:00", r.choice(self.v4))
        if r.random() < 0.1:
            body = bytes([0, r.choice([1, 6])]) + body[2:4] + bytes([r.choice([6, 8]), 4]) + body[6:]
        return P.ETH_ARP, body

    def dhcp_frame(self):
        r = self.r
        if r.random() < 0.5:
            src = r.choice(["0.0.0.0", "10.99.0.1", "10.99.0.2", "10.99.1.1"])
            dst = r.choice(["255.255.255.255", "10.99.0.254"])
            sp, dp_ = r.choice([(68, 67), (67, 68), (68, 69)])
            return P.ETH_IP, P.ipv4(src, dst, P.UDP, P.udp(sp, dp_, b"\x01" + b"\0" * 40))
        src = r.choice(["fe80::99", self.v6[7], "fd99::1", "::"])
        dst = r.choice(["ff02::1:2", "fe80::1"])
        sp, dp_ = r.choice([(546, 547), (547, 546), (546, 548)])
        return P.ETH_IPV6, P.ipv6(src, dst, P.UDP, P.udp(sp, dp_, b"\x01abc"), hop=r.choice(HOPS))

    def nd_frame(self):
        """ND/MLD with sources, targets and destinations from the pools."""
        r = self.r
        t = r.choice([133, 134, 135, 135, 136, 136, 137, 130, 131, 143])
        src, dst = r.choice(self.v6), r.choice(self.v6)
        target = r.choice(self.v6)
        rest = struct.pack("!I", r.choice([0, P.NA_OVERRIDE, P.NA_SOLICITED])) \
            if t == 136 else b"\0" * 4
        body = P.ip6(target) + P.lladdr_opt(2 if t == 136 else 1, _mac(r.choice([1, 2, 9])))
        if r.random() < 0.1:
            body = body[:r.randrange(len(body))]
        hop = r.choice([255, 255, 1, 64])
        pkt = P.ipv6(src, dst, P.ICMPV6, P.icmp6(src, dst, t, 0, rest, body), hop=hop)
        if r.random() < 0.15:   # with a hop-by-hop header (MLD's router alert)
            inner = pkt[40:]
            pkt = P.ipv6(src, dst, P.HOPOPTS, P.router_alert_hbh(P.ICMPV6) + inner, hop=hop)
        return P.ETH_IPV6, pkt

    def frame(self) -> bytes:
        r = self.r
        x = r.random()
        if x < 0.55:
            family, pkt = self.ip_frame()
            et = P.ETH_IP if family == 4 else P.ETH_IPV6
        elif x < 0.68:
            et, pkt = self.nd_frame()
        elif x < 0.78:
            et, pkt = self.arp_frame()
        elif x < 0.88:
            et, pkt = self.dhcp_frame()
        elif x < 0.93:
            et, pkt = r.choice([0x88CC, 0x8863, 0x0000, 0xFFFF, 0x0801]), b"\0" * 30
        else:   # a VLAN tag in the frame, then any of the above
            family, pkt = self.ip_frame()
            return P.eth(r.choice(self.macs), r.choice(self.macs),
                         P.ETH_IP if family == 4 else P.ETH_IPV6, pkt, vlan=r.randrange(4096))
        f = P.eth(r.choice(self.macs), r.choice(self.macs), et, pkt)
        y = r.random()
        if y < 0.08:
            f = f[:r.randrange(14, max(15, len(f)))]
        elif y < 0.13:
            b = bytearray(f)
            for _ in range(r.randrange(1, 4)):
                i = r.randrange(12, len(b))
                b[i] = r.randrange(256)
            f = bytes(b)
        return f

    def stream(self, n: int):
        fixed = list(hand_built(self.env))
        for i in range(n):
            if i < len(fixed):
                yield fixed[i]
                continue
            r = self.r
            self.hook = (r.choice([INGRESS, EGRESS]), r.choice(self.ifs))
            f = self.frame()[:MAX_FRAME]
            yield f, self.hook[0], self.hook[1], r.choice(self.iifs)


def hand_built(env: FuzzEnv):
    """One frame per rule of the pipeline, at E1 (identified), E3 (not) and the bridge
    (no entry): (frame, direction, ifindex, ingress_ifindex)."""
    i1, i2, i3 = env.ifs
    m1, m2 = _mac(1), _mac(2)
    ll1 = str(eui64_link_local(P.mac_bytes(m1)))
    ip4 = lambda s, d, proto, pl, **kw: P.eth(m2, m1, P.ETH_IP, P.ipv4(s, d, proto, pl, **kw))  # noqa
    ip6 = lambda s, d, nh, pl, **kw: P.eth(m2, m1, P.ETH_IPV6, P.ipv6(s, d, nh, pl, **kw))  # noqa
    udp = P.udp(40000, 53, b"q")
    yield ip4("10.99.0.1", "10.99.1.1", P.UDP, udp), EGRESS, i1, 0
    yield ip4("10.99.1.1", "10.99.0.1", P.UDP, P.udp(53, 40000, b"r")), INGRESS, i1, 0
    yield ip4("10.99.0.9", "10.99.1.1", P.UDP, udp), EGRESS, i1, 0                  # spoofed
    yield ip4("10.99.0.1", "10.99.1.1", P.UDP, udp[:6]), EGRESS, i1, 0              # truncated
    yield ip4("10.99.0.1", "10.99.1.1", P.UDP, udp, options=b"\x01" * 40), EGRESS, i1, 0
    yield ip4("10.99.0.1", "10.99.1.1", P.UDP, b"z" * 16, ident=3, offset=3), EGRESS, i1, 0
    yield ip4("10.99.0.1", "10.99.1.1", P.UDP, udp, ident=4, flags=1), EGRESS, i1, 0
    yield ip4("10.99.0.1", "10.99.1.1", P.UDP, b"z" * 16, ident=4, offset=2), EGRESS, i1, 0
    yield ip6("fd99::1", "fd99:1::1", P.DSTOPTS, P.ext6(P.UDP) + udp), EGRESS, i1, 0
    # every extension header in one chain, ending in a first fragment
    yield ip6("fd99::1", "fd99:1::1", P.HOPOPTS,
              P.ext6(P.DSTOPTS) + P.ext6(P.ROUTING) + P.ext6(P.AH) + P.ah6(P.FRAGMENT)
              + P.frag6(P.UDP, 0, True, 5) + udp), EGRESS, i1, 0
    yield ip6("fd99::1", "fd99:1::1", P.FRAGMENT, P.frag6(P.DSTOPTS, 9, False, 5)
              + b"\x3b\x00" + b"\0" * 30), EGRESS, i1, 0                            # later
    yield ip6("fd99::1", "fd99:1::1", P.DSTOPTS,
              P.ext6(P.UDP, b"\x01\xfd" + b"\0" * 253) + udp), EGRESS, i1, 0
    long_chain = b"".join(P.ext6(P.DSTOPTS, b"\x01\xfd" + b"\0" * 253) for _ in range(4))
    yield ip6("fd99::1", "fd99:1::1", P.DSTOPTS, long_chain + P.ext6(P.UDP) + udp), EGRESS, i1, 0
    yield ip6("fd99::1", "fd99:1::1", P.HOPOPTS, P.ext6(P.HOPOPTS) * 7 + udp), EGRESS, i1, 0
    yield P.ns_frame(m1, P.multicast_mac(P.solicited_node("fd99::2")), ll1,
                     P.solicited_node("fd99::2"), "fd99::2"), EGRESS, i1, 0
    yield P.na_frame(m1, P.multicast_mac("ff02::1"), ll1, "ff02::1", "fd99::2"), EGRESS, i1, 0
    yield P.ns_frame(m1, m2, ll1, "fd99:9::9", "fd99:9::9"), EGRESS, i1, 0
    yield P.eth(P.BROADCAST, m1, P.ETH_ARP, P.arp(1, m1, "10.99.0.2", "00" * 6,
                                                  "10.99.0.1")), EGRESS, i1, 0
    yield P.eth(P.BROADCAST, m1, P.ETH_IP, P.ipv4("0.0.0.0", "255.255.255.255", P.UDP,
                                                  P.udp(68, 67, b"\x01"))), EGRESS, i3, 0
    yield P.eth(m1, m2, P.ETH_IP, P.ipv4("10.99.0.254", "255.255.255.255", P.UDP,
                                         P.udp(67, 68, b"\x02"))), INGRESS, i3, 0
    yield P.eth(m1, m2, P.ETH_IP, P.ipv4("10.99.0.254", "255.255.255.255", P.UDP,
                                         P.udp(67, 68, b"\x02"))), INGRESS, i3, i1
    yield P.eth(m1, m2, P.ETH_VLAN, b"\0\x05\x08\x00" + P.ipv4("10.99.0.1", "10.99.1.1", P.UDP,
                                                              udp)), EGRESS, i1, 0
    yield P.eth(m1, m2, 0x88CC, b"\0" * 20), EGRESS, i1, 0
    yield P.eth(m1, m2, P.ETH_IP, P.ipv4("10.99.0.1", "10.99.1.1", P.UDP, udp)), EGRESS, \
        env.bridge, 0
    yield P.eth(m1, m2, P.ETH_IP, P.ipv4("10.99.0.1", "10.99.1.1", P.ICMP,
                                         P.icmp4(8, 0, P.echo_rest(7)))), EGRESS, i1, 0
    yield P.eth(m2, m1, P.ETH_IP, P.ipv4("10.99.1.1", "10.99.0.1", P.ICMP,
                                         P.icmp4(0, 0, P.echo_rest(7)))), INGRESS, i1, 0
    yield P.eth(m2, m1, P.ETH_IP, P.ipv4("10.99.1.1", "10.99.0.1", P.ICMP,
                                         P.icmp4(8, 0, P.echo_rest(7)))), INGRESS, i1, 0
    quoted = P.ipv4("10.99.0.1", "10.99.1.1", P.UDP, udp[:8])
    yield P.eth(m2, m1, P.ETH_IP, P.ipv4("10.99.1.1", "10.99.0.1", P.ICMP,
                                         P.icmp4(12, 0, b"\0" * 4, quoted))), INGRESS, i1, 0

