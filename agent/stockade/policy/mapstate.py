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

from collections.abc import Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True, slots=True)
class Entry:
    """What a key decides, and which policies (by display name) are behind it."""

    deny: bool
    policies: frozenset[str] = frozenset()

    @property
    def verdict(self) -> str:
        return "deny" if self.deny else "allow"


@dataclass(frozen=True, slots=True)
class DirectionPolicy:
    """Per local identity and direction: is policy enforced, and is a miss dropped."""

    enforced: bool = False
    default_deny: bool = False


MapState = dict[Key, Entry]
FlagState = dict[tuple[int, int], DirectionPolicy]  # (local identity, direction) -> flags


class L7Key(NamedTuple):
    """An L7-enforced TCP port of a local identity, for one peer identity (``ANY_PEER``:
    the rules every peer gets). The proxy uses the exact peer's entry when there is one
    (it already includes the any-peer rules), else the any-peer entry."""

    local: int
    direction: int
    port: int
    peer: int


# The HTTP rules (policy.api.ports.HTTPRule) that pass, any one of them sufficing. A
# rule with no field passes everything: an L4-only rule for that peer and port, or
# ``http: [{}]`` (visibility only), reduce the set to that one rule.
L7State = dict[L7Key, frozenset]


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
    """Changes that turn one compiled state into another. ``adds`` and ``removes``
    never share a key (a changed value is an add). ``prior`` holds, for every key the
    delta touches, its value before (None: absent), and ``prior_flags`` the same for
    flags: so a delta can be inverted, and the state before it can be read back
    (``BeforeView``) without a copy."""

    adds: MapState = field(default_factory=dict)
    removes: set[Key] = field(default_factory=set)
    flags: FlagState = field(default_factory=dict)  # new flags of the pairs that changed
    prior: dict[Key, Entry | None] = field(default_factory=dict)
    prior_flags: FlagState = field(default_factory=dict)
    # L7 rule sets that change: new value (None: removed), and the value before.
    l7: dict[L7Key, frozenset | None] = field(default_factory=dict)
    prior_l7: dict[L7Key, frozenset | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.adds or self.removes or self.flags or self.l7)

    def tightened(self) -> tuple[set[tuple[int, int]], set[tuple[int, int, int]]]:
        """Where this delta may deny what was allowed: ``wide`` (local, direction) for
        every peer (an any-peer key, or flags that now enforce or default-deny), and
        ``exact`` (local, peer, direction): the flows whose conntrack entries must go
        so that their next packet meets the new policy."""
        wide: set[tuple[int, int]] = set()
        exact: set[tuple[int, int, int]] = set()
        def was_allow(k: Key) -> bool:
            before = self.prior.get(k)
            return before is not None and not before.deny
        keys = [k for k in self.removes if was_allow(k)]
        keys += [k for k, e in self.adds.items()
                 if e.deny and (self.prior.get(k) is None or was_allow(k))]
        for k in keys:
            if k.peer == ANY_PEER:
                wide.add((k.local, k.direction))
            else:
                exact.add((k.local, k.peer, k.direction))
        for pair, flag in self.flags.items():
            before = self.prior_flags.get(pair, DirectionPolicy())
            if (flag.enforced and not before.enforced) or (flag.default_deny and not before.default_deny):
                wide.add(pair)
        return wide, {e for e in exact if (e[0], e[2]) not in wide}

    def __len__(self) -> int:
        return len(self.adds) + len(self.removes) + len(self.flags)

    def add(self, key: Key, entry: Entry, prior: Entry | None) -> None:
        self.prior.setdefault(key, prior)
        self.removes.discard(key)
        if self.prior[key] == entry:  # back to where it started: no change
            self.adds.pop(key, None)
        else:
            self.adds[key] = entry

    def remove(self, key: Key, prior: Entry | None) -> None:
        self.prior.setdefault(key, prior)
        self.adds.pop(key, None)
        if self.prior[key] is not None:
            self.removes.add(key)

    def set_flag(self, pair: tuple[int, int], flag: DirectionPolicy, prior: DirectionPolicy) -> None:
        self.prior_flags.setdefault(pair, prior)
        if self.prior_flags[pair] == flag:
            self.flags.pop(pair, None)
        else:
            self.flags[pair] = flag

    def set_l7(self, key: L7Key, rules: frozenset | None, prior: frozenset | None) -> None:
        self.prior_l7.setdefault(key, prior)
        if self.prior_l7[key] == rules:
            self.l7.pop(key, None)
        else:
            self.l7[key] = rules

    def then(self, later: "Delta") -> "Delta":
        """Sequential composition, in place: applying the result equals applying
        ``self`` and then ``later``."""
        for k in later.removes:
            self.remove(k, later.prior.get(k))
        for k, v in later.adds.items():
            self.add(k, v, later.prior.get(k))
        for pair, flag in later.flags.items():
            self.set_flag(pair, flag, later.prior_flags.get(pair, DirectionPolicy()))
        for key, rules in later.l7.items():
            self.set_l7(key, rules, later.prior_l7.get(key))
        return self

    def inverse(self) -> "Delta":
        """The delta that undoes this one."""
        out = Delta()
        for k in self.adds.keys() | self.removes:
            before, now = self.prior.get(k), self.adds.get(k)
            if before is None:
                out.remove(k, now)
            else:
                out.add(k, before, now)
        for pair, flag in self.flags.items():
            out.set_flag(pair, self.prior_flags.get(pair, DirectionPolicy()), flag)
        for key, rules in self.l7.items():
            out.set_l7(key, self.prior_l7.get(key), rules)
        return out

    def apply(self, entries: MapState, flags: FlagState) -> None:
        for key in self.removes:
            entries.pop(key, None)
        entries.update(self.adds)
        for k, v in self.flags.items():
            if v == DirectionPolicy():
                flags.pop(k, None)
            else:
                flags[k] = v


class BeforeView(Mapping):
    """Read-only view of the entries (or flags) as they were before ``delta``, given
    the current ones: what a plan's review compares against, without a copy."""

    def __init__(self, current: Mapping, prior: Mapping, absent=None):
        """``absent``: the prior value that means the key was not there (None for
        entries, ``DirectionPolicy()`` for flags)."""
        self.current, self.prior, self.absent = current, prior, absent

    def __getitem__(self, key):
        if key in self.prior:
            value = self.prior[key]
            if value is None or value == self.absent:
                raise KeyError(key)
            return value
        return self.current[key]

    def __contains__(self, key) -> bool:
        if key in self.prior:
            value = self.prior[key]
            return value is not None and value != self.absent
        return key in self.current

    def __iter__(self):
        for k in self.current:
            if k not in self.prior:
                yield k
        for k in self.prior:
            if k in self:
                yield k

    def __len__(self) -> int:
        return sum(1 for _ in self)


def diff(old: MapState, new: MapState, old_flags: FlagState | None = None,
         new_flags: FlagState | None = None) -> Delta:
    out = Delta()
    for k, v in new.items():
        if old.get(k) != v:
            out.add(k, v, old.get(k))
    for k in old:
        if k not in new:
            out.remove(k, old[k])
    of, nf = old_flags or {}, new_flags or {}
    for pair in set(of) | set(nf):
        out.set_flag(pair, nf.get(pair, DirectionPolicy()), of.get(pair, DirectionPolicy()))
    return out


def sorted_items(state: MapState) -> Iterator[tuple[Key, Entry]]:
    return iter(sorted(state.items()))


def lookup(entries: Mapping[Key, Entry], flags: Mapping[tuple[int, int], DirectionPolicy],
           local: int, peer: int, direction: int,
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


def _longest_match(entries: Mapping[Key, Entry], local: int, peer: int, direction: int, proto: int,
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
