"""Sanitized policy rules: what the engine sees after validation.

One CiliumNetworkPolicy document carries one ``spec`` or a list of ``specs``; each spec
becomes a ``Rule``. Peer rules keep their index in the document so that a trace can name
the rule that decided (``spec.ingress[1]``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from .cidr import CIDRRule
from .ports import ICMPField, PortRule
from .selector import EndpointSelector

CNP = "CiliumNetworkPolicy"
CCNP = "CiliumClusterwideNetworkPolicy"
KINDS = (CNP, CCNP)
DIRECTION_FIELDS = ("ingress", "egress", "ingressDeny", "egressDeny")


class PolicyRef(NamedTuple):
    """A policy is identified by (kind, namespace, name)."""

    kind: str
    namespace: str
    name: str

    @property
    def display(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def to_dict(self) -> dict:
        return {"kind": self.kind, "namespace": self.namespace or None, "name": self.name}


@dataclass(frozen=True)
class PeerRule:
    """One element of ``ingress``/``egress``/``ingressDeny``/``egressDeny``.

    No peer field (endpoints, cidrs, entities) means every peer, but only if the rule has
    ``toPorts`` or ``icmps``; an element with neither selects nothing (it still makes its
    direction default-deny). No ``toPorts``/``icmps`` means every protocol and port.

    A peer field given as an empty list (``fromEndpoints: []``) is not the same as an
    absent one: as in Cilium, it selects no peer at all, whatever else the element says.
    ``empty_fields`` names such fields, so the difference survives to the compiler.
    """

    path: str  # e.g. "spec.ingress[0]"
    endpoints: tuple[EndpointSelector, ...] = ()
    cidrs: tuple[CIDRRule, ...] = ()
    entities: tuple[str, ...] = ()
    to_ports: tuple[PortRule, ...] = ()
    icmps: tuple[ICMPField, ...] = ()
    empty_fields: tuple[str, ...] = ()  # peer fields given as [] (e.g. "fromEndpoints")

    @property
    def has_peers(self) -> bool:
        return bool(self.endpoints or self.cidrs or self.entities)

    @property
    def has_l4(self) -> bool:
        return bool(self.to_ports or self.icmps)

    @property
    def selects_nothing(self) -> bool:
        return bool(self.empty_fields) or (not self.has_peers and not self.has_l4)


@dataclass(frozen=True)
class Rule:
    ref: PolicyRef
    path: str  # "spec" or "specs[2]"
    endpoint_selector: EndpointSelector
    ingress: tuple[PeerRule, ...] = ()
    egress: tuple[PeerRule, ...] = ()
    ingress_deny: tuple[PeerRule, ...] = ()
    egress_deny: tuple[PeerRule, ...] = ()
    # None: not set, which means True for each direction that has rules.
    default_deny_ingress: bool | None = None
    default_deny_egress: bool | None = None
    description: str = ""
    labels: tuple[str, ...] = ()

    def clauses(self) -> Iterator[tuple[str, bool, PeerRule]]:
        """Every element of the four direction lists: (direction, deny, element), in the
        order ingress, ingressDeny, egress, egressDeny."""
        for direction, deny, items in (("ingress", False, self.ingress),
                                       ("ingress", True, self.ingress_deny),
                                       ("egress", False, self.egress),
                                       ("egress", True, self.egress_deny)):
            for pr in items:
                yield direction, deny, pr

    def peer_rules(self) -> Iterator[PeerRule]:
        return (pr for _, _, pr in self.clauses())

    def has_rules(self, direction: str) -> bool:
        if direction == "ingress":
            return bool(self.ingress or self.ingress_deny)
        return bool(self.egress or self.egress_deny)

    def wants_default_deny(self, direction: str) -> bool:
        flag = self.default_deny_ingress if direction == "ingress" else self.default_deny_egress
        return self.has_rules(direction) and (flag is None or flag)


@dataclass
class Policy:
    """One document: its rules, where it came from and its original text."""

    ref: PolicyRef
    rules: list[Rule]
    source: str = ""          # file path, "inline", "inventory:..." ...
    # The document as compact JSON with sorted keys (encode_document): a tenth of the
    # memory of its dicts, and what the state files store; ``document`` decodes it.
    document_json: bytes = b"{}"
    has_l7: bool = False
    description: str = ""     # the document's top-level ``description``
    # Set when a stored policy no longer passes this version's validation: it is still
    # compiled the way the version that accepted it did (see validation.sanitize_document).
    problems: tuple[str, ...] = ()

    @property
    def document(self) -> dict:
        """The document as it was given (a new copy on every call)."""
        return json.loads(self.document_json)


def encode_document(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
