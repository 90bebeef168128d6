"""One builder per area, shared by the pages and /api/v1: host -> JSON-ready dict.

The pages render these dicts; the API returns them as they are, so what an operator
sees and what a script reads never disagree.
"""
from __future__ import annotations

from pathlib import Path

from stockade.errors import PolicyError, PolicyErrors, StockadeError
from stockade.client import APIError, ClientError
from stockade.policy.api.loader import load_text

from . import model
from .agents import Host, iso_ago

FLOW_FILTERS = ("verdict", "protocol", "port", "from_label", "to_label", "label",
                "from_endpoint", "to_endpoint", "drop_reason", "direction", "ip")
POLICY_SUFFIXES = (".yaml", ".yml", ".json")


# ---------------------------------------------------------------- overview
def overview(h: Host) -> dict:
    health = h.get("health")
    out = {"host": h.name, "socket": h.ref.socket, "reachable": health is not None,
           "health": health, "drops_5m": None, "drops_60m": None, "errors": h.errors}
    if health is not None and h.flows_supported():
        flows = h.flows(verdict=["DROPPED"], since="1h")
        if flows is not None:
            out["drops_60m"] = model.drops_since(flows, iso_ago(3600))
            out["drops_5m"] = model.drops_since(flows, iso_ago(300))
    return out


# ---------------------------------------------------------------- endpoints
def endpoints(h: Host, q: str = "") -> dict:
    eps = h.get("endpoints", []) or []
    idents = h.get("identities", []) or []
    ipc = h.get("ipcache", []) or []
    q = (q or "").strip().lower()
    if q:
        def hit(obj) -> bool:
            return q in " ".join(str(v) for v in _flat(obj)).lower()
        eps, idents, ipc = [e for e in eps if hit(e)], [i for i in idents if hit(i)], [c for c in ipc if hit(c)]
    return {"host": h.name, "q": q, "endpoints": eps, "identities": idents, "ipcache": ipc,
            "counters": endpoint_counters(h), "errors": h.errors}


def endpoint_counters(h: Host) -> dict | None:
    """Flows of the last hour per endpoint, by the direction of the hook that saw them:
    {name: {"ingress": {"FORWARDED": n, "DROPPED": n, "AUDIT": n}, "egress": {...}}}."""
    if h.get("health") is None or not h.flows_supported():
        return None
    flows = h.flows(since="1h")
    if flows is None:
        return None
    out: dict = {}
    for f in flows:
        d = f.get("direction")
        side = "destination" if d == "ingress" else "source"
        name = ((f.get(side) or {}).get("endpoint") or {}).get("name")
        if not name or d not in ("ingress", "egress"):
            continue
        per = out.setdefault(name, {"ingress": {}, "egress": {}})[d]
        per[f.get("verdict", "?")] = per.get(f.get("verdict", "?"), 0) + 1
    return out


def _flat(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _flat(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _flat(v)
    else:
        yield obj


# ---------------------------------------------------------------- policies
def _live(h: Host) -> tuple[list, list[dict]]:
    infos = h.get("policies", []) or []
    try:
        return model.parse_live(infos), infos
    except PolicyErrors as exc:
        h.errors.append(f"a live policy cannot be read here: {exc}")
        return [], infos


def policies(h: Host) -> dict:
    parsed, infos = _live(h)
    by_ref = {p.ref.display: p for p in parsed}
    eps = h.get("endpoints", []) or []
    audit_eps = sorted(e["name"] for e in eps if e.get("audit"))
    out = []
    import yaml
    for info in infos:
        disp = f"{info['namespace']}/{info['name']}" if info.get("namespace") else info["name"]
        p = by_ref.get(disp)
        out.append({"name": disp, "kind": info.get("kind"), "source": info.get("source"),
                    "rules": info.get("rules"), "clauses": model.describe_policy(p) if p else [],
                    "yaml": yaml.safe_dump(info.get("document"), sort_keys=False)})
    health = h.get("health") or {}
    return {"host": h.name, "policies": out, "audit_endpoints": audit_eps,
            "agent_audit": bool(health.get("audit")), "errors": h.errors}


def evaluator(h: Host, parsed=None) -> model.Evaluator:
    if parsed is None:
        parsed, _ = _live(h)
    health = h.get("health") or {}
    eps = h.get("endpoints", []) or []
    return model.Evaluator(parsed, h.get("identities", []) or [],
                           enforcement=health.get("enforcement", "default"),
                           audit_ids=model.audit_identities(eps, health))


def matrix(h: Host, label: str = "") -> dict:
    idents = model.matrix_identities(h.get("identities", []) or [], label)
    ev = evaluator(h)
    rows = model.matrix(ev, idents)
    return {"host": h.name, "label": label,
            "identities": [{"id": i["id"], "name": model.identity_name(i), "local": i.get("local", False),
                            "reserved": i.get("kind") == "reserved", "labels": i.get("labels")}
                           for i in idents],
            "rows": [{"src": r["src"]["id"], "name": model.identity_name(r["src"]),
                      "local": r["src"].get("local", False),
                      "reserved": r["src"].get("kind") == "reserved",
                      "cells": [{"dst": c["dst"], "css": c["cell"].css, **c["cell"].to_dict()}
                                for c in r["cells"]]} for r in rows],
            "errors": h.errors}


# ---------------------------------------------------------------- review
class ReviewInputError(Exception):
    """Input that is not a policy set at all (no files, unreadable path)."""


def files_from_path(path: str, max_files: int, max_bytes: int) -> list[dict]:
    """A policy file, or every *.yaml/*.yml/*.json under a directory (sorted)."""
    p = Path(path).expanduser()
    if not path or not p.is_absolute():
        raise ReviewInputError("give an absolute path on the host running the UI")
    try:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in POLICY_SUFFIXES)
            if not found:
                raise ReviewInputError(f"{p} holds no .yaml, .yml or .json file")
        elif p.is_file():
            found = [p]
        else:
            raise ReviewInputError(f"{p}: no such file or directory")
        if len(found) > max_files:
            raise ReviewInputError(f"{p} holds {len(found)} policy files; the limit is {max_files}")
        total, out = 0, []
        for f in found:
            with f.open("rb") as fh:  # at most what is left of the limit (stat may not tell)
                data = fh.read(max_bytes - total + 1)
            total += len(data)
            if total > max_bytes:
                raise ReviewInputError(f"{p}: the files are larger than {max_bytes // 1024} KiB")
            out.append({"name": str(f), "text": data.decode("utf-8")})
        return out
    except OSError as exc:
        raise ReviewInputError(f"cannot read {exc.filename or p}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ReviewInputError(f"{p}: not UTF-8 text") from exc


def review(h: Host, files: list[dict], replace_all: bool = False) -> dict:
    """The proposed set against what is live, without changing anything:
    offline validation, the agent's own dry run, changed identity pairs, and the
    observed connections whose verdict would change."""
    out = {"host": h.name, "files": [f["name"] for f in files], "replace_all": replace_all,
           "valid": False, "errors": [], "agent": None, "pairs": [], "flows": [],
           "flows_checked": 0, "flows_available": False, "policies": [], "host_errors": h.errors}
    proposed, errors = [], []
    for f in files:
        try:
            proposed.extend(load_text(f["text"], f["name"]))
        except PolicyErrors as exc:
            errors.extend(model.error_rows(exc))
    if not files:
        errors.append({"file": None, "document": None, "name": None, "path": "",
                       "message": "no policy files given", "text": "no policy files given"})
    if errors:
        out["errors"] = errors
        return out
    seen = {}
    for p in proposed:
        if p.ref in seen:
            errors.append(model.error_rows(PolicyError(
                "metadata.name", f"policy {p.ref.display} is also defined in {seen[p.ref]}",
                file=p.source))[0])
        seen[p.ref] = p.source
    if errors:
        out["errors"] = errors
        return out
    out["valid"] = True
    out["policies"] = [{"name": p.ref.display, "source": p.source,
                        "clauses": model.describe_policy(p)} for p in proposed]
    try:
        result = h.client.put_policies(files, replace_all=replace_all, dry_run=True)
        out["agent"] = result
    except APIError as exc:
        if exc.errors:
            out["errors"] = [{"file": e.get("file"), "document": e.get("document"),
                              "name": e.get("name"), "path": e.get("field") or "",
                              "message": e.get("reason") or e.get("message"),
                              "text": e.get("message")} for e in exc.errors]
            out["valid"] = False
            return out
        h.errors.append(f"the agent's dry run failed: {exc}")
    except ClientError as exc:
        h.errors.append(f"the agent's dry run failed: {exc}")
    live, _ = _live(h)
    try:
        old, new = evaluator(h, live), evaluator(h, model.merged(live, proposed, replace_all))
    except StockadeError as exc:
        h.errors.append(f"cannot evaluate: {exc}")
        return out
    idents = model.matrix_identities(h.get("identities", []) or [])
    out["pairs"] = model.pair_changes(old, new, idents)
    flows = h.flows(since="1h") if h.flows_supported() else None
    if flows is not None:
        out["flows_available"] = True
        out["flows_checked"] = len(model.connections(flows))
        out["flows"] = model.flow_changes(flows, old, new)
    return out


# ---------------------------------------------------------------- flows
def flow_filters(args) -> dict:
    out = {}
    for key in FLOW_FILTERS:
        vals = [v.strip() for v in args.getlist(key) for v in v.split(" ") if v.strip()] \
            if key not in ("from_label", "to_label", "label") else \
            [v.strip() for v in args.getlist(key) if v.strip()]
        if vals:
            out[key] = vals
    since = (args.get("since") or "").strip()
    if since:
        out["since"] = since
    last = (args.get("last") or "").strip()
    if last.isdigit():
        out["last"] = int(last)
    return out


def flows(h: Host, filters: dict, limit: int) -> dict:
    filters = dict(filters)
    filters.setdefault("last", limit)
    got = h.flows(**filters)
    idents = {i["id"]: i for i in (h.get("identities", []) or [])}
    rows = []
    for f in reversed(got or []):  # newest first
        proto, port = model.flow_port(f)
        l4 = f.get("l4") or {}
        rows.append({**f, "from": model.flow_label(f, "source", idents),
                     "to": model.flow_label(f, "destination", idents),
                     "summary": f"{l4.get('protocol', '?')} "
                                f"{(f.get('ip') or {}).get('source')}:{l4.get('source_port') or ''} → "
                                f"{(f.get('ip') or {}).get('destination')}:{port if port is not None else ''}"})
    return {"host": h.name, "filters": filters, "available": got is not None, "flows": rows,
            "errors": h.errors}


def service_map(h: Host, filters: dict) -> dict:
    filters = dict(filters)
    filters.setdefault("since", "1h")
    got = h.flows(**filters)
    idents = {i["id"]: i for i in (h.get("identities", []) or [])}
    m = model.service_map(got or [], idents)
    return {"host": h.name, "available": got is not None, "filters": filters, **m,
            "errors": h.errors}
