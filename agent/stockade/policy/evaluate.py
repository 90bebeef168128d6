"""Policy questions, answered from compiled map state exactly as the datapath decides.

    ev = Evaluator(engine.entries, engine.flags, engine.local_ids)
    ev.verdict(src, dst, PROTO_TCP, 5432)   # "allow" | "deny" (a deny rule) | "default-deny"
    ev.segments(src, dst, PROTO_TCP)         # the port space cut where the verdict changes
    ev.cell(src, dst)                        # what the matrix shows for one pair

A connection is allowed when the source's egress and the destination's ingress both
allow it; an identity that is not local to this host has no policy here (its own host
enforces it, if any). Any port/type question is answered exactly: the segments come from
the map keys themselves, never from probing a made-up port.

``Evaluator`` takes mappings, so the state before a plan (``Plan.entries_before``) is
evaluated the same way as the state now; ``pair_changes`` compares the two.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from .mapstate import (
    ANY_PEER,
    EGRESS,
    INGRESS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_NAMES,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    DirectionPolicy,
    Entry,
    Key,
    lookup,
)

# The protocols a matrix cell reports, with the last port (or ICMP type) of each.
CELL_PROTOCOLS = ((PROTO_TCP, 65535), (PROTO_UDP, 65535), (PROTO_SCTP, 65535),
                  (PROTO_ICMP, 255), (PROTO_ICMPV6, 255))


@dataclass(frozen=True)
class Segment:
    first: int
    last: int
    verdict: str  # allow | deny | default-deny

    def describe(self, proto: int, top: int) -> str:
        name = PROTO_NAMES.get(proto, str(proto))
        if self.first == 0 and self.last == top:
            return name
        if self.first == self.last:
            return f"{self.first}/{name}"
        return f"{self.first}-{self.last}/{name}"


@dataclass
class Cell:
    """What one (source, destination) pair may do, over every protocol and port."""

    state: str                          # open | any (all but ``deny``) | ports | closed
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)   # denied by a deny rule
    remote: bool = False                # neither side has policy on this host

    def to_dict(self) -> dict:
        return {"state": self.state, "allow": self.allow, "deny": self.deny,
                "remote": self.remote}


class Evaluator:
    def __init__(self, entries: Mapping[Key, Entry], flags: Mapping[tuple[int, int], DirectionPolicy],
                 local_ids: Collection[int]):
        self.entries, self.flags, self.local_ids = entries, flags, local_ids
        self._index: dict[tuple[int, int, int], list[Key]] | None = None
        self._cells: dict[tuple, Cell] = {}

    # ------------------------------------------------------------------ one connection
    def side(self, local: int, peer: int, direction: int, proto: int,
             port: int | None) -> tuple[str, list[Key]]:
        """One hook's decision: allow, deny, default-deny or not-enforced, with the keys
        that decided it."""
        if local not in self.local_ids:
            return "not-enforced", []
        return lookup(self.entries, self.flags, local, peer, direction, proto, port)

    def verdict(self, src: int, dst: int, proto: int, port: int | None) -> str:
        results = (self.side(src, dst, EGRESS, proto, port)[0],
                   self.side(dst, src, INGRESS, proto, port)[0])
        if "deny" in results:
            return "deny"
        if "default-deny" in results:
            return "default-deny"
        return "allow"

    def enforced(self, src: int, dst: int) -> bool:
        return any(self.flags.get((i, d), DirectionPolicy()).enforced and i in self.local_ids
                   for i, d in ((src, EGRESS), (dst, INGRESS)))

    # ------------------------------------------------------------------ port space
    def keys_of(self, local: int, peer: int, direction: int) -> list[Key]:
        if self._index is None:
            index: dict[tuple[int, int, int], list[Key]] = {}
            for k in self.entries:
                index.setdefault((k.local, k.peer, k.direction), []).append(k)
            self._index = index
        return self._index.get((local, peer, direction), [])

    def _relevant(self, src: int, dst: int) -> list[Key]:
        keys: list[Key] = []
        for local, peer, d in ((src, dst, EGRESS), (dst, src, INGRESS)):
            if local in self.local_ids:
                keys += self.keys_of(local, peer, d)
                keys += self.keys_of(local, ANY_PEER, d)
        return keys

    def segments(self, src: int, dst: int, proto: int, top: int = 65535,
                 keys: Iterable[Key] | None = None) -> list[Segment]:
        """The ports (or ICMP types) 0..top of ``proto`` cut into runs of one verdict."""
        cuts = {0, top + 1}
        for k in self._relevant(src, dst) if keys is None else keys:
            if k.proto == proto and k.port_plen:
                lo, hi = k.port_range
                cuts.update((lo, min(hi, top) + 1))
        bounds = sorted(c for c in cuts if c <= top + 1)
        out: list[Segment] = []
        for lo, nxt in zip(bounds, bounds[1:], strict=False):
            v = self.verdict(src, dst, proto, lo)
            if out and out[-1].verdict == v and out[-1].last == lo - 1:
                out[-1] = Segment(out[-1].first, nxt - 1, v)
            else:
                out.append(Segment(lo, nxt - 1, v))
        return out

    def cell(self, src: int, dst: int) -> Cell:
        if src not in self.local_ids and dst not in self.local_ids:
            return Cell("open", remote=True)
        if not self.enforced(src, dst):
            return Cell("open")
        keys = self._relevant(src, dst)
        sig = (src in self.local_ids, dst in self.local_ids,
               self.flags.get((src, EGRESS)), self.flags.get((dst, INGRESS)),
               tuple(sorted((k.direction, k.peer == ANY_PEER, k.proto, k.port, k.port_plen,
                             self.entries[k].deny) for k in keys)))
        cached = self._cells.get(sig)
        if cached is not None:
            return cached
        allow, deny, defaulted = [], [], False
        for proto, top in CELL_PROTOCOLS:
            for seg in self.segments(src, dst, proto, top, keys):
                if seg.verdict == "allow":
                    allow.append(seg.describe(proto, top))
                elif seg.verdict == "deny":
                    deny.append(seg.describe(proto, top))
                else:
                    defaulted = True
        if not defaulted:  # everything but what deny rules name
            cell = Cell("any", [], deny)
        else:
            cell = Cell("ports" if allow else "closed", allow, deny)
        self._cells[sig] = cell
        return cell


def pair_changes(before: Evaluator, after: Evaluator, pairs: Iterable[tuple[int, int]]) -> list[dict]:
    """For each (src, dst) whose cell differs: what becomes allowed and what denied,
    as port/type runs per protocol."""
    out = []
    for src, dst in pairs:
        a, b = before.cell(src, dst), after.cell(src, dst)
        if (a.state, a.allow, a.deny) == (b.state, b.allow, b.deny):
            continue
        allowed, denied = [], []
        for proto, top in CELL_PROTOCOLS:
            was = _allowed_runs(before, src, dst, proto, top, a)
            now = _allowed_runs(after, src, dst, proto, top, b)
            allowed += [_describe(r, proto, top) for r in _minus(now, was)]
            denied += [_describe(r, proto, top) for r in _minus(was, now)]
        if allowed or denied:
            out.append({"src": src, "dst": dst, "allowed": allowed, "denied": denied,
                        "before": a.to_dict(), "after": b.to_dict()})
    return out


def affected_pairs(keys: Iterable[Key], flag_pairs: Iterable[tuple[int, int]],
                   identity_ids: Collection[int]) -> set[tuple[int, int]]:
    """(src, dst) pairs whose verdicts a change of these keys and flags can touch."""
    out: set[tuple[int, int]] = set()
    wide: set[tuple[int, int]] = set(flag_pairs)  # (local, direction): every peer
    for k in keys:
        if k.peer == ANY_PEER:
            wide.add((k.local, k.direction))
        else:
            out.add((k.local, k.peer) if k.direction == EGRESS else (k.peer, k.local))
    for local, direction in wide:
        for other in identity_ids:
            out.add((local, other) if direction == EGRESS else (other, local))
    return out


def _allowed_runs(ev: Evaluator, src: int, dst: int, proto: int, top: int,
                  cell: Cell) -> list[tuple[int, int]]:
    if cell.state == "open":
        return [(0, top)]
    return [(s.first, s.last) for s in ev.segments(src, dst, proto, top) if s.verdict == "allow"]


def _minus(runs: list[tuple[int, int]], other: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for lo, hi in runs:
        cur = lo
        for olo, ohi in sorted(other):
            if ohi < cur or olo > hi:
                continue
            if olo > cur:
                out.append((cur, olo - 1))
            cur = max(cur, ohi + 1)
        if cur <= hi:
            out.append((cur, hi))
    return out


def _describe(run: tuple[int, int], proto: int, top: int) -> str:
    return Segment(run[0], run[1], "").describe(proto, top)


__all__ = ["CELL_PROTOCOLS", "Cell", "Evaluator", "Segment", "affected_pairs",
           "pair_changes"]
