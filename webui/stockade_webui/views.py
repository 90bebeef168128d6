"""One builder per area, shared by the pages and /api/v1: host -> JSON-ready dict.

The pages render these dicts; the API returns them as they are, so what an operator
sees and what a script reads never disagree.
"""
from __future__ import annotations

import errno
import os
import stat

from stockade.client import APIError, ClientError
from stockade.flows import flow_port

from . import model, paging
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
ENDPOINT_TABLES = {"endpoints": "page", "identities": "ipage", "ipcache": "cpage"}


def _search(items: list, q: str) -> list:
    if not q:
        return items
    return [x for x in items if q in " ".join(str(v) for v in _flat(x)).lower()]


def endpoints(h: Host, q: str = "", pages: dict | None = None, per_page: int = 50,
              tables: tuple = ("endpoints", "identities", "ipcache")) -> dict:
    """Endpoints, identities and ipcache entries matching ``q`` (any value, any field),
    one page of each: ``pages`` maps a table to its page number (1 if absent)."""
    q = (q or "").strip().lower()
    pages = pages or {}
    out: dict = {"host": h.name, "q": q, "per_page": per_page, "paging": {}}
    for table in ENDPOINT_TABLES:
        items = _search(h.get(table, []) or [], q) if table in tables else []
        p = paging.page_of(len(items), pages.get(table, 1), per_page)
        out[table] = p.slice(items)
        out["paging"][table] = p.to_dict()
    wanted = {e["name"] for e in out["endpoints"]}
    counters = endpoint_counters(h) if "endpoints" in tables else None
    out["counters"] = None if counters is None else {k: v for k, v in counters.items() if k in wanted}
    out["errors"] = h.errors
    return out


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
def policies(h: Host, q: str = "", page: int = 1, per_page: int = 50) -> dict:
    """The live policies as the agent describes them (clauses in words included), those
    matching ``q`` (any value of the policy, its document included), a page at a time."""
    import yaml
    eps = h.get("endpoints", []) or []
    audit_eps = sorted(e["name"] for e in eps if e.get("audit"))
    q = (q or "").strip().lower()
    found = _search(h.get("policies", []) or [], q)
    p = paging.page_of(len(found), page, per_page)
    out = []
    for info in p.slice(found):
        disp = f"{info['namespace']}/{info['name']}" if info.get("namespace") else info["name"]
        out.append({"name": disp, "kind": info.get("kind"), "source": info.get("source"),
                    "description": info.get("description") or "",
                    "problems": info.get("problems") or [], "rules": info.get("rules"),
                    "clauses": info.get("clauses") or [],
                    "yaml": yaml.safe_dump(info.get("document"), sort_keys=False)})
    health = h.get("health") or {}
    return {"host": h.name, "q": q, "policies": out, "paging": {"policies": p.to_dict()},
            "per_page": per_page, "audit_endpoints": audit_eps,
            "agent_audit": bool(health.get("audit")), "errors": h.errors}


# ---------------------------------------------------------------- matrix
CELL_CSS = {"open": "open", "any": "open", "ports": "allow", "closed": "deny"}


def cell_css(c: dict) -> str:
    if "verdict" in c:  # one port asked
        return "audit" if c.get("audit") else ("allow" if c["verdict"] == "allow" else "deny")
    if c.get("audit") and (c.get("deny") or c.get("state") == "closed"):
        return "audit"
    return CELL_CSS.get(c.get("state") or "", "")


def matrix(h: Host, label: str = "", port: str = "", page: int = 1, cpage: int = 1,
           per_page: int = 25, cidrs: str | None = None) -> dict:
    """One square of the agent's own matrix (GET /v1/matrix): rows ``page`` and columns
    ``cpage``, ``per_page`` of each, with what the page needs to draw it."""
    def ask(row: int, col: int) -> dict:
        return h.call("matrix", label=label or None, port=port or None,
                      offset=(row - 1) * per_page, limit=per_page,
                      dst_offset=(col - 1) * per_page, dst_limit=per_page,
                      cidrs=cidrs or None) or {}
    data = ask(page, cpage)
    total = data.get("total", 0)
    rows_p, cols_p = paging.page_of(total, page, per_page), paging.page_of(total, cpage, per_page)
    if data and (rows_p.page, cols_p.page) != (page, cpage):   # past the end: the last page
        data = ask(rows_p.page, cols_p.page)
    idents = data.get("identities", [])
    by_id = {i["id"]: {**i, "reserved": i.get("kind") == "reserved"} for i in idents}
    rows = data.get("rows", [])
    columns = [by_id[c["dst"]] for c in rows[0]["cells"]] if rows else cols_p.slice(list(by_id.values()))
    return {"host": h.name, "label": label, "port": port,
            "identities": list(by_id.values()), "columns": columns,
            "rows": [{"src": r["src"], "name": by_id[r["src"]]["name"],
                      "local": by_id[r["src"]].get("local", False),
                      "reserved": by_id[r["src"]].get("kind") == "reserved",
                      "cells": [{**c, "css": cell_css(c)} for c in r["cells"]]}
                     for r in rows],
            "total": total, "per_page": per_page,
            "paging": {"rows": rows_p.to_dict(), "columns": cols_p.to_dict()},
            "errors": h.errors}


# ---------------------------------------------------------------- review
class ReviewInputError(Exception):
    """Input that is not a policy set at all (no files, unreadable path)."""


MAX_WALK_ENTRIES = 10000   # directory entries looked at for one review path
MAX_WALK_DEPTH = 16


def files_from_path(path: str, policy_dirs: list[str], max_files: int, max_bytes: int) -> list[dict]:
    """A policy file, or every *.yaml/*.yml/*.json under a directory (sorted), inside one
    of ``policy_dirs`` (``stockade webui --policy-dir``). Below that directory nothing is
    followed that is not a directory or a regular file: every component is opened with
    O_NOFOLLOW relative to its parent, so a symbolic link, a device, a FIFO or /proc can
    not be read through it; at most ``max_bytes`` are read in all."""
    if not policy_dirs:
        raise ReviewInputError("reading policy files on this host is off: the UI was started "
                               "without --policy-dir")
    if not path or not os.path.isabs(path):
        raise ReviewInputError("give an absolute path inside " + ", ".join(policy_dirs))
    if any(ord(c) < 32 for c in path):
        raise ReviewInputError("the path has control characters")
    norm = os.path.normpath(path)
    for root in policy_dirs:
        root = os.path.normpath(root)
        if norm == root or norm.startswith(root.rstrip("/") + "/"):
            rel = [part for part in norm[len(root):].split("/") if part]
            break
    else:
        raise ReviewInputError(f"{norm} is not inside the policy directories "
                               f"({', '.join(policy_dirs)})")
    fds: list[int] = []
    try:
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(fd)
            for part in rel:
                fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
                fds.append(fd)
        except OSError as exc:
            why = "is a symbolic link (not followed)" if exc.errno == errno.ELOOP else exc.strerror
            raise ReviewInputError(f"cannot read {norm}: {why}") from None
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            found: list[tuple[str, int]] = []
            _walk(fd, norm, found, fds, [0], 0, max_files)
            if not found:
                raise ReviewInputError(f"{norm} holds no .yaml, .yml or .json file")
            found.sort()
        elif stat.S_ISREG(st.st_mode):
            found = [(norm, fd)]
        else:
            raise ReviewInputError(f"{norm} is not a regular file or a directory")
        total, out = 0, []
        for name, ffd in found:
            data = _read_at_most(ffd, max_bytes - total + 1)
            total += len(data)
            if total > max_bytes:
                raise ReviewInputError(f"{norm}: the files are larger than {max_bytes // 1024} KiB")
            try:
                out.append({"name": name, "text": data.decode("utf-8")})
            except UnicodeDecodeError:
                raise ReviewInputError(f"{name}: not UTF-8 text") from None
        return out
    except OSError as exc:
        raise ReviewInputError(f"cannot read {norm}: {exc.strerror}") from None
    finally:
        for fd in fds:
            os.close(fd)


def _walk(dfd: int, where: str, found: list, fds: list, seen: list, depth: int, max_files: int) -> None:
    """Policy files below the open directory ``dfd``: (path, open fd of a regular file)."""
    if depth > MAX_WALK_DEPTH:
        raise ReviewInputError(f"{where}: directories nested deeper than {MAX_WALK_DEPTH}")
    with os.scandir(dfd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        seen[0] += 1
        if seen[0] > MAX_WALK_ENTRIES:
            raise ReviewInputError(f"{where}: more than {MAX_WALK_ENTRIES} entries to look at")
        if e.is_dir(follow_symlinks=False):
            sub = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            fds.append(sub)
            _walk(sub, f"{where}/{e.name}", found, fds, seen, depth + 1, max_files)
        elif e.is_file(follow_symlinks=False) and os.path.splitext(e.name)[1] in POLICY_SUFFIXES:
            ffd = os.open(e.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            fds.append(ffd)
            if not stat.S_ISREG(os.fstat(ffd).st_mode):
                continue
            found.append((f"{where}/{e.name}", ffd))
            if len(found) > max_files:
                raise ReviewInputError(f"{where} holds more than {max_files} policy files; "
                                       f"the limit is {max_files}")


def _read_at_most(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = os.read(fd, min(left, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


HIDDEN = "the value is not shown: the file was read on the UI's host"


def hide_values(errors: list[dict]) -> list[dict]:
    """Errors about files read on this host, with nothing taken from the files: their
    values, names and parser excerpts could be secrets the browser's user may not read."""
    out = []
    for e in errors:
        where = [x for x in (e.get("file"), None if e.get("document") is None else
                             f"document {e['document']}", e.get("path")) if x]
        out.append({"file": e.get("file"), "document": e.get("document"), "name": None,
                    "path": e.get("path") or "", "message": HIDDEN,
                    "text": ": ".join([*where, HIDDEN])})
    return out


def review(h: Host, files: list[dict], replace_all: bool = False,
           hidden: frozenset = frozenset()) -> dict:
    """The agent's own plan of the proposed set (POST /v1/review), never applied: its
    diff, the identity pairs newly allowed or denied, and the observed connections whose
    verdict would change. Invalid input comes back as the agent's errors."""
    out = {"host": h.name, "files": [f["name"] for f in files], "replace_all": replace_all,
           "valid": False, "errors": [], "agent": None, "pairs": [], "flows": [],
           "flows_checked": 0, "flows_available": False, "policies": [], "host_errors": h.errors}
    if not files:
        out["errors"] = [{"file": None, "document": None, "name": None, "path": "",
                          "message": "no policy files given", "text": "no policy files given"}]
        return out
    try:
        result = h.client.review(files, replace_all=replace_all)
    except APIError as exc:
        if exc.errors or exc.status == 400:
            errors: list[dict] = [{"file": e.get("file"), "document": e.get("document"),
                              "name": e.get("name"), "path": e.get("field") or "",
                              "message": e.get("reason") or e.get("message"),
                              "text": e.get("message")} for e in exc.errors] or [
                {"file": None, "document": None, "name": None, "path": exc.field or "",
                 "message": str(exc), "text": str(exc)}]
            if hidden:  # files read on this host: nothing from them in the answer
                errors = [*hide_values([e for e in errors if e["file"] in hidden or not e["file"]]),
                          *[e for e in errors if e["file"] and e["file"] not in hidden]]
            out["errors"] = errors
            return out
        h.errors.append(f"the agent's review failed: {exc}")
        return out
    except ClientError as exc:
        h.errors.append(f"the agent's review failed: {exc}")
        return out
    out.update(valid=True, agent={"diff": result["diff"], "changed": result["changed"],
                                  "revision": result["revision"]},
               pairs=result["pairs"],
               flows=result["flows"], flows_checked=result["flows_checked"],
               flows_available=result["flows_available"], policies=result["policies"])
    return out


# ---------------------------------------------------------------- flows
def flow_filters(args) -> dict:
    out: dict = {}
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
        proto, port = flow_port(f)
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
