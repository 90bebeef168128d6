"""Read an agent's pinned maps from outside it, byte for byte (for tests that prove the
maps did not change, or changed back): BPF_OBJ_GET on the pin, then every key.

    before = dump_maps(agent.settings["bpffs_dir"])
    ...
    assert dump_maps(agent.settings["bpffs_dir"]) == before
"""
from __future__ import annotations

import ctypes as ct
import os

# The maps the agent writes (conntrack, counters and events change with traffic).
WRITTEN = ("endpoints", "ipcache", "policy", "config")
# BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH
PERCPU_TYPES = (5, 6, 10)


class _MapInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16), ("rest", ct.c_uint8 * 64)]


def _lib():
    from bcc.libbcc import lib
    lib.bpf_obj_get.restype = ct.c_int
    lib.bpf_obj_get.argtypes = [ct.c_char_p]
    lib.bpf_obj_get_info.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    return lib


def possible_cpus() -> int:
    """The kernel's possible CPUs (/sys/devices/system/cpu/possible, e.g. "0-1")."""
    with open("/sys/devices/system/cpu/possible") as f:
        return sum(int(b) - int(a) + 1 if b else 1 for a, _, b in
                   (r.partition("-") for r in f.read().strip().split(",")))


def _value_bytes(info: _MapInfo) -> int:
    """A lookup's value size: a per-CPU map gives one 8-byte aligned slot per possible CPU."""
    if info.type in PERCPU_TYPES:
        return (info.value_size + 7) // 8 * 8 * possible_cpus()
    return info.value_size


def per_cpu(value: bytes, value_size: int) -> list[bytes]:
    """A per-CPU map's value (as dump_map gives it), one slot per CPU."""
    step = (value_size + 7) // 8 * 8
    return [value[i:i + value_size] for i in range(0, len(value), step)]


def dump_map(path: str) -> dict[bytes, bytes]:
    lib = _lib()
    fd = lib.bpf_obj_get(path.encode())
    if fd < 0:
        raise OSError(ct.get_errno(), f"bpf_obj_get {path}")
    try:
        info, size = _MapInfo(), ct.c_uint32(ct.sizeof(_MapInfo))
        if lib.bpf_obj_get_info(fd, ct.byref(info), ct.byref(size)) != 0:
            raise OSError(ct.get_errno(), f"bpf_obj_get_info {path}")
        key, nxt = ct.create_string_buffer(info.key_size), ct.create_string_buffer(info.key_size)
        size = _value_bytes(info)
        value = ct.create_string_buffer(max(size, 1))
        out, prev = {}, None
        while lib.bpf_get_next_key(fd, prev, nxt) == 0:
            ct.memmove(key, nxt, info.key_size)
            if lib.bpf_lookup_elem(fd, key, value) == 0:
                out[key.raw] = value.raw[:size]
            prev = key
        return out
    finally:
        os.close(fd)


def dump_maps(pin_dir: str, names=WRITTEN) -> dict[str, dict[bytes, bytes]]:
    """Every pinned map in ``pin_dir`` whose name starts with one of ``names``."""
    return {n: dump_map(os.path.join(pin_dir, n)) for n in sorted(os.listdir(pin_dir))
            if n.startswith(tuple(names))}
