"""Delta.tightened: where a policy delta may deny what was allowed (issue 14.7)."""
from stockade.policy.mapstate import ANY_PEER, EGRESS, INGRESS, Delta, DirectionPolicy, Entry, Key

ALLOW, DENY = Entry(False), Entry(True)


def test_removed_allow_and_added_deny_are_tightening():
    d = Delta()
    d.remove(Key(10, 20, INGRESS, 6, 80, 16), ALLOW)
    d.add(Key(10, 30, EGRESS, 17, 53, 16), DENY, None)
    d.add(Key(11, 31, INGRESS, 6, 0, 0), DENY, ALLOW)
    assert d.tightened() == (set(), {(10, 20, INGRESS), (10, 30, EGRESS), (11, 31, INGRESS)})


def test_added_allow_removed_deny_are_not():
    d = Delta()
    d.add(Key(10, 20, INGRESS, 6, 80, 16), ALLOW, None)
    d.remove(Key(10, 21, INGRESS, 6, 80, 16), DENY)
    d.add(Key(10, 22, INGRESS, 6, 0, 0), ALLOW, DENY)
    assert d.tightened() == (set(), set())


def test_any_peer_and_flags_are_wide():
    d = Delta()
    d.remove(Key(10, ANY_PEER, EGRESS, 6, 80, 16), ALLOW)
    d.set_flag((12, INGRESS), DirectionPolicy(True, True), DirectionPolicy())
    d.set_flag((13, INGRESS), DirectionPolicy(False, False), DirectionPolicy(True, True))
    d.remove(Key(10, 5, EGRESS, 6, 81, 16), ALLOW)      # inside a wide one: not repeated
    assert d.tightened() == ({(10, EGRESS), (12, INGRESS)}, set())
