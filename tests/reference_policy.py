"""A deliberately naive policy evaluator, written from Cilium's documented semantics.

It answers one question -- what does policy do with this connection, on this side -- by
reading the parsed policies as data and walking every rule, with no selector cache, no
map state and no code shared with the engine. Property tests compare the engine with it
(tests/test_compiler_props.py); it must stay independent: it imports only the parsed API
types from ``stockade.policy`` and never calls their matching helpers.

The semantics, as Cilium documents them (policy language L3/L4, deny policies, entities,
CIDR with ``except``, ``enableDefaultDeny``, enforcement modes), with Stockade's documented
deviations (docs/policy.md, docs/services.md):

- A rule applies to a workload when its ``endpointSelector`` selects it. Only workloads
  have policy; a reserved or CIDR identity on the local side is never enforced.
- A direction is enforced when an applying rule has rules in it (``ingress`` or
  ``ingressDeny``; ``egress`` or ``egressDeny``), or in mode ``always``; never in mode
  ``never``. An enforced direction is default-deny unless every applying rule with rules
  in it sets ``enableDefaultDeny`` false for it (``always``: always default-deny).
- A deny that matches wins over any allow; then any matching allow allows; then the
  direction's default.
- A rule element (one item of a direction list) selects its peers through
  ``fromEndpoints``/``fromCIDR``/``fromCIDRSet``/``fromEntities`` (``to...`` for egress):
  the union of what each names. With no peer field but ``toPorts``/``icmps`` it selects
  every peer; with neither it selects nothing. A peer field given as an explicitly empty
  list makes the whole element select nothing (issue 12), whatever else it has.
- Label selectors: ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists,
  DoesNotExist) all hold. A key with a source (``container:app``) matches labels of that
  source only; ``any:`` or no source, labels of every source. The keys ``namespace`` and
  ``io.kubernetes.pod.namespace`` are one key, whatever the source (issue 12). An empty
  selector ``{}`` selects every workload and nothing else; a selector selects a reserved
  identity only when it names a ``reserved:`` key; a CIDR identity is selected by its
  labels (an inventory service's CIDRs carry the service's labels), and only by a
  selector with a positive requirement (In, Exists): never for lacking a label.
- Entities: ``all`` is every peer; ``world`` the world identity and every CIDR identity;
  ``cluster`` every workload and every reserved identity but world; the others (host,
  remote-node, health, init, unmanaged) their reserved identity.
- CIDR peers select the CIDR identities whose prefix lies inside the CIDR and inside no
  ``except``; a /0 also selects the world identity (what no known prefix covers). A
  ``cidrGroupRef`` selects the CIDR identities carrying ``service:service=<name>``.
- L4: no ``toPorts``/``icmps`` means every protocol and port, ICMP included. A port rule
  matches its protocol (ANY: TCP, UDP and SCTP) and ``port``..``endPort`` (port 0: every
  port); an ICMP field matches its family's protocol and type. A non-first fragment
  (no port) matches only rules that name no port: no L4 at all, or port 0.

Verdicts are those of ``stockade.policy.mapstate.lookup``: ``allow``, ``deny`` (a deny
rule matched), ``default-deny`` or ``not-enforced``.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from stockade.policy.api.rule import PeerRule, Policy, Rule
from stockade.policy.api.selector import EndpointSelector, Requirement

TCP, UDP, SCTP, ICMP, ICMPV6 = 6, 17, 132, 1, 58
PROTOCOLS = {"TCP": {TCP}, "UDP": {UDP}, "SCTP": {SCTP}, "ANY": {TCP, UDP, SCTP}}
ICMP_PROTO = {"IPv4": ICMP, "IPv6": ICMPV6}

WORKLOAD, RESERVED, CIDR = "workload", "reserved", "cidr"
NAMESPACE_KEYS = {"namespace", "io.kubernetes.pod.namespace"}
PEER_FIELDS = {pre + name for pre in ("from", "to")
               for name in ("Endpoints", "CIDR", "CIDRSet", "Entities")}

ALLOW, DENY, DEFAULT_DENY, NOT_ENFORCED = "allow", "deny", "default-deny", "not-enforced"


@dataclass(frozen=True)
class Ident:
    """An identity as plain data. ``labels`` are (source, key, value) tuples; reserved
    identities carry ``("reserved", <entity name>, "")``."""

    id: int
    kind: str  # workload, reserved or cidr
    labels: tuple[tuple[str, str, str], ...] = ()
    prefix: str | None = None  # CIDR identities only

    def reserved_names(self) -> set[str]:
        return {key for source, key, _ in self.labels if source == "reserved"}


class Conn(NamedTuple):
    """One side of a connection: ``local`` is the workload whose policy is asked."""

    local: int
    peer: int
    direction: str  # ingress or egress
    proto: int
    port: int | None  # TCP/UDP/SCTP port or ICMP type; None: a non-first fragment


# labels ----------------------------------------------------------------------------
def _label_values(req: Requirement, labels) -> list[str]:
    if req.key in NAMESPACE_KEYS:
        return [v for _, k, v in labels if k in NAMESPACE_KEYS]
    return [v for s, k, v in labels if k == req.key and req.source in ("any", s)]


def _requirement_holds(req: Requirement, labels) -> bool:
    values = _label_values(req, labels)
    if req.operator == "In":
        return any(v in req.values for v in values)
    if req.operator == "NotIn":
        return all(v not in req.values for v in values)
    if req.operator == "Exists":
        return len(values) > 0
    if req.operator == "DoesNotExist":
        return len(values) == 0
    raise ValueError(f"unknown operator {req.operator!r}")


def selector_selects(sel: EndpointSelector, ident: Ident) -> bool:
    reqs = sel.requirements
    if not reqs:
        return ident.kind == WORKLOAD
    if ident.kind == RESERVED and not any(r.source == "reserved" for r in reqs):
        return False
    if ident.kind == CIDR and all(r.operator in ("NotIn", "DoesNotExist") for r in reqs):
        return False  # a CIDR identity is selected for labels it has, never for lacking one
    return all(_requirement_holds(r, ident.labels) for r in reqs)


# peers -----------------------------------------------------------------------------
def _inside(inner, outer) -> bool:
    if inner.version != outer.version or inner.prefixlen < outer.prefixlen:
        return False
    shift = inner.max_prefixlen - outer.prefixlen
    return int(inner.network_address) >> shift == int(outer.network_address) >> shift


def cidr_selects(rule, ident: Ident) -> bool:
    if rule.group:
        return ident.kind == CIDR and ("service", "service", rule.group) in ident.labels
    if ident.kind == RESERVED:
        return "world" in ident.reserved_names() and rule.cidr.prefixlen == 0
    if ident.kind != CIDR:
        return False
    prefix = ipaddress.ip_network(ident.prefix)
    return _inside(prefix, rule.cidr) and not any(_inside(prefix, e) for e in rule.excepts)


def entity_selects(entity: str, ident: Ident) -> bool:
    if entity == "all":
        return True
    if entity == "world":
        return ident.kind == CIDR or "world" in ident.reserved_names()
    if entity == "cluster":
        return ident.kind == WORKLOAD or (ident.kind == RESERVED and "world" not in ident.reserved_names())
    return ident.kind == RESERVED and entity in ident.reserved_names()


def explicitly_empty(policy: Policy, pr: PeerRule) -> tuple[str, ...]:
    """Peer fields written as ``[]``: from the parser when it records them (issue 12),
    else read from the policy's original document at the element's path."""
    recorded = getattr(pr, "empty_fields", None)
    if recorded is not None:
        return tuple(recorded)
    node = policy.document
    try:
        for part in pr.path.replace("]", "").replace("[", ".").split("."):
            node = node[int(part)] if part.isdigit() else node[part]
    except (KeyError, IndexError, TypeError):
        return ()  # a policy built without its document
    return tuple(f for f, v in node.items() if f in PEER_FIELDS and v == [])


def element_selects(policy: Policy, pr: PeerRule, ident: Ident) -> bool:
    if explicitly_empty(policy, pr):
        return False
    if pr.endpoints or pr.cidrs or pr.entities:
        return (any(selector_selects(s, ident) for s in pr.endpoints)
                or any(cidr_selects(c, ident) for c in pr.cidrs)
                or any(entity_selects(e, ident) for e in pr.entities))
    return bool(pr.to_ports or pr.icmps)


# L4 --------------------------------------------------------------------------------
def l4_matches(pr: PeerRule, proto: int, port: int | None) -> bool:
    if not pr.to_ports and not pr.icmps:
        return True
    for port_rule in pr.to_ports:
        for pp in port_rule.ports:
            if proto not in PROTOCOLS[pp.protocol]:
                continue
            if pp.port == 0:
                return True
            last = pp.end_port if pp.end_port else pp.port
            if port is not None and pp.port <= port <= last:
                return True
    return any(port is not None and proto == ICMP_PROTO[f.family] and port == f.type
               for f in pr.icmps)


# verdict ---------------------------------------------------------------------------
def _lists(rule: Rule, direction: str) -> tuple[tuple[PeerRule, ...], tuple[PeerRule, ...]]:
    if direction == "ingress":
        return rule.ingress, rule.ingress_deny
    if direction == "egress":
        return rule.egress, rule.egress_deny
    raise ValueError(f"direction must be ingress or egress, not {direction!r}")


def _default_deny_wanted(rule: Rule, direction: str) -> bool:
    flag = rule.default_deny_ingress if direction == "ingress" else rule.default_deny_egress
    return flag is not False


class Reference:
    """Policies, identities and an enforcement mode; ``verdict`` walks them every time."""

    def __init__(self, policies: Iterable[Policy], identities: Iterable[Ident],
                 mode: str = "default"):
        if mode not in ("default", "always", "never"):
            raise ValueError(f"mode must be default, always or never, not {mode!r}")
        self.policies = list(policies)
        self.identities = {i.id: i for i in identities}
        self.mode = mode

    def verdict(self, conn: Conn) -> str:
        local, peer = self.identities[conn.local], self.identities[conn.peer]
        if local.kind != WORKLOAD or self.mode == "never":
            return NOT_ENFORCED
        applying = [(p, r) for p in self.policies for r in p.rules
                    if selector_selects(r.endpoint_selector, local)]
        with_rules = [(p, r) for p, r in applying if any(_lists(r, conn.direction))]
        if self.mode == "always":
            default_deny = True
        elif not with_rules:
            return NOT_ENFORCED
        else:
            default_deny = any(_default_deny_wanted(r, conn.direction) for _, r in with_rules)

        def matching(p, elements):
            return any(element_selects(p, pr, peer) and l4_matches(pr, conn.proto, conn.port)
                       for pr in elements)

        if any(matching(p, _lists(r, conn.direction)[1]) for p, r in applying):
            return DENY
        if any(matching(p, _lists(r, conn.direction)[0]) for p, r in applying):
            return ALLOW
        return DEFAULT_DENY if default_deny else ALLOW

    def connection(self, src: int, dst: int, proto: int, port: int | None) -> str:
        """A new connection from ``src`` to ``dst``: allowed when the source's egress and
        the destination's ingress both let it through."""
        passes = (ALLOW, NOT_ENFORCED)
        egress = self.verdict(Conn(src, dst, "egress", proto, port))
        ingress = self.verdict(Conn(dst, src, "ingress", proto, port))
        return "allow" if egress in passes and ingress in passes else "deny"
