"""Carry pinned maps of an older layout version over into this build's maps.

An agent restarting on a newer build finds the previous build's pins, and the
previous build's programs still attached: they keep forwarding (with the old maps)
until this build's programs replace them, interface by interface. So:

1. ``Datapath.__init__`` (after compiling, which created the new maps) calls
   ``migrate_legacy_pins``: for every map whose layout changed, the old pin's entries
   are converted and copied into the new map, and the old pin is unlinked (no later
   build sees it again). The old conntrack map is kept open.
2. Once every interface runs the new programs, ``Datapath.finish_upgrade`` calls
   ``finish_legacy``: the conntrack entries the old programs made in between (flows
   opened during the restart) are copied too, then the old map is closed.

Established flows never miss their entry: the new programs only run after step 1.
Conversions (pins.LAYOUT_VERSIONS history):

* endpoints v1 -> v2: the same fields; host_ifindex and the MAC-derived link-local
  address filled in as ``set_endpoint`` would (the agent rewrites endpoints anyway).
* conntrack v1 -> v2: ICMP entries become echo requests (v1 kept the echo
  identifier in both ports and no type; every tracked ICMP flow of v1 was an echo,
  or a one-off error that v2 does not track); expired entries are left behind.
  Each copied entry is charged to its owner's budget (ct_released goes down by one:
  the agent is that map's only writer, see struct ct_owner); owner_peer (v1 had
  padding there) is the peer's identity for flows opened toward the endpoint.
* counters v1 -> v2: the same (direction, verdict, reason) cells, at v2's indexes
  (v2 added reasons at the end).
* policy v1 -> v2, policy_flags v1 -> v2: the same entries, all of generation 0
  (v1 keys are v2 keys of generation 0; v1 flags had padding, 0, where v2 has gen).
"""
from __future__ import annotations

import collections
import ctypes as ct
import errno
import os
import time
from pathlib import Path

from . import maps as m
from .errors import DatapathError
from .pins import BPF_NOEXIST, LAYOUT_VERSIONS, fd_items, fd_map_info, fd_update, obj_get, parse_pin_name, pin_name

NUM_REASONS_V1 = 11
NUM_COUNTERS_V1 = 2 * m.NUM_VERDICTS * NUM_REASONS_V1
ECHO_REQUEST = {4: 8, 6: 128}


def check_no_newer_pins(pin_dir: Path) -> None:
    """Refuse pins of a newer layout than this build knows (a downgrade): running on
    them would misread every entry."""
    try:
        names = os.listdir(pin_dir)
    except OSError:
        return
    for fn in names:
        parsed = parse_pin_name(fn)
        if parsed and parsed[1] > LAYOUT_VERSIONS[parsed[0]]:
            raise DatapathError(str(pin_dir / fn),
                                f"pinned by a newer build (layout v{parsed[1]}; this build "
                                f"knows v{LAYOUT_VERSIONS[parsed[0]]}): upgrade the agent or "
                                "remove the pins")


def _open_legacy(pin_dir: Path, name: str, version: int, key_size: int, value_size: int):
    path = pin_dir / pin_name(name, version)
    if not path.exists():
        return None
    fd = obj_get(str(path))
    info = fd_map_info(fd, str(path))
    if (info.key_size, info.value_size) != (key_size, value_size):
        os.close(fd)
        raise DatapathError(str(path), f"layout v{version} pin has key/value sizes "
                                       f"{(info.key_size, info.value_size)}, expected "
                                       f"{(key_size, value_size)}: remove the pins")
    return fd


def migrate_legacy_pins(dp) -> dict[str, int]:
    """Step 1 (module docstring). Returns {map name: fd of the old map still open}."""
    keep: dict[str, int] = {}
    pin_dir = dp.pin_dir
    fd = _open_legacy(pin_dir, "endpoints", 1, 4, ct.sizeof(m.EndpointInfoV1))
    if fd is not None:
        try:
            _copy_endpoints(dp, fd)
        finally:
            os.close(fd)
        os.unlink(pin_dir / pin_name("endpoints", 1))
    fd = _open_legacy(pin_dir, "counters", 1, 4, ct.sizeof(m.CounterValue))
    if fd is not None:
        try:
            _copy_counters(dp, fd)
        finally:
            os.close(fd)
        os.unlink(pin_dir / pin_name("counters", 1))
    for name, key_type, value_type in (("policy", m.PolicyKey, m.PolicyValue),
                                       ("policy_flags", m.PolicyFlagsKey, m.PolicyFlagsValue)):
        fd = _open_legacy(pin_dir, name, 1, ct.sizeof(key_type), ct.sizeof(value_type))
        if fd is not None:
            try:
                _copy_same(dp, name, fd, key_type, value_type)
            finally:
                os.close(fd)
            os.unlink(pin_dir / pin_name(name, 1))
    fd = _open_legacy(pin_dir, "conntrack", 1, ct.sizeof(m.CtKeyV1), ct.sizeof(m.CtValue))
    if fd is not None:
        try:
            _copy_conntrack(dp, fd)
        except BaseException:
            os.close(fd)
            raise
        os.unlink(pin_dir / pin_name("conntrack", 1))
        keep["conntrack"] = fd
    return keep


def finish_legacy(dp, legacy: dict[str, int]) -> dict[str, int]:
    """Step 2 (module docstring): copy once more, then close the old maps."""
    done = {}
    for name, fd in legacy.items():
        try:
            if name == "conntrack":
                done[name] = _copy_conntrack(dp, fd)
        finally:
            os.close(fd)
    return done


def _copy_endpoints(dp, fd: int) -> int:
    from .writer import delivery_ifindex, eui64_link_local
    n = 0
    for key, old in fd_items(fd, ct.c_uint32, m.EndpointInfoV1):
        new = m.EndpointInfo()
        ct.memmove(ct.addressof(new), ct.addressof(old), ct.sizeof(old))
        new.host_ifindex = delivery_ifindex(key.value)
        ll = eui64_link_local(bytes(old.mac))
        if ll is not None:
            ct.memmove(ct.addressof(new.ll[0]), ll.packed, 16)
            new.n_ll = 1
        if fd_update(dp.table("endpoints").map_fd, key, new, BPF_NOEXIST) == 0:
            n += 1
    return n


def _copy_same(dp, name: str, fd: int, key_type, value_type) -> int:
    """Copy every entry as it is (policy v1 -> v2: generation 0 is v1's layout); an
    entry the new map already has (a start that stopped half-way) is left alone."""
    new_fd = dp.table(name).map_fd
    n = 0
    for key, val in fd_items(fd, key_type, value_type):
        err = fd_update(new_fd, key, val, BPF_NOEXIST)
        if err == 0:
            n += 1
        elif err != errno.EEXIST:
            raise DatapathError(name, f"cannot migrate an entry: {errno.errorcode.get(err, err)}")
    return n


def _copy_counters(dp, fd: int) -> None:
    from .bpfsys import lib, possible_cpus
    ncpu = possible_cpus()
    old_t = m.CounterValue * ncpu
    new_fd = dp.table("counters").map_fd
    for idx in range(NUM_COUNTERS_V1):
        old = old_t()
        if lib.bpf_lookup_elem(fd, ct.byref(ct.c_uint32(idx)), ct.byref(old)) != 0:
            continue
        if not any(c.packets for c in old):
            continue
        rest, reason = divmod(idx, NUM_REASONS_V1)
        direction, verdict = divmod(rest, m.NUM_VERDICTS)
        new_idx = ct.c_uint32(m.counter_index(direction, verdict, reason))
        cur = old_t()
        lib.bpf_lookup_elem(new_fd, ct.byref(new_idx), ct.byref(cur))
        for a, b in zip(cur, old, strict=False):
            a.packets += b.packets
            a.bytes += b.bytes
        if lib.bpf_update_elem(new_fd, ct.byref(new_idx), ct.byref(cur), 0) != 0:
            raise DatapathError("counters", f"cannot migrate counter {idx} "
                                            f"(errno {ct.get_errno()})")


def convert_ct_key_v1(old: m.CtKeyV1) -> m.CtKey:
    new = m.CtKey(ifindex=old.ifindex, proto=old.proto, direction=old.direction,
                  family=old.family)
    ct.memmove(new.saddr, old.saddr, 16)
    ct.memmove(new.daddr, old.daddr, 16)
    icmp = (old.family, old.proto) in ((4, m.IPPROTO_ICMP), (6, m.IPPROTO_ICMPV6))
    if icmp:
        new.sport = old.sport
        new.icmp_type = ECHO_REQUEST[old.family]
    else:
        new.sport, new.dport = old.sport, old.dport
    return new


def _copy_conntrack(dp, fd: int) -> int:
    """Copy live v1 entries absent from the new map; charge them to their hooks."""
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    new_fd = dp.table("conntrack").map_fd
    charged: collections.Counter = collections.Counter()
    for key, val in fd_items(fd, m.CtKeyV1, m.CtValue):
        if val.expires < now:
            continue
        new = convert_ct_key_v1(key)
        if new.direction == m.DIR_INGRESS:   # charged to the peer that opened it
            val.owner_peer = dp._identity_of(new.family, bytes(new.saddr))
        if fd_update(new_fd, new, val, BPF_NOEXIST) == 0:
            charged[(new.ifindex, new.direction, val.owner_peer)] += 1
    dp.ct_charge({owner: -n for owner, n in charged.items()})   # added, not released
    return sum(charged.values())
