"""Policy trace: what would the policy do with one connection, and why.

The source's egress and the destination's ingress are each looked up exactly as the
datapath does (mapstate.lookup); the connection is allowed when both allow. Only
workloads (label selectors) have policy; CIDR and entity peers are not enforced.
"""
from __future__ import annotations

from .api.entity import RESERVED
from .api.rule import Policy
from .compiler import Compiler
from .identity import IdentityAllocator, most_specific, reserved_identities
from .mapstate import EGRESS, INGRESS, PROTO_NAMES, lookup
from .sel import PeerSpec


class Tracer:
    def __init__(self, policies: list[Policy], enforcement: str = "default"):
        self.compiler = Compiler(enforcement)
        self.alloc = IdentityAllocator()
        self.cidr_ids = {}
        for ident in reserved_identities():
            self.compiler.add_identity(ident)
        for prefix in sorted({n for p in policies for r in p.rules for n in _prefixes(r)},
                             key=lambda n: (n.version, n.network_address, n.prefixlen)):
            ident = self.alloc.cidr(prefix)
            self.cidr_ids[prefix] = ident.id
            self.compiler.add_identity(ident)
        for p in policies:
            self.compiler.set_policy(p)

    def identity_of(self, spec: PeerSpec) -> int:
        if spec.kind == "entity":
            return RESERVED[spec.entity]
        if spec.kind == "cidr":
            return most_specific(self.cidr_ids, spec.prefix) or RESERVED["world"]
        ident = self.alloc.workload(spec.labels)
        if ident.id not in self.compiler.local_ids:
            self.compiler.add_identity(ident, local=True)
        return ident.id

    def trace(self, src: PeerSpec, dst: PeerSpec, proto: int, port: int) -> dict:
        sid, did = self.identity_of(src), self.identity_of(dst)
        egress = self._side(src, sid, did, EGRESS, proto, port)
        ingress = self._side(dst, did, sid, INGRESS, proto, port)
        allowed = egress["verdict"] == "allow" and ingress["verdict"] == "allow"
        return {
            "verdict": "allow" if allowed else "deny",
            "src": {"selector": str(src), "identity": sid},
            "dst": {"selector": str(dst), "identity": did},
            "port": f"{port}/{PROTO_NAMES[proto]}",
            "egress": egress, "ingress": ingress,
        }

    def _side(self, spec: PeerSpec, local: int, peer: int, direction: int, proto: int,
              port: int) -> dict:
        dname = "egress" if direction == EGRESS else "ingress"
        if spec.kind != "workload":
            return {"verdict": "allow", "enforced": False, "reason": f"{spec} has no {dname} policy",
                    "policies": [], "rules": []}
        result, keys = lookup(self.compiler.entries, self.compiler.flags, local, peer,
                              direction, proto, port)
        c = self.compiler
        if result == "not-enforced":
            return {"verdict": "allow", "enforced": False, "policies": [], "rules": [],
                    "reason": f"no policy selecting {spec} has {dname} rules"}
        if result == "default-deny":
            pols = sorted({r.ref.display for r in c.rules_for(local) if r.wants_default_deny(dname)})
            return {"verdict": "deny", "enforced": True, "policies": pols, "rules": [],
                    "reason": f"default deny: no {dname} rule allows it"}
        deny = result == "deny"
        if not keys:  # enforced without default deny, and nothing matched
            return {"verdict": "allow", "enforced": True, "policies": [], "rules": [],
                    "reason": f"{dname} default deny is disabled (enableDefaultDeny) and no rule matched"}
        pols = sorted({p for k in keys for p in c.entries[k].policies if c.entries[k].deny == deny})
        rules = [{"policy": cl.policy, "rule": cl.peer_rule.path, "verdict": "deny" if d else "allow"}
                 for cl, d in c.explain(local, peer, direction, proto, port) if d == deny]
        return {"verdict": "deny" if deny else "allow", "enforced": True, "policies": pols,
                "rules": rules, "reason": ("denied by a deny rule" if deny else "allowed by rule")}


def _prefixes(rule):
    for items in (rule.ingress, rule.egress, rule.ingress_deny, rule.egress_deny):
        for pr in items:
            for c in pr.cidrs:
                yield from c.prefixes()
