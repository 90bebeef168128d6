"""Entities: named groups of peers (``fromEntities``/``toEntities``)."""
from __future__ import annotations

# Reserved identity numbers keep Cilium's.
HOST, WORLD, UNMANAGED, HEALTH, INIT, REMOTE_NODE = 1, 2, 3, 4, 5, 6

RESERVED = {
    "host": HOST, "world": WORLD, "unmanaged": UNMANAGED, "health": HEALTH, "init": INIT,
    "remote-node": REMOTE_NODE,
}
# cluster: every endpoint known on any host plus the hosts (everything in the ipcache that
# is not world); all: everything (the wildcard peer).
ENTITIES = tuple(RESERVED) + ("cluster", "all")
