"""The compiler's output: policy map state, keyed exactly as the BPF policy map.

A ``Key`` mirrors ``struct policy_key`` in bpf/include/stockade_maps.h on purpose, so that
policy code never imports the datapath. The BPF map is an LPM trie; its prefix always
covers ``local``, ``peer`` and ``direction`` (72 bits), then the protocol when it is not
0 (8 bits), then the top ``port_plen`` bits of ``port``. A port range is written as the
smallest set of port prefixes that covers it.

Lookup order in the datapath (and in tests/fake_datapath.py): the exact peer identity,
then the wildcard peer ``ANY_PEER``; a deny from either lookup wins, otherwise an allow
from either lookup allows, otherwise the direction's default applies. Within one
(local, peer, direction) the compiler removes allow entries that a deny entry covers, so
the longest-prefix match never prefers a narrower allow over a broader deny.

All fields are in host order here; the datapath converts ``port`` to network order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

ANY_PEER = 0
ANY_PROTO = 0

INGRESS = 0
EGRESS = 1
DIRECTIONS = (INGRESS, EGRESS)
DIRECTION_NAMES = {INGRESS: "ingress", EGRESS: "egress"}

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132
PROTO_NAMES = {ANY_PROTO: "any", PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp",
               PROTO_ICMPV6: "icmpv6", PROTO_SCTP: "sctp"}
PROTO_NUMBERS = {v: k for k, v in PROTO_NAMES.items()}

FIXED_PREFIX_BITS = 72  # local(32) + peer(32) + direction(8)


class Key(NamedTuple):
    """One policy map key. ``port`` holds the ICMP type for ICMP/ICMPv6."""

    local: int
    peer: int
    direction: int
    proto: int = ANY_PROTO
    port: int = 0
    port_plen: int = 0

    @property
    def prefixlen(self) -> int:
        if self.proto == ANY_PROTO:
            return FIXED_PREFIX_BITS
        return FIXED_PREFIX_BITS + 8 + self.port_plen

    @property
    def port_range(self) -> tuple[int, int]:
        """Inclusive (first, last) port this key covers."""
        span = 1 << (16 - self.port_plen)
        return self.port, self.port + span - 1

    def covers(self, other: "Key") -> bool:
        """True when every packet matching ``other`` also matches this key."""
        if (self.local, self.peer, self.direction) != (other.local, other.peer, other.direction):
            return False
        if self.proto == ANY_PROTO:
            return True
        if self.proto != other.proto:
            return False
        lo, hi = self.port_range
        olo, ohi = other.port_range
        return lo <= olo and ohi <= hi

    def matches(self, proto: int, port: int | None) -> bool:
        """Does a packet of ``proto`` to ``port`` match (``port`` None: non-first fragment)."""
        if self.proto == ANY_PROTO:
            return True
        if self.proto != proto:
            return False
        if port is None:
            return self.port_plen == 0
        lo, hi = self.port_range
        return lo <= port <= hi

    def describe(self) -> str:
        if self.proto == ANY_PROTO:
            return "any"
        lo, hi = self.port_range
        name = PROTO_NAMES.get(self.proto, str(self.proto))
        if self.port_plen == 0:
            return name
        return f"{lo}/{name}" if lo == hi else f"{lo}-{hi}/{name}"


@dataclass(frozen=True)
class Entry:
    """What a key decides, and which policies (by display name) are behind it."""

    deny: bool
    policies: frozenset[str] = frozenset()

    @property
    def verdict(self) -> str:
        return "deny" if self.deny else "allow"


@dataclass(frozen=True)
class DirectionPolicy:
    """Per local identity and direction: is policy enforced, and is a miss dropped."""

    enforced: bool = False
    default_deny: bool = False


MapState = dict[Key, Entry]
FlagState = dict[tuple[int, int], DirectionPolicy]  # (local identity, direction) -> flags


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """Smallest list of (port, port_plen) prefixes covering first..last inclusive."""
    if first == 0 and last == 65535:
        return [(0, 0)]
    out = []
    lo = first
    while lo <= last:
        size = lo & -lo if lo else 1 << 16
        while lo + size - 1 > last:
            size >>= 1
        out.append((lo, 16 - size.bit_length() + 1))
        lo += size
    return out


@dataclass
class Delta:
    """Changes that turn one compiled state into another; ``adds`` and ``removes`` never
    share a key (a changed value is an add)."""

    adds: MapState
    removes: set[Key]
    flags: FlagState  # new flags for the (local, direction) pairs that changed

    def __bool__(self) -> bool:
        return bool(self.adds or self.removes or self.flags)

    def apply(self, entries: MapState, flags: FlagState) -> None:
        for key in self.removes:
            entries.pop(key, None)
        entries.update(self.adds)
        for k, v in self.flags.items():
            if v == DirectionPolicy():
                flags.pop(k, None)
            else:
                flags[k] = v


def diff(old: MapState, new: MapState, old_flags: FlagState | None = None,
         new_flags: FlagState | None = None) -> Delta:
    adds = {k: v for k, v in new.items() if old.get(k) != v}
    removes = {k for k in old if k not in new}
    flags: FlagState = {}
    of, nf = old_flags or {}, new_flags or {}
    for k in set(of) | set(nf):
        a, b = of.get(k, DirectionPolicy()), nf.get(k, DirectionPolicy())
        if a != b:
            flags[k] = b
    return Delta(adds, removes, flags)


def sorted_items(state: MapState) -> Iterator[tuple[Key, Entry]]:
    return iter(sorted(state.items()))


def lookup(entries: MapState, flags: FlagState, local: int, peer: int, direction: int,
           proto: int, port: int | None) -> tuple[str, list[Key]]:
    """Reference lookup, in the datapath's order. Returns (verdict, deciding keys)
    where verdict is 'allow', 'deny' (deny rule), 'default-deny' or 'not-enforced'."""
    flag = flags.get((local, direction), DirectionPolicy())
    if not flag.enforced:
        return "not-enforced", []
    found: list[Key] = []
    for p in (peer, ANY_PEER) if peer != ANY_PEER else (ANY_PEER,):
        best = _longest_match(entries, local, p, direction, proto, port)
        if best is not None:
            found.append(best)
    denies = [k for k in found if entries[k].deny]
    if denies:
        return "deny", denies
    if found:
        return "allow", found
    return ("default-deny" if flag.default_deny else "allow"), []


def _longest_match(entries: MapState, local: int, peer: int, direction: int, proto: int,
                   port: int | None) -> Key | None:
    candidates: Iterable[Key] = [Key(local, peer, direction)]
    if port is None:
        candidates = [Key(local, peer, direction, proto, 0, 0), Key(local, peer, direction)]
    else:
        candidates = [Key(local, peer, direction, proto, (port >> (16 - plen)) << (16 - plen) if plen else 0, plen)
                      for plen in range(16, -1, -1)] + [Key(local, peer, direction)]
    for k in candidates:
        if k in entries:
            return k
    return None
