"""policy/countindex.py: the refs that changed between two {ref: Policy} snapshots, and
the per-item counts kept from them, against a recount from scratch over random changes,
some of them discarded (a dry run, a failed write) before the next."""
from __future__ import annotations

import random

import pytest

from stockade.policy.countindex import CountIndex, changed_refs

pytestmark = pytest.mark.pure


class Doc:
    """A stand-in for a Policy: an immutable object whose items never change."""

    def __init__(self, items):
        self.items = frozenset(items)


def test_changed_refs_are_the_replaced_added_and_removed_ones():
    a, b, c = Doc("x"), Doc("y"), Doc("z")
    seen = {"p": a, "q": b}
    assert changed_refs(seen, seen) == []
    assert changed_refs(seen, {"p": a, "q": Doc("y")}) == ["q"]       # same items, new object
    assert sorted(changed_refs(seen, {"p": a, "r": c})) == ["q", "r"]  # one gone, one new
    assert sorted(changed_refs(seen, {})) == ["p", "q"]
    assert changed_refs({}, {"p": a}) == ["p"]


def test_counts_follow_every_change_even_after_discarded_ones():
    rnd, index, live = random.Random(7), CountIndex(lambda d: d.items), {}
    for step in range(300):
        new = dict(live)
        for _ in range(rnd.choice((1, 1, 3))):
            ref = f"p{rnd.randrange(12)}"
            if rnd.random() < 0.3:
                new.pop(ref, None)
            else:
                new[ref] = Doc(rnd.sample("abcdef", rnd.randint(0, 3)))
        naive = {r for r in live.keys() | new.keys() if live.get(r) is not new.get(r)}
        assert set(changed_refs(live, new)) == naive, step
        index.update(new)
        recount: dict[str, int] = {}
        for d in new.values():
            for item in d.items:
                recount[item] = recount.get(item, 0) + 1
        assert dict(index.count) == recount, step
        if rnd.random() < 0.7:
            live = new
