"""The engine's transactions: a discarded plan leaves no trace, a plan's delta is exactly
the change, and the state before it can be read back (BeforeView)."""
from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.policy.engine import PolicyEngine
from stockade.policy.identity import IdentityAllocator
from stockade.policy.mapstate import Delta, DirectionPolicy, Entry, Key, diff
from test_compiler_props import SETTINGS, document_st, identities_for, make_policy, policy_prefixes, workload_st


def fingerprint(engine: PolicyEngine):
    return (dict(engine.entries), dict(engine.flags), dict(engine.policies),
            dict(engine.identities), set(engine.local_ids))


def build(alloc, docs, workloads):
    policies = [make_policy(f"p{i}", scope, specs) for i, (scope, specs) in enumerate(docs)]
    engine = PolicyEngine()
    tx = engine.begin()
    for ident, local in identities_for(alloc, policies, workloads):
        tx.set_identity(ident, local)
    tx.set_policies(policies)
    engine.commit(tx)
    return engine


change_st = st.lists(st.one_of(
    st.tuples(st.just("policy"), st.sampled_from(["p0", "p1", "p9"]), document_st),
    st.tuples(st.just("delete"), st.sampled_from(["p0", "p1", "p9"])),
    st.tuples(st.just("identity"), workload_st, st.booleans()),
    st.tuples(st.just("forget"), st.integers(0, 30))), min_size=1, max_size=6)


def run(engine, alloc, tx, ops):
    for op in ops:
        if op[0] == "policy":
            p = make_policy(op[1], *op[2])
            for prefix in policy_prefixes([p]):
                tx.set_identity(alloc.cidr(prefix))
            stale = [r for r in engine.policies if r.name == op[1] and r != p.ref]
            tx.set_policies([p], remove=stale)
        elif op[0] == "delete":
            tx.set_policies([], remove=[r for r in engine.policies if r.name == op[1]])
        elif op[0] == "identity":
            tx.set_identity(alloc.workload(op[1]), local=op[2])
        else:
            ids = sorted(i for i in engine.identities if i >= 256 and i < (1 << 24))
            if ids:
                tx.remove_identity(ids[op[1] % len(ids)])


@settings(max_examples=120, **SETTINGS)
@given(docs=st.lists(document_st, min_size=1, max_size=2),
       workloads=st.lists(st.tuples(workload_st, st.booleans()), min_size=1, max_size=3),
       ops=change_st)
def test_discard_leaves_the_engine_as_it_was(docs, workloads, ops):
    alloc = IdentityAllocator()
    engine = build(alloc, docs, workloads)
    before = copy.deepcopy(fingerprint(engine))
    tx = engine.begin()
    run(engine, alloc, tx, ops)
    engine.discard(tx)
    assert fingerprint(engine) == before
    # and the engine still works: the same change, committed, equals a fresh compile
    tx = engine.begin()
    run(engine, alloc, tx, ops)
    engine.commit(tx)
    fresh = PolicyEngine()
    ftx = fresh.begin()
    for ident in engine.identities.values():
        ftx.set_identity(ident, ident.id in engine.local_ids)
    ftx.set_policies(list(engine.policies.values()))
    fresh.commit(ftx)
    assert dict(fresh.entries) == dict(engine.entries)
    assert dict(fresh.flags) == dict(engine.flags)


@settings(max_examples=120, **SETTINGS)
@given(docs=st.lists(document_st, min_size=1, max_size=2),
       workloads=st.lists(st.tuples(workload_st, st.booleans()), min_size=1, max_size=3),
       ops=change_st)
def test_plan_delta_and_the_state_before_it(docs, workloads, ops):
    alloc = IdentityAllocator()
    engine = build(alloc, docs, workloads)
    old_entries, old_flags = dict(engine.entries), dict(engine.flags)
    tx = engine.begin()
    run(engine, alloc, tx, ops)
    plan = tx.plan()
    # applying the composed delta to the old state gives the new one
    entries, flags = dict(old_entries), dict(old_flags)
    plan.delta.apply(entries, flags)
    assert entries == dict(engine.entries) and flags == dict(engine.flags)
    # the delta is minimal: the same as a diff of the two states
    d = diff(old_entries, dict(engine.entries), old_flags, dict(engine.flags))
    assert (d.adds, d.removes, d.flags) == (plan.delta.adds, plan.delta.removes, plan.delta.flags)
    # the state before, read through the plan, is the old state
    assert dict(plan.entries_before(engine.entries)) == old_entries
    assert dict(plan.flags_before(engine.flags)) == old_flags
    # and the inverse takes it back
    plan.delta.inverse().apply(entries, flags)
    assert entries == old_entries and flags == old_flags
    engine.commit(tx)


def test_only_one_transaction_at_a_time():
    engine = PolicyEngine()
    tx = engine.begin()
    try:
        engine.begin()
    except RuntimeError as exc:
        assert "already open" in str(exc)
    else:
        raise AssertionError("a second transaction was opened")
    engine.discard(tx)
    engine.commit(engine.begin())


K1, K2 = Key(300, 301, 0, 6, 80, 16), Key(300, 0, 0)
ALLOW, DENY = Entry(False, frozenset({"a"})), Entry(True, frozenset({"d"}))


def test_delta_composition_cancels_out():
    d = Delta()
    d.add(K1, ALLOW, None)
    d.then(Delta(removes={K1}, prior={K1: ALLOW}))
    assert not d and K1 in d.prior and d.prior[K1] is None
    d = Delta()
    d.remove(K2, DENY)
    d.add(K2, DENY, None)
    assert not d  # removed then put back as it was
    d = Delta()
    d.set_flag((300, 0), DirectionPolicy(True, True), DirectionPolicy())
    d.set_flag((300, 0), DirectionPolicy(), DirectionPolicy(True, True))
    assert not d
