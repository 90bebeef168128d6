"""The policy writer's order is safe (issue 14.8): random old/new policy map states go
through the real MapWriter.apply_delta onto a recording map; at every intermediate
state, no packet is allowed that both the old and the new state deny.

The verdict model is the programs' (bpf/lib/policy.h policy_decide): a longest-prefix
match among the exact peer's entries and one among the any-peer entries; a deny in
either wins, then an allow in either, then the direction's flags.
"""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recording_maps import RawMapWriter
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


class RecordingWriter(RawMapWriter):
    """Every write is one recorded state (what the programs see then)."""

    def __init__(self, entries, flags, **kw):
        super().__init__(entries, flags, **kw)
        self.states = [self.view()]

    def after_write(self):
        self.states.append(self.view())


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


def _plain(flags):
    return {p: f for p, f in flags.items() if f != DirectionPolicy()}


def check(old, new, switch_min=None) -> RecordingWriter:
    """Write old -> new; every intermediate state allows nothing both deny, and with a
    generation switch (``switch_min`` reached) drops nothing both allow either."""
    w = RecordingWriter(*old, switch_min=switch_min)
    delta = delta_between(old, new)
    switched = w._switching(delta)
    w.apply_delta(delta, checked=True)
    assert w.view() == (new[0], _plain(new[1]))
    for i, state in enumerate(w.states):
        for pkt in PACKETS:
            now, was, will = allowed(state, *pkt), allowed(old, *pkt), allowed(new, *pkt)
            if now and not was and not will:
                raise AssertionError(f"state {i} of {len(w.states)} allows {pkt}, which both deny")
            if (pkt[0], pkt[2]) in switched and not now and was and will:
                raise AssertionError(f"state {i} of {len(w.states)} drops {pkt}, which both "
                                     "allow (generation switch)")
    # the old generation is gone: one generation per pair in the map
    gens = w.raw_generations()
    assert len({(local, d) for local, d, _ in gens}) == len(gens)
    return w


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


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_switch_allows_exactly_old_or_new(data):
    """Large changes (every change here: switch_min 1) switch generations: each state
    between the writes decides every packet as the old or the new state does."""
    old = data.draw(states)
    new = data.draw(related(old)) if data.draw(st.booleans()) else data.draw(states)
    check(old, new, switch_min=1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_chains_of_changes_mix_switches_and_ordered_writes(data):
    """Several changes in a row, each switched or written in order by its size (a
    pair's generation goes 0 -> 1 -> 0 ...), and back: every state safe."""
    state = data.draw(states)
    first = state
    switch_min = data.draw(st.sampled_from((1, 2, 3, 100)))
    w = RecordingWriter(*state, switch_min=switch_min)
    for new in [data.draw(related(state)) for _ in range(3)] + [first]:
        delta = delta_between(state, new)
        switched = w._switching(delta)
        w.states = [w.view()]
        w.apply_delta(delta, checked=True)
        assert w.view() == (new[0], _plain(new[1]))
        for st_ in w.states:
            for pkt in PACKETS:
                now, was, will = allowed(st_, *pkt), allowed(state, *pkt), allowed(new, *pkt)
                assert not (now and not was and not will), pkt
                assert not ((pkt[0], pkt[2]) in switched and not now and was and will), pkt
        state = new


def test_the_reshaped_allow_is_never_dropped_by_a_switch():
    """The ordered writes' price (module docstring of writer.py): 80/tcp reshaped to
    0-1023/tcp drops port 80 between two writes; a switch never does."""
    enforce = {(LOCAL, INGRESS): DirectionPolicy(True, True)}
    old = ({Key(LOCAL, 200, INGRESS, TCP, 80, 16): Entry(False)}, enforce)
    new = ({Key(LOCAL, 200, INGRESS, TCP, 0, 6): Entry(False)}, enforce)
    w = RecordingWriter(*old)   # default switch_min: written in order
    w.apply_delta(delta_between(old, new), checked=True)
    assert any(not allowed(s, LOCAL, 200, INGRESS, TCP, 80) for s in w.states)
    w = check(old, new, switch_min=2)
    assert all(allowed(s, LOCAL, 200, INGRESS, TCP, 80) for s in w.states)


def _pair_state(ports, peer=200, deny=False):
    return {Key(LOCAL, peer, INGRESS, TCP, p, 16): Entry(deny) for p in ports}


ENFORCE = {(LOCAL, INGRESS): DirectionPolicy(True, True)}


def test_switch_needs_room_for_both_generations():
    """10 entries replaced by 10 others: 20 in the map at the switch. A map of 19 is
    refused before any write (the old policy stays), one of 20 suffices (the recording
    map refuses an entry over its size)."""
    from stockade.datapath.errors import CapacityError
    old = (_pair_state(range(1000, 1010)), ENFORCE)
    new = (_pair_state(range(2000, 2010)), ENFORCE)
    w = RecordingWriter(*old, limit=19, switch_min=10)
    with pytest.raises(CapacityError, match="20 entries needed"):
        w.apply_delta(delta_between(old, new))
    assert w.writes == 0 and w.view() == (old[0], old[1])
    w = RecordingWriter(*old, limit=20, switch_min=10)
    w.apply_delta(delta_between(old, new))
    assert w.view() == new and len(w.maps["policy"]) == 10


def test_rollback_after_a_failure_at_any_write_restores_the_old_state():
    """txn.unwrite after a write that failed part way: the inverse delta on what the
    maps then hold gives the old state back, at whichever write it failed; no state in
    between allows what both deny, none left over in the other generation."""
    old = (_pair_state(range(1000, 1006)) | _pair_state((22,), peer=ANY_PEER, deny=True), ENFORCE)
    new = (_pair_state(range(1003, 1009)) | {Key(LOCAL, 200, INGRESS, TCP): Entry(True)},
           {(LOCAL, INGRESS): DirectionPolicy(True, False)})
    total = RecordingWriter(*old, switch_min=4)
    total.apply_delta(delta_between(old, new))
    for fail_at in range(total.writes):
        w = RecordingWriter(*old, switch_min=4)
        delta = delta_between(old, new)
        w.fail_at = fail_at
        try:
            w.apply_delta(delta)
        except Exception:
            pass
        else:  # pragma: no cover
            raise AssertionError(f"no failure at write {fail_at}")
        w.fail_at = None
        w.apply_delta(delta.inverse(), checked=True)
        assert w.view() == (old[0], old[1]), fail_at
        gens = w.raw_generations()
        assert len({(local, d) for local, d, _ in gens}) == len(gens), fail_at
        for st_ in w.states:
            for pkt in PACKETS:
                assert not (allowed(st_, *pkt) and not allowed(old, *pkt) and not allowed(new, *pkt))


def test_entries_of_the_generation_not_in_force_are_ignored_and_cleared():
    """An agent stopped mid-switch left entries in the generation not in force: they
    decide nothing, and the next write deletes them before it switches into it."""
    from stockade.datapath import maps as m
    from stockade.datapath.writer import _policy_key
    old = (_pair_state((80,)), ENFORCE)
    w = RecordingWriter(*old, switch_min=1)
    stale = Key(LOCAL, 200, INGRESS, TCP, 443, 16)
    w.maps["policy"][bytes(_policy_key(stale, 1))] = bytes(m.PolicyValue(deny=0))
    assert w.view() == old
    new = (_pair_state((81,)), ENFORCE)
    w.apply_delta(delta_between(old, new))
    assert w.view() == new and w.raw_generations() == {(LOCAL, INGRESS, 1)}
    assert all(not allowed(s, LOCAL, 200, INGRESS, TCP, 443) for s in w.states)


def test_the_old_generation_goes_only_after_a_grace_period():
    """A program that read the flags entry just before the switch still looks up the
    old generation: its entries are deleted only after every running program has
    finished (one grace period for all pairs switched), never before the switch."""
    from stockade.datapath import maps as m
    from stockade.datapath.writer import _gen_of
    flags = {(LOCAL, INGRESS): DirectionPolicy(True, True), (LOCAL, EGRESS): DirectionPolicy(True, True)}
    old = (_pair_state(range(10)) | {Key(LOCAL, 200, EGRESS, TCP, p, 16): Entry(False) for p in range(10)},
           flags)
    new = (_pair_state(range(20, 30)) | {Key(LOCAL, 200, EGRESS, TCP, p, 16): Entry(False)
                                         for p in range(20, 30)}, flags)
    w = RecordingWriter(*old, switch_min=5)
    w.apply_delta(delta_between(old, new))
    assert w.view() == (new[0], new[1])
    kinds = [e[0] if e[0] == "grace" else (e[0], e[1]) for e in w.events]
    assert kinds.count("grace") == 1
    g = kinds.index("grace")
    assert kinds[:g].count(("update", "policy_flags")) == 2          # both pairs switched
    old_deletes = [i for i, e in enumerate(w.events) if e[:2] == ("delete", "policy")
                   and _gen_of(m.PolicyKey.from_buffer_copy(e[2])) == 0]
    assert len(old_deletes) == 20 and min(old_deletes) > g


def test_entries_that_keep_their_verdict_are_rewritten_in_place():
    """A restarted agent rewrites every entry (the policies behind them are unknown to
    it), with the same verdicts: no switch, so no room for a second generation needed."""
    old = (_pair_state(range(100)), ENFORCE)
    w = RecordingWriter(*old, limit=100, switch_min=10)
    delta = Delta()
    for k, e in old[0].items():
        delta.add(k, Entry(e.deny, frozenset({"web"})), e)
    assert len(delta.adds) == 100 and w._switching(delta) == set()
    w.apply_delta(delta)
    assert w.view() == old and w.raw_generations() == {(LOCAL, INGRESS, 0)}
    assert ("grace",) not in w.events


# -- a transaction's rollback (policy_hold ... policy_undo): exactly the old maps -------

def _written(state, switch_min) -> RecordingWriter:
    """A writer whose maps hold ``state`` as it wrote it (its own policy numbers)."""
    w = RecordingWriter({}, {}, switch_min=switch_min)
    w.apply_delta(delta_between(({}, {}), state), checked=True)
    return w


def _raw(w) -> dict:
    return {name: dict(entries) for name, entries in w.maps.items()}


def _check_rollback(chain, switch_min) -> None:
    """Write the states of ``chain`` one after another in one transaction, failing at
    every single write in turn (and after the last: the persisting failed); undoing
    gives back exactly the maps as they were (every key, value and generation), and
    every state in between decides each packet as a state of the chain does, or denies
    more than all of them (nothing all deny is allowed)."""
    old = chain[0]
    total = _written(old, switch_min)
    setup = total.writes
    total.policy_hold()
    for a, b in itertools.pairwise(chain):
        total.apply_delta(delta_between(a, b), checked=True)
    writes = total.writes - setup
    for fail_at in range(writes + 1):
        w = _written(old, switch_min)
        before = _raw(w)
        w.policy_hold()
        w.states = [w.view()]
        w.fail_at = setup + fail_at if fail_at < writes else None
        try:
            for a, b in itertools.pairwise(chain):
                w.apply_delta(delta_between(a, b), checked=True)
        except Exception:
            assert fail_at < writes
        else:
            assert fail_at == writes, f"no failure at write {fail_at}"
        w.fail_at = None
        w.policy_undo(0)
        w.policy_release()
        assert _raw(w) == before, f"failed at write {fail_at} of {writes}"
        assert w.view() == (old[0], _plain(old[1])) == (w.policy_entries(), w.policy_flags())
        for i, state in enumerate(w.states):
            for pkt in PACKETS:
                if allowed(state, *pkt):
                    assert any(allowed(s, *pkt) for s in chain), (fail_at, i, pkt)
        # the writer's shadow is the maps: the chain goes through once more
        w.apply_delta(delta_between(old, chain[-1]), checked=True)
        assert w.view() == (chain[-1][0], _plain(chain[-1][1]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_rollback_at_every_write_restores_exactly_the_old_maps(data):
    """A transaction's change, switched or ordered by its size, undone after a failure
    at any write or after all of them (its state could not be persisted)."""
    old = data.draw(states)
    new = data.draw(related(old)) if data.draw(st.booleans()) else data.draw(states)
    _check_rollback([old, new], data.draw(st.sampled_from((1, 2, 3, 100))))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_rollback_of_several_writes_in_one_transaction(data):
    """Several policy steps of one transaction (a pair switched by the first is written
    in order by the later ones: its other generation is the old one, kept)."""
    chain = [data.draw(states)]
    for _ in range(data.draw(st.integers(1, 3))):
        chain.append(data.draw(related(chain[-1])))
    _check_rollback(chain, data.draw(st.sampled_from((1, 2, 3))))


def test_a_switch_keeps_the_old_generation_until_commit():
    """Inside a transaction the old generation stays, untouched, after the switch:
    undoing is one flags update back and, after a grace period, deleting the new
    generation; committing deletes the old one after a grace period instead."""
    old = (_pair_state(range(1000, 1010)), ENFORCE)
    new = (_pair_state(range(2000, 2010)), ENFORCE)
    for commit in (False, True):
        w = _written(old, 5)
        before = _raw(w)["policy"]
        (gen_before,) = {g for _, _, g in w.raw_generations()}
        w.policy_hold()
        w.apply_delta(delta_between(old, new), checked=True)
        assert w.view() == new
        assert {k: v for k, v in w.maps["policy"].items() if k in before} == before
        w.events.clear()
        if commit:
            w.policy_commit()
            assert w.view() == new and w.raw_generations() == {(LOCAL, INGRESS, 1 - gen_before)}
            assert w.events[0] == ("grace",) and len(w.events) == 11
        else:
            w.policy_undo(w.policy_mark() - 1)
            w.policy_release()
            kinds = [e[:2] for e in w.events]
            assert kinds[:2] == [("update", "policy_flags"), ("grace",)]
            assert kinds[2:] == [("delete", "policy")] * 10
            assert not {e[2] for e in w.events[2:]} & before.keys()
            assert _raw(w)["policy"] == before and w.view() == old
