"""The policy writer's order is safe (issue 14.8): random old/new policy map states go
through the real MapWriter.apply_delta onto a recording map; at every intermediate
state, no packet is allowed that both the old and the new state deny.

The verdict model is the programs' (bpf/lib/policy.h policy_decide): a longest-prefix
match among the exact peer's entries and one among the any-peer entries; a deny in
either wins, then an allow in either, then the direction's flags.
"""
from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.datapath.writer import MapWriter, _key_from_c
from stockade.policy.mapstate import (
    ANY_PEER,
    ANY_PROTO,
    EGRESS,
    INGRESS,
    Delta,
    DirectionPolicy,
    Entry,
    Key,
)

LOCAL, PEERS = 100, (ANY_PEER, 200, 201)
TCP, UDP = 6, 17
PORTS = (0, 79, 80, 81, 443)


class RecordingWriter(MapWriter):
    """MapWriter over dicts: every write is one recorded state."""

    def __init__(self, entries, flags):
        self.entries = dict(entries)
        self.flags = dict(flags)
        self.states = [(dict(self.entries), dict(self.flags))]

    def _shadow(self):
        return dict(self.entries), dict(self.flags)

    def _update(self, name, key, value):
        if name == "policy":
            self.entries[_key_from_c(key)] = Entry(bool(value.deny))
        else:
            self.flags[(key.identity, key.direction)] = DirectionPolicy(
                bool(value.enforced), bool(value.default_deny))
        self.states.append((dict(self.entries), dict(self.flags)))

    def _delete(self, name, key):
        if name == "policy":
            found = self.entries.pop(_key_from_c(key), None) is not None
        else:
            found = self.flags.pop((key.identity, key.direction), None) is not None
        self.states.append((dict(self.entries), dict(self.flags)))
        return found


def _lpm(entries, local, peer, direction, proto, port):
    best = None
    for k, e in entries.items():
        if (k.local, k.peer, k.direction) == (local, peer, direction) and k.matches(proto, port):
            if best is None or k.prefixlen > best[0].prefixlen:
                best = (k, e)
    return None if best is None else best[1].deny


def allowed(state, local, peer, direction, proto, port) -> bool:
    entries, flags = state
    f = flags.get((local, direction))
    if f is None or not f.enforced:
        return True
    exact = _lpm(entries, local, peer, direction, proto, port)
    anyp = _lpm(entries, local, ANY_PEER, direction, proto, port)
    if exact is True or anyp is True:
        return False
    if exact is False or anyp is False:
        return True
    return not f.default_deny


PACKETS = [(LOCAL, peer, d, proto, port) for peer in (200, 201, 202) for d in (INGRESS, EGRESS)
           for proto in (TCP, UDP) for port in (*PORTS, None)]

keys = st.builds(
    lambda peer, d, proto, port, plen: Key(LOCAL, peer, d) if proto == ANY_PROTO else
    Key(LOCAL, peer, d, proto, port & ((0xFFFF << (16 - plen)) & 0xFFFF), plen),
    st.sampled_from((ANY_PEER, 200, 200, 201)), st.sampled_from((INGRESS, INGRESS, INGRESS, EGRESS)),
    st.sampled_from((ANY_PROTO, TCP, TCP, TCP, UDP)), st.sampled_from((80, 80, 80, 0, 81, 443)),
    st.sampled_from((0, 16, 16, 16, 15, 8)))
states = st.tuples(
    st.dictionaries(keys, st.builds(Entry, st.booleans()), max_size=6),
    st.dictionaries(st.tuples(st.just(LOCAL), st.sampled_from((INGRESS, EGRESS))),
                    st.sampled_from([DirectionPolicy(True, False)] * 3 + [DirectionPolicy(True, True),
                                    DirectionPolicy(False, False)]), min_size=1, max_size=2))


def delta_between(old, new) -> Delta:
    (oe, of), (ne, nf) = old, new
    d = Delta()
    for k in set(oe) | set(ne):
        if k in ne and oe.get(k) != ne[k]:
            d.add(k, ne[k], oe.get(k))
        elif k not in ne:
            d.remove(k, oe[k])
    for p in set(of) | set(nf):
        if of.get(p, DirectionPolicy()) != nf.get(p, DirectionPolicy()):
            d.set_flag(p, nf.get(p, DirectionPolicy()), of.get(p, DirectionPolicy()))
    return d


def check(old, new) -> None:
    w = RecordingWriter(*old)
    w.apply_delta(delta_between(old, new), checked=True)
    assert w.entries == new[0] and {p: f for p, f in w.flags.items() if f != DirectionPolicy()} == \
        {p: f for p, f in new[1].items() if f != DirectionPolicy()}
    for i, state in enumerate(w.states):
        for pkt in PACKETS:
            if allowed(state, *pkt) and not allowed(old, *pkt) and not allowed(new, *pkt):
                raise AssertionError(f"state {i} of {len(w.states)} allows {pkt}, which both deny")


def _moved(k: Key, how: int) -> Key:
    """``k`` for the other peer class (exact <-> any), or as wide as its protocol."""
    if how == 0:
        return k._replace(peer=ANY_PEER if k.peer != ANY_PEER else 200)
    return k._replace(port=0, port_plen=0) if k.proto != ANY_PROTO else k


@st.composite
def related(draw, old):
    """A new state made from ``old``: entries kept, flipped, moved to the other peer
    class or widened, dropped, plus a few new ones; the swaps that open holes."""
    entries, flags = old
    out = {}
    for k, e in entries.items():
        op = draw(st.sampled_from(("keep", "flip", "move", "widen", "drop")))
        if op == "keep":
            out[k] = e
        elif op == "flip":
            out[k] = Entry(not e.deny)
        elif op == "move":
            out[_moved(k, 0)] = Entry(draw(st.booleans()))
        elif op == "widen":
            out[_moved(k, 1)] = Entry(draw(st.booleans()))
    out.update(draw(st.dictionaries(keys, st.builds(Entry, st.booleans()), max_size=2)))
    return out, (flags if draw(st.booleans()) else draw(states)[1])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_no_intermediate_state_allows_what_both_deny(data):
    old = data.draw(states)
    new = data.draw(related(old)) if data.draw(st.booleans()) else data.draw(states)
    check(old, new)


def test_the_reported_swap():
    """Issue 14.8's case: old deny X TCP/* + allow-any TCP/80, new allow X TCP/80 +
    deny-any TCP/*: X -> 80 was allowed between the add and the remove."""
    enforce = {(LOCAL, INGRESS): DirectionPolicy(True, False)}
    old = ({Key(LOCAL, 200, INGRESS, TCP, 0, 0): Entry(True),
            Key(LOCAL, ANY_PEER, INGRESS, TCP, 80, 16): Entry(False)}, enforce)
    new = ({Key(LOCAL, 200, INGRESS, TCP, 80, 16): Entry(False),
            Key(LOCAL, ANY_PEER, INGRESS, TCP, 0, 0): Entry(True)}, enforce)
    assert not allowed(old, LOCAL, 200, INGRESS, TCP, 80) and not allowed(new, LOCAL, 200, INGRESS, TCP, 80)
    check(old, new)


def test_every_pair_of_small_states():
    """Exhaustively: one exact-peer and one any-peer key, each absent, allow or deny,
    at two specificities."""
    enforce = {(LOCAL, INGRESS): DirectionPolicy(True, False)}
    slots = [Key(LOCAL, 200, INGRESS, TCP, 0, 0), Key(LOCAL, 200, INGRESS, TCP, 80, 16),
             Key(LOCAL, ANY_PEER, INGRESS, TCP, 0, 0), Key(LOCAL, ANY_PEER, INGRESS, TCP, 80, 16)]
    choices = (None, Entry(False), Entry(True))
    all_states = []
    for combo in itertools.product(choices, repeat=len(slots)):
        all_states.append(({k: e for k, e in zip(slots, combo, strict=True) if e is not None}, enforce))
    for old in all_states:
        for new in all_states:
            check(old, new)
