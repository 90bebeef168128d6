"""ctypes mirrors of bpf/include/stockade_maps.h (see that header for byte order).

tests/root/test_datapath_layout.py compiles the header with bcc and checks that every
struct here has the same size and field offsets as the C one.
"""
from __future__ import annotations

import ctypes as ct
import enum
import ipaddress

DIR_INGRESS = 0
DIR_EGRESS = 1

EP_F_AUDIT = 1 << 0
EP_F_UNIDENTIFIED = 1 << 1
CFG_F_AUDIT = 1 << 0
CFG_F_FORWARD_UNIDENTIFIED = 1 << 1
CFG_F_L7_NO_SERVERS = 1 << 2   # no l7_ports entry of kind L7_SERVER (see the header)
CFG_F_L7_NO_CLIENTS = 1 << 3
CFG_L7_BITS = CFG_F_L7_NO_SERVERS | CFG_F_L7_NO_CLIENTS

EP_MAX_IP4 = 4
EP_MAX_IP6 = 4
EP_MAX_LL = 4
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
IDENTITY_ANY = 0
IDENTITY_WORLD = 2

CT_STATE_NEW, CT_STATE_ESTABLISHED, CT_STATE_CLOSING, CT_STATE_REVOKED = 0, 1, 2, 3

# flow_event.policy_match (MATCH_* in the header): low nibble, plus lookup flags
MATCH_NONE, MATCH_NOT_ENFORCED, MATCH_ALLOW, MATCH_DENY = 0, 1, 2, 3
MATCH_DEFAULT_DENY, MATCH_DEFAULT_ALLOW = 4, 5
MATCH_F_EXACT, MATCH_F_ANY = 0x10, 0x20

EVENT_CLASS_NEW, EVENT_CLASS_DROP = 0, 1
# events_lost indexes
EVENTS_LOST = ("rate_limit_new", "rate_limit_drop", "ringbuf_full")


class Verdict(enum.IntEnum):
    FORWARDED = 0
    DROPPED = 1
    AUDIT = 2


class Reason(enum.IntEnum):
    """Mirrors REASON_* in the header. NONE: plain forward."""

    NONE = 0
    POLICY_DENIED = 1
    POLICY_DENY_RULE = 2
    SPOOFED = 3
    CT_FULL = 4
    UNKNOWN_ENDPOINT = 5
    INVALID = 6
    UNSUPPORTED = 7
    CT_ESTABLISHED = 8
    CT_RELATED = 9
    NEIGH = 10
    FRAGMENT_ORPHAN = 11
    DHCP = 12


NUM_VERDICTS = len(Verdict)
NUM_REASONS = len(Reason)
NUM_COUNTERS = 2 * NUM_VERDICTS * NUM_REASONS


def counter_index(direction: int, verdict: int, reason: int) -> int:
    return (direction * NUM_VERDICTS + verdict) * NUM_REASONS + reason


class Ip6Words(ct.Structure):
    _fields_ = [("w", ct.c_uint32 * 4)]


_ENDPOINT_V1_FIELDS = [
    ("endpoint_id", ct.c_uint32),
    ("identity", ct.c_uint32),
    ("flags", ct.c_uint32),
    ("mac", ct.c_uint8 * 6),
    ("n_ip4", ct.c_uint8),
    ("n_ip6", ct.c_uint8),
    ("ip4", ct.c_uint32 * EP_MAX_IP4),
    ("ip6", Ip6Words * EP_MAX_IP6),
]


class EndpointInfo(ct.Structure):
    """endpoints, layout v2."""
    _fields_ = _ENDPOINT_V1_FIELDS + [
        ("host_ifindex", ct.c_uint32),
        ("n_ll", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("ll", Ip6Words * EP_MAX_LL),
    ]


class EndpointInfoV1(ct.Structure):
    """endpoints, layout v1 (pinned as "endpoints"): for migration only."""
    _fields_ = _ENDPOINT_V1_FIELDS


class Ipcache4Key(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 4)]


class Ipcache6Key(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 16)]


class IpcacheValue(ct.Structure):
    _fields_ = [("identity", ct.c_uint32)]


POLICY_DIR_GEN = 0x80   # PolicyKey.direction: an entry of generation 1 (policy v2)


class PolicyKey(ct.Structure):
    """policy, layout v2: the generation bit in direction (POLICY_DIR_GEN)."""
    _fields_ = [
        ("prefixlen", ct.c_uint32),
        ("local", ct.c_uint32),
        ("peer", ct.c_uint32),
        ("direction", ct.c_uint8),
        ("proto", ct.c_uint8),
        ("port", ct.c_uint16),  # network order
    ]


class PolicyValue(ct.Structure):
    _fields_ = [("deny", ct.c_uint8), ("pad", ct.c_uint8 * 3), ("policy_id", ct.c_uint32)]


class PolicyFlagsKey(ct.Structure):
    _fields_ = [("identity", ct.c_uint32), ("direction", ct.c_uint8), ("pad", ct.c_uint8 * 3)]


class PolicyFlagsValue(ct.Structure):
    """policy_flags, layout v2: gen, the generation of the pair's entries in force
    (v1 had padding there: 0)."""
    _fields_ = [("enforced", ct.c_uint8), ("default_deny", ct.c_uint8),
                ("gen", ct.c_uint8), ("pad", ct.c_uint8)]


class CtKey(ct.Structure):
    """conntrack, layout v2: ICMP type in the key, query identifier in sport only."""
    _fields_ = [
        ("ifindex", ct.c_uint32),
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("sport", ct.c_uint16),  # network order
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("direction", ct.c_uint8),
        ("family", ct.c_uint8),
        ("icmp_type", ct.c_uint8),
    ]


class CtKeyV1(ct.Structure):
    """conntrack, layout v1 (pinned as "conntrack"): ICMP echo identifier in both
    ports, no ICMP type. For migration only."""
    _fields_ = [
        ("ifindex", ct.c_uint32),
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("direction", ct.c_uint8),
        ("family", ct.c_uint8),
        ("pad", ct.c_uint8),
    ]


class CtValue(ct.Structure):
    """conntrack value, layout v2 (v1 had 6 bytes of padding where pad and owner_peer
    are: the same size, owner_peer 0)."""
    _fields_ = [
        ("expires", ct.c_uint64),
        ("created", ct.c_uint64),
        ("state", ct.c_uint8),
        ("audited", ct.c_uint8),
        ("pad", ct.c_uint8 * 2),
        ("owner_peer", ct.c_uint32),
    ]


class CtOwner(ct.Structure):
    """ct_created / ct_released key: whom conntrack entries are charged to."""
    _fields_ = [("ifindex", ct.c_uint32), ("direction", ct.c_uint8), ("pad", ct.c_uint8 * 3),
                ("peer", ct.c_uint32)]


class CtCount(ct.Structure):
    _fields_ = [("n", ct.c_uint64)]


class FragKey(ct.Structure):
    _fields_ = [
        ("family", ct.c_uint8),
        ("proto", ct.c_uint8),
        ("pad", ct.c_uint8 * 2),
        ("id", ct.c_uint32),
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
    ]


class FragValue(ct.Structure):
    _fields_ = [
        ("sport", ct.c_uint16),  # network order
        ("dport", ct.c_uint16),
        ("l4_proto", ct.c_uint8),
        ("has_ports", ct.c_uint8),
        ("icmp_type", ct.c_uint8),
        ("icmp_code", ct.c_uint8),
    ]


class CounterValue(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


class ConfigValue(ct.Structure):
    _fields_ = [("flags", ct.c_uint32)]


class EventBucket(ct.Structure):
    _fields_ = [("tokens", ct.c_uint64), ("last", ct.c_uint64)]


class FlowEvent(ct.Structure):
    _fields_ = [
        ("timestamp", ct.c_uint64),
        ("ifindex", ct.c_uint32),
        ("src_identity", ct.c_uint32),
        ("dst_identity", ct.c_uint32),
        ("direction", ct.c_uint8),
        ("verdict", ct.c_uint8),
        ("reason", ct.c_uint8),
        ("ip_version", ct.c_uint8),
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("tcp_flags", ct.c_uint8),
        ("icmp_type", ct.c_uint8),
        ("is_reply", ct.c_uint8),
        ("pkt_len", ct.c_uint32),
        ("policy_match", ct.c_uint8),
        ("icmp_code", ct.c_uint8),
        ("pad", ct.c_uint8 * 2),
        ("policy_exact", ct.c_uint32),
        ("policy_any", ct.c_uint32),
    ]

    def addresses(self) -> tuple[str, str]:
        """(source, destination) as text; IPv4 for ip_version 4 and ARP (0)."""
        if self.ip_version == 6:
            return (str(ipaddress.IPv6Address(bytes(self.saddr))),
                    str(ipaddress.IPv6Address(bytes(self.daddr))))
        return (str(ipaddress.IPv4Address(bytes(self.saddr[:4]))),
                str(ipaddress.IPv4Address(bytes(self.daddr[:4]))))


# C struct name -> mirror, for the layout test
LAYOUTS = {
    "ip6_words": Ip6Words,
    "endpoint_info": EndpointInfo,
    "ipcache4_key": Ipcache4Key,
    "ipcache6_key": Ipcache6Key,
    "ipcache_value": IpcacheValue,
    "policy_key": PolicyKey,
    "policy_value": PolicyValue,
    "policy_flags_key": PolicyFlagsKey,
    "policy_flags_value": PolicyFlagsValue,
    "ct_key": CtKey,
    "ct_value": CtValue,
    "ct_owner": CtOwner,
    "ct_count": CtCount,
    "frag_key": FragKey,
    "frag_value": FragValue,
    "counter_value": CounterValue,
    "config_value": ConfigValue,
    "flow_event": FlowEvent,
    "event_bucket": EventBucket,
}


class L7PortKey(ct.Structure):
    """l7_ports key: an L7-enforced TCP port of a local endpoint's address, as a server
    (kind L7_SERVER) or as a client (L7_CLIENT: its connections to that port)."""
    _fields_ = [("family", ct.c_uint8), ("kind", ct.c_uint8),
                ("port", ct.c_uint16),  # network order
                ("addr", ct.c_uint8 * 16)]


L7_SERVER, L7_CLIENT = 0, 1


class L7PortValue(ct.Structure):
    _fields_ = [("identity", ct.c_uint32)]


class L7Host(ct.Structure):
    _fields_ = [("ifindex", ct.c_uint32), ("mac", ct.c_uint8 * 6), ("pad", ct.c_uint8 * 2)]
