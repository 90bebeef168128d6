"""One agent per network namespace: a lock held as an abstract unix socket.

Abstract unix socket names belong to the network namespace (the kernel scopes them),
so ``\\0stockade-agent`` bound and listening in a namespace says "an agent runs here",
and nowhere else. It goes when the process exits, however it exits (no stale lock
file). A second agent, or ``--cleanup``, connects to it: the listening socket's
credentials (SO_PEERCRED, taken at listen()) name the holder's PID, and it refuses.
The lock is taken before any map, link or container is touched.
"""
from __future__ import annotations

import os
import socket
import struct
import threading

from ..errors import StockadeError

NAME = b"\0stockade-agent"
# Test agents that share a namespace with each other and with a running demo agent set
# this (tests/agentproc.py) until every test agent runs in a namespace of its own.
SHARED_ENV = "STOCKADE_SHARED_NAMESPACE"


def wanted() -> bool:
    return os.environ.get(SHARED_ENV) != "1"


class LockHeld(StockadeError):
    def __init__(self, pid: int | None):
        self.pid = pid
        who = f"PID {pid}" if pid else "another process"
        super().__init__(f"another Stockade agent ({who}) runs in this network namespace; "
                         "one agent per namespace (stop it first, or run this one in a "
                         "namespace of its own)")


def holder() -> int | None:
    """The PID holding the lock in this namespace, None when nobody does."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(NAME)
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except OSError:
        return 0
    try:
        cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", cred)[0]
    finally:
        s.close()


def take() -> socket.socket:
    """Hold the lock for this process's life (keep the socket). Raises LockHeld."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(NAME)
    except OSError as exc:
        s.close()
        raise LockHeld(holder()) from exc
    s.listen(16)
    s.set_inheritable(False)

    def answer():   # whoever asks has read our PID at connect: hang up
        while True:
            try:
                conn, _ = s.accept()
                conn.close()
            except OSError:
                return
    threading.Thread(target=answer, name="stockade-nslock", daemon=True).start()
    return s
