"""The bpf() system call through ctypes: map access, pins, object info, batches and the
ring buffer, without bcc.

The agent never imports bcc: bcc maps LLVM and clang into the process (about 60 MB of
resident memory before it compiles anything). Only the short-lived compiler process
(stockade.datapath.build) does. ``lib`` has the names and conventions of the libbpf
calls the package used through bcc (0 or a fd on success, -1 with errno set, read with
``ctypes.get_errno()``).
"""
from __future__ import annotations

import ctypes as ct
import errno
import mmap
import os
import select
import struct
from typing import Callable

SYS_BPF = 321                # x86_64
(BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY) = 1, 2, 3, 4
BPF_OBJ_PIN, BPF_OBJ_GET = 6, 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH, BPF_MAP_DELETE_BATCH = 24, 26, 27
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH = 6, 5, 10

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long
_libc.syscall.argtypes = [ct.c_long, ct.c_int, ct.c_void_p, ct.c_uint]


def _addr(p) -> int:
    """The address behind a ctypes object, a ``byref()``, a pointer, or None (0)."""
    if p is None:
        return 0
    if isinstance(p, int):
        return p
    return ct.cast(p, ct.c_void_p).value or 0


class _ElemAttr(ct.Structure):
    _fields_ = [("map_fd", ct.c_uint32), ("pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class _ObjAttr(ct.Structure):
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32)]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _BatchAttr(ct.Structure):
    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


def sys_bpf(cmd: int, attr) -> int:
    return _libc.syscall(SYS_BPF, cmd, ct.byref(attr), ct.sizeof(attr))


class _MapCreateAttr(ct.Structure):
    _fields_ = [("map_type", ct.c_uint32), ("key_size", ct.c_uint32), ("value_size", ct.c_uint32),
                ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("inner_map_fd", ct.c_uint32), ("numa_node", ct.c_uint32),
                ("map_name", ct.c_char * 16)]


class _ProgLoadAttr(ct.Structure):
    _fields_ = [("prog_type", ct.c_uint32), ("insn_cnt", ct.c_uint32), ("insns", ct.c_uint64),
                ("license", ct.c_uint64), ("log_level", ct.c_uint32), ("log_size", ct.c_uint32),
                ("log_buf", ct.c_uint64), ("kern_version", ct.c_uint32),
                ("prog_flags", ct.c_uint32), ("prog_name", ct.c_char * 16)]


BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "") -> int:
    """A new map's fd; OSError with the kernel's errno."""
    attr = _MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size,
                          max_entries=max_entries, map_flags=flags,
                          map_name=name.encode()[:15])
    fd = sys_bpf(BPF_MAP_CREATE, attr)
    if fd < 0:
        err = ct.get_errno() or errno.EIO
        raise OSError(err, f"cannot create map {name}: {os.strerror(err)}")
    return fd


def prog_load(insns: bytes, name: str, prog_type: int = BPF_PROG_TYPE_SCHED_CLS,
              license: str = "GPL") -> int:
    """Load (and verify) a program; OSError with the verifier's last lines."""
    code = ct.create_string_buffer(insns, len(insns))
    lic = ct.create_string_buffer(license.encode())
    log_buf = ct.create_string_buffer(1 << 16)
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8,
                         insns=ct.addressof(code), license=ct.addressof(lic),
                         prog_name=name.encode()[:15])
    fd = sys_bpf(BPF_PROG_LOAD, attr)
    if fd < 0:
        err = ct.get_errno() or errno.EIO
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log_buf), ct.addressof(log_buf)
        sys_bpf(BPF_PROG_LOAD, attr)
        tail = log_buf.value.decode(errors="replace").strip().splitlines()[-5:]
        raise OSError(err, f"cannot load program {name}: {os.strerror(err)}"
                      + (": " + " / ".join(tail) if tail else ""))
    return fd


BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_ARRAY_OF_MAPS = 2, 12
_grace_fds: tuple[int, int] | None = None


def _map_create(map_type: int, inner_fd: int = 0) -> int:
    attr = _MapCreateAttr(map_type=map_type, key_size=4, value_size=4, max_entries=1,
                          inner_map_fd=inner_fd)
    fd = sys_bpf(BPF_MAP_CREATE, attr)
    if fd < 0:
        err = ct.get_errno() or errno.EIO
        raise OSError(err, f"cannot create a map: {os.strerror(err)}")
    return fd


def wait_for_programs() -> None:
    """Return once every BPF program that was running when called has finished (an RCU
    grace period). The kernel waits for one on each update of a map-in-map
    (maybe_wait_bpf_programs in kernel/bpf/syscall.c), so this updates a private
    one-slot array of maps, made on first use and kept for the process's life."""
    global _grace_fds
    if _grace_fds is None:
        inner = _map_create(BPF_MAP_TYPE_ARRAY)
        try:
            outer = _map_create(BPF_MAP_TYPE_ARRAY_OF_MAPS, inner)
        except OSError:
            os.close(inner)
            raise
        _grace_fds = (inner, outer)
    inner, outer = _grace_fds
    key, value = ct.c_uint32(0), ct.c_uint32(inner)
    if lib.bpf_update_elem(outer, ct.byref(key), ct.byref(value), BPF_ANY) < 0:
        err = ct.get_errno() or errno.EIO
        raise OSError(err, f"map-in-map update: {os.strerror(err)}")


class _Lib:
    """libbpf-style wrappers (the subset the datapath package uses)."""

    @staticmethod
    def bpf_lookup_elem(fd: int, key, value) -> int:
        return sys_bpf(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=fd, key=_addr(key), value=_addr(value)))

    @staticmethod
    def bpf_update_elem(fd: int, key, value, flags: int = BPF_ANY) -> int:
        return sys_bpf(BPF_MAP_UPDATE_ELEM, _ElemAttr(map_fd=fd, key=_addr(key), value=_addr(value),
                                                      flags=flags))

    @staticmethod
    def bpf_delete_elem(fd: int, key) -> int:
        return sys_bpf(BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=fd, key=_addr(key)))

    @staticmethod
    def bpf_get_next_key(fd: int, key, next_key) -> int:
        return sys_bpf(BPF_MAP_GET_NEXT_KEY, _ElemAttr(map_fd=fd, key=_addr(key),
                                                       value=_addr(next_key)))

    @staticmethod
    def bpf_obj_get(path: bytes) -> int:
        buf = ct.create_string_buffer(path)
        return sys_bpf(BPF_OBJ_GET, _ObjAttr(pathname=ct.addressof(buf)))

    @staticmethod
    def bpf_obj_pin(fd: int, path: bytes) -> int:
        buf = ct.create_string_buffer(path)
        return sys_bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ct.addressof(buf), bpf_fd=fd))

    @staticmethod
    def bpf_obj_get_info(fd: int, info, info_len) -> int:
        """``info_len``: a pointer to a c_uint32 with the buffer's size; set to the kernel's."""
        size = ct.cast(info_len, ct.POINTER(ct.c_uint32))
        attr = _InfoAttr(bpf_fd=fd, info_len=size[0], info=_addr(info))
        rc = sys_bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
        if rc == 0:
            size[0] = attr.info_len
        return rc


lib = _Lib()


def update_batch(fd: int, keys, values, count: int, flags: int = BPF_ANY) -> int:
    """BPF_MAP_UPDATE_BATCH of ``count`` keys and values (ctypes arrays); returns how many
    the kernel wrote, raises OSError(errno) when it stopped early (EINVAL/ENOTSUPP: the map
    type has no batch operations)."""
    attr = _BatchAttr(keys=_addr(keys), values=_addr(values), count=count, map_fd=fd,
                      elem_flags=flags)
    if sys_bpf(BPF_MAP_UPDATE_BATCH, attr) != 0:
        err = ct.get_errno() or errno.EIO
        raise OSError(err, f"{os.strerror(err)} after {attr.count} of {count}", attr.count)
    return attr.count


def lookup_batch(fd: int, keys, values, count: int, token_in, token_out) -> tuple[int, bool]:
    """BPF_MAP_LOOKUP_BATCH: up to ``count`` keys and values (ctypes arrays) from where
    ``token_in`` left off (None: the map's start); ``token_out`` (a buffer of at least
    the key's size) receives where the next call goes on. Returns how many were read
    and whether the map ended there; raises OSError(errno) otherwise (EINVAL/ENOTSUPP:
    the map type has no batch operations; ENOSPC: a bucket holds more than ``count``)."""
    attr = _BatchAttr(in_batch=_addr(token_in), out_batch=_addr(token_out), keys=_addr(keys),
                      values=_addr(values), count=count, map_fd=fd)
    if sys_bpf(BPF_MAP_LOOKUP_BATCH, attr) != 0:
        err = ct.get_errno() or errno.EIO
        if err == errno.ENOENT:
            return attr.count, True
        raise OSError(err, os.strerror(err))
    return attr.count, False


def delete_batch(fd: int, keys, count: int) -> int:
    attr = _BatchAttr(keys=_addr(keys), count=count, map_fd=fd)
    if sys_bpf(BPF_MAP_DELETE_BATCH, attr) != 0:
        err = ct.get_errno() or errno.EIO
        raise OSError(err, f"{os.strerror(err)} after {attr.count} of {count}", attr.count)
    return attr.count


def obj_get(path: str) -> int:
    fd = lib.bpf_obj_get(path.encode())
    if fd < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


class BpfProgInfo(ct.Structure):
    """struct bpf_prog_info, up to the fields read here."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64),
                ("name", ct.c_char * 16), ("ifindex", ct.c_uint32),
                ("flags", ct.c_uint32), ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64),
                ("nr_jited_ksyms", ct.c_uint32), ("nr_jited_func_lens", ct.c_uint32),
                ("jited_ksyms", ct.c_uint64), ("jited_func_lens", ct.c_uint64),
                ("btf_id", ct.c_uint32), ("func_info_rec_size", ct.c_uint32),
                ("func_info", ct.c_uint64), ("nr_func_info", ct.c_uint32),
                ("nr_line_info", ct.c_uint32), ("line_info", ct.c_uint64),
                ("jited_line_info", ct.c_uint64), ("nr_jited_line_info", ct.c_uint32),
                ("line_info_rec_size", ct.c_uint32), ("jited_line_info_rec_size", ct.c_uint32),
                ("nr_prog_tags", ct.c_uint32), ("prog_tags", ct.c_uint64),
                ("run_time_ns", ct.c_uint64), ("run_cnt", ct.c_uint64)]


def prog_map_ids(fd: int) -> set[int]:
    """The ids of the maps program ``fd`` uses."""
    ids = (ct.c_uint32 * 64)()
    info = BpfProgInfo(nr_map_ids=64, map_ids=ct.addressof(ids))
    size = ct.c_uint32(ct.sizeof(info))
    if lib.bpf_obj_get_info(fd, ct.byref(info), ct.byref(size)) != 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return set(ids[:min(info.nr_map_ids, 64)])


def prog_info(fd: int) -> BpfProgInfo:
    info = BpfProgInfo()
    size = ct.c_uint32(ct.sizeof(info))
    if lib.bpf_obj_get_info(fd, ct.byref(info), ct.byref(size)) != 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return info


def possible_cpus() -> int:
    """How many values a per-CPU map holds per key (the possible CPUs, as bcc counts)."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class MapHandle:
    """One map by fd: what Datapath.table() returns (``map_fd``; per-CPU values)."""

    def __init__(self, fd: int, name: str):
        self.map_fd, self.name = fd, name

    def percpu_get(self, key, value_type) -> list:
        """The per-CPU values of ``key`` (each ``value_type``, padded to 8 bytes)."""
        ncpu = possible_cpus()
        stride = (ct.sizeof(value_type) + 7) & ~7
        buf = ct.create_string_buffer(stride * ncpu)
        if lib.bpf_lookup_elem(self.map_fd, ct.byref(key), buf) != 0:
            err = ct.get_errno()
            raise OSError(err, os.strerror(err), self.name)
        return [value_type.from_buffer_copy(buf.raw, i * stride) for i in range(ncpu)]

    def percpu_zero(self, key, value_type) -> None:
        stride = (ct.sizeof(value_type) + 7) & ~7
        buf = ct.create_string_buffer(stride * possible_cpus())
        if lib.bpf_update_elem(self.map_fd, ct.byref(key), buf, BPF_ANY) != 0:
            err = ct.get_errno()
            raise OSError(err, os.strerror(err), self.name)

    def close(self) -> None:
        if self.map_fd >= 0:
            os.close(self.map_fd)
            self.map_fd = -1


_BUSY, _DISCARD = 1 << 31, 1 << 30
_HDR = 8


class RingBuffer:
    """Consumer of a BPF_MAP_TYPE_RINGBUF map (the kernel's layout: a consumer page, a
    producer page, then the data area mapped twice so a record never wraps)."""

    def __init__(self, fd: int, size: int, callback: Callable[[memoryview], None]):
        page = mmap.PAGESIZE
        self.fd, self.size, self.mask, self.callback = fd, size, size - 1, callback
        self._cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=0)
        self._prod = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=page)
        self._data = memoryview(self._prod)[page:]
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)

    def consume(self) -> int:
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        n = 0
        while True:
            prod = struct.unpack_from("<Q", self._prod, 0)[0]
            if cons >= prod:
                break
            while cons < prod:
                off = cons & self.mask
                length = struct.unpack_from("<I", self._data, off)[0]
                if length & _BUSY:
                    struct.pack_into("<Q", self._cons, 0, cons)
                    return n
                length &= ~(_BUSY | _DISCARD) & 0xFFFFFFFF
                if not struct.unpack_from("<I", self._data, off)[0] & _DISCARD:
                    self.callback(self._data[off + _HDR:off + _HDR + length])
                    n += 1
                cons += (length + _HDR + 7) & ~7
                struct.pack_into("<Q", self._cons, 0, cons)
        return n

    def poll(self, timeout_ms: int) -> int:
        if self.consume():
            return 1
        if self._epoll.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1):
            return self.consume()
        return 0

    def close(self) -> None:
        self._epoll.close()
        self._data.release()
        self._prod.close()
        self._cons.close()
