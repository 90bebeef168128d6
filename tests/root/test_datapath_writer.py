"""Write ordering of MapWriter.apply_delta, checked against a recording fake map
layer (no kernel): after every single write, no packet may be allowed or dropped
unless the old or the new state does the same."""
from __future__ import annotations

import itertools

import pytest

from recording_maps import RawMapWriter
from stockade.datapath.errors import CapacityError
from stockade.datapath.writer import _gen_of, _key_from_c, _policy_key
from stockade.policy.mapstate import ANY_PEER, EGRESS, PROTO_TCP, DirectionPolicy, Entry, Key, diff, lookup

pytestmark = pytest.mark.pure

A, B = 1001, 1002
ALLOW, DENY = Entry(False), Entry(True)
DD = DirectionPolicy(True, True)
AOM = DirectionPolicy(True, False)
OFF = DirectionPolicy()


class FakeWriter(RawMapWriter):
    """Raw policy maps in dicts; checks every intermediate state."""

    def __init__(self, entries, flags, old, new, limit=64):
        super().__init__(entries, flags, limit=limit)
        self.old, self.new = old, new

    def after_write(self):
        entries, flags = self.view()
        for port in (80, 443, 8080):
            now = _allowed(entries, flags, port)
            assert now in (_allowed(*self.old, port), _allowed(*self.new, port)), (
                f"write {self.writes}: port {port} {'allowed' if now else 'dropped'}")


def _allowed(entries, flags, port):
    verdict, _ = lookup(entries, flags, A, B, EGRESS, PROTO_TCP, port)
    return verdict in ("allow", "not-enforced")


def tcp(peer, port):
    return Key(A, peer, EGRESS, PROTO_TCP, port, 16)


STATES = {
    "off": ({}, {}),
    "allow-80": ({tcp(B, 80): ALLOW}, {(A, EGRESS): DD}),
    "allow-443-any": ({tcp(ANY_PEER, 443): ALLOW, tcp(B, 8080): ALLOW}, {(A, EGRESS): DD}),
    "deny-80-allow-miss": ({tcp(B, 80): DENY}, {(A, EGRESS): AOM}),
    "deny-all-b": ({Key(A, B, EGRESS): DENY}, {(A, EGRESS): AOM}),
    "deny-any-allow-b": ({Key(A, ANY_PEER, EGRESS, PROTO_TCP): DENY, tcp(B, 8080): ALLOW},
                         {(A, EGRESS): DD}),
}


@pytest.mark.parametrize("old,new", list(itertools.permutations(STATES, 2)),
                         ids=[f"{o}->{n}" for o, n in itertools.permutations(STATES, 2)])
def test_no_transient_verdicts(old, new):
    (oe, of), (ne, nf) = STATES[old], STATES[new]
    w = FakeWriter(oe, of, (oe, of), (ne, nf))
    w.apply_delta(diff(oe, ne, of, nf))
    assert w.view() == (ne, {k: v for k, v in nf.items() if v != OFF})


def test_capacity_checked_before_any_write():
    old = {tcp(B, p): ALLOW for p in range(10)}
    new = {tcp(B, 1000 + p): ALLOW for p in range(10)}
    w = FakeWriter(old, {(A, EGRESS): DD}, (old, {}), (new, {}), limit=15)
    with pytest.raises(CapacityError, match="20 entries needed"):
        w.apply_delta(diff(old, new))
    assert w.writes == 0


@pytest.mark.parametrize("key", [Key(A, B, EGRESS), Key(A, B, EGRESS, PROTO_TCP),
                                 tcp(B, 8080), Key(A, B, EGRESS, PROTO_TCP, 8192, 6)],
                         ids=["any", "tcp", "tcp-8080", "tcp-8192-9215"])
def test_policy_key_round_trip(key):
    c = _policy_key(key)
    assert c.prefixlen == key.prefixlen
    assert _key_from_c(c) == key and _gen_of(c) == 0
    c1 = _policy_key(key, 1)
    assert _key_from_c(c1) == key and _gen_of(c1) == 1 and bytes(c1) != bytes(c)
