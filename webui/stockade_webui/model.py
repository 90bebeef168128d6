"""What the pages show, computed from the agent's answers: presentation only, no policy.

Every policy question (the matrix, the review, traces) is answered by the agent's own
engine through its API; this module only names identities, groups flows and lays out
the service map.
"""
from __future__ import annotations

from stockade.errors import PolicyError, PolicyErrors
from stockade.flows import connections


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


def error_rows(exc: PolicyErrors | PolicyError) -> list[dict]:
    errs = exc.errors if isinstance(exc, PolicyErrors) else [exc]
    return [{"file": e.file, "document": e.doc_index, "name": e.doc_name,
             "path": e.path, "message": e.msg, "text": str(e)} for e in errs]


def flow_label(f: dict, side: str, idents: dict | None = None) -> str:
    peer = f.get(side) or {}
    if peer.get("labels"):
        return short_labels(peer["labels"])
    if idents and peer.get("identity") in idents:
        return identity_name(idents[peer["identity"]])
    ip = (f.get("ip") or {}).get(side)
    return ip or f"identity {peer.get('identity')}"


SEVERITY = {"FORWARDED": 0, "AUDIT": 1, "DROPPED": 2}


def drops_since(flows: list[dict], since_iso: str) -> int:
    return sum(1 for f in connections(flows)
               if f.get("verdict") == "DROPPED" and (f.get("time") or "") >= since_iso)


def service_map(flows: list[dict], idents: dict) -> dict:
    """Nodes (identities seen in flows) and edges aggregated per (from, to, verdict)
    with the ports seen, laid out by maplayout so that the page needs no script."""
    from . import maplayout
    nodes: dict[str, dict] = {}
    edges: dict[tuple, dict] = {}
    for f in connections(flows):
        a, b = flow_label(f, "source", idents), flow_label(f, "destination", idents)
        for name, side in ((a, "source"), (b, "destination")):
            n = nodes.setdefault(name, {"name": name, "flows": 0, "out": 0, "in": 0, "local": False,
                                        "identity": (f.get(side) or {}).get("identity")})
            n["flows"] += 1
            n["out" if side == "source" else "in"] += 1
            if (f.get(side) or {}).get("endpoint"):
                n["local"] = True
        verdict = f.get("verdict", "FORWARDED")
        e = edges.setdefault((a, b, verdict), {"from": a, "to": b, "verdict": verdict,
                                               "count": 0, "ports": set()})
        e["count"] += 1
        l4 = f.get("l4") or {}
        name, port = str(l4.get("protocol") or "?").lower(), l4.get("destination_port")
        e["ports"].add(f"{port}/{name}" if port is not None else name)
    out_edges = [{**e, "ports": sorted(e["ports"])} for _, e in sorted(edges.items())]
    size = maplayout.layout(nodes, out_edges)
    return {**size, "nodes": [nodes[n] for n in sorted(nodes)], "edges": out_edges}
