"""Pinned maps: their layout versions, pin file names, and raw access by fd.

Every pinned map has a layout version (see "Layout versions" in
bpf/include/stockade_maps.h). Version 1 is pinned under the map's name, version
N > 1 as "<name>_vN", so a build never opens a pin whose layout it does not know:
an older build's pins are migrated (stockade.datapath.migrate), a newer build's pins
make the loader refuse to start.
"""
from __future__ import annotations

import ctypes as ct
import errno
import re
from typing import Iterator

from .errors import DatapathError

# Raise a map's version whenever its key or value layout or meaning changes, and
# teach stockade.datapath.migrate how to convert the previous one.
LAYOUT_VERSIONS = {"endpoints": 2, "ipcache4": 1, "ipcache6": 1, "policy": 2,
                   "policy_flags": 2, "conntrack": 2, "ct_created": 1, "ct_released": 1,
                   "frag": 1, "counters": 2, "config": 1, "l7_ports": 1, "l7_host": 1}
PINNED_MAPS = tuple(LAYOUT_VERSIONS)
_VERSIONED = re.compile(r"^(?P<name>[a-z0-9_]+?)(?:_v(?P<v>\d+))?$")


def pin_name(name: str, version: int | None = None) -> str:
    """The file name of map ``name``'s pin at layout ``version`` (default: current)."""
    v = LAYOUT_VERSIONS[name] if version is None else version
    return name if v == 1 else f"{name}_v{v}"


def parse_pin_name(filename: str) -> tuple[str, int] | None:
    """(map name, layout version) of a pin file name, None when it is not one of ours."""
    m = _VERSIONED.match(filename)
    if not m:
        return None
    name, v = m.group("name"), int(m.group("v") or 1)
    if name not in LAYOUT_VERSIONS:
        return None
    return name, v


def _lib():
    from .bpfsys import lib
    return lib


def obj_get(path: str) -> int:
    """An fd of the pinned object at ``path`` (BPF_OBJ_GET)."""
    fd = _lib().bpf_obj_get(path.encode())
    if fd < 0:
        err = ct.get_errno()
        raise DatapathError(path, f"cannot open pin: {errno.errorcode.get(err, err)}")
    return fd


class BpfMapInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16),
                ("rest", ct.c_uint8 * 64)]


def fd_map_info(fd: int, what: str) -> BpfMapInfo:
    """The kernel's view of the map behind ``fd`` (type, sizes, max_entries)."""
    info = BpfMapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    if _lib().bpf_obj_get_info(fd, ct.byref(info), ct.byref(size)) != 0:
        raise DatapathError(what, f"cannot read map info (errno {ct.get_errno()})")
    return info


def fd_keys(fd: int, key_type) -> list:
    """Every key of the map behind ``fd``."""
    lib = _lib()
    out, prev = [], None
    nxt = key_type()
    while lib.bpf_get_next_key(fd, prev, ct.byref(nxt)) == 0:
        key = key_type.from_buffer_copy(nxt)
        out.append(key)
        prev = ct.byref(key)
    return out


KEY_CHUNK = 4096
ENOTSUPP = 524   # the kernel's own, which errno does not name


def fd_key_chunks(fd: int, key_type, value_type, what: str = "map") -> Iterator[bytes]:
    """Every key of the hash map behind ``fd``, as the raw bytes of up to KEY_CHUNK keys
    at a time (``key_type``'s layout, back to back): BPF_MAP_LOOKUP_BATCH, a few system
    calls for the whole map where ``fd_keys`` makes one per key (kernels or map types
    without batch operations get ``fd_keys``)."""
    from .bpfsys import lookup_batch
    size = ct.sizeof(key_type)
    keys = (key_type * KEY_CHUNK)()
    values = (value_type * KEY_CHUNK)()
    token = ct.create_string_buffer(max(size, 8))   # the kernel reads it, then writes it
    token_in = None
    while True:
        try:
            n, done = lookup_batch(fd, keys, values, KEY_CHUNK, token_in, token)
        except OSError as exc:
            if token_in is None and exc.errno in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP):
                yield b"".join(bytes(k) for k in fd_keys(fd, key_type))
                return
            raise DatapathError(what, f"cannot list keys: {exc.strerror}") from None
        if n:
            yield ct.string_at(keys, n * size)
        if done:
            return
        token_in = token


def fd_items(fd: int, key_type, value_type) -> list:
    """Every (key, value) of the map behind ``fd`` (entries deleted meanwhile are skipped)."""
    lib = _lib()
    out = []
    for key in fd_keys(fd, key_type):
        val = value_type()
        if lib.bpf_lookup_elem(fd, ct.byref(key), ct.byref(val)) == 0:
            out.append((key, val))
    return out


BPF_ANY, BPF_NOEXIST = 0, 1


def fd_update(fd: int, key, value, flags: int = BPF_ANY) -> int:
    """bpf_map_update_elem; returns 0 or the errno."""
    if _lib().bpf_update_elem(fd, ct.byref(key), ct.byref(value), flags) < 0:
        return ct.get_errno() or errno.EIO
    return 0
