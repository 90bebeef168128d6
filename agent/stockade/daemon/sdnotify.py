"""Tell systemd (Type=notify) that the agent is ready: the datapath is attached, the last
policy restored and the API served. Without NOTIFY_SOCKET (not under systemd) it does nothing."""
from __future__ import annotations

import os
import socket


def notify(state: str = "READY=1") -> bool:
    """Send STATE to $NOTIFY_SOCKET; True when sent. An abstract socket starts with '@'."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(state.encode())
    return True
