"""Readable descriptions of rules and of compiled deltas, for dry runs and reviews."""
from __future__ import annotations

from ..policy.api.rule import PeerRule, Policy, Rule
from ..policy.mapstate import DIRECTION_NAMES, Delta, Key

SAMPLE = 50


def describe_peers(pr: PeerRule) -> str:
    if pr.empty_fields:
        return "no peer (" + ", ".join(f"{f}: []" for f in pr.empty_fields) + " selects none)"
    parts = [f"endpoints {s}" for s in pr.endpoints]
    parts += [f"cidr {c}" for c in pr.cidrs]
    parts += [f"entity {e}" for e in pr.entities]
    return ", ".join(parts) if parts else "any peer"


def describe_l4(pr: PeerRule) -> str:
    ports = [str(p) for r in pr.to_ports for p in r.ports]
    ports += [str(i) for i in pr.icmps]
    return ", ".join(ports) if ports else "any port"


def describe_rule(rule: Rule) -> list[str]:
    """One line per clause: ``db: ingress allow {app=db} <- endpoints {app=web} on 5432/TCP``."""
    out = []
    name = rule.ref.display
    for label, items, arrow in (("ingress allow", rule.ingress, "<-"), ("ingress deny", rule.ingress_deny, "<-"),
                                ("egress allow", rule.egress, "->"), ("egress deny", rule.egress_deny, "->")):
        for pr in items:
            if pr.selects_nothing:
                why = f" ({describe_peers(pr)})" if pr.empty_fields else ""
                out.append(f"{name}: {label.split()[0]} default-deny for {rule.endpoint_selector}{why}")
            else:
                out.append(f"{name}: {label} {rule.endpoint_selector} {arrow} {describe_peers(pr)} "
                           f"on {describe_l4(pr)}")
    return out


def policy_lines(policies) -> set[str]:
    return {line for p in policies for r in p.rules for line in describe_rule(r)}


def describe_key(op: str, key: Key, entry=None) -> dict:
    return {"op": op, "local": key.local, "peer": key.peer,
            "direction": DIRECTION_NAMES[key.direction], "port": key.describe(),
            "verdict": entry.verdict if entry is not None else None}


def summarize(old: dict, new: dict, delta: Delta) -> dict:
    """old/new: {PolicyRef: Policy}."""
    added = sorted(r.display for r in new.keys() - old.keys())
    removed = sorted(r.display for r in old.keys() - new.keys())
    changed = sorted(r.display for r in new.keys() & old.keys() if new[r].document != old[r].document)
    old_lines, new_lines = policy_lines(old.values()), policy_lines(new.values())
    sample = [describe_key("+", k, e) for k, e in sorted(delta.adds.items())[:SAMPLE]]
    sample += [describe_key("-", k) for k in sorted(delta.removes)[:SAMPLE]]
    return {"added": added, "removed": removed, "changed": changed,
            "rules": {"added": sorted(new_lines - old_lines), "removed": sorted(old_lines - new_lines)},
            "entries": {"added": len(delta.adds), "removed": len(delta.removes),
                        "flags": len(delta.flags), "sample": sample}}


def merge(into: Delta, more: Delta) -> Delta:
    """Sequential composition: applying ``into`` then ``more`` equals applying the result."""
    for k in more.removes:
        into.adds.pop(k, None)
        into.removes.add(k)
    for k, v in more.adds.items():
        into.removes.discard(k)
        into.adds[k] = v
    into.flags.update(more.flags)
    return into


def policies_by_ref(policies: list[Policy]) -> dict:
    return {p.ref: p for p in policies}
