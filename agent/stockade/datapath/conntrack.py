"""Conntrack from the agent's side: reading, gc, deletion, and hook budgets (mixed
into ``Datapath``).

The programs insert entries and count them per hook in ct_created; only the agent
deletes entries, and it counts every deletion in ct_released (struct ct_owner in
bpf/include/stockade_maps.h). Every deletion must therefore go through ``ct_delete``
(or ``ct_charge`` for entries the agent itself adds, as the migration does), or the
hook's budget drifts.
"""
from __future__ import annotations

import collections
import ctypes as ct
import ipaddress
import struct
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from . import maps as m

TABLE = (0, 0, 0)   # the owner that counts the whole table (struct ct_owner, ifindex 0)
# struct ct_key (m.CtKey) as ifindex, saddr, daddr, direction, family: what a walk reads
_CT_KEY = struct.Struct("<I16s16s5xBBx")
assert _CT_KEY.size == ct.sizeof(m.CtKey)


def _by_length(prefixes: Iterable[str]) -> dict[int, list[tuple[int, frozenset[int]]]]:
    """``prefixes`` as family -> [(host bits, {network address >> host bits})]: an
    address lies in one when ``address >> host bits`` is in the set of its length."""
    found: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
    for p in prefixes:
        net = ipaddress.ip_network(p, strict=False)
        shift = net.max_prefixlen - net.prefixlen
        found[(net.version, shift)].add(int(net.network_address) >> shift)
    out: dict[int, list[tuple[int, frozenset[int]]]] = {}
    for (family, shift), within in sorted(found.items()):
        out.setdefault(family, []).append((shift, frozenset(within)))
    return out


def _lib():
    from .bpfsys import lib
    return lib


class ConntrackMaps:
    """Needs ``self.table(name)``, ``self._items`` and ``self._delete`` (MapWriter)."""

    if TYPE_CHECKING:
        def table(self, name: str) -> Any: ...
        def _items(self, name: str, key_type: Any, value_type: Any) -> list: ...
        def _update(self, name: str, key: Any, value: Any) -> None: ...
        def _delete(self, name: str, key: Any) -> bool: ...

    def ct_entries(self) -> list[tuple[m.CtKey, m.CtValue]]:
        return self._items("conntrack", m.CtKey, m.CtValue)

    # -- budgets -----------------------------------------------------------------
    def _owner_counts(self, name: str) -> dict[tuple[int, int, int], int]:
        return {(k.ifindex, k.direction, k.peer): v.n
                for k, v in self._items(name, m.CtOwner, m.CtCount)}

    def ct_charge(self, counts: dict[tuple[int, int, int], int]) -> None:
        """Record ``counts[(ifindex, direction, peer)]`` entries deleted (positive) or
        added by the agent (negative) for each owner (ct_released; the agent is its only
        writer). The programs count an owner's live entries as created - released."""
        released = self._owner_counts("ct_released")
        counts = dict(counts)
        total = sum(n for o, n in counts.items() if o != TABLE)
        counts[TABLE] = counts.get(TABLE, 0) + total      # the whole table's count too
        for owner, n in sorted(counts.items()):
            if not n:
                continue
            key = m.CtOwner(ifindex=owner[0], direction=owner[1], peer=owner[2])
            total = (released.get(owner, 0) + n) % (1 << 64)
            self._update("ct_released", key, m.CtCount(n=total))

    def ct_budgets(self, table: bool = False) -> dict[tuple[int, int, int], int]:
        """Live entries per owner as the programs count them:
        (ifindex, direction, peer identity or 0) -> n; with ``table``, also the whole
        table's count under (0, 0, 0)."""
        created = self._owner_counts("ct_created")
        released = self._owner_counts("ct_released")
        owners = set(created) | set(released)
        if not table:
            owners.discard(TABLE)
        out = {}
        for o in sorted(owners):
            live = (created.get(o, 0) - released.get(o, 0)) % (1 << 64)
            out[o] = live if live < (1 << 63) else 0   # as the programs clamp it
        return out

    # -- deletion ----------------------------------------------------------------
    def ct_delete(self, keys: Iterable[m.CtKey],
                  still: Callable[[m.CtValue], bool] | None = None) -> int:
        """Delete entries ``keys`` (with ``still``, only those whose value, read again
        just before, still passes it) and charge them to their hooks. Returns how many
        were deleted."""
        lib = _lib()
        fd = self.table("conntrack").map_fd
        freed: collections.Counter = collections.Counter()
        for k in keys:
            v = m.CtValue()
            if lib.bpf_lookup_elem(fd, ct.byref(k), ct.byref(v)) != 0:
                continue
            if still is not None and not still(v):
                continue
            if self._delete("conntrack", k):
                freed[(k.ifindex, k.direction, v.owner_peer)] += 1
        self.ct_charge(freed)
        return sum(freed.values())

    def ct_gc(self, now_ns: int | None = None) -> int:
        """Delete expired conntrack entries; returns how many were deleted. Also forgets
        the budgets of owners that have no entry left."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now_ns is None else now_ns
        expired = [k for k, v in self.ct_entries() if v.expires < now]
        n = self.ct_delete(expired, still=lambda v: v.expires < now)
        self._prune_owners()
        return n

    def _prune_owners(self) -> None:
        # A program may be adding to an owner deleted here: the maps are not
        # preallocated (the memory stays valid), so at worst that one count is lost and
        # the owner's count is one low, which the programs clamp at zero.
        for (ifindex, direction, peer), live in self.ct_budgets().items():   # not TABLE
            if live == 0:
                key = m.CtOwner(ifindex=ifindex, direction=direction, peer=peer)
                self._delete("ct_created", key)
                self._delete("ct_released", key)

    def ct_flush(self) -> int:
        """Delete every conntrack entry (charged to its owner); forget empty owners."""
        n = self.ct_delete([k for k, _ in self.ct_entries()])
        self._prune_owners()
        return n

    # -- by identity ---------------------------------------------------------------
    def _identity_of(self, family: int, addr: bytes) -> int:
        """The ipcache identity of ``addr`` (longest prefix; miss: world), as the
        programs look it up."""
        key: m.Ipcache4Key | m.Ipcache6Key
        if family == 4:
            key, name = m.Ipcache4Key(prefixlen=32), "ipcache4"
            ct.memmove(key.addr, addr[:4], 4)
        else:
            key, name = m.Ipcache6Key(prefixlen=128), "ipcache6"
            ct.memmove(key.addr, addr[:16], 16)
        val = m.IpcacheValue()
        if _lib().bpf_lookup_elem(self.table(name).map_fd, ct.byref(key), ct.byref(val)) != 0:
            return m.IDENTITY_WORLD
        return val.identity

    def ct_delete_pairs(self, pairs: Iterable[tuple[int, int]]) -> int:
        """Delete the entries of flows between identities ``(local, peer)``: entries at
        the hooks of endpoints whose identity is ``local`` whose other end resolves (in
        the ipcache, as the programs see it) to ``peer``, both directions. For a policy
        change that revokes what was allowed: the next packet of such a flow is judged
        by the new policy. Returns how many were deleted."""
        wanted = set(pairs)
        if not wanted:
            return 0
        local_of = {k.value: v.identity
                    for k, v in self._items("endpoints", ct.c_uint32, m.EndpointInfo)
                    if not v.flags & m.EP_F_UNIDENTIFIED}
        doomed = []
        for k, _v in self.ct_entries():
            local = local_of.get(k.ifindex)
            if local is None:
                continue
            # the peer is the destination of a flow the endpoint started, else the source
            addr = bytes(k.daddr) if k.direction == m.DIR_EGRESS else bytes(k.saddr)
            if (local, self._identity_of(k.family, addr)) in wanted:
                doomed.append(k)
        return self.ct_delete(doomed)

    def ct_delete_tightened(self, wide: Iterable[tuple[int, int]],
                            exact: Iterable[tuple[int, int, int]]) -> int:
        """Delete the entries of flows a tighter policy may now deny, so that their next
        packet is judged again: at the hooks of endpoints with identity ``local``, flows
        opened in ``direction`` (the endpoint's egress: it opened them; ingress: toward
        it), every peer for ``wide`` (local, direction), the peer identity resolved in
        the ipcache for ``exact`` (local, peer, direction). Allowed flows only lose an
        entry the next packet creates again. Returns how many were deleted."""
        wide, exact = set(wide), set(exact)
        if not wide and not exact:
            return 0
        local_of = {k.value: v.identity
                    for k, v in self._items("endpoints", ct.c_uint32, m.EndpointInfo)
                    if not v.flags & m.EP_F_UNIDENTIFIED}
        peers_of = collections.defaultdict(set)
        for local, peer, direction in exact:
            peers_of[(local, direction)].add(peer)
        ifindexes = {i for i, ident in local_of.items()
                     if any(w[0] == ident for w in wide) or any(p[0] == ident for p in peers_of)}
        if not ifindexes:
            return 0
        resolved: dict[tuple[int, bytes], int] = {}
        doomed = []
        for ifindex, saddr, daddr, direction, family, chunk, at in self._ct_keys():
            if ifindex not in ifindexes:
                continue
            ident = local_of.get(ifindex)
            if ident is None:
                continue
            if (ident, direction) in wide:
                doomed.append(m.CtKey.from_buffer_copy(chunk, at))
                continue
            peers = peers_of.get((ident, direction))
            if peers:
                addr = daddr if direction == m.DIR_EGRESS else saddr
                who = resolved.get((family, addr))
                if who is None:
                    who = resolved[(family, addr)] = self._identity_of(family, addr)
                if who in peers:
                    doomed.append(m.CtKey.from_buffer_copy(chunk, at))
        return self.ct_delete(doomed)

    def _ct_keys(self) -> Iterator[tuple[int, bytes, bytes, int, int, bytes, int]]:
        """(ifindex, saddr, daddr, direction, family, chunk, offset) of every conntrack
        entry, its key being ``CtKey.from_buffer_copy(chunk, offset)``: keys read in
        batches and unpacked from their bytes, no object made per key."""
        from .pins import fd_key_chunks
        size = _CT_KEY.size
        for chunk in fd_key_chunks(self.table("conntrack").map_fd, m.CtKey, m.CtValue,
                                   "conntrack"):
            offset = 0
            for ifindex, saddr, daddr, direction, family in _CT_KEY.iter_unpack(chunk):
                yield ifindex, saddr, daddr, direction, family, chunk, offset
                offset += size

    def ct_delete_moved(self, ifindexes: Iterable[int], prefixes: Iterable[str],
                        changed: Callable[[int, bytes], bool] | None = None) -> int:
        """Delete the entries of flows judged under an identity that changed: every
        entry at the hooks of ``ifindexes`` (endpoints relabelled), and every entry whose
        peer address lies in one of ``prefixes`` (ipcache entries added, changed or
        gone) and, with ``changed``, for which ``changed(family, address bytes)`` says
        the address now resolves to another identity (a more specific entry may keep
        it where it was). An allowed flow's next packet creates its entry again.
        Returns how many were deleted."""
        ifindexes = set(ifindexes)
        nets = _by_length(prefixes)
        if not ifindexes and not nets:
            return 0
        verdicts: dict[bytes, bool] = {}
        doomed = []
        for ifindex, saddr, daddr, direction, family, chunk, at in self._ct_keys():
            if ifindex not in ifindexes:
                lengths = nets.get(family)
                if not lengths:
                    continue
                raw = (daddr if direction == m.DIR_EGRESS else saddr)[:4 if family == 4 else 16]
                addr = int.from_bytes(raw, "big")
                if not any(addr >> shift in within for shift, within in lengths):
                    continue
                if changed is not None:
                    verdict = verdicts.get(raw)
                    if verdict is None:
                        verdict = verdicts[raw] = changed(family, raw)
                    if not verdict:
                        continue
            doomed.append(m.CtKey.from_buffer_copy(chunk, at))
        return self.ct_delete(doomed)

    def ct_delete_audited(self, ifindexes: Iterable[int] | None = None) -> int:
        """Delete the entries audited would-be drops created (at ``ifindexes``' hooks, or
        everywhere): an endpoint leaving audit mode keeps none of the flows its policy
        denies. Returns how many were deleted."""
        only = None if ifindexes is None else set(ifindexes)
        doomed = [k for k, v in self.ct_entries()
                  if v.audited and (only is None or k.ifindex in only)]
        return self.ct_delete(doomed, still=lambda v: bool(v.audited))
