"""Compact flow records: one ``struct``-packed row per flow, no dict per flow.

A record is ``RECORD`` (88 bytes) in a shared bytearray (see ring.py). The fields an
agent resolves at decode time and that repeat from flow to flow (identity labels,
endpoint name and host, the list of deciding policies) are interned: the row holds a
small index into ``Interner`` tables, so a full ring of 65,535 rows is about 5.8 MB (plus the HTTP
parts of L7 rows, l7.py).

Row fields, in order (``Field`` gives the index of each in an unpacked row):
    time_ns       wall-clock ns (UTC)
    ifindex       host-side interface of the hook that saw the packet
    src_identity, dst_identity
    src_info, dst_info   index of (identity, labels, endpoint name, host) in Interner
    policy        index of a tuple of policy names in Interner (0: none known)
    size          bytes of the packet that made the event
    saddr, daddr  16 bytes, network order (IPv4 in the first 4)
    sport, dport  host order (0 for ICMP)
    verdict, reason, direction, ip_version, proto, tcp_flags, icmp_type, is_reply,
    policy_match, icmp_code
    l7            id of the HTTP part in the ring's L7Table (l7.py); 0: an L3/L4 flow
"""
from __future__ import annotations

import datetime as _dt
import functools
import ipaddress
import struct
import threading

from ..datapath.maps import (
    MATCH_ALLOW,
    MATCH_DEFAULT_ALLOW,
    MATCH_DEFAULT_DENY,
    MATCH_DENY,
    MATCH_NONE,
    MATCH_NOT_ENFORCED,
    Reason,
    Verdict,
)
from .l7 import L7Table, to_l7_dict

RECORD = struct.Struct("<QIIIIIII16s16sHHBBBBBBBBBBxxI")
RECORD_SIZE = RECORD.size

(TIME, IFINDEX, SRC_ID, DST_ID, SRC_INFO, DST_INFO, POLICY, SIZE, SADDR, DADDR, SPORT, DPORT,
 VERDICT, REASON, DIRECTION, IP_VERSION, PROTO, TCP_FLAGS, ICMP_TYPE, IS_REPLY, POLICY_MATCH,
 ICMP_CODE, L7) = range(23)

VERDICTS = {v.value: v.name for v in Verdict}
REASONS = {r.value: r.name.lower() for r in Reason}
DIRECTIONS = {0: "ingress", 1: "egress"}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
TCP_FLAG_NAMES = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"),
                  (0x20, "URG"), (0x40, "ECE"), (0x80, "CWR"))
MATCHES = {MATCH_NONE: None, MATCH_NOT_ENFORCED: "not-enforced", MATCH_ALLOW: "allow",
           MATCH_DENY: "deny", MATCH_DEFAULT_DENY: "default-deny",
           MATCH_DEFAULT_ALLOW: "default-allow"}


class Interner:
    """value <-> small int, index 0 reserved for "unknown". Thread-safe for adds.

    Values are few (one per identity/endpoint pair and per policy set), so the table
    only grows with the number of distinct workloads, not with traffic."""

    def __init__(self, zero=None):
        self._index: dict = {zero: 0}
        self.values: list = [zero]
        self._lock = threading.Lock()

    def add(self, value) -> int:
        i = self._index.get(value)
        if i is None:
            with self._lock:
                i = self._index.get(value)
                if i is None:
                    i = len(self.values)
                    self.values.append(value)
                    self._index[value] = i
        return i

    def __len__(self) -> int:
        return len(self.values)


# A row's 16 address bytes -> text: rendering every flow (the flow log, queries,
# follows) meets the same few addresses again and again. Bounded (least recently
# used out).
ADDRESS_CACHE_MAX = 4096


@functools.lru_cache(maxsize=ADDRESS_CACHE_MAX)
def address(raw: bytes, version: int) -> str:
    """A row's address field (16 bytes, IPv4 in the first 4) as text."""
    return str(ipaddress.IPv6Address(raw)) if version == 6 else str(ipaddress.IPv4Address(raw[:4]))


def rfc3339(ns: int) -> str:
    t = _dt.datetime.fromtimestamp(ns // 1_000_000_000, _dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{(ns % 1_000_000_000) // 1000:06d}Z"


def tcp_flag_names(flags: int) -> list[str]:
    return [name for bit, name in TCP_FLAG_NAMES if flags & bit]


def connection_key(row: tuple) -> tuple:
    """Same for both hooks of one connection (both record its first packet's tuple)."""
    return (row[IP_VERSION], row[PROTO], row[SADDR], row[DADDR], row[SPORT], row[DPORT])


def drop_reason(row: tuple) -> str | None:
    """The reason a flow was (or, in audit, would have been) dropped; None for plain
    forwards."""
    if row[VERDICT] == Verdict.FORWARDED:
        return None
    return REASONS.get(row[REASON], f"reason_{row[REASON]}")


def _peer(info: tuple | None, identity: int) -> dict:
    if info is None:
        return {"identity": identity, "labels": [], "endpoint": None}
    _ident, labels, name, host = info
    ep = None if name is None and host is None else {"name": name, "host": host}
    return {"identity": identity, "labels": list(labels), "endpoint": ep}


def to_dict(row: tuple, infos: Interner, policies: Interner, ifnames: dict | None = None,
            l7: L7Table | None = None) -> dict:
    """The API / ``-o json`` shape of one row (see contract.py, Flow)."""
    v = row[IP_VERSION]
    proto = row[PROTO]
    src, dst = address(row[SADDR], v), address(row[DADDR], v)
    icmp = proto in (1, 58)
    l4 = {"protocol": PROTOCOLS.get(proto, str(proto)),
          "source_port": None if icmp else row[SPORT],
          "destination_port": None if icmp else row[DPORT]}
    if proto == 6:
        l4["tcp_flags"] = tcp_flag_names(row[TCP_FLAGS])
    if icmp:
        l4["icmp_type"], l4["icmp_code"] = row[ICMP_TYPE], row[ICMP_CODE]
    if icmp or not (row[SPORT] or row[DPORT]):
        conn = f"{l4['protocol']} {src} -> {dst}"
    else:
        conn = f"{l4['protocol']} {src}:{row[SPORT]} -> {dst}:{row[DPORT]}"
    out = {
        "time": rfc3339(row[TIME]),
        "verdict": VERDICTS.get(row[VERDICT], str(row[VERDICT])),
        "drop_reason": drop_reason(row),
        "reason": REASONS.get(row[REASON], str(row[REASON])),
        "direction": DIRECTIONS.get(row[DIRECTION], str(row[DIRECTION])),
        "ip_version": v,
        "ip": {"source": src, "destination": dst},
        "l4": l4,
        "is_reply": bool(row[IS_REPLY]),
        "interface": {"index": row[IFINDEX],
                      "name": (ifnames or {}).get(row[IFINDEX])},
        "source": _peer(infos.values[row[SRC_INFO]], row[SRC_ID]),
        "destination": _peer(infos.values[row[DST_INFO]], row[DST_ID]),
        "policy": list(policies.values[row[POLICY]] or ()),
        "policy_match": MATCHES.get(row[POLICY_MATCH] & 0x0F),
        "size": row[SIZE],
        "connection": conn,
    }
    info = l7.get(row[L7]) if l7 is not None and row[L7] else None
    if info is not None:
        out["l7"] = to_l7_dict(info)
    return out
