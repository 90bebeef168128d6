"""A transaction of the reconciler: one change, planned in full before anything is written.

    txn = Txn(agent)
    change.apply(txn)        # model via txn.j (a Journal), engine via txn.etx, writes as steps
    txn.write(datapath)      # the steps, in the order the change made them
    txn.commit() | txn.discard()

The steps keep the order that never opens the datapath: a new identity's policy entries
are written before the endpoint entry that points at them, the old identity's entries go
after it; an interface is attached (and closed) before its workload is known. A change
plans against the model as it is inside the transaction; nothing reaches the kernel
until ``write``.

``write`` keeps, for every step it writes (or begins to), the step that undoes it: the
inverse policy delta (with a datapath that journals its policy writes, datapath/writer.py
``policy_hold``: the writer's own undo, which switches a large change back to the old
generation it kept intact until ``commit``), the ipcache entry and endpoint entry as they
were, the attachment as it was. When the write or the persisting of the state after it fails, ``unwrite``
writes those, last first (so the undo keeps the safe order too: an endpoint goes back to
its old identity before that identity's new entries go), then ``discard`` puts the model,
the engine and the identity numbers back: the maps, the model and the state files are
the previous generation again, and the caller's answer is the error.
"""
from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import StockadeError
from ..policy.api.entity import RESERVED
from ..policy.engine import Transaction
from ..policy.identity import Identity
from ..policy.labels import LabelSet
from ..policy.mapstate import Delta
from .endpoints import Endpoint
from .state import IpcacheEntry, Journal, State

if TYPE_CHECKING:
    from .agent import Agent

HOST_ID = RESERVED["host"]
WORLD_ID = RESERVED["world"]   # what an address no ipcache entry covers resolves to
CLOSED = {"endpoint_id": 0, "identity": 0, "unidentified": True}   # an unidentified interface


def host_prefix(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


@dataclass
class Step:
    """One datapath write: policy (a Delta), ipcache, endpoint, attach or detach."""

    kind: str
    key: Any = None
    value: Any = None
    prior: Any = None      # ipcache: the identity the entry had (None: none)


@dataclass
class Txn:
    agent: "Agent"
    dry_run: bool = False                            # planned to be discarded
    j: Journal = field(default_factory=Journal)
    steps: list[Step] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)    # state files to write on commit
    log: list[str] = field(default_factory=list)     # what happened, for the change log
    etx: Transaction = field(init=False)
    undo: list[Step] = field(default_factory=list)   # inverses of the steps written
    audit_off: set[int] = field(default_factory=set)  # interfaces leaving audit mode
    moved_ifindexes: set[int] = field(default_factory=set)  # endpoints given another identity
    moved_prefixes: dict[str, int | None] = field(default_factory=dict)  # ipcache prefix ->
    #                                            its identity before (None: no entry)
    on_commit: list = field(default_factory=list)    # callables, run once committed
    dp: Any = None   # a datapath holding this transaction's policy writes (policy_hold)

    def __post_init__(self):
        self.etx = self.agent.engine.begin(plan=self.dry_run)   # a review plans; a change does not
        self._alloc_mark = self.agent.alloc.mark()

    @property
    def state(self) -> State:
        return self.agent.state

    # ------------------------------------------------------------------ engine
    def engine(self, delta: Delta) -> None:
        if delta:
            if self.steps and self.steps[-1].kind == "policy":
                self.steps[-1].value.then(delta)
            else:
                self.steps.append(Step("policy", value=Delta().then(delta)))

    def set_identity(self, ident: Identity, local: bool = False) -> None:
        self.engine(self.etx.set_identity(ident, local))

    def remove_identity(self, ident_id: int) -> None:
        self.engine(self.etx.remove_identity(ident_id))

    def ref_identity(self, labels: LabelSet, local: bool) -> Identity:
        """The identity of ``labels``, counted as used by one more local endpoint (or
        remote record); it joins the engine on first use, as local when it is."""
        st = self.state
        ident = self.agent.alloc.workload(labels)
        was_local = st.local_refs.get(ident.id, 0) > 0
        was_known = was_local or st.remote_refs.get(ident.id, 0) > 0
        refs = st.local_refs if local else st.remote_refs
        self.j.set(refs, ident.id, refs.get(ident.id, 0) + 1)
        if local and not was_local:
            self.set_identity(ident, local=True)
        elif not was_known:
            self.set_identity(ident, local=False)
        return ident

    def unref_identity(self, ident_id: int, local: bool) -> None:
        st = self.state
        refs = st.local_refs if local else st.remote_refs
        left = refs.get(ident_id, 0) - 1
        if left > 0:
            self.j.set(refs, ident_id, left)
            return
        self.j.delete(refs, ident_id)
        ident = self.agent.engine.identities.get(ident_id)
        if local and st.remote_refs.get(ident_id, 0) > 0 and ident is not None:
            self.set_identity(ident, local=False)
        elif st.local_refs.get(ident_id, 0) <= 0 and st.remote_refs.get(ident_id, 0) <= 0:
            self.remove_identity(ident_id)

    # ------------------------------------------------------------------ ipcache
    def set_ipcache(self, prefix: str, identity: int, source: str, host: str | None) -> None:
        entry = IpcacheEntry(identity, source, host)
        old = self.state.ipcache.get(prefix)
        if old == entry:
            return
        self.j.set(self.state.ipcache, prefix, entry)
        self.steps.append(Step("ipcache", prefix, identity, old.identity if old else None))

    def del_ipcache(self, prefix: str) -> None:
        old = self.state.ipcache.get(prefix)
        if old is not None:
            self.j.delete(self.state.ipcache, prefix)
            self.steps.append(Step("ipcache", prefix, None, old.identity))

    # ------------------------------------------------------------------ endpoints
    def put_endpoint(self, ep: Endpoint) -> None:
        self.j.set(self.state.endpoints, ep.name, ep)
        self.dirty.add("endpoints")

    def drop_endpoint(self, name: str) -> None:
        self.j.delete(self.state.endpoints, name)
        self.j.delete(self.state.memberships, name)
        self.dirty.add("endpoints")

    def bind(self, ifindex: int, name: str) -> None:
        self.j.set(self.state.by_ifindex, ifindex, name)

    def unbind(self, ifindex: int) -> None:
        self.j.delete(self.state.by_ifindex, ifindex)

    def write_endpoint(self, ep: Endpoint) -> None:
        """The endpoint entry behind its interface: its identity, or closed while it has none."""
        if ep.ifindex is None:
            return
        if ep.identity is None:
            self.steps.append(Step("endpoint", ep.ifindex, {"endpoint_id": ep.id, "identity": 0,
                                                            "unidentified": True}))
        else:
            self.steps.append(Step("endpoint", ep.ifindex, {
                "endpoint_id": ep.id, "identity": ep.identity, "ips": ep.ips, "mac": ep.mac,
                "audit": ep.audit, "link_local": self._link_local(ep)}))

    def _link_local(self, ep: Endpoint) -> list[str]:
        """The workload's own IPv6 link-local addresses, read from its namespace: the
        only fe80::/10 sources the datapath lets it use (stable-privacy ones are not
        derived from the MAC)."""
        if not self.agent.live or ep.ifindex is None:
            return []
        from ..discovery import DiscoveryError, peer_link_local_addresses
        try:
            return peer_link_local_addresses(ep.ifindex)[:3]
        except DiscoveryError as exc:
            self.agent.error(f"endpoint {ep.name}: link-local addresses: {exc}")
            return []

    def close_interface(self, ifindex: int) -> None:
        """Unknown until a runtime or the API identifies it: dropped."""
        self.steps.append(Step("endpoint", ifindex, CLOSED))

    def forget_interface(self, ifindex: int) -> None:
        self.steps.append(Step("endpoint", ifindex, None))

    def attach(self, ifindex: int, *, closed_on_undo: bool = False) -> None:
        """``closed_on_undo``: the interface is managed (a new link): undoing this
        leaves it attached and closed, never unfiltered."""
        self.steps.append(Step("attach", ifindex, closed_on_undo))

    def detach(self, ifindex: int) -> None:
        self.steps.append(Step("endpoint", ifindex, None))
        self.steps.append(Step("detach", ifindex))

    # ------------------------------------------------------------------ the end
    def write(self, dp) -> None:
        """Write every step, in order. Raises the datapath's error part way; ``unwrite``
        then undoes what was written."""
        # Every key any step adds, at once: a bound on the maps' size at every point (the
        # removes tell which identities' changes are large: switched, both generations).
        deltas = [step.value for step in self.steps if step.kind == "policy"]
        if len(deltas) == 1:
            peak = deltas[0]    # its adds and removes never share a key
        else:
            peak = Delta()
            for d in deltas:
                peak.adds.update(d.adds)
                peak.removes |= d.removes
                peak.flags.update(d.flags)
            peak.removes -= peak.adds.keys()
        if peak:
            dp.check_capacity(peak)
        journaled = hasattr(dp, "policy_hold")
        if journaled:
            dp.policy_hold()
            self.dp = dp
        for step in self.steps:
            inverse = self._inverse(step)
            if inverse is not None and inverse.kind == "unpolicy" and journaled:
                inverse = Step("policy_mark", dp.policy_mark())
            if inverse is not None:
                self.undo.append(inverse)   # before the write: a half-done one is undone too
            self._note_moved(step)
            _write_step(self.agent, dp, step)
        self._cut_flows(dp)

    def _note_moved(self, step: Step) -> None:
        """Addresses and interfaces whose identity this step changes: their flows were
        judged under the old one (cut in _cut_flows)."""
        if step.kind == "ipcache":
            # an entry added takes its addresses from what they resolved to (world, or a
            # shorter prefix's identity); one removed gives them back
            self.moved_prefixes.setdefault(step.key, step.prior)
        elif step.kind == "endpoint":
            old = self.agent.endpoint_entries.get(step.key)
            if old and old.get("identity") and (step.value or {}).get("identity") != old["identity"]:
                self.moved_ifindexes.add(step.key)

    def _cut_flows(self, dp) -> None:
        """Once the new policy is in the maps: the flows it may now deny are judged
        again (datapath/conntrack.py ``ct_cut``): those it denies are revoked, those
        audited would-be drops opened at interfaces that left audit mode too; and
        revoked flows it allows again are let go."""
        if not hasattr(dp, "ct_cut_tightened"):
            return
        wide: set = set()
        exact: set = set()
        for step in self.steps:
            if step.kind == "policy":
                w, e = step.value.tightened()
                wide |= w
                exact |= e
        # only identities that were local before can have flows judged by the old policy
        # (a new endpoint's first flags are no reason to walk the table)
        before = self.etx.locals_before
        wide = {p for p in wide if p[0] in before}
        exact = {p for p in exact if p[0] in before}
        allowed = policy_judge(self.agent.engine)
        from ..errors import StockadeError
        try:
            n = dp.ct_cut_tightened(wide, exact, allowed) if (wide or exact) else 0
            if self.audit_off:
                n += dp.ct_cut_audited(self.audit_off, allowed)
            after = self.state.ipcache
            moved = {p: old for p, old in self.moved_prefixes.items()
                     if old != (after[p].identity if p in after else None)}
            if self.moved_ifindexes or moved:
                n += dp.ct_cut_moved(self.moved_ifindexes, moved,
                                     resolution_changed(after, moved), allowed)
            freed = dp.ct_unrevoke(allowed) if any(s.kind in ("policy", "ipcache", "endpoint")
                                                   for s in self.steps) else 0
        except StockadeError as exc:
            self.agent.error(f"cutting flows the new policy denies: {exc}")
            return
        if n:
            self.log.append(f"conntrack: {n} flows the change denies revoked")
        if freed:
            self.log.append(f"conntrack: {freed} revoked flows the change allows again let go")

    def unwrite(self, dp) -> None:
        """Write the inverse of every step written, last first."""
        while self.undo:
            step = self.undo[-1]
            if step.kind == "policy_mark":   # the datapath's journal, back to this mark
                dp.policy_undo(step.key)
            else:
                if step.kind == "unpolicy":   # the inverse of a policy step, computed when needed
                    step = Step("policy", value=step.value.inverse())
                _write_step(self.agent, dp, step)
            self.undo.pop()

    def _inverse(self, step: Step) -> Step | None:
        agent = self.agent
        if step.kind == "policy":   # its delta is not changed after it is written
            return Step("unpolicy", value=step.value)
        if step.kind == "ipcache":
            return Step("ipcache", step.key, step.prior)
        if step.kind == "endpoint":
            return Step("endpoint", step.key, agent.endpoint_entries.get(step.key))
        if step.kind == "attach":
            if step.key in agent.attached:
                return None
            return Step("close", step.key) if step.value else Step("detach", step.key)
        if step.kind == "detach":
            return Step("attach", step.key) if step.key in agent.attached else None
        if step.kind == "close":
            return None
        raise ValueError(step.kind)

    def commit(self) -> None:
        if self.dp is not None:   # persisted: the old generations of switched pairs go
            dp, self.dp = self.dp, None
            try:
                dp.policy_commit()
            except StockadeError as exc:
                self.agent.error(f"deleting the previous policy generation: {exc} "
                                 "(stale, deleted at the next policy write)")
        self.agent.engine.commit(self.etx)
        for fn in self.on_commit:
            fn()

    def discard(self) -> None:
        if self.dp is not None:   # undone, or about to be rewritten from the model
            dp, self.dp = self.dp, None
            dp.policy_release()
        self.agent.engine.discard(self.etx)
        self.j.undo()
        self.agent.alloc.undo(self._alloc_mark)


def resolution_changed(ipcache: Mapping[str, IpcacheEntry],
                       before: Mapping[str, int | None]) -> Callable[[int, bytes], bool]:
    """Whether an address (family 4 or 6, its bytes) resolves in ``ipcache`` to another
    identity than it did while the prefixes of ``before`` had the identities it gives
    (None: no entry): longest prefix first, a miss is world, as the programs look it up."""
    order: dict[int, list[int]] = {}

    def changed(family: int, raw: bytes) -> bool:
        if not order:   # the lengths in use, once an address needs them
            lengths: dict[int, set[int]] = {4: set(), 6: set()}
            for prefix in itertools.chain(ipcache, before):
                lengths[6 if ":" in prefix else 4].add(int(prefix.rpartition("/")[2]))
            order.update({f: sorted(ls, reverse=True) for f, ls in lengths.items()})
        net_type = ipaddress.IPv4Network if family == 4 else ipaddress.IPv6Network
        width = 32 if family == 4 else 128
        addr = int.from_bytes(raw, "big")
        then = now = None
        for plen in order[family]:
            shift = width - plen
            prefix = str(net_type((addr >> shift << shift, plen)))
            entry = ipcache.get(prefix)
            cur = entry.identity if entry is not None else None
            if now is None:
                now = cur
            if then is None:
                then = before[prefix] if prefix in before else cur
            if then is not None and now is not None:
                break
        return (WORLD_ID if then is None else then) != (WORLD_ID if now is None else now)
    return changed


def policy_judge(engine) -> Callable[[int, int, int, int, int | None], bool]:
    """Whether the engine's policy, as it is now, admits the first packet of a flow
    (local identity, peer identity, direction, protocol, port): the datapath's
    conntrack cut asks it of each flow it judges again."""
    from ..policy.mapstate import lookup

    def allowed(local: int, peer: int, direction: int, proto: int, port: int | None) -> bool:
        verdict, _ = lookup(engine.entries, engine.flags, local, peer, direction, proto, port)
        return verdict in ("allow", "not-enforced")
    return allowed


def _write_step(agent: "Agent", dp, step: Step) -> None:
    if step.kind == "policy":
        dp.apply_delta(step.value, checked=True)
    elif step.kind == "ipcache":
        if step.value is None:
            dp.del_ipcache(step.key)
        else:
            dp.set_ipcache(step.key, step.value)
    elif step.kind == "endpoint":
        if step.value is None:
            dp.del_endpoint(step.key)
            agent.endpoint_entries.pop(step.key, None)
        else:
            dp.set_endpoint(step.key, **step.value)
            agent.endpoint_entries[step.key] = step.value
    elif step.kind == "close":
        # a managed interface stays attached and closed; when even the closed entry
        # cannot be written (a full map) it goes: without an entry it is dropped as
        # unidentified too, and a delete never fails for want of room
        try:
            dp.set_endpoint(step.key, **CLOSED)
            agent.endpoint_entries[step.key] = CLOSED
        except StockadeError:
            dp.del_endpoint(step.key)
            agent.endpoint_entries.pop(step.key, None)
    elif step.kind == "attach":
        if step.key not in agent.attached:
            dp.attach_interface(step.key)
            agent.attached.add(step.key)
            agent._kernel_default("protect", [step.key])   # the programs run: let it be
    elif step.kind == "detach":
        if step.key in agent.attached:
            agent._kernel_default("unprotect", [step.key])
            dp.detach_interface(step.key)
            agent.attached.discard(step.key)
