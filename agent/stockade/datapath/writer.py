"""Typed writers and readers for the pinned maps (mixed into ``Datapath``).

Ordering of ``apply_delta``: no intermediate state allows a packet that both the old
and the new state deny (tests/test_writer_order.py checks every intermediate state of
random and exhaustive old/new pairs against the programs' verdict):

  1. deny entries added/changed      (only denies more than the old state)
  2. flags that loosen a direction   (a packet that misses every entry now misses in
                                      the new state too: the new denies are in)
  3. allow entries removed           (before any allow is added: a stale allow of one
                                      peer class never meets a new allow of the other,
                                      e.g. old any-peer allow 80/tcp + new exact allow
                                      80/tcp while the new any-peer deny tcp is in)
  4. allow entries added/changed     (every allow left is the new state's)
  5. flags that tighten a direction  (allow entries are in place before a miss drops)
  6. deny entries removed            (the new state plus stale denies: denies more)

Proof sketch: by longest-prefix match, adding deny entries to a state never allows
more; after step 3 every allow entry is one of the new state's, so a packet allowed
by an allow entry then is allowed by the new state (its new denies are all present,
and a more specific new entry can only be an allow), and a packet allowed for missing
every entry misses the old or new state's entries alike under the flag in force.
The price: a packet allowed by both the old and the new state through different
allow entries (an allow reshaped, say 80/tcp -> 0-1023/tcp) is dropped between steps
3 and 4; established flows pass by conntrack, a new connection retries.

Large changes switch generations instead (bpf/include/stockade_maps.h, "Policy
generations"): when a delta adds, removes or turns over (allow <-> deny) at least
``switch_min`` entries of one (local identity, direction) pair, that pair's whole new state is written into the
generation not in force, its flags entry (new flags and generation) is replaced in one
map update, then, once every program that may have read the old flags entry has
finished (an RCU grace period), the old generation's entries are deleted. Every packet meets exactly
the old or the new state: nothing both allow is dropped. A packet is decided by one
pair's entries and flags only, so pairs switched and pairs written in order do not
interact. Entries of a generation not in force (a switch cut short) are deleted when
the writer first reads the maps.

Inside a transaction (``policy_hold`` ... ``policy_commit``, daemon/txn.py) a switched
pair's old generation stays in the map, untouched, until the transaction commits (its
state persisted): ``policy_undo`` then only puts the pair's flags entry back (the old
generation in force again, in one map update) and, after a grace period, deletes what
was written into the new one; the ordered writes are undone by their inverse delta, in
the same safe order. The map then holds exactly what it held before. A pair switched
once in a transaction is written in order by its later steps (its other generation is
the old one, kept).

``check_capacity`` runs first and raises ``CapacityError`` before any write when
the peak size during those steps (adds happen before removes; a switched pair holds
both generations until the old one is deleted) exceeds a map.
"""
from __future__ import annotations

import collections
import ctypes as ct
import dataclasses
import errno
import ipaddress
import socket
import struct
import time
from typing import TYPE_CHECKING, Any, Iterable

from stockade.policy.mapstate import (
    ANY_PROTO,
    FIXED_PREFIX_BITS,
    Delta,
    DirectionPolicy,
    Entry,
    FlagState,
    Key,
    MapState,
)

from . import maps as m
from .errors import CapacityError, DatapathError


def _lib():
    from .bpfsys import lib
    return lib


SWITCH_MIN = 32   # entries of one pair a delta changes from which it switches generations


def _policy_key_fields(key: Key, gen: int) -> tuple[int, int, int, int, int, int]:
    """PolicyKey's fields in order (the port in network order)."""
    local, peer, direction, proto, port, plen = key
    if proto == ANY_PROTO:
        port, prefixlen = 0, FIXED_PREFIX_BITS
    else:
        if plen < 16:
            port &= (0xFFFF << (16 - plen)) & 0xFFFF
        prefixlen = FIXED_PREFIX_BITS + 8 + plen
    return (prefixlen, local, peer, direction | (m.POLICY_DIR_GEN if gen else 0), proto,
            socket.htons(port))


def _policy_key(key: Key, gen: int = 0) -> m.PolicyKey:
    return m.PolicyKey(*_policy_key_fields(key, gen))


# PolicyKey and PolicyValue packed by struct: a batch of 100,000 is one bytes object,
# not 200,000 ctypes structures.
_KEY_STRUCT = struct.Struct("=IIIBBH")
_VALUE_STRUCT = struct.Struct("=B3xI")
assert _KEY_STRUCT.size == ct.sizeof(m.PolicyKey) and _VALUE_STRUCT.size == ct.sizeof(m.PolicyValue)


def _key_from_c(k: m.PolicyKey) -> Key:
    direction = k.direction & ~m.POLICY_DIR_GEN
    if k.prefixlen <= FIXED_PREFIX_BITS:
        return Key(k.local, k.peer, direction)
    return Key(k.local, k.peer, direction, k.proto, socket.ntohs(k.port),
               k.prefixlen - FIXED_PREFIX_BITS - 8)


def _gen_of(k: m.PolicyKey) -> int:
    return 1 if k.direction & m.POLICY_DIR_GEN else 0


def _pair(key: Key) -> tuple[int, int]:
    return key.local, key.direction


def eui64_link_local(mac: bytes) -> ipaddress.IPv6Address | None:
    """fe80::/64 with the modified EUI-64 interface id of ``mac`` (RFC 4291 2.5.1), the
    address Linux gives an interface by default; None for an unset (all-zero) MAC."""
    if len(mac) != 6 or not any(mac):
        return None
    iid = bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + iid)


def delivery_ifindex(ifindex: int) -> int:
    """Where an endpoint's DHCP requests go: the master (bridge) of ``ifindex``, or
    ``ifindex`` itself when it has none (the host stack is right behind it); 0 when
    the interface does not exist."""
    from pyroute2.netlink.exceptions import NetlinkError

    from ..netlink import get_link
    try:
        link = get_link(ifindex)
    except (NetlinkError, ValueError, OSError):
        return 0
    return link.master or ifindex


def _rank(flag: DirectionPolicy) -> int:
    """How restrictive a direction is: 0 not enforced, 1 allow on miss, 2 deny on miss."""
    if not flag.enforced:
        return 0
    return 2 if flag.default_deny else 1


def _undo_of(delta: Delta, entries: MapState, flags: FlagState) -> Delta:
    """The delta that puts back what ``delta`` changes, from what the maps hold
    (``entries``, ``flags``: the writer's shadow), not from the delta's priors."""
    undo = Delta()
    for k in delta.adds.keys() | delta.removes:
        now, before = delta.adds.get(k), entries.get(k)
        if before is None:
            undo.remove(k, now)
        else:
            undo.add(k, before, now)
    for pair, flag in delta.flags.items():
        undo.set_flag(pair, flags.get(pair, DirectionPolicy()), flag)
    return undo


@dataclasses.dataclass
class _Switched:
    """A pair switched inside a transaction, as it was before (policy_undo restores it)."""

    pair: tuple[int, int]
    old_gen: int
    old_flag: DirectionPolicy
    old_entries: dict[Key, Entry]
    old_raw: list            # the old generation's raw keys: deleted at commit
    new_raw: list            # what is (or may be) written into the new one
    flipped: bool = False    # the flags entry names the new generation


class PolicyIds:
    """Entry (allow/deny and the policies behind it) <-> the number in a policy value.

    Numbers are never reused while the agent runs, so a flow event names the policies
    that decided it at the time, whatever changed since. The table holds each distinct
    (verdict, set of policy names) once: it grows with new combinations of policies,
    not with entries or traffic."""

    def __init__(self) -> None:
        self._numbers: dict[Entry, int] = {}
        self._entries: dict[int, Entry] = {}

    def number(self, entry: Entry) -> int:
        n = self._numbers.get(entry)
        if n is None:
            n = self._numbers[entry] = len(self._numbers) + 1
            self._entries[n] = entry
        return n

    def entry(self, number: int) -> Entry | None:
        return self._entries.get(number)


class MapWriter:
    """Needs ``self.table(name)`` (see loader.Datapath)."""

    switch_min = SWITCH_MIN   # see the module docstring (setting policy_switch_entries)

    if TYPE_CHECKING:
        def table(self, name: str) -> Any: ...
        def map_info(self, name: str) -> Any: ...
        def ct_flush(self) -> int: ...

    # -- low level -------------------------------------------------------------
    def _update(self, name: str, key, value) -> None:
        t = self.table(name)
        if _lib().bpf_update_elem(t.map_fd, ct.byref(key), ct.byref(value), 0) < 0:
            err = ct.get_errno()
            raise DatapathError(name, f"update failed: {errno.errorcode.get(err, err)}")

    def _delete(self, name: str, key) -> bool:
        t = self.table(name)
        if _lib().bpf_delete_elem(t.map_fd, ct.byref(key)) < 0:
            err = ct.get_errno()
            if err == errno.ENOENT:
                return False
            raise DatapathError(name, f"delete failed: {errno.errorcode.get(err, err)}")
        return True

    def _items(self, name: str, key_type, value_type) -> list:
        """All (key, value) pairs, read with our own ctypes types (not bcc's)."""
        fd = self.table(name).map_fd
        lib = _lib()
        out = []
        key, nxt = key_type(), key_type()
        prev = None
        while True:
            if lib.bpf_get_next_key(fd, prev, ct.byref(nxt)) < 0:
                break
            val = value_type()
            key = key_type.from_buffer_copy(nxt)
            if lib.bpf_lookup_elem(fd, ct.byref(key), ct.byref(val)) == 0:
                out.append((key, val))
            prev = ct.byref(key)
        return out

    def max_entries(self, name: str) -> int:
        """Capacity as the kernel has it (a reused pin may predate the settings)."""
        return int(self.map_info(name).max_entries)

    # -- endpoints and ipcache -------------------------------------------------
    def set_endpoint(self, ifindex: int, endpoint_id: int, identity: int,
                     ips: Iterable[str] = (), mac: str | None = None,
                     audit: bool = False, unidentified: bool = False,
                     link_local: Iterable[str] = (), host_ifindex: int | None = None) -> None:
        """Write the endpoint behind host-side interface ``ifindex`` (replaces it).

        ``link_local``: the workload's IPv6 link-local addresses (for a container,
        discovery.veth.link_local_addresses); the one derived from ``mac`` (EUI-64) is
        always added. They are the only fe80::/10 sources the endpoint may use.
        ``host_ifindex``: where its DHCP requests go (stockade_maps.h); None: the
        interface's bridge, or the interface itself when it has no master."""
        info = m.EndpointInfo(endpoint_id=endpoint_id, identity=identity)
        info.flags = (m.EP_F_AUDIT if audit else 0) | (m.EP_F_UNIDENTIFIED if unidentified else 0)
        info.host_ifindex = delivery_ifindex(ifindex) if host_ifindex is None else host_ifindex
        lls = []
        if mac:
            info.mac[:] = list(bytes.fromhex(mac.replace(":", "")))
            derived = eui64_link_local(bytes(info.mac))
            if derived is not None:
                lls.append(derived)
        for ip in link_local:
            addr = ipaddress.ip_address(ip)
            if addr.version != 6 or not addr.is_link_local:
                raise DatapathError(f"endpoint {endpoint_id}", f"{ip} is not an IPv6 link-local "
                                                               "address")
            if addr not in lls:
                lls.append(addr)
        if len(lls) > m.EP_MAX_LL:
            raise DatapathError(f"endpoint {endpoint_id}", "too many IPv6 link-local addresses")
        for i, addr in enumerate(lls):
            ct.memmove(ct.addressof(info.ll[i]), addr.packed, 16)
        info.n_ll = len(lls)
        for ip in ips:
            addr = ipaddress.ip_address(ip)
            if addr.version == 4:
                if info.n_ip4 >= m.EP_MAX_IP4:
                    raise DatapathError(f"endpoint {endpoint_id}", "too many IPv4 addresses")
                ct.memmove(ct.addressof(info.ip4) + 4 * info.n_ip4, addr.packed, 4)
                info.n_ip4 += 1
            else:
                if info.n_ip6 >= m.EP_MAX_IP6:
                    raise DatapathError(f"endpoint {endpoint_id}", "too many IPv6 addresses")
                ct.memmove(ct.addressof(info.ip6[info.n_ip6]), addr.packed, 16)
                info.n_ip6 += 1
        self._update("endpoints", ct.c_uint32(ifindex), info)

    def del_endpoint(self, ifindex: int) -> bool:
        return self._delete("endpoints", ct.c_uint32(ifindex))

    def get_endpoint(self, ifindex: int) -> m.EndpointInfo | None:
        for k, v in self._items("endpoints", ct.c_uint32, m.EndpointInfo):
            if k.value == ifindex:
                return v
        return None

    @staticmethod
    def _ipcache_key(prefix: str):
        net = ipaddress.ip_network(prefix, strict=False)
        k: m.Ipcache4Key | m.Ipcache6Key
        if net.version == 4:
            k = m.Ipcache4Key(prefixlen=net.prefixlen)
            name = "ipcache4"
        else:
            k = m.Ipcache6Key(prefixlen=net.prefixlen)
            name = "ipcache6"
        ct.memmove(k.addr, net.network_address.packed, len(net.network_address.packed))
        return name, k

    def set_ipcache(self, prefix: str, identity: int) -> None:
        """Map an address or CIDR to an identity (longest prefix wins)."""
        name, k = self._ipcache_key(prefix)
        self._update(name, k, m.IpcacheValue(identity=identity))

    def del_ipcache(self, prefix: str) -> bool:
        name, k = self._ipcache_key(prefix)
        return self._delete(name, k)

    def ipcache_entries(self) -> dict[str, int]:
        """Every ipcache prefix (``10.0.0.1/32``) and its identity, both families."""
        out = {}
        for name, key_type in (("ipcache4", m.Ipcache4Key), ("ipcache6", m.Ipcache6Key)):
            for k, v in self._items(name, key_type, m.IpcacheValue):
                addr = ipaddress.ip_address(bytes(k.addr))
                out[str(ipaddress.ip_network(f"{addr}/{k.prefixlen}", strict=False))] = v.identity
        return out

    def set_config(self, audit: bool = False, forward_unidentified: bool = False) -> None:
        """The agent's settings; the L7 bits stay as they are (datapath.l7maps owns
        them: they follow the l7_ports entries)."""
        flags = (m.CFG_F_AUDIT if audit else 0) | (
            m.CFG_F_FORWARD_UNIDENTIFIED if forward_unidentified else 0)
        self._write_config(flags | (self.config_flags() & m.CFG_L7_BITS))

    def config_flags(self) -> int:
        v = m.ConfigValue()
        if _lib().bpf_lookup_elem(self.table("config").map_fd, ct.byref(ct.c_uint32(0)),
                                  ct.byref(v)) < 0:
            err = ct.get_errno()
            raise DatapathError("config", f"lookup failed: {errno.errorcode.get(err, err)}")
        return int(v.flags)

    def _write_config(self, flags: int) -> None:
        self._update("config", ct.c_uint32(0), m.ConfigValue(flags=flags))

    # -- policy ----------------------------------------------------------------
    # -- which policies made an entry: a number in the value, events carry it ---------
    def _policy_ids(self) -> "PolicyIds":
        if getattr(self, "_ids", None) is None:
            self._ids = PolicyIds()
        return self._ids

    def policy_id(self, entry: Entry) -> int:
        return self._policy_ids().number(entry)

    def policy_names(self, exact: int, any_peer: int, deny: bool) -> tuple[str, ...]:
        """The policies behind a decision, from the two policy_ids a flow event carries
        (the exact-peer and the any-peer entry that matched): those of the entries that
        agree with the decision, as they were when the event happened."""
        ids = self._policy_ids()
        names: set[str] = set()
        for number in (exact, any_peer):
            entry = ids.entry(number)
            if entry is not None and entry.deny == deny:
                names |= entry.policies
        return tuple(sorted(names))

    def _read_policy(self) -> tuple[MapState, FlagState, dict[tuple[int, int], int], list]:
        """What the policy maps hold: (entries in force, flags, {pair: generation of its
        flags entry}, raw keys of entries of a generation not in force). An entry whose
        policy_id this writer did not give (a previous agent's) reads with no policy
        names, so it is written again."""
        ids = self._policy_ids()
        flags: FlagState = {}
        gens: dict[tuple[int, int], int] = {}
        for k, v in self._items("policy_flags", m.PolicyFlagsKey, m.PolicyFlagsValue):
            pair = (k.identity, k.direction)
            gens[pair] = 1 if v.gen else 0
            flag = DirectionPolicy(bool(v.enforced), bool(v.default_deny))
            if flag != DirectionPolicy():
                flags[pair] = flag
        out: MapState = {}
        stale = []
        for k, v in self._items("policy", m.PolicyKey, m.PolicyValue):
            key = _key_from_c(k)
            if _gen_of(k) != gens.get(_pair(key), 0):
                stale.append(k)
                continue
            entry = ids.entry(v.policy_id)
            out[key] = entry if entry is not None and entry.deny == bool(v.deny) \
                else Entry(deny=bool(v.deny))
        return out, flags, gens, stale

    def policy_entries(self) -> MapState:
        """The policy entries in force (each pair's generation)."""
        return self._read_policy()[0]

    def policy_flags(self) -> FlagState:
        return self._read_policy()[1]

    def _shadow(self) -> tuple[MapState, FlagState]:
        """What this writer knows the policy maps hold: read once, then kept up to date
        by apply_delta, so a small delta costs no walk over a large map. Entries of a
        generation not in force are deleted then (nothing reads them)."""
        if getattr(self, "_policy_shadow", None) is None:
            entries, flags, gens, stale = self._read_policy()
            # a switch cut short: programs may still read what it left (a transaction's
            # switched pairs keep their other generation until it ends)
            if stale and self._journal() is None:
                self._wait_for_programs()
                self._delete_policy_keys(stale)
            self._policy_shadow, self._flags_shadow, self._gens = entries, flags, gens
            self._pairs: dict[tuple[int, int], set[Key]] = {}
            for k in entries:
                self._pairs.setdefault(_pair(k), set()).add(k)
        return self._policy_shadow, self._flags_shadow

    def _drop_shadow(self) -> None:
        self.__dict__.pop("_policy_shadow", None)
        self.__dict__.pop("_flags_shadow", None)
        self.__dict__.pop("_gens", None)
        self.__dict__.pop("_pairs", None)

    def _gen(self, pair: tuple[int, int]) -> int:
        return self._gens.get(pair, 0)

    # -- transactions: a switched pair's old generation is kept until commit ---------
    def _journal(self) -> list | None:
        return getattr(self, "_policy_journal", None)

    def policy_hold(self) -> None:
        """Begin a transaction: from now on a switch keeps the old generation, and every
        policy write is journaled for ``policy_undo``, until ``policy_commit`` or
        ``policy_release``."""
        self._shadow()   # read (and stale entries cleared) before anything is kept
        self._policy_journal: list | None = []

    def policy_mark(self) -> int:
        """Where the journal is now: ``policy_undo(mark)`` undoes what came after."""
        return len(self._journal() or ())

    def policy_undo(self, mark: int = 0) -> None:
        """Undo, last first, the policy writes journaled after ``mark``: switched pairs
        go back to the old generation (kept intact) in one flags update each, ordered
        writes by their inverse delta."""
        journal = self._journal()
        if journal is None:
            return
        while len(journal) > mark:
            rec = journal[-1]
            if isinstance(rec, _Switched):
                self._unswitch(rec)
            else:
                self._policy_undoing = True   # the inverse is written, not journaled
                try:
                    self.apply_delta(rec, checked=True)
                finally:
                    self._policy_undoing = False
            journal.pop()

    def _unswitch(self, rec: _Switched) -> None:
        entries, flags = self._shadow()
        if rec.flipped:
            self._write_flag(rec.pair, rec.old_flag, rec.old_gen)
            rec.flipped = False
            self._wait_for_programs()   # a program may have read the new generation's flags
        self._delete_policy_keys(rec.new_raw)
        for k in self._pairs.pop(rec.pair, set()):
            entries.pop(k, None)
        entries.update(rec.old_entries)
        self._pairs[rec.pair] = set(rec.old_entries)
        if rec.old_flag == DirectionPolicy():
            flags.pop(rec.pair, None)
        else:
            flags[rec.pair] = rec.old_flag
        self._gens[rec.pair] = rec.old_gen
        if rec.old_gen == 0 and rec.old_flag == DirectionPolicy():
            self._gens.pop(rec.pair, None)

    def policy_commit(self) -> None:
        """End the transaction, kept: the switched pairs' old generations go, once every
        program that may have read an old flags entry has finished."""
        journal = self._journal()
        self._policy_journal = None
        old = [k for rec in journal or () if isinstance(rec, _Switched) for k in rec.old_raw]
        if old:
            try:
                self._wait_for_programs()
                self._delete_policy_keys(old)
            except BaseException:
                self._drop_shadow()   # what is left is stale: deleted at the next read
                raise

    def policy_release(self) -> None:
        """End the transaction without undoing (the caller rewrites the maps from its
        model): whatever generation is not in force is stale, deleted at the next read."""
        if self._journal() is not None:
            self._policy_journal = None
            self._drop_shadow()

    def _switching(self, delta: Delta) -> set[tuple[int, int]]:
        """The pairs ``delta`` changes by at least ``switch_min`` entries: written by a
        generation switch. An entry that keeps its verdict (only the policies behind it
        change: a restarted agent's first write) is no change here: it is rewritten in
        place, one atomic update that decides every packet as before."""
        current = self._shadow()[0]
        count: dict[tuple[int, int], int] = {}
        for k, e in delta.adds.items():
            before = current.get(k)
            if before is None or before.deny != e.deny:
                count[_pair(k)] = count.get(_pair(k), 0) + 1
        for k in delta.removes:
            count[_pair(k)] = count.get(_pair(k), 0) + 1
        limit = max(1, self.switch_min)
        held = {rec.pair for rec in self._journal() or () if isinstance(rec, _Switched)}
        return {p for p, n in count.items() if n >= limit and p not in held}

    def _by_pair(self, pairs: set[tuple[int, int]]) -> dict[tuple[int, int], list[Key]]:
        """The shadow's keys of each of ``pairs`` (an index kept with the shadow)."""
        self._shadow()
        return {p: sorted(self._pairs.get(p, ())) for p in pairs}

    def check_capacity(self, delta: Delta) -> None:
        """Raise CapacityError when ``delta`` cannot be written without overflowing."""
        current, current_flags = self._shadow()
        switch = self._switching(delta)
        peak = len(current) + sum(1 for k in delta.adds if k not in current and _pair(k) not in switch)
        if switch:   # both generations of a switched pair are in the map at once
            old = self._by_pair(switch)
            gone = delta.removes - delta.adds.keys()
            added = collections.Counter(_pair(k) for k in delta.adds)
            for pair, keys in old.items():
                kept = sum(1 for k in keys if k not in gone and k not in delta.adds)
                peak += kept + added[pair]
        limit = self.max_entries("policy")
        if peak > limit:
            raise CapacityError("policy", f"{peak} entries needed during the update, map holds {limit}")
        flags = set(current_flags) | set(self._gens)
        new_flags = ({k for k, v in delta.flags.items() if v != DirectionPolicy()} | switch) - flags
        limit = self.max_entries("policy_flags")
        if len(flags) + len(new_flags) > limit:
            raise CapacityError("policy_flags",
                                f"{len(flags) + len(new_flags)} entries needed, map holds {limit}")

    def _write_flag(self, pair: tuple[int, int], flag: DirectionPolicy, gen: int | None = None) -> None:
        """Write a pair's flags entry: its flags and the generation in force (``gen``,
        default: the pair's own). No entry means not enforced, generation 0."""
        gen = self._gen(pair) if gen is None else gen
        k = m.PolicyFlagsKey(identity=pair[0], direction=pair[1])
        if flag == DirectionPolicy() and gen == 0:
            self._delete("policy_flags", k)
            self._gens.pop(pair, None)
        else:
            self._update("policy_flags", k, m.PolicyFlagsValue(
                enforced=int(flag.enforced), default_deny=int(flag.default_deny), gen=gen))
            self._gens[pair] = gen

    def apply_delta(self, delta: Delta, *, checked: bool = False) -> None:
        """Write ``delta``: pairs it changes by ``switch_min`` entries or more by a
        generation switch, the others in the order described in the module docstring.
        ``checked``: the caller has already run ``check_capacity`` on it (or on a delta
        it is part of)."""
        if not checked:
            self.check_capacity(delta)
        old_entries, old_flags = self._shadow()
        switch = self._switching(delta)
        small = delta
        if switch:
            small = Delta(adds={k: e for k, e in delta.adds.items() if _pair(k) not in switch},
                          removes={k for k in delta.removes if _pair(k) not in switch},
                          flags={p: f for p, f in delta.flags.items() if p not in switch})
        loosen = {p: f for p, f in small.flags.items()
                  if _rank(f) <= _rank(old_flags.get(p, DirectionPolicy()))}
        tighten = {p: f for p, f in small.flags.items() if p not in loosen}
        deny_adds = [(k, e) for k, e in sorted(small.adds.items()) if e.deny]
        allow_adds = [(k, e) for k, e in sorted(small.adds.items()) if not e.deny]
        removes = sorted(small.removes)
        allow_removes = [k for k in removes if k in old_entries and not old_entries[k].deny]
        deny_removes = [k for k in removes if not (k in old_entries and not old_entries[k].deny)]

        journal = None if getattr(self, "_policy_undoing", False) else self._journal()
        try:
            if journal is not None and small:   # before the write: a half-done one too
                journal.append(_undo_of(small, old_entries, old_flags))
            self._write_ordered(deny_adds, loosen, allow_removes, allow_adds, tighten, deny_removes)
            adds: dict[tuple[int, int], dict[Key, Entry]] = {p: {} for p in switch}
            for k, e in delta.adds.items():
                if _pair(k) in adds:
                    adds[_pair(k)][k] = e
            old_gens = [self._switch(pair, keys, adds[pair], delta, old_entries, old_flags)
                        for pair, keys in sorted(self._by_pair(switch).items())]
            if old_gens and journal is None:
                # a program that read a flags entry before its switch may still look up
                # the old generation: delete it once every such program has finished
                self._wait_for_programs()
                self._delete_policy_keys([k for keys in old_gens for k in keys])
        except BaseException:
            self._drop_shadow()  # partly written: read the maps again next time
            raise
        delta.apply(old_entries, old_flags)
        for k in delta.removes:
            self._pairs.get(_pair(k), set()).discard(k)
        for k in delta.adds:
            self._pairs.setdefault(_pair(k), set()).add(k)

    def _switch(self, pair: tuple[int, int], old_keys: list[Key], adds: MapState, delta: Delta,
                entries: MapState, flags: FlagState) -> list:
        """Write ``pair``'s new state into the other generation and switch to it (the
        shadow follows in apply_delta); returns the old generation's raw keys."""
        old_gen = self._gen(pair)
        new_gen = 1 - old_gen
        new = {k: entries[k] for k in old_keys if k not in delta.removes}
        new.update(adds)
        items = sorted(new.items())
        old_raw = [_policy_key(k, old_gen) for k in old_keys]
        journal = None if getattr(self, "_policy_undoing", False) else self._journal()
        rec = None
        if journal is not None:
            rec = _Switched(pair, old_gen, flags.get(pair, DirectionPolicy()),
                            {k: entries[k] for k in old_keys}, old_raw,
                            [_policy_key(k, new_gen) for k, _ in items])
            journal.append(rec)   # before the write: a half-done one is undone too
        self._write_policy([(k, e) for k, e in items if e.deny], 1, new_gen)
        self._write_policy([(k, e) for k, e in items if not e.deny], 0, new_gen)
        if rec is not None:
            rec.flipped = True    # from the update's start: undoing writes the old one back
        self._write_flag(pair, delta.flags.get(pair, flags.get(pair, DirectionPolicy())), new_gen)
        return old_raw

    def _wait_for_programs(self) -> None:
        """Until every program running now has finished (bpfsys.wait_for_programs)."""
        from .bpfsys import wait_for_programs
        try:
            wait_for_programs()
        except OSError:
            time.sleep(0.05)   # no map-in-map here: programs run for microseconds

    BATCH_MIN = 64      # from this many entries, one BPF_MAP_UPDATE_BATCH per step

    def _write_policy(self, items, deny: int, gen: int | None = None) -> None:
        """Write policy entries ``items`` [(Key, Entry)] into generation ``gen`` (default:
        each pair's own): batched when there are many."""
        if len(items) < self.BATCH_MIN:
            for k, e in items:
                self._update("policy", _policy_key(k, self._gen(_pair(k)) if gen is None else gen),
                             m.PolicyValue(deny=deny, policy_id=self.policy_id(e)))
            return
        gens = self._gens
        pack_key, pack_value, number = _KEY_STRUCT.pack, _VALUE_STRUCT.pack, self._policy_ids().number
        keys = b"".join([pack_key(*_policy_key_fields(k, gens.get((k[0], k[2]), 0) if gen is None
                                                      else gen)) for k, _ in items])
        ids: dict[int, int] = {}   # id(entry) -> number: entries are mostly shared objects
        values = b"".join([pack_value(deny, ids.get(id(e)) or ids.setdefault(id(e), number(e)))
                           for _, e in items])
        self._update_raw("policy", keys, values, len(items))

    def _update_raw(self, name: str, keys: bytes, values: bytes, n: int) -> None:
        """Update ``n`` entries from packed keys and values (in order)."""
        from .bpfsys import update_batch
        try:
            update_batch(self.table(name).map_fd, (ct.c_char * len(keys)).from_buffer_copy(keys),
                         (ct.c_char * len(values)).from_buffer_copy(values), n)
        except OSError as exc:
            raise DatapathError(name, f"update failed: {errno.errorcode.get(exc.errno, exc.errno)}"
                                ) from exc

    def _delete_policy_keys(self, keys: list) -> None:
        """Delete raw policy keys (absent ones are no error)."""
        for k in keys:
            self._delete("policy", k)

    def _write_ordered(self, deny_adds, loosen, allow_removes, allow_adds, tighten,
                       deny_removes) -> None:
        self._write_policy(deny_adds, 1)
        for p, f in sorted(loosen.items()):
            self._write_flag(p, f)
        for k in allow_removes:
            self._delete("policy", _policy_key(k, self._gen(_pair(k))))
        self._write_policy(allow_adds, 0)
        for p, f in sorted(tighten.items()):
            self._write_flag(p, f)
        for k in deny_removes:
            self._delete("policy", _policy_key(k, self._gen(_pair(k))))

    # -- counters and conntrack -------------------------------------------------
    def counters(self) -> dict[tuple[int, m.Verdict, m.Reason], tuple[int, int]]:
        """Non-zero counters summed over CPUs: (direction, verdict, reason) -> (packets, bytes)."""
        t = self.table("counters")
        out = {}
        try:
            for d in (m.DIR_INGRESS, m.DIR_EGRESS):
                for v in m.Verdict:
                    for r in m.Reason:
                        per_cpu = t.percpu_get(ct.c_uint32(m.counter_index(d, v, r)), m.CounterValue)
                        pk = sum(c.packets for c in per_cpu)
                        by = sum(c.bytes for c in per_cpu)
                        if pk:
                            out[(d, v, r)] = (pk, by)
        except OSError as exc:
            raise DatapathError("counters", f"cannot read: {exc}") from exc
        return out

    def reset_counters(self) -> None:
        t = self.table("counters")
        try:
            for i in range(m.NUM_COUNTERS):
                t.percpu_zero(ct.c_uint32(i), m.CounterValue)
        except OSError as exc:
            raise DatapathError("counters", f"cannot reset: {exc}") from exc

    def flush(self, names: Iterable[str] = ("endpoints", "ipcache4", "ipcache6", "policy",
                                            "policy_flags", "conntrack")) -> None:
        """Delete every entry of the given hash/LPM maps, reset config and counters."""
        types = {"endpoints": (ct.c_uint32, m.EndpointInfo),
                 "ipcache4": (m.Ipcache4Key, m.IpcacheValue),
                 "ipcache6": (m.Ipcache6Key, m.IpcacheValue),
                 "policy": (m.PolicyKey, m.PolicyValue),
                 "policy_flags": (m.PolicyFlagsKey, m.PolicyFlagsValue)}
        self._drop_shadow()
        for name in names:
            if name == "conntrack":
                self.ct_flush()  # charged to the hooks' budgets
                continue
            for k, _v in self._items(name, *types[name]):
                self._delete(name, k)
        self.set_config()
        self.reset_counters()
