"""Policy questions about this host, answered by the agent's own engine: the live trace,
the allow matrix, and the review of a proposed policy set (a plan, then discarded).

Everything here runs under the agent's lock on the engine the datapath was written
from, so the answers are the datapath's; a question that needs a hypothetical identity
or policy set plans it in a transaction and discards it.
"""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Iterable

from ..errors import InvalidRequest, NotFound, SelectorError
from ..flows import connections, flow_port
from ..l7.rules import RequestError, http_request
from ..policy.api.cidr import Network
from ..policy.api.entity import RESERVED
from ..policy.api.rule import Policy
from ..policy.api.selector import EndpointSelector
from ..policy.describe import clause_rows
from ..policy.evaluate import Evaluator, affected_pairs, pair_changes
from ..policy.identity import CIDR_BASE, CIDR_KIND, WORKLOAD_KIND, Identity, most_specific
from ..policy.labels import LabelSet
from ..policy.mapstate import EGRESS, INGRESS, PROTO_NAMES, DirectionPolicy
from ..policy.sel import PeerSpec, parse_port, parse_sel
from ..policy.trace import trace
from .changes import ChangePolicies
from .txn import Txn

if TYPE_CHECKING:
    from .agent import Agent

HYPOTHETICAL_BASE = CIDR_BASE - 4096  # numbers for identities that only live in a discarded plan


# ---------------------------------------------------------------- the live trace
class LiveWorld:
    """Selectors resolved against the agent: endpoints by name, labels to the identity
    that has exactly them (or a hypothetical local one, in the transaction), CIDRs
    through the ipcache, as the datapath resolves addresses."""

    def __init__(self, agent: "Agent", txn: Txn):
        self.agent, self.txn, self.engine = agent, txn, agent.engine
        self._prefixes = {ipaddress.ip_network(p): e.identity for p, e in agent.state.ipcache.items()}

    def prefixes(self) -> Iterable[Network]:
        return self._prefixes

    def identity_of(self, spec: PeerSpec) -> int:
        if spec.kind == "entity":
            return RESERVED[spec.entity]
        if spec.kind == "cidr":
            return most_specific(self._prefixes, spec.prefix) or RESERVED["world"]
        if spec.kind == "endpoint":
            ep = self.agent.state.endpoints.get(spec.name)
            if ep is None:
                raise NotFound(f"no endpoint named {spec.name}", "src")
            if ep.identity is None:
                raise InvalidRequest(f"endpoint {spec.name} has no identity yet ({ep.state})")
            return ep.identity
        return self._by_labels(spec.labels)

    def _by_labels(self, labels: LabelSet) -> int:
        want = {(l.key, l.value, l.source) for l in labels}
        found = [i for i in self.engine.identities.values() if i.kind == WORKLOAD_KIND
                 and _same_labels(want, i.labels)]
        found.sort(key=lambda i: (i.id not in self.engine.local_ids, i.id))
        if found:
            return found[0].id
        used = set(self.engine.identities)
        num = next(n for n in range(HYPOTHETICAL_BASE, CIDR_BASE) if n not in used)
        self.txn.set_identity(Identity(num, labels, WORKLOAD_KIND), local=True)
        return num


def _same_labels(want: set[tuple[str, str, str]], have: LabelSet) -> bool:
    """A selector's labels (source ``unspec``: any source) name exactly ``have``."""
    if len(want) != len(have):
        return False
    pool = list(have)
    for key, value, source in want:
        match = next((l for l in pool if l.key == key and l.value == value
                      and (source == "unspec" or l.source == source)), None)
        if match is None:
            return False
        pool.remove(match)
    return True


def live_trace(agent: "Agent", src: str, dst: str, dport: str, http: dict | None = None) -> dict:
    try:
        s, d = parse_sel(src), parse_sel(dst)
        proto, port = parse_port(dport)
        req = http_request(**(http or {}))
    except SelectorError as exc:
        raise InvalidRequest(str(exc)) from None
    except RequestError as exc:    # the query parameter it came from: http_method, ...
        param = exc.field.partition("[")[0].removesuffix("s")
        raise InvalidRequest(str(exc), f"http_{param}") from None
    with agent.locked():
        txn = Txn(agent, dry_run=True)
        try:
            return trace(LiveWorld(agent, txn), s, d, proto, port, req)
        finally:
            txn.discard()


# ---------------------------------------------------------------- the matrix
def matrix_identities(agent: "Agent", label: str = "", cidrs: bool = False) -> list[Identity]:
    """Rows and columns: workloads (local first) plus host and world (and, with
    ``cidrs``, the CIDR identities policies and services name), filtered by ``label``
    (``k=v,k``: every item must hold; a bare key: the label exists)."""
    e = agent.engine
    keep = [i for i in e.identities.values()
            if i.kind == WORKLOAD_KIND or i.id in (RESERVED["host"], RESERVED["world"])
            or (cidrs and i.kind == CIDR_KIND)]
    if label:
        sel = EndpointSelector.from_filter(label)
        keep = [i for i in keep if sel.matches(i.labels)]
    return sorted(keep, key=lambda i: (i.kind != WORKLOAD_KIND, i.id not in e.local_ids, i.id))


def audit_ids(agent: "Agent") -> set[int]:
    eps = agent.state.endpoints.values()
    return {e.identity for e in eps if e.identity is not None and (agent.config.audit or e.audit)}


def _identity_dict(agent: "Agent", i: Identity) -> dict:
    return {"id": i.id, "name": i.short_name, "labels": i.labels.to_strings(), "kind": i.kind,
            "local": i.id in agent.engine.local_ids}


def matrix(agent: "Agent", query: dict) -> dict:
    """``query`` as GET /v1/matrix's parameters, validated with their defaults
    (apischema: the document's bounds): label (filter), port (``80/tcp``: a verdict per
    pair for that port), offset and limit (rows), dst_offset and dst_limit (columns;
    no dst_limit: every identity), cidrs (CIDR identities too)."""
    label = query.get("label") or ""
    cidrs = bool(query.get("cidrs"))
    offset, limit = query["offset"], query["limit"]
    dst_offset, dst_limit = query["dst_offset"], query.get("dst_limit")
    proto = port = None
    if query.get("port"):
        try:
            proto, port = parse_port(query["port"])
        except SelectorError as exc:
            raise InvalidRequest(str(exc), "port") from None
    with agent.locked():
        e = agent.engine
        idents = matrix_identities(agent, label, cidrs)
        ev = Evaluator(e.entries, e.flags, e.local_ids)
        audited = audit_ids(agent)
        rows = []
        cols = idents[dst_offset:dst_offset + dst_limit if dst_limit else None]
        for s in idents[offset:offset + limit]:
            cells = []
            for d in cols:
                if proto is not None:
                    v = ev.verdict(s.id, d.id, proto, port)
                    cells.append({"dst": d.id, "verdict": v,
                                  "audit": v != "allow" and _audited(ev, audited, s.id, d.id, proto, port)})
                    continue
                c = ev.cell(s.id, d.id)
                cells.append({"dst": d.id, **c.to_dict(),
                              "audit": bool(c.deny or c.state == "closed") and
                              _audited(ev, audited, s.id, d.id, 6, None)})
            rows.append({"src": s.id, "cells": cells})
        return {"identities": [_identity_dict(agent, i) for i in idents], "rows": rows,
                "total": len(idents), "offset": offset, "limit": limit,
                "dst_offset": dst_offset, "dst_limit": dst_limit,
                "port": query.get("port") or None, "revision": agent.state.revision}


def _audited(ev: Evaluator, audited: set[int], src: int, dst: int, proto: int,
             port: int | None) -> bool:
    """Would a drop of this pair only be logged? (every side that denies is in audit)."""
    deciders = []
    for local, peer, direction in ((src, dst, EGRESS), (dst, src, INGRESS)):
        if port is None:  # the whole cell: every side that enforces policy may deny
            denies = local in ev.local_ids and ev.flags.get((local, direction), DirectionPolicy()).enforced
        else:
            denies = ev.side(local, peer, direction, proto, port)[0] in ("deny", "default-deny")
        if denies:
            deciders.append(local)
    return bool(deciders) and all(d in audited for d in deciders)


# ---------------------------------------------------------------- the review
def review(agent: "Agent", proposed: list[Policy], replace_all: bool) -> dict:
    """The plan of ``proposed`` against what is live, discarded: the agent's diff, the
    identity pairs newly allowed or denied, and the observed connections (last hour)
    whose verdict would change."""
    flows = _recent_flows(agent)
    with agent.locked():
        e = agent.engine
        remove = [r for r in e.policies if replace_all and r not in {p.ref for p in proposed}]
        txn = Txn(agent, dry_run=True)
        try:
            result = ChangePolicies(proposed, remove).apply(txn)
            plan = txn.etx.plan()
            before = Evaluator(plan.entries_before(e.entries), plan.flags_before(e.flags),
                               plan.locals_before)
            after = Evaluator(e.entries, e.flags, e.local_ids)
            idents = {i.id: i for i in matrix_identities(agent)}
            pairs = affected_pairs(list(plan.delta.adds) + list(plan.delta.removes),
                                   plan.delta.flags, idents)
            changes = pair_changes(before, after, sorted(p for p in pairs
                                                         if p[0] in idents and p[1] in idents))
            for c in changes:
                c["src_id"], c["dst_id"] = c["src"], c["dst"]
                c["src"], c["dst"] = idents[c["src_id"]].short_name, idents[c["dst_id"]].short_name
            audited = audit_ids(agent)
            flow_rows = flow_changes(flows, before, after, audited, e.identities) if flows is not None else []
        finally:
            txn.discard()
    return {"diff": result["diff"], "changed": result["changed"], "replace_all": replace_all,
            "revision": agent.state.revision, "pairs": changes,
            "policies": [{"name": p.ref.display, "source": p.source, "description": p.description,
                          "clauses": clause_rows(p)} for p in proposed],
            "flows": flow_rows, "flows_available": flows is not None,
            "flows_checked": len(connections(flows)) if flows else 0}


def _recent_flows(agent: "Agent") -> list[dict] | None:
    if agent.flow_source is None:
        return None
    return agent.flow_source.query({"since": "1h"})["flows"]


def flow_changes(flows: list[dict], before: Evaluator, after: Evaluator, audited: set[int],
                 identities: dict[int, Identity]) -> list[dict]:
    """Observed connections whose verdict the plan changes, grouped by (from, to, port,
    change): "would block 12 connections ... from app=web to app=db:5432"."""
    groups: dict[tuple, dict] = {}
    for f in connections(flows):
        src = (f.get("source") or {}).get("identity")
        dst = (f.get("destination") or {}).get("identity")
        if src is None or dst is None:
            continue
        proto, port = flow_port(f)
        if not proto:
            continue
        was, now = before.verdict(src, dst, proto, port), after.verdict(src, dst, proto, port)
        if (was == "allow") == (now == "allow"):
            continue
        change = "block" if now != "allow" else "allow"
        audit = change == "block" and _audited(after, audited, src, dst, proto, port)
        where = f"{port}/{PROTO_NAMES.get(proto, proto)}" if port is not None else PROTO_NAMES.get(proto, str(proto))
        key = (_flow_name(f, "source", identities), _flow_name(f, "destination", identities),
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


def _flow_name(f: dict, side: str, identities: dict[int, Identity]) -> str:
    peer = f.get(side) or {}
    ident = identities.get(peer.get("identity") or 0)
    if ident is not None:
        return ident.short_name
    return (f.get("ip") or {}).get(side) or f"identity {peer.get('identity')}"
