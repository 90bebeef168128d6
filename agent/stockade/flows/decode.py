"""Batch decoding of datapath flow events (raw ``struct flow_event`` bytes) into rows.

The decoder knows nothing of the agent: a ``Resolver`` snapshot tells it which
endpoint sits behind an ifindex or an address, an identity's labels and which
policies are behind the policy_ids an event carries (the datapath wrote them in the
policy map's values, so a flow names what decided it when it happened). The agent builds a new
snapshot when its model changes (flowsource.py); decoding itself takes no lock.
"""
from __future__ import annotations

import collections
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..datapath.maps import DIR_EGRESS, MATCH_DENY, FlowEvent, Verdict
from .ring import FlowRing

# struct flow_event (bpf/include/stockade_maps.h), little-endian host
EVENT = struct.Struct("<QIIIBBBB16s16sHHBBBBIBB2xII")
assert EVENT.size == __import__("ctypes").sizeof(FlowEvent), "flow_event layout changed"

CACHE_MAX = 8192  # per-snapshot cache of policy lookups (ports of a scan would grow it)


@dataclass
class Resolver:
    """What the agent knows, frozen at one moment.

    endpoints_by_ifindex  ifindex -> endpoint name
    endpoints_by_addr     16-byte address (IPv4 zero-padded) -> (endpoint name|None, host)
    labels                identity -> tuple of label strings
    policies              callable(exact id, any id, deny) -> tuple of policy names: the
                          policies behind the entries that decided (policy_ids the event
                          carries, as written at the time; Datapath.policy_names)
    """

    endpoints_by_ifindex: dict = field(default_factory=dict)
    endpoints_by_addr: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    policies: Callable | None = None
    ifnames: dict = field(default_factory=dict)
    host: str | None = None


ENDPOINT_SERIES = 256        # endpoints with drop counters of their own
OTHER, UNIDENTIFIED = "_other", "_unidentified"
VERDICT_DROPPED = int(Verdict.DROPPED)


class Decoder:
    """Turn batches of raw events into ring rows; counts verdicts as it goes."""

    def __init__(self, ring: FlowRing, resolver: Resolver | None = None):
        self.ring = ring
        self.verdicts: collections.Counter = collections.Counter()  # (verdict, dir, reason)
        # drop events by (local endpoint, direction): at most ENDPOINT_SERIES endpoints, the
        # rest as OTHER; endpoints that went are forgotten (set_resolver)
        self.endpoint_drops: dict = {}
        self.decoded = 0
        self.set_resolver(resolver or Resolver())

    def set_resolver(self, resolver: Resolver) -> None:
        self.resolver = resolver
        known = set(resolver.endpoints_by_ifindex.values()) | {OTHER, UNIDENTIFIED}
        for key in [k for k in self.endpoint_drops if k[0] not in known]:
            del self.endpoint_drops[key]
        self._info_cache: dict = {}
        self._policy_cache: dict = {}
        self.ring.ifnames = dict(resolver.ifnames)

    def _info(self, identity: int, name, host) -> int:
        key = (identity, name, host)
        idx = self._info_cache.get(key)
        if idx is None:
            labels = self.resolver.labels.get(identity, ())
            idx = self.ring.infos.add((identity, tuple(labels), name, host))
            self._info_cache[key] = idx
        return idx

    def _policy(self, exact: int, any_peer: int, deny: bool) -> int:
        key = (exact, any_peer, deny)
        idx = self._policy_cache.get(key)
        if idx is None:
            if len(self._policy_cache) >= CACHE_MAX:
                self._policy_cache.clear()
            names: tuple = ()
            if self.resolver.policies is not None:
                names = tuple(self.resolver.policies(exact, any_peer, deny))
            idx = self.ring.policies.add(names)
            self._policy_cache[key] = idx
        return idx

    def rows(self, events: bytes | Iterable[bytes], now_ns: int | None = None) -> list[tuple]:
        """Decode ``events`` (concatenated raw events, or a list of them) into rows."""
        data = events if isinstance(events, (bytes, bytearray)) else b"".join(events)
        # bpf_ktime_get_ns is CLOCK_MONOTONIC; one offset per batch makes it wall time
        offset = (time.time_ns() - time.monotonic_ns()) if now_ns is None else now_ns
        r = self.resolver
        by_if, by_addr, host = r.endpoints_by_ifindex, r.endpoints_by_addr, r.host
        info, policy, verdicts = self._info, self._policy, self.verdicts
        icache, pcache = self._info_cache, self._policy_cache
        no_peer = (None, None)
        out: list = []
        append = out.append
        # The hot loop: cache hits inline, misses through info() / policy().
        for (ts, ifindex, sid, did, direction, verdict, reason, ipv, saddr, daddr, sport, dport,
             proto, flags, itype, is_reply, size, pmatch, icode, pexact, pany) in EVENT.iter_unpack(data):
            local_name = by_if.get(ifindex)
            lhost = host if local_name else None
            if direction == DIR_EGRESS:
                src_info = icache.get((sid, local_name, lhost)) or info(sid, local_name, lhost)
                pname, phost = by_addr.get(daddr, no_peer)
                dst_info = icache.get((did, pname, phost)) or info(did, pname, phost)
            else:
                dst_info = icache.get((did, local_name, lhost)) or info(did, local_name, lhost)
                pname, phost = by_addr.get(saddr, no_peer)
                src_info = icache.get((sid, pname, phost)) or info(sid, pname, phost)
            pol: int | None = 0
            if pexact or pany:
                deny = pmatch & 0x0F == MATCH_DENY
                pol = pcache.get((pexact, pany, deny))
                if pol is None:
                    pol = policy(pexact, pany, deny)
            vk = (verdict, direction, reason)
            verdicts[vk] = verdicts.get(vk, 0) + 1
            if verdict == VERDICT_DROPPED:
                self._count_drop(local_name, direction)
            append((ts + offset, ifindex, sid, did, src_info, dst_info, pol, size, saddr, daddr,
                    sport, dport, verdict, reason, direction, ipv, proto, flags, itype, is_reply,
                    pmatch, icode, 0))
        self.decoded += len(out)
        return out

    def _count_drop(self, name, direction: int) -> None:
        key = (name or UNIDENTIFIED, direction)
        drops = self.endpoint_drops
        if key not in drops and len(drops) >= 2 * ENDPOINT_SERIES:
            key = (OTHER, direction)
        drops[key] = drops.get(key, 0) + 1

    def decode_into_ring(self, events) -> list[tuple]:
        rows = self.rows(events)
        self.ring.append_rows(rows)
        return rows
