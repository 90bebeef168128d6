"""tcx through the bpf() syscall (ctypes): BPF links on an interface's ingress/egress.

bcc has no tcx API and Debian's bpftool 7.1 cannot attach tcx, so the few commands
needed are called directly: BPF_LINK_CREATE (attach types BPF_TCX_INGRESS/EGRESS),
BPF_LINK_UPDATE (swap the program of a link in one step), BPF_PROG_QUERY (the programs
an interface runs, in order), BPF_OBJ_PIN/GET, BPF_OBJ_GET_INFO_BY_FD and
BPF_LINK_DETACH. The bpf_attr layouts are those of include/uapi/linux/bpf.h.

A tcx link belongs to whoever holds its fd or pin: ``tc filter del`` and ``tc qdisc
del ... clsact`` do not touch it, and it goes away with its interface.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os
import platform
import struct
from dataclasses import dataclass

from .errors import DatapathError

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
           "riscv64": 280}.get(platform.machine(), 321)

BPF_OBJ_PIN, BPF_OBJ_GET = 6, 7
BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_QUERY = 13, 15, 16
BPF_LINK_CREATE, BPF_LINK_UPDATE, BPF_LINK_GET_FD_BY_ID, BPF_LINK_DETACH = 28, 29, 30, 34

BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47
ATTACH_TYPES = {"ingress": BPF_TCX_INGRESS, "egress": BPF_TCX_EGRESS}
BPF_F_BEFORE = 1 << 3
BPF_F_AFTER = 1 << 4

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


def _bpf(cmd: int, attr: bytearray) -> int:
    """bpf(cmd, attr, len); returns the result or raises OSError with the errno."""
    buf = (ct.c_char * len(attr)).from_buffer(attr)
    ret = _libc.syscall(ct.c_long(_NR_BPF), ct.c_int(cmd), buf, ct.c_uint(len(attr)))
    if ret < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _attr(size: int = 128) -> bytearray:
    return bytearray(size)


def link_create(prog_fd: int, ifindex: int, hook: str, *, first: bool = True) -> int:
    """A tcx link running ``prog_fd`` on ``ifindex``'s ``hook``; ``first``: ahead of
    every program already there (BPF_F_BEFORE with no relative program). Returns its fd."""
    a = _attr()
    struct.pack_into("=IIII", a, 0, prog_fd, ifindex, ATTACH_TYPES[hook],
                     BPF_F_BEFORE if first else 0)
    return _bpf(BPF_LINK_CREATE, a)


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the link's program for ``prog_fd`` (atomic for the packets)."""
    a = _attr()
    struct.pack_into("=III", a, 0, link_fd, prog_fd, 0)
    _bpf(BPF_LINK_UPDATE, a)


def link_detach(link_fd: int) -> None:
    a = _attr()
    struct.pack_into("=I", a, 0, link_fd)
    _bpf(BPF_LINK_DETACH, a)


def obj_pin(fd: int, path: str) -> None:
    name = ct.create_string_buffer(path.encode())
    a = _attr()
    struct.pack_into("=QI", a, 0, ct.addressof(name), fd)
    _bpf(BPF_OBJ_PIN, a)


def obj_get(path: str) -> int:
    name = ct.create_string_buffer(path.encode())
    a = _attr()
    struct.pack_into("=Q", a, 0, ct.addressof(name))
    return _bpf(BPF_OBJ_GET, a)


def _info(fd: int, size: int) -> bytes:
    info = ct.create_string_buffer(size)
    a = _attr()
    struct.pack_into("=IIQ", a, 0, fd, size, ct.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, a)
    return info.raw


@dataclass(frozen=True)
class LinkInfo:
    id: int
    prog_id: int
    ifindex: int        # 0 once its interface is gone (the link is then defunct)
    hook: str | None


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd, 64)
    _type, link_id, prog_id = struct.unpack_from("=III", raw, 0)
    ifindex, attach_type = struct.unpack_from("=II", raw, 16)
    hook = {v: k for k, v in ATTACH_TYPES.items()}.get(attach_type)
    return LinkInfo(link_id, prog_id, ifindex, hook)


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str
    tag: str


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd, 232)
    prog_id = struct.unpack_from("=I", raw, 4)[0]
    tag = raw[8:16].hex()
    name = raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    return ProgInfo(prog_id, name, tag)


def prog_info_by_id(prog_id: int) -> ProgInfo | None:
    """The program with id ``prog_id``, None when it is gone."""
    a = _attr()
    struct.pack_into("=I", a, 0, prog_id)
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, a)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Entry:
    """One program of an interface's tcx hook, in run order."""

    prog_id: int
    link_id: int        # 0: attached without a link (BPF_PROG_ATTACH)


def query(ifindex: int, hook: str, max_progs: int = 64) -> list[Entry]:
    """The programs tcx runs on ``ifindex``'s ``hook``, first first."""
    progs = (ct.c_uint32 * max_progs)()
    links = (ct.c_uint32 * max_progs)()
    a = _attr()
    struct.pack_into("=IIII", a, 0, ifindex, ATTACH_TYPES[hook], 0, 0)
    struct.pack_into("=QI", a, 16, ct.addressof(progs), max_progs)
    struct.pack_into("=QQ", a, 32, 0, ct.addressof(links))
    _bpf(BPF_PROG_QUERY, a)
    count = struct.unpack_from("=I", a, 24)[0]
    return [Entry(progs[i], links[i]) for i in range(min(count, max_progs))]


def supported() -> bool:
    """Whether this kernel has tcx (6.6 and later): a query on loopback answers."""
    try:
        query(1, "ingress")
        return True
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise DatapathError("tcx", f"cannot probe tcx support: {exc}") from exc
