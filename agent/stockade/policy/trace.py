"""Policy trace: what would the policy do with one connection, and why.

The source's egress and the destination's ingress are each looked up exactly as the
datapath does (mapstate.lookup); the connection is allowed when both allow. Only
workloads (label selectors) have policy; CIDR and entity peers are not enforced.

A CIDR side stands for every address in its prefix. The policies' own prefixes split it
into parts (a more specific prefix inside it has an identity of its own, e.g. an
``except``); when the parts get different verdicts the answer is ``partial``, with the
verdict of each part.
"""
from __future__ import annotations

import ipaddress

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
        """The verdict for one connection. A CIDR side facing a workload may be split
        into parts (``_parts``): then ``parts`` lists each with its verdict, and the
        verdict is ``partial`` when they differ."""
        side = "dst" if dst.kind == "cidr" and src.kind == "workload" else (
            "src" if src.kind == "cidr" and dst.kind == "workload" else None)
        parts = self._parts(dst if side == "dst" else src) if side else []
        if len(parts) <= 1:
            return self._trace_one(src, dst, proto, port)
        results, out = [], []
        for spec, desc in parts:
            r = self._trace_one(src if side == "dst" else spec, spec if side == "dst" else dst,
                                proto, port)
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

    def _parts(self, spec: PeerSpec) -> list[tuple[PeerSpec, dict]]:
        """A CIDR spec split by the policies' prefixes inside it: [(spec of the part,
        {"cidr", "except"})]; one part when no policy prefix lies inside it."""
        net = ipaddress.ip_network(spec.prefix)
        inner = [p for p in self.cidr_ids if p.version == net.version and p != net and p.subnet_of(net)]
        out = []
        for part in [net] + sorted(inner, key=lambda n: (n.network_address, n.prefixlen)):
            holes = [p for p in inner if p != part and p.subnet_of(part)]
            top = [h for h in holes if not any(o != h and h.subnet_of(o) for o in holes)]
            desc = {"cidr": str(part)}
            if top:
                desc["except"] = [str(h) for h in sorted(top, key=lambda n: n.network_address)]
            out.append((PeerSpec("cidr", prefix=str(part)), desc))
        return out

    def _trace_one(self, src: PeerSpec, dst: PeerSpec, proto: int, port: int) -> dict:
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
