"""What the pages show, computed from the agent's answers: pure functions, no I/O.

The offline policy engine (stockade.policy) evaluates verdicts exactly as the datapath
does, from the live identities and the live (or proposed) policy documents:

    ev = Evaluator(policies, identities, enforcement="default")
    ev.verdict(src_id, dst_id, proto, port)     # "allow" | "deny" | "default-deny"
    ev.cell(src_id, dst_id)                     # what the matrix shows for one pair

A connection is allowed when the source's egress and the destination's ingress both
allow it; only identities local to the agent have policy on its host (a remote peer's
side is enforced, if at all, by its own host's agent).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from stockade.daemon.policydiff import describe_l4, describe_peers
from stockade.errors import PolicyError, PolicyErrors
from stockade.policy.api.rule import Policy
from stockade.policy.api.validation import sanitize_document
from stockade.policy.compiler import full_compile
from stockade.policy.identity import Identity
from stockade.policy.labels import LabelSet
from stockade.policy.mapstate import (ANY_PEER, EGRESS, INGRESS, PROTO_NAMES, PROTO_NUMBERS,
                                      Key, lookup)

# A port no policy is likely to name: when it is allowed, "any port" is.
PROBE_PORT = 61999


# ---------------------------------------------------------------- labels
def short_labels(labels: list[str]) -> str:
    """``["static:app=web", "static:tier=front"]`` -> ``app=web,tier=front``; reserved
    identities keep their source (``reserved:world``)."""
    out = []
    for text in labels:
        source, _, rest = text.partition(":")
        out.append(text if source in ("reserved", "cidr") or not rest else rest)
    return ",".join(out) or "(no labels)"


def identity_name(ident: dict | None, num: int | None = None) -> str:
    if ident is None:
        return f"identity {num}" if num is not None else "unknown"
    if ident.get("kind") == "cidr" and ident.get("prefix"):
        return f"cidr:{ident['prefix']}"
    return short_labels(ident.get("labels") or [])


def label_filter_matches(labels: list[str], text: str) -> bool:
    """``app=web,tier`` (all must hold; a bare key means present; a key may carry its
    source). Empty text matches everything."""
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        k, sep, v = item.partition("=")
        ok = False
        for lab in labels:
            src, _, kv = lab.partition(":")
            lk, _, lv = kv.partition("=")
            if ":" in k:
                ksrc, kname = k.split(":", 1)
                if ksrc != src or kname != lk:
                    continue
            elif k != lk:
                continue
            if not sep or lv == v:
                ok = True
                break
        if not ok:
            return False
    return True


def _labelset(labels: list[str]) -> LabelSet:
    mapping = {}
    for text in labels:
        key, _, value = text.partition("=")
        mapping[key] = value
    return LabelSet.from_mapping(mapping, "unspec")


# ---------------------------------------------------------------- policies
def parse_live(infos: list[dict]) -> list[Policy]:
    """The agent's PolicyInfo list -> sanitized Policies (the agent accepted them, so
    they are valid; a document this version cannot read raises PolicyErrors)."""
    return [sanitize_document(i["document"], source=i.get("source", "")) for i in infos]


def merged(live: list[Policy], proposed: list[Policy], replace_all: bool) -> list[Policy]:
    """What the live set becomes when ``proposed`` is pushed (as the agent does)."""
    if replace_all:
        return list(proposed)
    keep = {p.ref: p for p in live}
    for p in proposed:
        keep[p.ref] = p
    return list(keep.values())


def describe_policy(p: Policy) -> list[dict]:
    """Who may reach whom, one row per clause, in words."""
    rows = []
    for rule in p.rules:
        subject = str(rule.endpoint_selector)
        for kind, items, direction in (("allow", rule.ingress, "ingress"),
                                       ("deny", rule.ingress_deny, "ingress"),
                                       ("allow", rule.egress, "egress"),
                                       ("deny", rule.egress_deny, "egress")):
            for pr in items:
                if pr.selects_nothing:
                    rows.append({"verdict": "default-deny", "direction": direction,
                                 "from": "nothing" if direction == "ingress" else subject,
                                 "to": subject if direction == "ingress" else "nothing",
                                 "ports": "-", "path": f"{rule.path}.{pr.path.split('.')[-1]}",
                                 "text": f"{subject}: {direction} default deny, no peer allowed"
                                         + (f" ({describe_peers(pr)})" if pr.empty_fields else "")})
                    continue
                peers, ports = describe_peers(pr), describe_l4(pr)
                src, dst = (peers, subject) if direction == "ingress" else (subject, peers)
                verb = "may reach" if kind == "allow" else "may NOT reach"
                rows.append({"verdict": kind, "direction": direction, "from": src, "to": dst,
                             "ports": ports, "path": pr.path,
                             "text": f"{src} {verb} {dst} on {ports}"})
    return rows


def error_rows(exc: PolicyErrors | PolicyError) -> list[dict]:
    errs = exc.errors if isinstance(exc, PolicyErrors) else [exc]
    return [{"file": e.file, "document": e.doc_index, "name": e.doc_name,
             "path": e.path, "message": e.msg, "text": str(e)} for e in errs]


# ---------------------------------------------------------------- evaluation
@dataclass
class Cell:
    """What one (source, destination) pair may do."""

    state: str                     # open | ports | any | closed | self
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    audit: bool = False            # a deny here is only logged (audit mode)
    remote: bool = False           # neither side is enforced on this host

    @property
    def css(self) -> str:
        if self.audit and (self.deny or self.state == "closed"):
            return "audit"
        return {"open": "open", "any": "open", "ports": "allow", "closed": "deny"}.get(self.state, "")

    def to_dict(self) -> dict:
        return {"state": self.state, "allow": self.allow, "deny": self.deny,
                "audit": self.audit, "remote": self.remote}


class Evaluator:
    def __init__(self, policies: list[Policy], identities: list[dict],
                 enforcement: str = "default", audit_ids: set[int] | None = None):
        self.identities = {i["id"]: i for i in identities}
        objs, local = [], set()
        for i in identities:
            if i.get("kind") == "cidr":
                continue
            objs.append(Identity(i["id"], _labelset(i.get("labels") or []),
                                 i.get("kind") or "workload"))
            if i.get("local") and i.get("kind", "workload") == "workload":
                local.add(i["id"])
        self.local = local
        self.audit_ids = audit_ids or set()
        self.entries, self.flags = full_compile(policies, objs, local, enforcement)
        self._by_local: dict[tuple[int, int], list[Key]] = {}
        for k in self.entries:
            self._by_local.setdefault((k.local, k.direction), []).append(k)

    def side(self, local: int, peer: int, direction: int, proto: int, port: int | None) -> str:
        if local not in self.local:
            return "not-enforced"
        return lookup(self.entries, self.flags, local, peer, direction, proto, port)[0]

    def verdict(self, src: int, dst: int, proto: int, port: int | None) -> str:
        """allow | deny (a deny rule) | default-deny."""
        results = (self.side(src, dst, EGRESS, proto, port), self.side(dst, src, INGRESS, proto, port))
        if "deny" in results:
            return "deny"
        if "default-deny" in results:
            return "default-deny"
        return "allow"

    def audited(self, src: int, dst: int, proto: int, port: int | None) -> bool:
        """Would a deny of this connection only be logged? (the denying side is in audit)."""
        eg = self.side(src, dst, EGRESS, proto, port)
        ing = self.side(dst, src, INGRESS, proto, port)
        deciders = ([src] if eg in ("deny", "default-deny") else []) + \
                   ([dst] if ing in ("deny", "default-deny") else [])
        return bool(deciders) and all(d in self.audit_ids for d in deciders)

    def _candidates(self, src: int, dst: int) -> list[Key]:
        keys = []
        for loc, d in ((src, EGRESS), (dst, INGRESS)):
            other = dst if loc == src else src
            for k in self._by_local.get((loc, d), ()):
                if k.peer in (other, ANY_PEER) and k.proto != 0:
                    keys.append(k)
        seen, out = set(), []
        for k in sorted(keys, key=lambda k: (k.proto, k.port, -k.port_plen)):
            tag = (k.proto, k.port, k.port_plen)
            if tag not in seen:
                seen.add(tag)
                out.append(k)
        return out

    def cell(self, src: int, dst: int) -> Cell:
        if src not in self.local and dst not in self.local:
            return Cell("open", remote=True)
        enforced = any(self.flags.get((i, d)) and self.flags[(i, d)].enforced
                       for i, d in ((src, EGRESS), (dst, INGRESS)))
        if not enforced:
            return Cell("open", audit=False)
        allow, deny = [], []
        audit = False
        for k in self._candidates(src, dst):
            port = k.port if k.port_plen else PROBE_PORT
            v = self.verdict(src, dst, k.proto, port)
            label = k.describe()
            if v == "allow":
                allow.append(label)
            elif v == "deny":
                deny.append(label)
                audit = audit or self.audited(src, dst, k.proto, port)
        any_tcp = self.verdict(src, dst, PROTO_NUMBERS["tcp"], PROBE_PORT) == "allow"
        any_udp = self.verdict(src, dst, PROTO_NUMBERS["udp"], PROBE_PORT) == "allow"
        if not allow and not any_tcp:
            audit = audit or self.audited(src, dst, PROTO_NUMBERS["tcp"], PROBE_PORT)
        if any_tcp and any_udp:
            return Cell("any", [], deny, audit)
        if allow:
            return Cell("ports", allow, deny, audit)
        return Cell("closed", [], deny, audit)


def audit_identities(endpoints: list[dict], health: dict | None) -> set[int]:
    if health and health.get("audit"):
        return {e["identity"] for e in endpoints if e.get("identity") is not None}
    return {e["identity"] for e in endpoints if e.get("audit") and e.get("identity") is not None}


def matrix_identities(identities: list[dict], label: str = "") -> list[dict]:
    """Rows and columns: workloads (local first) plus host and world, filtered."""
    keep = [i for i in identities
            if i.get("kind") == "workload" or i.get("labels") in (["reserved:host"], ["reserved:world"])]
    keep = [i for i in keep if label_filter_matches(i.get("labels") or [], label)]
    return sorted(keep, key=lambda i: (i.get("kind") != "workload", not i.get("local"), i["id"]))


def matrix(ev: Evaluator, idents: list[dict]) -> list[dict]:
    rows = []
    for s in idents:
        cells = []
        for d in idents:
            cells.append({"dst": d["id"], "cell": ev.cell(s["id"], d["id"])})
        rows.append({"src": s, "cells": cells})
    return rows


def pair_changes(old: Evaluator, new: Evaluator, idents: list[dict]) -> list[dict]:
    """Identity pairs whose verdict changes for some port the old or new policy names."""
    out = []
    for s in idents:
        for d in idents:
            a, b = old.cell(s["id"], d["id"]), new.cell(s["id"], d["id"])
            if (a.state, a.allow, a.deny) == (b.state, b.allow, b.deny):
                continue
            before, after = _cell_ports(a), _cell_ports(b)
            newly_allowed = sorted(after - before) if "any" not in before else []
            newly_denied = sorted(before - after) if "any" not in after else []
            if "any" in after and "any" not in before:
                newly_allowed = ["any"]
            if "any" in before and "any" not in after:
                newly_denied = ["any except " + ", ".join(sorted(after))] if after else ["any"]
            if not newly_allowed and not newly_denied:
                continue
            out.append({"src": identity_name(s), "dst": identity_name(d),
                        "src_id": s["id"], "dst_id": d["id"],
                        "allowed": newly_allowed, "denied": newly_denied})
    return out


def _cell_ports(c: Cell) -> set[str]:
    if c.state in ("open", "any"):
        return {"any"}
    return set(c.allow)


# ---------------------------------------------------------------- flows
def flow_port(f: dict) -> tuple[int, int | None]:
    l4 = f.get("l4") or {}
    proto = PROTO_NUMBERS.get(str(l4.get("protocol", "")).lower(), 0)
    return proto, l4.get("destination_port")


def flow_label(f: dict, side: str, idents: dict | None = None) -> str:
    peer = f.get(side) or {}
    if peer.get("labels"):
        return short_labels(peer["labels"])
    if idents and peer.get("identity") in idents:
        return identity_name(idents[peer["identity"]])
    ip = (f.get("ip") or {}).get(side)
    return ip or f"identity {peer.get('identity')}"


SEVERITY = {"FORWARDED": 0, "AUDIT": 1, "DROPPED": 2}


def connections(flows: list[dict]) -> list[dict]:
    """One flow per connection: both hooks of a connection (the source's egress, the
    destination's ingress) report its first packet, and replies belong to the
    connection that started them. The hook with the harshest verdict speaks for it:
    a connection the destination dropped was dropped, whatever the source's side said."""
    best: dict = {}
    for f in flows:
        if f.get("is_reply"):
            continue
        key = f.get("connection") or (
            (f.get("ip") or {}).get("source"), (f.get("ip") or {}).get("destination"),
            (f.get("l4") or {}).get("protocol"), (f.get("l4") or {}).get("source_port"),
            (f.get("l4") or {}).get("destination_port"))
        old = best.get(key)
        if old is None or SEVERITY.get(f.get("verdict"), 0) > SEVERITY.get(old.get("verdict"), 0):
            best[key] = f
    return list(best.values())


def flow_changes(flows: list[dict], old: Evaluator, new: Evaluator) -> list[dict]:
    """Observed connections whose verdict the proposed policy changes, grouped by
    (from, to, port, change): "would block 12 connections ... app=web -> app=db:5432"."""
    groups: dict[tuple, dict] = {}
    for f in connections(flows):
        src = (f.get("source") or {}).get("identity")
        dst = (f.get("destination") or {}).get("identity")
        if src is None or dst is None:
            continue
        proto, port = flow_port(f)
        if not proto:
            continue
        before = old.verdict(src, dst, proto, port)
        after = new.verdict(src, dst, proto, port)
        if (before == "allow") == (after == "allow"):
            continue
        change = "block" if after != "allow" else "allow"
        audit = change == "block" and new.audited(src, dst, proto, port)
        pname = PROTO_NAMES.get(proto, str(proto))
        where = f"{port}/{pname}" if port is not None else pname
        key = (flow_label(f, "source", old.identities), flow_label(f, "destination", old.identities),
               where, change, audit)
        g = groups.setdefault(key, {"from": key[0], "to": key[1], "port": where, "change": change,
                                    "audit": audit, "count": 0, "observed": {}, "last": ""})
        g["count"] += 1
        g["observed"][f.get("verdict", "?")] = g["observed"].get(f.get("verdict", "?"), 0) + 1
        g["last"] = max(g["last"], f.get("time") or "")
    out = sorted(groups.values(), key=lambda g: (-g["count"], g["from"], g["to"], g["port"]))
    for g in out:
        n = g["count"]
        verb = "would block" if g["change"] == "block" else "would allow"
        if g["audit"]:
            verb = "would audit (log as dropped, still let through)"
        noun = "connection" if n == 1 else "connections"
        to_port = f"{g['to']}:{g['port'].split('/')[0]}" if g["port"][0].isdigit() else \
            f"{g['to']} ({g['port']})"
        g["text"] = f"{verb} {n} {noun} seen in the last hour from {g['from']} to {to_port}"
    return out


def drops_since(flows: list[dict], since_iso: str) -> int:
    return sum(1 for f in connections(flows)
               if f.get("verdict") == "DROPPED" and (f.get("time") or "") >= since_iso)


# ---------------------------------------------------------------- service map
def service_map(flows: list[dict], idents: dict, width: int = 900, height: int = 560) -> dict:
    """Nodes (identities seen in flows) on a circle; edges aggregated per
    (from, to, verdict) with the ports seen. Positions are computed here so that the
    page needs no script to draw."""
    import math
    nodes: dict[str, dict] = {}
    edges: dict[tuple, dict] = {}
    for f in connections(flows):
        a, b = flow_label(f, "source", idents), flow_label(f, "destination", idents)
        for name, side in ((a, "source"), (b, "destination")):
            n = nodes.setdefault(name, {"name": name, "flows": 0, "local": False,
                                        "identity": (f.get(side) or {}).get("identity")})
            n["flows"] += 1
            if (f.get(side) or {}).get("endpoint"):
                n["local"] = True
        verdict = f.get("verdict", "FORWARDED")
        e = edges.setdefault((a, b, verdict), {"from": a, "to": b, "verdict": verdict,
                                               "count": 0, "ports": set()})
        e["count"] += 1
        proto, port = flow_port(f)
        e["ports"].add(f"{port}/{PROTO_NAMES.get(proto, proto)}" if port is not None
                       else PROTO_NAMES.get(proto, str(proto)))
    names = sorted(nodes)
    cx, cy = width / 2, height / 2
    r = min(width, height) / 2 - 90
    for i, name in enumerate(names):
        angle = 2 * math.pi * i / max(len(names), 1) - math.pi / 2
        nodes[name]["x"] = round(cx + (r if len(names) > 1 else 0) * math.cos(angle), 1)
        nodes[name]["y"] = round(cy + (r if len(names) > 1 else 0) * math.sin(angle), 1)
    out_edges = []
    for (a, b, verdict), e in sorted(edges.items()):
        na, nb = nodes[a], nodes[b]
        dx, dy = nb["x"] - na["x"], nb["y"] - na["y"]
        dist = math.hypot(dx, dy) or 1
        # forwarded and dropped edges between the same pair are drawn side by side
        off = {"FORWARDED": -5, "DROPPED": 5, "AUDIT": 0}.get(verdict, 0)
        ox, oy = -dy / dist * off, dx / dist * off
        shrink = 34 / dist
        e.update(x1=round(na["x"] + dx * shrink + ox, 1), y1=round(na["y"] + dy * shrink + oy, 1),
                 x2=round(nb["x"] - dx * shrink + ox, 1), y2=round(nb["y"] - dy * shrink + oy, 1),
                 ports=sorted(e["ports"]), self_loop=(a == b))
        e["lx"], e["ly"] = round((e["x1"] + e["x2"]) / 2, 1), round((e["y1"] + e["y2"]) / 2 - 4, 1)
        out_edges.append(e)
    return {"width": width, "height": height, "nodes": [nodes[n] for n in names],
            "edges": out_edges}

