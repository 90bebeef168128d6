"""Run a loaded program on a packet of our making: BPF_PROG_TEST_RUN (as Cilium's
bpf/tests do), for the fuzz test and for per-program cost measurements.

    run = ProgTestRun(dp.from_endpoint_fd)
    retval, ns = run(frame, ifindex=7)           # TC_ACT_* and the run's duration

The kernel builds an skb of ``frame`` (an Ethernet frame, at least 14 bytes, at most
about 3.5 KiB: one page with head- and tailroom) on the device ``ifindex`` (which
must exist in the caller's network namespace), with ``ingress_ifindex`` as
skb->ingress_ifindex, and runs the program once (or ``repeat`` times: the duration
is then the mean). Nothing is sent: a redirect only returns TC_ACT_REDIRECT. Maps
are the real ones (the run changes them as a packet would).
"""
from __future__ import annotations

import ctypes as ct
import os

from .errors import DatapathError

SYS_BPF = 321                # x86_64
BPF_PROG_TEST_RUN = 10
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


class _SkbCtx(ct.Structure):
    """The head of struct __sk_buff, up to ifindex (the fields a test run may set)."""
    _fields_ = [("len", ct.c_uint32), ("pkt_type", ct.c_uint32), ("mark", ct.c_uint32),
                ("queue_mapping", ct.c_uint32), ("protocol", ct.c_uint32),
                ("vlan_present", ct.c_uint32), ("vlan_tci", ct.c_uint32),
                ("vlan_proto", ct.c_uint32), ("priority", ct.c_uint32),
                ("ingress_ifindex", ct.c_uint32), ("ifindex", ct.c_uint32)]


class _TestAttr(ct.Structure):
    """union bpf_attr, the BPF_PROG_TEST_RUN member."""
    _fields_ = [("prog_fd", ct.c_uint32), ("retval", ct.c_uint32),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("data_in", ct.c_uint64), ("data_out", ct.c_uint64),
                ("repeat", ct.c_uint32), ("duration", ct.c_uint32),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32),
                ("pad", ct.c_uint32)]


class ProgTestRun:
    """BPF_PROG_TEST_RUN on one program fd; the attribute buffers are reused."""

    def __init__(self, prog_fd: int):
        self.attr = _TestAttr(prog_fd=prog_fd)
        self.ctx = _SkbCtx()
        self.out = ct.create_string_buffer(4096)
        self.attr.ctx_in = ct.addressof(self.ctx)
        self.attr.ctx_size_in = ct.sizeof(self.ctx)
        self.attr.data_out = ct.addressof(self.out)

    def __call__(self, frame: bytes, ifindex: int, ingress_ifindex: int = 0,
                 repeat: int = 1) -> tuple[int, int]:
        a = self.attr
        buf = ct.create_string_buffer(frame, len(frame))
        a.data_in = ct.addressof(buf)
        a.data_size_in = len(frame)
        a.data_size_out = ct.sizeof(self.out)
        a.repeat = repeat
        self.ctx.ifindex = ifindex
        self.ctx.ingress_ifindex = ingress_ifindex
        if _libc.syscall(SYS_BPF, BPF_PROG_TEST_RUN, ct.byref(a), ct.sizeof(a)) != 0:
            err = ct.get_errno()
            raise DatapathError("BPF_PROG_TEST_RUN", f"{os.strerror(err)} "
                                f"(frame of {len(frame)} bytes, ifindex {ifindex})")
        return a.retval, a.duration
