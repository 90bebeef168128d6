"""Flows in Hubble's shapes, for tooling written against ``hubble observe``.

``to_jsonpb`` gives one line of ``hubble observe -o jsonpb``: ``{"flow": {...},
"node_name": ..., "time": ...}`` with flow.proto's field names (``IP``, ``l4.TCP``,
``traffic_direction``, ``drop_reason_desc``, ``Summary``, ...) and enum names; fields
that would hold their zero value are left out, as protojson does. ``compact`` gives
one line of ``-o compact``. Both take the API's Flow (record.to_dict).
"""
from __future__ import annotations

import datetime as _dt

# our drop reason -> flow.proto DropReason (name, number)
DROP_REASONS = {
    "policy_denied": ("POLICY_DENIED", 133),
    "policy_deny_rule": ("POLICY_DENY", 181),
    "spoofed": ("INVALID_SOURCE_IP", 132),
    "ct_full": ("CT_MAP_INSERTION_FAILED", 155),
    "unknown_endpoint": ("NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION", 165),
    "invalid": ("INVALID_PACKET_DROPPED", 134),
    "unsupported": ("UNSUPPORTED_L3_PROTOCOL", 139),
    "fragment_orphan": ("FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND", 175),
}
L4_KEYS = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP", "icmp": "ICMPv4", "icmpv4": "ICMPv4",
           "icmpv6": "ICMPv6"}
EVENT_DROP, EVENT_TRACE = 1, 4          # monitor API message types (CILIUM_NOTIFY_*)
EVENT_L7 = 129                          # MessageTypeAccessLog
ICMP4_NAMES = {0: "EchoReply", 3: "DestinationUnreachable", 8: "EchoRequest", 11: "TimeExceeded"}
ICMP6_NAMES = {1: "DestinationUnreachable", 3: "TimeExceeded", 128: "EchoRequest", 129: "EchoReply",
               133: "RouterSolicitation", 134: "RouterAdvertisement", 135: "NeighborSolicitation",
               136: "NeighborAdvertisement"}


def _l4(flow: dict) -> tuple[dict, str]:
    l4 = flow.get("l4") or {}
    proto = str(l4.get("protocol", "")).lower()
    if proto == "icmp":
        proto = "icmpv6" if flow.get("ip_version") == 6 else "icmpv4"
    key = L4_KEYS.get(proto)
    if key is None:
        return {}, proto.upper()
    if key.startswith("ICMP"):
        body = {k: v for k, v in (("type", l4.get("icmp_type")), ("code", l4.get("icmp_code"))) if v}
        names = ICMP6_NAMES if key == "ICMPv6" else ICMP4_NAMES
        itype = l4.get("icmp_type")
        return {key: body}, f"{key} {names.get(itype, itype) if isinstance(itype, int) else itype}"
    body = {k: v for k, v in (("source_port", l4.get("source_port")),
                              ("destination_port", l4.get("destination_port"))) if v}
    summary = key
    if key == "TCP":
        flags = l4.get("tcp_flags") or []
        if flags:
            body["flags"] = {f: True for f in flags}
            summary = "TCP Flags: " + ", ".join(flags)
    return {key: body}, summary


def _endpoint(peer: dict) -> dict:
    out: dict = {}
    if peer.get("identity"):
        out["identity"] = peer["identity"]
    if peer.get("labels"):
        out["labels"] = list(peer["labels"])
    ep = peer.get("endpoint") or {}
    if ep.get("name"):
        out["pod_name"] = ep["name"]
    return out


def printable(text) -> str:
    """What a client sent, safe on a terminal: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _l7_summary(l7: dict) -> str:
    """As Hubble's: ``HTTP/1.1 GET http://api/x`` or ``HTTP/1.1 403 2ms (GET http://api/x)``;
    printable (l7 fields are what a client sent)."""
    http = {k: printable(v) for k, v in (l7.get("http") or {}).items() if k != "headers"}
    if l7.get("type") == "RESPONSE":
        return (f"{http.get('protocol')} {http.get('code')} {(l7.get('latency_ns') or 0) // 1_000_000}ms "
                f"({http.get('method')} {http.get('url')})")
    return f"{http.get('protocol')} {http.get('method')} {http.get('url')}"


def to_flow(flow: dict, node_name: str | None = None) -> dict:
    """flow.proto's Flow as protojson (proto field names)."""
    verdict = flow.get("verdict", "VERDICT_UNKNOWN")
    direction = str(flow.get("direction") or "").upper() or "TRAFFIC_DIRECTION_UNKNOWN"
    l4, summary = _l4(flow)
    v = flow.get("ip_version")
    out: dict = {"time": flow.get("time"), "verdict": verdict}
    drop = flow.get("drop_reason") if verdict == "DROPPED" else None
    if drop:
        name, number = DROP_REASONS.get(drop, ("DROP_REASON_UNKNOWN", 0))
        if number:
            out["drop_reason"] = number
    ip = flow.get("ip") or {}
    out["IP"] = {"source": ip.get("source"), "destination": ip.get("destination"),
                 "ipVersion": "IPv6" if v == 6 else "IPv4"}
    if l4:
        out["l4"] = l4
    src, dst = _endpoint(flow.get("source") or {}), _endpoint(flow.get("destination") or {})
    if src:
        out["source"] = src
    if dst:
        out["destination"] = dst
    l7 = flow.get("l7")
    out["Type"] = "L7" if l7 else "L3_L4"
    if l7:
        http = dict(l7.get("http") or {})
        http = {k: v for k, v in http.items() if v not in (None, "", 0, [])}
        out["l7"] = {"type": l7.get("type"), "http": http}
        if l7.get("latency_ns"):
            out["l7"]["latency_ns"] = str(l7["latency_ns"])   # uint64: a string in protojson
        summary = _l7_summary(l7)
    host = node_name or ((flow.get("source") or {}).get("endpoint") or {}).get("host") \
        or ((flow.get("destination") or {}).get("endpoint") or {}).get("host")
    if host:
        out["node_name"] = host
    out["event_type"] = {"type": EVENT_L7 if l7 else EVENT_DROP if verdict == "DROPPED" else EVENT_TRACE}
    out["traffic_direction"] = direction
    if drop:
        out["drop_reason_desc"] = DROP_REASONS.get(drop, ("DROP_REASON_UNKNOWN", 0))[0]
    out["is_reply"] = bool(flow.get("is_reply"))
    iface = flow.get("interface") or {}
    if iface.get("index") or iface.get("name"):
        out["interface"] = {k: iface[k] for k in ("index", "name") if iface.get(k)}
    out["Summary"] = summary
    policies = [{"name": n} for n in flow.get("policy") or []]
    if policies:
        side = "ingress" if direction == "INGRESS" else "egress"
        out[f"{side}_{'denied' if verdict == 'DROPPED' else 'allowed'}_by"] = policies
    return out


def to_jsonpb(flow: dict, node_name: str | None = None) -> dict:
    """One GetFlowsResponse line: {"flow": ..., "node_name": ..., "time": ...}."""
    f = to_flow(flow, node_name)
    return {"flow": f, "node_name": f.get("node_name", ""), "time": f["time"]}


def _when(text: str) -> str:
    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return str(text)
    return t.strftime("%b %e %H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def _side(flow: dict, side: str) -> str:
    peer = flow.get(side) or {}
    ep = peer.get("endpoint") or {}
    ip = (flow.get("ip") or {}).get(side, "")
    port = (flow.get("l4") or {}).get(f"{side}_port")
    who = ep.get("name") or (f"[{ip}]" if ":" in ip else ip)
    return f"{who}:{port}" if port else who


def compact(flow: dict) -> str:
    """``Mar  5 10:14:03.120: web1:40000 (ID:256) -> db1:5432 (ID:257) to-endpoint
    FORWARDED (TCP Flags: SYN)``, as ``hubble observe -o compact`` prints."""
    _, summary = _l4(flow)
    if flow.get("l7"):
        summary = _l7_summary(flow["l7"])
    verdict = flow.get("verdict", "")
    point = "to-endpoint" if flow.get("direction") == "ingress" else "from-endpoint"
    if flow.get("l7"):
        point = "http-request" if flow["l7"].get("type") == "REQUEST" else "http-response"
    left, right, arrow = "source", "destination", "->"
    if flow.get("is_reply"):  # a reply is shown from the connection's initiator, as Hubble does
        left, right, arrow = right, left, "<-"
    text = (f"{_when(str(flow.get('time') or ''))}: {_side(flow, left)} "
            f"(ID:{(flow.get(left) or {}).get('identity')}) {arrow} "
            f"{_side(flow, right)} (ID:{(flow.get(right) or {}).get('identity')}) "
            f"{point} {verdict} ({summary})")
    if verdict == "DROPPED" and flow.get("drop_reason"):
        text += f" {DROP_REASONS.get(flow['drop_reason'], (flow['drop_reason'].upper(), 0))[0]}"
    return text
