"""Flows (the API's Flow dicts) grouped into connections.

Both hooks of a connection (the source's egress, the destination's ingress) report its
first packet, and replies belong to the connection that started them. The hook with the
harshest verdict speaks for it: a connection the destination dropped was dropped,
whatever the source's side said. HTTP requests on it (L7 flows, same connection) do not
change its L3/L4 verdict: a 403 leaves the connection open.
"""
from __future__ import annotations

from ..policy.mapstate import PROTO_NUMBERS

SEVERITY = {"FORWARDED": 0, "AUDIT": 1, "DROPPED": 2}


def connections(flows: list[dict]) -> list[dict]:
    best: dict = {}
    for f in flows:
        if f.get("is_reply"):
            continue
        key = f.get("connection") or (
            (f.get("ip") or {}).get("source"), (f.get("ip") or {}).get("destination"),
            (f.get("l4") or {}).get("protocol"), (f.get("l4") or {}).get("source_port"),
            (f.get("l4") or {}).get("destination_port"))
        old = best.get(key)
        if old is None or (_severity(f) > _severity(old)):
            best[key] = f
    return list(best.values())


def flow_port(f: dict) -> tuple[int, int | None]:
    """(protocol number, destination port or ICMP type) of a flow."""
    l4 = f.get("l4") or {}
    proto = PROTO_NUMBERS.get(str(l4.get("protocol", "")).lower(), 0)
    return proto, l4.get("destination_port")


def _severity(f: dict) -> int:
    return -1 if f.get("l7") else SEVERITY.get(f.get("verdict") or "", 0)
