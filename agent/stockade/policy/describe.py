"""Rules and compiled changes in words: what the CLI, the API's dry runs and the web UI
show an operator."""
from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable

from .api.ports import HTTPRule
from .api.rule import PeerRule, Policy, Rule
from .countindex import CountIndex
from .mapstate import DIRECTION_NAMES, Delta, Key

SAMPLE = 50
ARROWS = {"ingress": "<-", "egress": "->"}


def describe_peers(pr: PeerRule) -> str:
    if pr.empty_fields:
        return "no peer (" + ", ".join(f"{f}: []" for f in pr.empty_fields) + " selects none)"
    parts = [f"endpoints {s}" for s in pr.endpoints]
    parts += [f"cidr {c}" for c in pr.cidrs]
    parts += [f"entity {e}" for e in pr.entities]
    return ", ".join(parts) if parts else "any peer"


def describe_http(rule: HTTPRule) -> str:
    parts = [v for v in (rule.method, rule.path) if v is not None]
    if rule.host is not None:
        parts.append(f"host {rule.host}")
    parts += [f"header {h}" for h in rule.headers]
    return " ".join(parts) or "any request"


def describe_l4(pr: PeerRule) -> str:
    """``5432/TCP``; with HTTP rules ``8080/TCP (HTTP: GET /api/.*; POST /submit header X)``."""
    ports = []
    for r in pr.to_ports:
        text = ", ".join(str(p) for p in r.ports)
        if r.http:
            text += " (HTTP: " + "; ".join(describe_http(h) for h in r.http) + ")"
        ports.append(text)
    ports += [str(i) for i in pr.icmps]
    return ", ".join(ports) if ports else "any port"


def describe_rule(rule: Rule) -> list[str]:
    """One line per clause: ``db: ingress allow {app=db} <- endpoints {app=web} on 5432/TCP``."""
    out = []
    name = rule.ref.display
    for direction, deny, pr in rule.clauses():
        if pr.selects_nothing:
            why = f" ({describe_peers(pr)})" if pr.empty_fields else ""
            out.append(f"{name}: {direction} default-deny for {rule.endpoint_selector}{why}")
        else:
            verb = "deny" if deny else "allow"
            out.append(f"{name}: {direction} {verb} {rule.endpoint_selector} {ARROWS[direction]} "
                       f"{describe_peers(pr)} on {describe_l4(pr)}")
    return out


def clause_rows(policy: Policy) -> list[dict]:
    """Who may reach whom, one row per clause (the web UI's Policies and Review pages)."""
    rows = []
    for rule in policy.rules:
        subject = str(rule.endpoint_selector)
        for direction, deny, pr in rule.clauses():
            path = pr.path
            if pr.selects_nothing:
                why = f" ({describe_peers(pr)})" if pr.empty_fields else ""
                rows.append({"verdict": "default-deny", "direction": direction,
                             "from": "nothing" if direction == "ingress" else subject,
                             "to": subject if direction == "ingress" else "nothing",
                             "ports": "-", "path": path,
                             "text": f"{subject}: {direction} default deny, no peer allowed{why}"})
                continue
            peers, ports = describe_peers(pr), describe_l4(pr)
            src, dst = (peers, subject) if direction == "ingress" else (subject, peers)
            verb = "may NOT reach" if deny else "may reach"
            rows.append({"verdict": "deny" if deny else "allow", "direction": direction,
                         "from": src, "to": dst, "ports": ports, "path": path,
                         "text": f"{src} {verb} {dst} on {ports}"})
    return rows


def policy_lines(policies: Iterable[Policy]) -> set[str]:
    return {line for p in policies for line in _lines(p)}


def _lines(p: Policy) -> frozenset[str]:
    """The rule lines of ``p``, computed once per Policy object (its rules do not change)."""
    cached = p.__dict__.get("_describe_lines")
    if cached is None:
        cached = p.__dict__["_describe_lines"] = frozenset(
            line for r in p.rules for line in describe_rule(r))
    return cached


def describe_key(op: str, key: Key, entry=None) -> dict:
    return {"op": op, "local": key.local, "peer": key.peer,
            "direction": DIRECTION_NAMES[key.direction], "port": key.describe(),
            "verdict": entry.verdict if entry is not None else None}


class LineIndex(CountIndex):
    """How many policies have each rule line: whether a line a change removes is still
    another, untouched policy's."""

    def __init__(self) -> None:
        super().__init__(_lines)


def summarize(old: dict, new: dict, delta: Delta, index: LineIndex | None = None,
              touched: Iterable | None = None) -> dict:
    """What a policy change does, for a dry run or an import: old/new {PolicyRef: Policy}.
    ``index``: a LineIndex kept across calls (the agent's), to count the lines of the
    policies the change did not touch instead of walking them. ``touched``: the refs the
    change names (a superset of those whose policy differs), so that no pass over every
    policy is needed; by default every ref of both."""
    # Policies that are the same object in both did not change, and their lines are in
    # both: only the touched ones can add or remove a line, unless an untouched policy
    # still has it. (10,000 policies and a one-rule change: look at the one.)
    touched = [r for r in (old.keys() | new.keys() if touched is None else set(touched))
               if old.get(r) is not new.get(r)]
    added = sorted(r.display for r in touched if r not in old)
    removed = sorted(r.display for r in touched if r not in new)
    changed = sorted(r.display for r in touched
                     if r in old and r in new and new[r].document_json != old[r].document_json)
    old_lines = policy_lines(old[r] for r in touched if r in old)
    new_lines = policy_lines(new[r] for r in touched if r in new)
    differ = old_lines ^ new_lines
    if differ:
        kept: set[str] = set()
        if index is not None:    # the untouched policies' lines: old's, less the touched ones'
            index.update(old)
            of_touched = Counter(line for r in touched if r in old for line in _lines(old[r]))
            kept = {line for line in differ if index.count.get(line, 0) > of_touched.get(line, 0)}
        else:
            for r, p in new.items():
                if old.get(r) is p and not differ.isdisjoint(lines := _lines(p)):
                    kept |= differ & lines
        old_lines |= kept
        new_lines |= kept
    sample = [describe_key("+", k, delta.adds[k]) for k in heapq.nsmallest(SAMPLE, delta.adds)]
    sample += [describe_key("-", k) for k in heapq.nsmallest(SAMPLE, delta.removes)]
    return {"added": added, "removed": removed, "changed": changed,
            "rules": {"added": sorted(new_lines - old_lines), "removed": sorted(old_lines - new_lines)},
            "entries": {"added": len(delta.adds), "removed": len(delta.removes),
                        "flags": len(delta.flags), "sample": sample}}
