"""The policy compiler: (policies, identities) -> map state, incrementally.

For each local identity L and each peer identity P (or the wildcard ``ANY_PEER``) the
entries of the pair (L, P) come from the clauses (one direction list element of a rule)
of the rules that select L and whose peers include P. Changing one identity or one
policy recomputes only the pairs that change touches, found through the selector cache,
and returns a ``Delta``; ``full_compile`` recomputes everything from scratch, and
applying every delta to the old state always equals it (tests/test_compiler_props.py).
"""
from __future__ import annotations

import functools
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from .api.ports import HTTPRule
from .api.rule import PeerRule, Policy, PolicyRef, Rule
from .identity import WORKLOAD_KIND, Identity
from .mapstate import (
    ANY_PEER,
    ANY_PROTO,
    EGRESS,
    INGRESS,
    PROTO_TCP,
    Delta,
    DirectionPolicy,
    Entry,
    FlagState,
    Key,
    L7Key,
    L7State,
    MapState,
    port_prefixes,
)
from .selectorcache import Selector, SelectorCache

ENFORCEMENT_MODES = ("default", "always", "never")
L4Key = tuple[int, int, int]  # (proto, port, port_plen)


@dataclass(eq=False)
class Clause:
    """One element of a rule's ingress/egress/ingressDeny/egressDeny list, compiled."""

    rule: Rule
    direction: int
    deny: bool
    peer_rule: PeerRule
    selectors: tuple[Selector, ...]
    any_peer: bool
    l4: tuple[L4Key, ...]
    policy: str = field(init=False)
    l7: dict[int, tuple[HTTPRule, ...]] = field(init=False)  # TCP port -> HTTP rules
    entry: Entry = field(init=False)   # what this clause alone decides: shared by its keys

    def __post_init__(self):
        self.policy = self.rule.ref.display
        self.l7 = {} if self.deny else l7_ports(self.peer_rule)
        self.entry = Entry(self.deny, frozenset((self.policy,)))

    def http_for(self, port: int) -> tuple[HTTPRule, ...]:
        """The HTTP rules this clause sets for TCP ``port`` (which it must allow): its
        own, or the rule that passes everything when it allows the port at L4 only."""
        return self.l7.get(port) or (ALL_HTTP,)

    def allows_tcp(self, port: int) -> bool:
        return not self.deny and any(Key(0, 0, 0, *k).matches(PROTO_TCP, port) for k in self.l4)


ALL_HTTP = HTTPRule()


def l7_ports(pr: PeerRule) -> dict[int, tuple[HTTPRule, ...]]:
    out: dict[int, tuple[HTTPRule, ...]] = {}
    for port_rule in pr.to_ports:
        if port_rule.http:
            for pp in port_rule.ports:
                out[pp.port] = tuple(dict.fromkeys(out.get(pp.port, ()) + port_rule.http))
    return out


def peer_selectors(pr: PeerRule) -> tuple[tuple[Selector, ...], bool]:
    """(selectors, wildcard): L4-only rules and ``all`` select every peer."""
    if pr.selects_nothing:
        return (), False
    if not pr.has_peers or "all" in pr.entities:
        return (), True
    sels: list[Selector] = [("endpoints", s) for s in pr.endpoints]
    sels += [("cidrgroup", c.group) if c.group else ("cidr", c) for c in pr.cidrs]
    sels += [("entity", e) for e in pr.entities]
    return tuple(dict.fromkeys(sels)), False


def l4_keys(pr: PeerRule) -> tuple[L4Key, ...]:
    if not pr.has_l4:
        return ((ANY_PROTO, 0, 0),)
    keys: list[L4Key] = []
    for port_rule in pr.to_ports:
        for pp in port_rule.ports:
            lo, hi = pp.range
            if lo == hi:
                keys.extend([_l4_key(proto, lo, 16) for proto in pp.proto_numbers])
                continue
            prefixes = port_prefixes(lo, hi)
            for proto in pp.proto_numbers:
                keys.extend([_l4_key(proto, port, plen) for port, plen in prefixes])
    keys.extend(_l4_key(f.proto, f.type, 16) for f in pr.icmps)
    return tuple(dict.fromkeys(keys))


@functools.lru_cache(maxsize=65536)
def _l4_key(proto: int, port: int, plen: int) -> L4Key:
    """One shared tuple per key: 1,000 policies allowing the same 100 ports hold 100."""
    return (proto, port, plen)


def compile_rule(rule: Rule) -> list[Clause]:
    out = []
    for direction, deny, pr in rule.clauses():
        sels, any_peer = peer_selectors(pr)
        if sels or any_peer:
            out.append(Clause(rule, INGRESS if direction == "ingress" else EGRESS, deny, pr,
                              sels, any_peer, l4_keys(pr)))
    return out


class Compiler:
    """Holds the compiled state and updates it incrementally. Not thread-safe: callers
    serialize changes (the agent does it under its lock)."""

    def __init__(self, enforcement: str = "default"):
        if enforcement not in ENFORCEMENT_MODES:
            raise ValueError(f"enforcement must be one of {ENFORCEMENT_MODES}")
        self.enforcement = enforcement
        self.cache = SelectorCache()
        self.policies: dict[PolicyRef, Policy] = {}
        self.local_ids: set[int] = set()
        self.entries: MapState = {}
        self.flags: FlagState = {}
        self._clauses: dict[int, list[Clause]] = {}           # id(rule) -> clauses
        self._rule_locals: dict[int, set[int]] = {}           # id(rule) -> local ids
        self._rules: dict[int, Rule] = {}
        self._l7_rule_ids: set[int] = set()                   # id(rule) of rules with HTTP rules
        self._rule_dirs: dict[int, tuple[bool | None, bool | None]] = {}  # see _directions
        self._sel_clauses: dict[Selector, set[Clause]] = {}
        self._local_rules: dict[int, dict[int, Rule]] = {}  # local -> id(rule) -> rule
        self._rule_index: dict[tuple[str, str] | None, set[int]] = {}  # see index_keys
        self._pairs: dict[tuple[int, int], MapState] = {}
        self._peers_of: dict[int, set[int]] = {}              # local -> peers with a pair
        self._locals_of_peer: dict[int, set[int]] = {}        # peer -> locals with a pair
        self.l7: L7State = {}
        self._l7_of: dict[int, set[L7Key]] = {}               # local -> its L7 keys

    # public API ------------------------------------------------------------------
    def add_identity(self, ident: Identity, local: bool = False) -> Delta:
        delta = Delta()
        changed = self.cache.add_identity(ident)
        pairs: set[tuple[int, int]] = set()
        for sel in changed:
            for clause in self._sel_clauses.get(sel, ()):
                pairs.update((loc, ident.id) for loc in self._rule_locals[id(clause.rule)])
        if local and ident.kind == WORKLOAD_KIND:
            self.local_ids.add(ident.id)
            rules = [self._rules[rid] for rid in self._rules_for_labels(ident)
                     if self._rules[rid].endpoint_selector.matches(ident.labels)]
            self._local_rules[ident.id] = {id(r): r for r in rules}
            for r in rules:
                self._rule_locals[id(r)].add(ident.id)
            self._recompute_locals({ident.id}, delta)
            pairs = {p for p in pairs if p[0] != ident.id}
        self._recompute_pairs(pairs, delta)
        return delta

    def remove_identity(self, ident_id: int) -> Delta:
        delta = Delta()
        self.cache.remove_identity(ident_id)
        for loc in list(self._locals_of_peer.get(ident_id, ())):
            self._set_pair(loc, ident_id, {}, delta)
        if ident_id in self.local_ids:
            self.local_ids.discard(ident_id)
            for r in self._local_rules.pop(ident_id, {}).values():
                self._rule_locals[id(r)].discard(ident_id)
            for peer in list(self._peers_of.get(ident_id, ())):
                self._set_pair(ident_id, peer, {}, delta)
            for d in (INGRESS, EGRESS):
                self._set_flag(ident_id, d, DirectionPolicy(), delta)
        self._recompute_l7(set(self._l7_of), delta)
        return delta

    def set_policy(self, policy: Policy) -> Delta:
        return self.set_policies([policy])

    def set_policies(self, policies: Iterable[Policy], remove: Iterable[PolicyRef] = ()) -> Delta:
        """Add or replace ``policies`` and drop ``remove`` in one step; each affected
        local identity is recomputed once."""
        delta = Delta()
        affected: dict[int, set[int]] = {}  # local -> peers whose pairs may change
        for ref in remove:
            self._drop_policy(ref, affected)
        for policy in policies:
            self._drop_policy(policy.ref, affected)
            self.policies[policy.ref] = policy
            for rule in policy.rules:
                self._add_rule(rule, affected)
        self._recompute_locals(set(affected), delta, affected)
        return delta

    def remove_policy(self, ref: PolicyRef) -> Delta:
        return self.set_policies([], remove=[ref])

    def explain(self, local: int, peer: int, direction: int, proto: int,
                port: int | None) -> list[tuple[Clause, bool]]:
        """Clauses that match a packet, each with whether it denies."""
        out = []
        for rule in self._local_rules.get(local, {}).values():
            for c in self._clauses[id(rule)]:
                if c.direction != direction or not self._clause_has_peer(c, peer):
                    continue
                if any(Key(local, 0, direction, *k).matches(proto, port) for k in c.l4):
                    out.append((c, c.deny))
        return out

    def rules_for(self, local: int) -> list[Rule]:
        return list(self._local_rules.get(local, {}).values())

    # rules -----------------------------------------------------------------------
    def _add_rule(self, rule: Rule, affected: dict[int, set[int]]) -> None:
        rid = id(rule)
        self._rules[rid] = rule
        self._index_rule(rule, True)
        self._clauses[rid] = compile_rule(rule)
        if any(c.l7 for c in self._clauses[rid]):
            self._l7_rule_ids.add(rid)
        self._rule_dirs[rid] = _directions(rule)
        for c in self._clauses[rid]:
            for sel in c.selectors:
                self.cache.add_selector(sel)
                self._sel_clauses.setdefault(sel, set()).add(c)
        locs = {i for i in self._candidates(rule)
                if rule.endpoint_selector.matches(self.cache.identities[i].labels)}
        self._rule_locals[rid] = locs
        peers = self._rule_peers(rid)
        for i in locs:
            self._local_rules[i][rid] = rule
            affected.setdefault(i, set()).update(peers)

    def _rule_peers(self, rid: int) -> set[int]:
        out: set[int] = set()
        for c in self._clauses[rid]:
            out |= self._clause_peers(c)
        return out

    def _rules_for_labels(self, ident: Identity) -> set[int]:
        out = set(self._rule_index.get(None, ()))
        for label in ident.labels:
            out |= self._rule_index.get((label.key, label.value), set())
        return out

    def _index_rule(self, rule: Rule, add: bool) -> None:
        found = self.cache.index_keys(rule.endpoint_selector)
        keys: list[tuple[str, str] | None] = [None] if found is None else list(found)
        for k in keys:
            bucket = self._rule_index.setdefault(k, set())
            if add:
                bucket.add(id(rule))
            else:
                bucket.discard(id(rule))

    def _candidates(self, rule: Rule) -> Collection[int]:
        return self.cache.candidates(rule.endpoint_selector, self.local_ids)

    def _drop_policy(self, ref: PolicyRef, affected: dict[int, set[int]]) -> None:
        old = self.policies.pop(ref, None)
        for rule in old.rules if old else []:
            rid = id(rule)
            peers = self._rule_peers(rid)
            for c in self._clauses.pop(rid):
                for sel in c.selectors:
                    self._sel_clauses[sel].discard(c)
                    if not self._sel_clauses[sel]:
                        del self._sel_clauses[sel]
                    self.cache.remove_selector(sel)
            locs = self._rule_locals.pop(rid)
            for i in locs:
                del self._local_rules[i][rid]
                affected.setdefault(i, set()).update(peers)
            self._index_rule(rule, False)
            del self._rules[rid]
            self._l7_rule_ids.discard(rid)
            del self._rule_dirs[rid]

    # recomputation ---------------------------------------------------------------
    def _clause_has_peer(self, c: Clause, peer: int) -> bool:
        if c.any_peer:
            return peer == ANY_PEER
        return peer != ANY_PEER and any(peer in self.cache.get(s) for s in c.selectors)

    def _clause_peers(self, c: Clause) -> set[int]:
        if c.any_peer:
            return {ANY_PEER}
        out: set[int] = set()
        for s in c.selectors:
            out |= self.cache.get(s)
        return out

    def _local_clauses(self, local: int) -> list[Clause]:
        return [c for r in self._local_rules.get(local, {}).values() for c in self._clauses[id(r)]]

    def _recompute_locals(self, locals_: set[int], delta: Delta,
                          only_peers: dict[int, set[int]] | None = None) -> None:
        """Recompute the pairs of each local (only those with ``only_peers[loc]`` when
        given: a rule change touches just its own peers) and its flags."""
        for loc in locals_:
            wanted = only_peers.get(loc) if only_peers is not None else None
            if wanted is not None and 4 * len(wanted) < len(self._local_rules.get(loc, ())):
                # a few peers of a local with many rules: find their clauses by selector
                for peer in wanted:
                    self._set_pair(loc, peer, self._pair_entries(
                        loc, peer, self._clauses_with_peer(loc, peer)), delta)
                for d, flag in self._flags_for(loc).items():
                    self._set_flag(loc, d, flag, delta)
                continue
            by_peer: dict[int, list[Clause]] = {}
            for c in self._local_clauses(loc):
                peers = self._clause_peers(c)
                for peer in peers if wanted is None else peers & wanted:
                    by_peer.setdefault(peer, []).append(c)
            todo = by_peer.keys() | self._peers_of.get(loc, set()) if wanted is None else wanted
            for peer in todo:
                self._set_pair(loc, peer, self._pair_entries(loc, peer, by_peer.get(peer, [])), delta)
            for d, flag in self._flags_for(loc).items():
                self._set_flag(loc, d, flag, delta)
        self._recompute_l7(locals_, delta)

    def _clauses_with_peer(self, loc: int, peer: int) -> list[Clause]:
        """The clauses of ``loc``'s rules that may select ``peer`` (a superset of those
        that do: _pair_entries checks), found through the selectors that select it."""
        rules = self._local_rules.get(loc, {})
        ident = self.cache.identities.get(peer)
        if peer == ANY_PEER or ident is None:
            return [c for r in rules.values() for c in self._clauses[id(r)]
                    if c.any_peer == (peer == ANY_PEER)] if peer == ANY_PEER else []
        seen: dict[int, Clause] = {}
        for sel in self.cache.selectors_for(ident):
            if peer in self.cache.get(sel):
                for c in self._sel_clauses.get(sel, ()):
                    if id(c.rule) in rules:
                        seen[id(c)] = c
        return list(seen.values())

    def _recompute_pairs(self, pairs: set[tuple[int, int]], delta: Delta) -> None:
        for loc, peer in pairs:
            self._set_pair(loc, peer, self._pair_entries(loc, peer, self._local_clauses(loc)), delta)
        self._recompute_l7({loc for loc, _ in pairs}, delta)

    # L7 ----------------------------------------------------------------------------
    def l7_rules(self, local: int) -> L7State:
        """The HTTP rules of every L7 port of ``local``, per peer identity (see L7Key).
        For each peer: the rules of every clause that allows it that port, plus those
        that every peer gets; an L4-only clause for the port passes everything."""
        if self._l7_rule_ids.isdisjoint(self._local_rules.get(local, ())):
            return {}       # no L7 port (a local with 10,000 L4 rules: no walk of them)
        clauses = [c for c in self._local_clauses(local) if not c.deny]
        ports = {(c.direction, port) for c in clauses for port in c.l7}
        out: L7State = {}
        for d, port in sorted(ports):
            per_peer: dict[int, set[HTTPRule]] = {}
            for c in clauses:
                if c.direction == d and c.allows_tcp(port):
                    rules = c.http_for(port)
                    for peer in self._clause_peers(c):
                        per_peer.setdefault(peer, set()).update(rules)
            every = per_peer.get(ANY_PEER, set())
            for peer, peer_rules in per_peer.items():
                peer_rules |= every
                out[L7Key(local, d, port, peer)] = (frozenset((ALL_HTTP,)) if ALL_HTTP in peer_rules
                                                    else frozenset(peer_rules))
        return out

    def l7_policies(self, key: L7Key) -> tuple[str, ...]:
        """The policies behind ``key``'s HTTP rules (l7_rules): those of the clauses that
        allow its peer (for ANY_PEER: every peer) the port."""
        names = {c.policy for c in self._local_clauses(key.local)
                 if not c.deny and c.direction == key.direction and c.allows_tcp(key.port)
                 and (c.any_peer or (key.peer != ANY_PEER and self._clause_has_peer(c, key.peer)))}
        return tuple(sorted(names))

    def _recompute_l7(self, locals_: set[int], delta: Delta) -> None:
        for loc in locals_:
            new = self.l7_rules(loc) if loc in self.local_ids else {}
            old_keys = self._l7_of.get(loc, set())
            for k in old_keys - new.keys():
                delta.set_l7(k, None, self.l7.pop(k))
            for k, v in new.items():
                prior = self.l7.get(k)
                if prior != v:
                    self.l7[k] = v
                    delta.set_l7(k, v, prior)
            if new:
                self._l7_of[loc] = set(new)
            else:
                self._l7_of.pop(loc, None)

    def _pair_entries(self, loc: int, peer: int, clauses: list[Clause]) -> MapState:
        raw: MapState = {}
        for c in clauses:
            if not self._clause_has_peer(c, peer):
                continue
            entry, direction = c.entry, c.direction
            for proto, port, plen in c.l4:
                key = Key(loc, peer, direction, proto, port, plen)
                cur = raw.get(key)
                if cur is None or (entry.deny and not cur.deny):
                    raw[key] = entry
                elif cur.deny == entry.deny and not entry.policies <= cur.policies:
                    raw[key] = Entry(cur.deny, cur.policies | entry.policies)
        denies = [k for k, e in raw.items() if e.deny]
        if not denies:
            return raw
        return {k: e for k, e in raw.items() if e.deny or not any(d.covers(k) for d in denies)}

    def _flags_for(self, loc: int) -> dict[int, DirectionPolicy]:
        if self.enforcement == "never":
            return {INGRESS: DirectionPolicy(), EGRESS: DirectionPolicy()}
        if self.enforcement == "always":
            return {INGRESS: DirectionPolicy(True, True), EGRESS: DirectionPolicy(True, True)}
        dirs = [self._rule_dirs[rid] for rid in self._local_rules.get(loc, {})]
        out = {}
        for d, i in ((INGRESS, 0), (EGRESS, 1)):
            wants = [w[i] for w in dirs]
            out[d] = (DirectionPolicy() if wants.count(None) == len(wants)
                      else DirectionPolicy(True, True in wants))
        return out

    def _set_pair(self, loc: int, peer: int, new: MapState, delta: Delta) -> None:
        old = self._pairs.get((loc, peer), {})
        for k in old.keys() - new.keys():
            delta.remove(k, self.entries.pop(k))
        for k, v in new.items():
            prior = old.get(k)
            if prior != v:
                self.entries[k] = v
                delta.add(k, v, prior)
        if new:
            self._pairs[(loc, peer)] = new
            self._peers_of.setdefault(loc, set()).add(peer)
            self._locals_of_peer.setdefault(peer, set()).add(loc)
        elif (loc, peer) in self._pairs:
            del self._pairs[(loc, peer)]
            self._peers_of[loc].discard(peer)
            self._locals_of_peer[peer].discard(loc)

    def _set_flag(self, loc: int, d: int, flag: DirectionPolicy, delta: Delta) -> None:
        old = self.flags.get((loc, d), DirectionPolicy())
        if old == flag:
            return
        if flag == DirectionPolicy():
            del self.flags[(loc, d)]
        else:
            self.flags[(loc, d)] = flag
        delta.set_flag((loc, d), flag, old)


def full_compile(policies: list[Policy], identities: list[Identity], local_ids: set[int],
                 enforcement: str = "default") -> tuple[MapState, FlagState]:
    """From scratch: the reference every incremental update must agree with."""
    c = Compiler(enforcement)
    for ident in identities:
        c.add_identity(ident, local=ident.id in local_ids)
    c.set_policies(policies)
    return dict(c.entries), dict(c.flags)


def _directions(rule: Rule) -> tuple[bool | None, bool | None]:
    """Per direction (ingress, egress): None when the rule has no rules there, else
    whether it wants that direction's default deny."""
    ingress = rule.wants_default_deny("ingress") if rule.has_rules("ingress") else None
    egress = rule.wants_default_deny("egress") if rule.has_rules("egress") else None
    return ingress, egress
