"""Netlink dumps that survive a busy host.

The kernel interrupts a dump (NLM_F_DUMP_INTR) when the objects it lists change
meanwhile, as links and addresses do while containers start: the dump is taken again,
with a short backoff, rather than failing the caller (an agent failing its start).
"""
from __future__ import annotations

import time
from typing import Any, Callable

from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

ATTEMPTS = 12          # about 1.6 s of backoff in all


def dump(call: Callable[..., Any], *args, **kwargs) -> list:
    """``list(call(*args, **kwargs))``, retried while the kernel interrupts the dump."""
    delay = 0.005
    for attempt in range(ATTEMPTS):
        try:
            return list(call(*args, **kwargs))
        except NetlinkDumpInterrupted:
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    raise AssertionError("unreachable")
