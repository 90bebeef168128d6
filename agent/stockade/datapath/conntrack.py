"""Conntrack from the agent's side: reading, gc, deletion, and hook budgets (mixed
into ``Datapath``).

The programs insert entries and count them per hook in ct_created; only the agent
deletes entries, and it counts every deletion in ct_released (struct ct_owner in
bpf/include/stockade_maps.h). Every deletion must therefore go through ``ct_delete``
(or ``ct_charge`` for entries the agent itself adds, as the migration does), or the
hook's budget drifts.

A policy change cuts the flows it may deny (``ct_cut_*``): each such entry is judged again
as the programs would judge the flow's first packet now; an allowed flow keeps its
entry, a denied one is revoked (CT_STATE_REVOKED: every later packet of it, from either
side, is dropped). Deleting the entry would not stop it: a packet without an entry may
open one, so the endpoint's next ACK would open the flow again from its own side.
"""
from __future__ import annotations

import collections
import ctypes as ct
import ipaddress
import struct
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from . import maps as m
from .bpfsys import BPF_EXIST

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


# A policy verdict: (local identity, peer identity, direction, protocol, port or None:
# the policy's port: an ICMP type, or None for a protocol without ports) -> allowed
Judge = Callable[[int, int, int, int, "int | None"], bool]
_PORTS = {6, 17, 132}          # TCP, UDP, SCTP (parse.h)
_ICMP = {1, 58}


def _policy_port(k: m.CtKey) -> int | None:
    """The port the policy matched the flow's first packet on (policy.h policy_match)."""
    if k.proto in _ICMP:
        return int(k.icmp_type)
    if k.proto in _PORTS:
        return int.from_bytes(bytes(ct.c_uint16(k.dport)), "big")
    return None


def _lib():
    from .bpfsys import lib
    return lib


class ConntrackMaps:
    """Needs ``self.table(name)``, ``self._items`` and ``self._delete`` (MapWriter)."""

    if TYPE_CHECKING:
        def table(self, name: str) -> Any: ...
        def config_flags(self) -> int: ...
        settings: dict
        _revoked: set[bytes] | None
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
        revoked = getattr(self, "_revoked", None)
        if revoked:
            revoked.difference_update(bytes(k) for k in expired)
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
        self._revoked = set[bytes]()
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

    def ct_cut_tightened(self, wide: Iterable[tuple[int, int]],
                         exact: Iterable[tuple[int, int, int]], allowed: Judge) -> int:
        """Cut the flows a tighter policy may now deny (``ct_cut``): at the hooks of
        endpoints with identity ``local``, flows opened in ``direction`` (the
        endpoint's egress: it opened them; ingress: toward it), every peer for ``wide``
        (local, direction), the peer identity resolved in the ipcache for ``exact``
        (local, peer, direction). Returns how many were revoked."""
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
        return self.ct_cut(doomed, allowed)

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

    def ct_cut_moved(self, ifindexes: Iterable[int], prefixes: Iterable[str],
                     changed: Callable[[int, bytes], bool] | None, allowed: Judge) -> int:
        """Cut (``ct_cut``) the flows judged under an identity that changed: every
        entry at the hooks of ``ifindexes`` (endpoints relabelled), and every entry whose
        peer address lies in one of ``prefixes`` (ipcache entries added, changed or
        gone) and, with ``changed``, for which ``changed(family, address bytes)`` says
        the address now resolves to another identity (a more specific entry may keep
        it where it was). Returns how many were revoked."""
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
        return self.ct_cut(doomed, allowed)

    def ct_cut_audited(self, ifindexes: Iterable[int] | None, allowed: Judge) -> int:
        """Cut (``ct_cut``) the flows audited would-be drops opened (at ``ifindexes``'
        hooks, or everywhere): an endpoint leaving audit mode keeps none of the flows
        its policy denies. Returns how many were revoked."""
        only = None if ifindexes is None else set(ifindexes)
        doomed = [k for k, v in self.ct_entries()
                  if v.audited and (only is None or k.ifindex in only)]
        return self.ct_cut(doomed, allowed)

    # -- judging again -------------------------------------------------------------
    def ct_cut(self, keys: Iterable[m.CtKey], allowed: Judge) -> int:
        """Judge the flows of entries ``keys`` again, as the programs would judge their
        first packet now (the hook's endpoint identity, the peer's identity in the
        ipcache, the policy ``allowed`` answers for). An allowed flow keeps its entry
        (no longer marked audited); a denied one is marked audited where the endpoint
        or the agent is in audit mode, else revoked. An entry at the hook of an
        interface no longer identified is revoked. Returns how many were revoked."""
        keys = list(keys)
        if not keys:   # the common case: the endpoints map is not read for nothing
            return 0
        endpoints = {k.value: v for k, v in self._items("endpoints", ct.c_uint32, m.EndpointInfo)}
        audit_all = bool(self.config_flags() & m.CFG_F_AUDIT)
        fd = self.table("conntrack").map_fd
        lib = _lib()
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        judge = self._judge(allowed)
        revoked = 0
        for k in keys:
            v = m.CtValue()
            if lib.bpf_lookup_elem(fd, ct.byref(k), ct.byref(v)) != 0:
                continue
            if v.state == m.CT_STATE_REVOKED or v.expires < now:
                continue
            ep = endpoints.get(k.ifindex)
            if ep is None or ep.flags & m.EP_F_UNIDENTIFIED:
                ok, audit = False, False
            else:
                ok = judge(k, ep.identity)
                audit = audit_all or bool(ep.flags & m.EP_F_AUDIT)
            if ok or audit:
                if bool(v.audited) != (not ok):
                    v.audited = int(not ok)
                    self._ct_rewrite(fd, k, v, "audited")
                continue
            if self._ct_revoke(fd, k, v, now):
                revoked += 1
        return revoked

    def _judge(self, allowed: Judge) -> Callable[[m.CtKey, int], bool]:
        """``allowed`` asked of the flow of entry ``k`` at the hook of an endpoint with
        identity ``local``, as the programs would judge its first packet now (the peer's
        identity in the ipcache); each peer address and each question asked once."""
        peers: dict[tuple[int, bytes], int] = {}
        verdicts: dict[tuple, bool] = {}

        def judge(k: m.CtKey, local: int) -> bool:
            raw = bytes(k.daddr if k.direction == m.DIR_EGRESS else k.saddr)
            peer = peers.get((k.family, raw))
            if peer is None:
                peer = peers[(k.family, raw)] = self._identity_of(k.family, raw)
            query = (local, peer, k.direction, k.proto, _policy_port(k))
            known = verdicts.get(query)
            ok = verdicts[query] = allowed(*query) if known is None else known
            return ok
        return judge

    def _ct_revoke(self, fd: int, k: m.CtKey, v: m.CtValue, now: int) -> bool:
        v.state = m.CT_STATE_REVOKED
        v.audited = 0
        timeout = "CT_TIMEOUT_TCP_S" if k.proto == 6 else "CT_TIMEOUT_OTHER_S"
        v.expires = now + int(self.settings[timeout]) * 1_000_000_000
        if not self._ct_rewrite(fd, k, v, "state"):
            return False
        self._revoked_keys().add(bytes(k))
        return True

    def _ct_rewrite(self, fd: int, k: m.CtKey, v: m.CtValue, field: str) -> bool:
        """Write ``v`` over the existing entry ``k`` until reading it back shows its
        ``field`` (a program refreshing the entry at that moment writes its old state
        back). False when the entry is gone (nothing to rewrite)."""
        lib = _lib()
        cur = m.CtValue()
        for _ in range(5):
            if lib.bpf_update_elem(fd, ct.byref(k), ct.byref(v), BPF_EXIST) != 0:
                return False
            if lib.bpf_lookup_elem(fd, ct.byref(k), ct.byref(cur)) != 0:
                return False
            if getattr(cur, field) == getattr(v, field):
                return True
        from .errors import DatapathError
        raise DatapathError("conntrack", "an entry kept changing while it was revoked")

    def _revoked_keys(self) -> set[bytes]:
        """The keys of the entries revoked (read from the table once per process)."""
        keys = getattr(self, "_revoked", None)
        if keys is None:
            keys = self._revoked = {bytes(k) for k, v in self.ct_entries()
                                    if v.state == m.CT_STATE_REVOKED}
        return keys

    def ct_unrevoke(self, allowed: Judge) -> int:
        """Delete the revoked entries of flows the policy now allows again (their next
        packet opens them), and forget those gone. Returns how many were deleted."""
        keys = self._revoked_keys()
        if not keys:
            return 0
        endpoints = {k.value: v for k, v in self._items("endpoints", ct.c_uint32, m.EndpointInfo)}
        fd = self.table("conntrack").map_fd
        lib = _lib()
        judge = self._judge(allowed)
        doomed = []
        for raw in list(keys):
            k = m.CtKey.from_buffer_copy(raw)
            v = m.CtValue()
            if lib.bpf_lookup_elem(fd, ct.byref(k), ct.byref(v)) != 0 or \
                    v.state != m.CT_STATE_REVOKED:
                keys.discard(raw)
                continue
            ep = endpoints.get(k.ifindex)
            if ep is None or ep.flags & m.EP_F_UNIDENTIFIED:
                continue
            if judge(k, ep.identity):
                doomed.append(k)
                keys.discard(raw)
        return self.ct_delete(doomed, still=lambda v: v.state == m.CT_STATE_REVOKED)
