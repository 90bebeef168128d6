"""The policy engine: identities and policies in, map state out, one transaction at a time.

    engine = PolicyEngine("default")
    tx = engine.begin()
    tx.set_identity(ident, local=True)     # each call returns the Delta it makes
    tx.set_policies([policy], remove=[])
    plan = tx.plan()                       # the composed Delta, and the state before it
    engine.commit(tx)                      # or engine.discard(tx): as if never begun

Everything that answers a policy question (the agent's datapath writes, the offline and
live traces, the matrix and the review) reads this engine's state through an
``evaluate.Evaluator``; nothing else compiles policy. A dry run is a plan that is
discarded: ``discard`` replays each operation's inverse through the same incremental
compiler, so the engine is left exactly as it was (tests/test_engine.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .api.rule import Policy, PolicyRef, Rule
from .compiler import Clause, Compiler
from .identity import WORKLOAD_KIND, Identity
from .mapstate import BeforeView, Delta, DirectionPolicy, FlagState, L7Key, L7State, MapState


@dataclass
class Plan:
    """What a transaction does: its composed delta, and enough of the state before it
    (identities, locals, policies) to evaluate either side."""

    delta: Delta
    identities_before: dict[int, Identity]
    locals_before: frozenset[int]
    policies_before: dict[PolicyRef, Policy]
    identities_after: dict[int, Identity]
    locals_after: frozenset[int]
    policies_after: dict[PolicyRef, Policy]

    def entries_before(self, current: MapState) -> BeforeView:
        return BeforeView(current, self.delta.prior)

    def flags_before(self, current: FlagState) -> BeforeView:
        return BeforeView(current, self.delta.prior_flags, absent=DirectionPolicy())


class PolicyEngine:
    """Holds the compiled state. Not thread-safe: callers serialize (the agent's lock)."""

    def __init__(self, enforcement: str = "default"):
        self._compiler = Compiler(enforcement)
        self.identities: dict[int, Identity] = {}
        self._tx: Transaction | None = None

    # ------------------------------------------------------------------ reading
    @property
    def enforcement(self) -> str:
        return self._compiler.enforcement

    @property
    def entries(self) -> MapState:
        return self._compiler.entries

    @property
    def flags(self) -> FlagState:
        return self._compiler.flags

    @property
    def l7(self) -> L7State:
        """HTTP rule sets per (local identity, direction, port, peer): see compiler.l7_rules."""
        return self._compiler.l7

    def l7_policies(self, key: L7Key) -> tuple[str, ...]:
        """The names of the policies behind ``self.l7[key]``."""
        return self._compiler.l7_policies(key)

    @property
    def policies(self) -> dict[PolicyRef, Policy]:
        return self._compiler.policies

    @property
    def local_ids(self) -> set[int]:
        return self._compiler.local_ids

    def rules_for(self, local: int) -> list[Rule]:
        return self._compiler.rules_for(local)

    def explain(self, local: int, peer: int, direction: int, proto: int,
                port: int | None) -> list[tuple[Clause, bool]]:
        return self._compiler.explain(local, peer, direction, proto, port)

    # ------------------------------------------------------------------ writing
    def begin(self, plan: bool = True) -> "Transaction":
        """``plan``: keep the state before, for ``Transaction.plan()`` (a copy of every
        identity and policy: a live change of one rule among 100,000 does without)."""
        if self._tx is not None:
            raise RuntimeError("a transaction is already open on this engine")
        self._tx = Transaction(self, plan)
        return self._tx

    def commit(self, tx: "Transaction") -> None:
        self._close(tx)

    def discard(self, tx: "Transaction") -> None:
        """Undo every operation of ``tx``, newest first."""
        self._close(tx)
        c = self._compiler
        for undo in reversed(tx.undo):
            kind = undo[0]
            if kind == "identity":
                _, ident_id, before, was_local = undo
                if ident_id in self.identities:
                    c.remove_identity(ident_id)
                    del self.identities[ident_id]
                if before is not None:
                    c.add_identity(before, local=was_local)
                    self.identities[ident_id] = before
            else:
                _, restore, drop = undo
                c.set_policies(restore, remove=drop)

    def _close(self, tx: "Transaction") -> None:
        if tx is not self._tx:
            raise RuntimeError("not this engine's open transaction")
        self._tx = None


class Transaction:
    """Operations on the engine, each applied at once and recorded with its inverse."""

    def __init__(self, engine: PolicyEngine, plan: bool = True):
        self.engine = engine
        self.steps: list[Delta] = []
        self.undo: list[tuple] = []
        self._locals_before = frozenset(engine.local_ids)
        self._before: tuple[dict, dict] | None = (
            (dict(engine.identities), dict(engine.policies)) if plan else None)

    @property
    def locals_before(self) -> frozenset[int]:
        """The local identities as they were when the transaction began."""
        return self._locals_before

    @property
    def _c(self) -> Compiler:
        return self.engine._compiler

    def set_identity(self, ident: Identity, local: bool = False) -> Delta:
        """Add ``ident`` (or change whether it is local to this host)."""
        engine = self.engine
        old = engine.identities.get(ident.id)
        was_local = ident.id in engine.local_ids
        local = local and ident.kind == WORKLOAD_KIND
        if old == ident and was_local == local:
            return Delta()
        delta = Delta()
        if old is not None:
            delta.then(self._c.remove_identity(ident.id))
        delta.then(self._c.add_identity(ident, local=local))
        engine.identities[ident.id] = ident
        self.undo.append(("identity", ident.id, old, was_local))
        return self._step(delta)

    def remove_identity(self, ident_id: int) -> Delta:
        engine = self.engine
        old = engine.identities.get(ident_id)
        if old is None:
            return Delta()
        was_local = ident_id in engine.local_ids
        delta = self._c.remove_identity(ident_id)
        del engine.identities[ident_id]
        self.undo.append(("identity", ident_id, old, was_local))
        return self._step(delta)

    def set_policies(self, upsert: Iterable[Policy] = (), remove: Iterable[PolicyRef] = ()) -> Delta:
        """Add or replace ``upsert`` and drop ``remove`` (unknown refs are ignored)."""
        current = self.engine.policies
        upsert = [p for p in upsert if current.get(p.ref) is not p]
        remove = [r for r in remove if r in current and r not in {p.ref for p in upsert}]
        if not upsert and not remove:
            return Delta()
        touched = [p.ref for p in upsert] + remove
        restore = [current[r] for r in touched if r in current]
        drop = [r for r in touched if r not in current]
        delta = self._c.set_policies(upsert, remove=remove)
        self.undo.append(("policies", restore, drop))
        return self._step(delta)

    def _step(self, delta: Delta) -> Delta:
        if delta:
            self.steps.append(delta)
        return delta

    @property
    def delta(self) -> Delta:
        out = Delta()
        for step in self.steps:
            out.then(step)
        return out

    def plan(self) -> Plan:
        if self._before is None:
            raise RuntimeError("this transaction was begun without plan=True")
        e = self.engine
        identities_before, policies_before = self._before
        return Plan(self.delta, identities_before, self._locals_before,
                    policies_before, dict(e.identities), frozenset(e.local_ids),
                    dict(e.policies))
