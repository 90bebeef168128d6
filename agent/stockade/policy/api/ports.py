"""L4 parts of a rule: ``toPorts`` (ports, protocols, HTTP rules) and ``icmps``."""
from __future__ import annotations

from dataclasses import dataclass

from ..mapstate import PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP

PROTOCOLS = {"TCP": (PROTO_TCP,), "UDP": (PROTO_UDP,), "SCTP": (PROTO_SCTP,),
             "ANY": (PROTO_TCP, PROTO_UDP, PROTO_SCTP)}

ICMP4_TYPES = {
    "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
    "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11,
    "ParameterProblem": 12, "Timestamp": 13, "TimestampReply": 14, "Photuris": 40,
    "ExtendedEchoRequest": 42, "ExtendedEchoReply": 43,
}
ICMP6_TYPES = {
    "DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3, "ParameterProblem": 4,
    "EchoRequest": 128, "EchoReply": 129, "MulticastListenerQuery": 130,
    "MulticastListenerReport": 131, "MulticastListenerDone": 132, "RouterSolicitation": 133,
    "RouterAdvertisement": 134, "NeighborSolicitation": 135, "NeighborAdvertisement": 136,
    "RedirectMessage": 137, "RouterRenumbering": 138, "ICMPNodeInformationQuery": 139,
    "ICMPNodeInformationResponse": 140, "InverseNeighborDiscoverySolicitation": 141,
    "InverseNeighborDiscoveryAdvertisement": 142, "HomeAgentAddressDiscoveryRequest": 144,
    "HomeAgentAddressDiscoveryReply": 145, "MobilePrefixSolicitation": 146,
    "MobilePrefixAdvertisement": 147, "DuplicateAddressRequestCodeSuffix": 157,
    "DuplicateAddressConfirmationCodeSuffix": 158, "ExtendedEchoRequest": 160,
    "ExtendedEchoReply": 161,
}
ICMP_FAMILIES = {"IPv4": (PROTO_ICMP, ICMP4_TYPES), "IPv6": (PROTO_ICMPV6, ICMP6_TYPES)}


@dataclass(frozen=True)
class PortProtocol:
    """``port`` 0 means every port of ``protocol``; ``end_port`` makes a range."""

    port: int
    end_port: int | None
    protocol: str  # TCP, UDP, SCTP or ANY

    @property
    def range(self) -> tuple[int, int]:
        if self.port == 0:
            return 0, 65535
        return self.port, self.end_port or self.port

    @property
    def proto_numbers(self) -> tuple[int, ...]:
        return PROTOCOLS[self.protocol]

    def __str__(self) -> str:
        lo, hi = self.range
        ports = "all" if (lo, hi) == (0, 65535) else (str(lo) if lo == hi else f"{lo}-{hi}")
        return f"{ports}/{self.protocol}"


@dataclass(frozen=True)
class HTTPRule:
    """One item of ``rules.http``: enforced by the host's proxy (stockade.l7)."""

    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PortRule:
    ports: tuple[PortProtocol, ...]
    http: tuple[HTTPRule, ...] = ()


@dataclass(frozen=True)
class ICMPField:
    family: str  # IPv4 or IPv6
    type: int

    @property
    def proto(self) -> int:
        return ICMP_FAMILIES[self.family][0]

    def __str__(self) -> str:
        return f"{self.type}/{'icmp' if self.family == 'IPv4' else 'icmpv6'}"
