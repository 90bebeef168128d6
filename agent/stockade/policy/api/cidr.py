"""CIDR peers: ``fromCIDR``/``toCIDR`` and ``fromCIDRSet``/``toCIDRSet`` with ``except``."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def inside(inner: Network, outer: Network) -> bool:
    """``inner`` lies in ``outer`` (same family; False across families)."""
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CIDRRule:
    """Selects addresses inside ``cidr`` and outside every prefix in ``excepts``; or,
    with ``group`` (``cidrGroupRef``), the CIDRs of the inventory service of that name."""

    cidr: Network | None
    excepts: tuple[Network, ...] = ()
    group: str = ""

    def prefixes(self) -> tuple[Network, ...]:
        """Every prefix this rule needs an identity for (a group's come from its service)."""
        if self.group or self.cidr is None:
            return ()
        return (self.cidr,) + self.excepts

    def selects(self, prefix: Network) -> bool:
        """Does this rule select the CIDR identity of ``prefix`` (a prefix that is at
        least as specific as the rule's and outside its exceptions)?"""
        if self.group or self.cidr is None or not inside(prefix, self.cidr):
            return False
        return not any(inside(prefix, e) for e in self.excepts)

    def __str__(self) -> str:
        if self.group:
            return f"group {self.group}"
        if not self.excepts:
            return str(self.cidr)
        return f"{self.cidr} except {', '.join(map(str, self.excepts))}"


def parse_network(text: str) -> Network:
    """A prefix or a bare address (a host prefix). Host bits must be zero."""
    if "/" not in text:
        addr = ipaddress.ip_address(text)
        return ipaddress.ip_network(f"{addr}/{addr.max_prefixlen}")
    return ipaddress.ip_network(text, strict=True)
