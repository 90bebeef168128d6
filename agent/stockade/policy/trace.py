"""Policy trace: what would the policy do with one connection, and why.

The source's egress and the destination's ingress are each looked up exactly as the
datapath does (evaluate.Evaluator, mapstate.lookup); the connection is allowed when both
allow. Only identities local to the host have policy there: CIDR and entity peers (and,
live, other hosts' workloads) are not enforced on this side.

A CIDR side stands for every address in its prefix. Prefixes with identities of their
own inside it (an ``except``, a narrower rule, live: an ipcache entry) split it into
parts; when the parts get different verdicts the answer is ``partial``, with the verdict
of each part.

One function, ``trace``, answers for every caller: the offline ``Tracer`` (policy files,
identities made up from the selectors) and the agent's live trace (its own engine and
identities) only differ in how a selector becomes an identity (a ``World``).
"""
from __future__ import annotations

import ipaddress
from typing import Iterable, Protocol

from ..errors import SelectorError
from ..l7.rules import HTTPRequest, first_match, rule_dict, rules_for, sort_rules
from .api.cidr import Network, inside
from .api.entity import RESERVED
from .api.rule import Policy
from .engine import PolicyEngine
from .evaluate import Evaluator
from .identity import IdentityAllocator, most_specific, reserved_identities
from .mapstate import EGRESS, INGRESS, PROTO_NAMES, PROTO_TCP
from .sel import PeerSpec


class World(Protocol):
    engine: PolicyEngine

    def identity_of(self, spec: PeerSpec) -> int: ...

    def prefixes(self) -> Iterable[Network]:
        """Prefixes that have identities of their own (they split a CIDR side)."""


def trace(world: World, src: PeerSpec, dst: PeerSpec, proto: int, port: int,
          http: HTTPRequest | None = None) -> dict:
    """The verdict for one connection (and, given ``http``, one HTTP request on it), in
    the JSON shape the CLI and the API print."""
    side = "dst" if dst.kind == "cidr" and src.kind != "cidr" else (
        "src" if src.kind == "cidr" and dst.kind != "cidr" else None)
    parts = _parts(world, dst if side == "dst" else src) if side else []
    if len(parts) <= 1:
        return _trace_one(world, src, dst, proto, port, http)
    results, out = [], []
    for spec, desc in parts:
        r = _trace_one(world, src if side == "dst" else spec, spec if side == "dst" else dst,
                       proto, port, http)
        results.append(r)
        reasons = "; ".join(f"{d}: {r[d]['reason']}" for d in ("egress", "ingress"))
        out.append({**desc, "verdict": r["verdict"], "reason": reasons})
    result = dict(results[0])
    result["src"] = {"selector": str(src), "identity": result["src"]["identity"]}
    result["dst"] = {"selector": str(dst), "identity": result["dst"]["identity"]}
    if len({r["verdict"] for r in results}) > 1:
        result["verdict"] = "partial"
    result["parts"] = out
    return result


def _parts(world: World, spec: PeerSpec) -> list[tuple[PeerSpec, dict]]:
    """A CIDR spec split by the prefixes inside it: [(spec of the part, {"cidr",
    "except"})]."""
    net = ipaddress.ip_network(spec.prefix)
    inner = [p for p in world.prefixes() if p != net and inside(p, net)]
    out = []
    for part in [net] + sorted(inner, key=lambda n: (n.network_address, n.prefixlen)):
        holes = [p for p in inner if p != part and inside(p, part)]
        top = [h for h in holes if not any(o != h and inside(h, o) for o in holes)]
        desc: dict = {"cidr": str(part)}
        if top:
            desc["except"] = [str(h) for h in sorted(top, key=lambda n: n.network_address)]
        out.append((PeerSpec("cidr", prefix=str(part)), desc))
    return out


def _trace_one(world: World, src: PeerSpec, dst: PeerSpec, proto: int, port: int,
               http: HTTPRequest | None = None) -> dict:
    sid, did = world.identity_of(src), world.identity_of(dst)
    ev = Evaluator(world.engine.entries, world.engine.flags, world.engine.local_ids)
    egress = _side(world.engine, ev, src, sid, did, EGRESS, proto, port)
    ingress = _side(world.engine, ev, dst, did, sid, INGRESS, proto, port)
    if proto == PROTO_TCP:
        # both sides' HTTP rules must pass (the proxy judges them in one pass)
        for side, local, peer, direction in ((egress, sid, did, EGRESS), (ingress, did, sid, INGRESS)):
            if side["verdict"] == "allow":
                _http_side(world.engine, side, local, peer, port, http, direction)
    allowed = egress["verdict"] == "allow" and ingress["verdict"] == "allow"
    return {
        "verdict": "allow" if allowed else "deny",
        "src": {"selector": str(src), "identity": sid},
        "dst": {"selector": str(dst), "identity": did},
        "port": f"{port}/{PROTO_NAMES[proto]}",
        "egress": egress, "ingress": ingress,
    }


def _http_side(engine: PolicyEngine, side: dict, local: int, peer: int, port: int,
               http: HTTPRequest | None, direction: int = INGRESS) -> None:
    """The proxy's part of a side the datapath allows: the HTTP rules of the port (as
    the proxy gets them: the server's ingress rules, the client's egress rules), and for
    ``http`` whether one of them passes it."""
    rules = rules_for(engine.l7, local, port, peer, direction)
    if rules is None:
        if http is not None and direction == INGRESS:   # egress without rules: silent
            side["http"] = {"enforced": False, "rules": [], "matched": None}
            side["reason"] += f"; port {port} has no HTTP rules here: every request passes"
        return
    rules_list = sort_rules(rules)
    out: dict = {"enforced": True, "rules": [rule_dict(r) for r in rules_list], "matched": None}
    side["http"] = out
    if http is None:
        side["reason"] += f"; HTTP rules apply on port {port} (give a request to check it)"
        return
    out["request"] = {"method": http.method, "path": http.path, "host": http.host,
                      "headers": [f"{k}: {v}" for k, v in http.headers]}
    hit = first_match(rules_list, http)
    if hit is None:
        side["verdict"] = "deny"
        side["reason"] = (f"HTTP: no rule of port {port} matches {http.method} {http.path}: "
                          "the proxy answers 403")
        return
    out["matched"] = rule_dict(hit)
    side["reason"] += f"; HTTP: {http.method} {http.path} matches a rule"


def _side(engine: PolicyEngine, ev: Evaluator, spec: PeerSpec, local: int, peer: int,
          direction: int, proto: int, port: int) -> dict:
    dname = "egress" if direction == EGRESS else "ingress"
    if local not in engine.local_ids:
        return {"verdict": "allow", "enforced": False, "reason": f"{spec} has no {dname} policy here",
                "policies": [], "rules": []}
    result, keys = ev.side(local, peer, direction, proto, port)
    if result == "not-enforced":
        return {"verdict": "allow", "enforced": False, "policies": [], "rules": [],
                "reason": f"no policy selecting {spec} has {dname} rules"}
    if result == "default-deny":
        pols = sorted({r.ref.display for r in engine.rules_for(local) if r.wants_default_deny(dname)})
        return {"verdict": "deny", "enforced": True, "policies": pols, "rules": [],
                "reason": f"default deny: no {dname} rule allows it"}
    deny = result == "deny"
    if not keys:  # enforced without default deny, and nothing matched
        return {"verdict": "allow", "enforced": True, "policies": [], "rules": [],
                "reason": f"{dname} default deny is disabled (enableDefaultDeny) and no rule matched"}
    entries = engine.entries
    pols = sorted({p for k in keys for p in entries[k].policies if entries[k].deny == deny})
    rules = [{"policy": cl.policy, "rule": cl.peer_rule.path, "verdict": "deny" if d else "allow"}
             for cl, d in engine.explain(local, peer, direction, proto, port) if d == deny]
    return {"verdict": "deny" if deny else "allow", "enforced": True, "policies": pols,
            "rules": rules, "reason": ("denied by a deny rule" if deny else "allowed by rule")}


class Tracer:
    """Offline: the policies of some files, and identities made up from the selectors
    (a label selector is a workload of this host with exactly those labels)."""

    def __init__(self, policies: list[Policy], enforcement: str = "default"):
        self.engine = PolicyEngine(enforcement)
        self.alloc = IdentityAllocator()
        self.cidr_ids: dict[Network, int] = {}
        tx = self.engine.begin()
        for ident in reserved_identities():
            tx.set_identity(ident)
        for prefix in sorted(set().union(*map(prefixes_named, policies)),
                             key=lambda n: (n.version, n.network_address, n.prefixlen)):
            ident = self.alloc.cidr(prefix)
            self.cidr_ids[prefix] = ident.id
            tx.set_identity(ident)
        tx.set_policies(policies)
        self.engine.commit(tx)

    def prefixes(self) -> Iterable[Network]:
        return self.cidr_ids

    def identity_of(self, spec: PeerSpec) -> int:
        if spec.kind == "entity":
            return RESERVED[spec.entity]
        if spec.kind == "cidr":
            return most_specific(self.cidr_ids, spec.prefix) or RESERVED["world"]
        if spec.kind != "workload":
            raise SelectorError(f"{spec}: only the live trace (--live) knows endpoints")
        ident = self.alloc.workload(spec.labels)
        if ident.id not in self.engine.local_ids:
            tx = self.engine.begin()
            tx.set_identity(ident, local=True)
            self.engine.commit(tx)
        return ident.id

    def trace(self, src: PeerSpec, dst: PeerSpec, proto: int, port: int,
              http: HTTPRequest | None = None) -> dict:
        return trace(self, src, dst, proto, port, http)


def prefixes_named(p) -> frozenset:
    """Every CIDR prefix policy ``p`` names, computed once per Policy object (its rules do
    not change)."""
    cached = p.__dict__.get("_prefixes_named")
    if cached is None:
        cached = p.__dict__["_prefixes_named"] = frozenset(
            n for r in p.rules for n in policy_prefixes(r))
    return cached


def policy_prefixes(rule):
    """Every CIDR prefix a rule names (its CIDRs and their excepts)."""
    for pr in rule.peer_rules():
        for c in pr.cidrs:
            yield from c.prefixes()
