"""Command-line selectors (SEL) and port specs, shared by trace and policy tests.

SEL: ``cidr:<prefix>``, ``entity:<name>``, ``endpoint:<name>`` (an agent's endpoint: the
live trace only), or ``k=v,k=v`` labels (a key may carry a source prefix,
``container:app=web``). PORT: ``80/tcp``, ``53/udp``, ``9/sctp``,
``8/icmp`` (ICMP type), ``128/icmpv6``.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Mapping

from ..errors import InvalidRequest, SelectorError
from .api.entity import RESERVED
from .labels import LabelSet, check_key, check_value, parse_pairs, split_source
from .mapstate import PROTO_ICMP, PROTO_ICMPV6, PROTO_NUMBERS


@dataclass(frozen=True)
class PeerSpec:
    kind: str                   # "workload", "cidr", "entity" or "endpoint"
    labels: LabelSet = LabelSet()
    prefix: str = ""
    entity: str = ""
    name: str = ""              # endpoint

    def __str__(self) -> str:
        if self.kind == "cidr":
            return f"cidr:{self.prefix}"
        if self.kind == "entity":
            return f"entity:{self.entity}"
        if self.kind == "endpoint":
            return f"endpoint:{self.name}"
        return ",".join(f"{l.key}={l.value}" if l.source == "unspec" else str(l) for l in self.labels)


def parse_sel(value: str | Mapping[str, str]) -> PeerSpec:
    if isinstance(value, Mapping):
        items = {str(k): "" if v is None else str(v) for k, v in value.items()}
        return _labels(items, str(dict(value)))
    if not isinstance(value, str) or not value.strip():
        raise SelectorError(f"{value!r}: a selector is cidr:<prefix>, entity:<name>, "
                            "endpoint:<name> or k=v,...")
    text = value.strip()
    if text.startswith("cidr:"):
        try:
            net = ipaddress.ip_network(text[5:], strict=False)
        except ValueError as exc:
            raise SelectorError(f"{text!r}: {exc}") from exc
        return PeerSpec("cidr", prefix=str(net))
    if text.startswith("entity:"):
        name = text[7:]
        if name not in RESERVED:
            raise SelectorError(f"{text!r}: entity must be one of {', '.join(RESERVED)}")
        return PeerSpec("entity", entity=name)
    if text.startswith("endpoint:"):
        name = text[9:].strip()
        if not name:
            raise SelectorError(f"{text!r}: endpoint:<name> needs a name")
        return PeerSpec("endpoint", name=name)
    try:
        items = {k: v or "" for k, v in parse_pairs(text, text, bare=False)}
    except InvalidRequest as exc:
        raise SelectorError(str(exc)) from None
    return _labels(items, text)


def _labels(items: dict[str, str], text: str) -> PeerSpec:
    if not items:
        raise SelectorError(f"{text!r}: no labels given")
    for key, val in items.items():
        why = check_key(key) or check_value(val, split_source(key)[0])
        if why:
            raise SelectorError(f"{text!r}: {why}")
    return PeerSpec("workload", labels=LabelSet.from_mapping(items, "unspec"))


def parse_port(text: str) -> tuple[int, int]:
    """``80/tcp`` -> (6, 80). The number is the ICMP type for icmp/icmpv6."""
    num, sep, proto = str(text).strip().partition("/")
    proto = proto.lower()
    if not sep or proto not in PROTO_NUMBERS or proto == "any" or not (num.isascii() and num.isdigit()):
        raise SelectorError(f"{text!r}: expected PORT/PROTO, e.g. 80/tcp, 53/udp, 9/sctp, "
                            "8/icmp, 128/icmpv6")
    n = int(num)
    limit = 255 if PROTO_NUMBERS[proto] in (PROTO_ICMP, PROTO_ICMPV6) else 65535
    if n > limit:
        raise SelectorError(f"{text!r}: {n} is out of range (0-{limit})")
    return PROTO_NUMBERS[proto], n
