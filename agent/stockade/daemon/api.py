"""The agent as its API sees it (contract.AgentService): reads from snapshots, changes
submitted to the reconciler. The HTTP server (server.py) translates routes to these
methods; nothing here touches the kernel or the model directly."""
from __future__ import annotations

import ipaddress
import logging
import time

from .. import __version__
from ..errors import InvalidRequest, NotFound, PolicyError, PolicyErrors, StockadeError
from ..policy.api.loader import load_text
from ..policy.api.rule import KINDS
from ..policy.describe import clause_rows
from ..policy.mapstate import DIRECTION_NAMES, DirectionPolicy
from . import review
from .agent import Agent
from .apischema import api_schema
from .changes import (
    ChangePolicies,
    DeleteRemote,
    PutRemote,
    PutRemotes,
    RemoveEndpoint,
    SetServices,
    UpsertEndpoint,
    conflicts,
)
from .endpoints import parse_labels, parse_spec
from .gcpause import collector_paused
from .inventory import parse_services
from .state import Snapshot

log = logging.getLogger("stockade.api")
TRIM_AFTER_TEXT = 1 << 20   # an import of policy text larger than this gives memory back
# How long an OCI hook's request waits for the container's create event (the hook
# itself gives up after 2 s: stockade/hook.py)
HOOK_EVENT_WAIT = 1.0


class AgentAPI:
    def __init__(self, agent: Agent):
        self.agent = agent

    # ------------------------------------------------------------------ health
    def health(self) -> dict:
        a, snap = self.agent, self.agent.snapshot()
        problems = [f"policy {p.ref.display}: {msg}" for p in snap.policies.values()
                    for msg in p.problems]
        mismatches = [f"endpoint {name}: {why}" for name, why in sorted(snap.mismatches.items())]
        sources = a.source_health()
        down = any(not s["connected"] and not s.get("waiting") for s in sources)
        kvstore = a.fleet.status() if a.fleet is not None else None
        down = down or (kvstore is not None and kvstore["state"] != "connected")
        attach = a.attach_status()
        l7 = a.l7.health() if a.l7 is not None else None
        down = down or (l7 is not None and not l7["ok"])
        bad = snap.errors or problems or mismatches or down or attach["degraded"] or snap.unprotected
        out = {"status": "degraded" if bad else "ok", "attach": attach,
                "version": __version__, "uptime_s": round(time.time() - a.started, 1),
                "enforcement": a.config.enforcement, "audit": a.config.audit,
                "host": a.config.host_name, "policy_revision": snap.revision,
                "endpoints": len(snap.endpoints), "identities": len(snap.identities),
                "policies": len(snap.policies), "ipcache": len(snap.ipcache),
                "errors": list(snap.errors), "policy_problems": problems,
                "binding_mismatches": mismatches, "sources": sources,
                "unprotected_interfaces": sorted(set(snap.unprotected)),
                "l7_proxy": l7}
        if kvstore is not None:
            out["kvstore"] = kvstore
        return out

    # ------------------------------------------------------------------ endpoints
    def _endpoint_dict(self, snap: Snapshot, ep) -> dict:
        enf = {}
        for d in (0, 1):
            f = snap.flags.get((ep.identity, d), DirectionPolicy()) if ep.identity else DirectionPolicy()
            enf[DIRECTION_NAMES[d]] = {"enforced": f.enforced, "default_deny": f.default_deny}
        ident = snap.identities.get(ep.identity) if ep.identity is not None else None
        member = snap.memberships.get(ep.name)
        return {"name": ep.name, "id": ep.id, "interface": ep.interface, "ifindex": ep.ifindex,
                "ips": list(ep.ips), "labels": (ident.labels if ident else ep.labels).to_dict(),
                "service": member.service.name if member and member.service else None,
                "identity": ep.identity, "source": ep.source,
                "audit": ep.audit or self.agent.config.audit, "state": ep.state,
                "mac": ep.mac, "by_mac": ep.by_mac, "enforcement": enf,
                "dropped_labels": [d.to_dict() for d in ep.dropped_labels]}

    def list_endpoints(self) -> list[dict]:
        snap = self.agent.snapshot()
        return [self._endpoint_dict(snap, e) for e in sorted(snap.endpoints, key=lambda e: e.name)]

    def add_endpoint(self, spec: dict) -> dict:
        s = parse_spec(spec)
        ep = self.agent.submit(UpsertEndpoint(s["name"], s["interface"], s["ips"], s["labels"],
                                              "static", s["audit"], mac=s["mac"],
                                              dropped_labels=s["dropped_labels"]))
        snap = self.agent.snapshot()
        return self._endpoint_dict(snap, ep)

    def remove_endpoint(self, name: str) -> None:
        self.agent.submit(RemoveEndpoint(name, static_only=True))

    def oci_hook(self, state: dict) -> dict:
        started = time.monotonic()
        cid = state["id"]
        manager = (state.get("annotations") or {}).get("io.container.manager", "libpod")
        source = self.agent.runtime_source("podman") if manager == "libpod" else None
        result: object
        if manager != "libpod":
            result = f"not a Podman container (io.container.manager {manager})"
        elif source is None:
            result = "this agent does not follow Podman (podman_socket)"
        else:
            try:
                result = source.enroll(cid, state["pid"], state.get("bundle"), HOOK_EVENT_WAIT)
            except StockadeError as exc:
                result = str(exc)
        endpoint = None
        took = time.monotonic() - started
        if not isinstance(result, str):
            endpoint = self._endpoint_dict(self.agent.snapshot(), result)
            log.info("OCI hook: container %s is endpoint %s (%s) after %.1f ms", cid[:12],
                     endpoint["name"], endpoint["state"], took * 1000)
        else:
            log.info("OCI hook: container %s not enrolled after %.1f ms: %s", cid[:12],
                     took * 1000, result)
        return {"id": cid, "enrolled": endpoint is not None and endpoint["state"] == "ready",
                "endpoint": endpoint, "reason": result if isinstance(result, str) else None,
                "seconds": round(took, 4)}

    # ------------------------------------------------------------------ identities
    def list_identities(self) -> list[dict]:
        snap = self.agent.snapshot()
        users: dict[int, list[str]] = {}
        for e in snap.endpoints:
            if e.identity is not None:
                users.setdefault(e.identity, []).append(e.name)
        out = []
        for ident in sorted(snap.identities.values(), key=lambda i: i.id):
            d = ident.to_dict()
            d["endpoints"] = sorted(users.get(ident.id, []))
            d["local"] = ident.id in snap.local_ids
            out.append(d)
        return out

    # ------------------------------------------------------------------ ipcache
    def list_ipcache(self) -> list[dict]:
        snap = self.agent.snapshot()
        out = []
        for prefix, e in sorted(snap.ipcache.items()):
            ident = snap.identities.get(e.identity)
            out.append({"prefix": prefix, "identity": e.identity,
                        "labels": ident.labels.to_strings() if ident else [],
                        "host": e.host, "source": e.source})
        return out

    def add_ipcache(self, entry: dict) -> dict:
        return self.agent.submit(self._remote(entry))

    def add_ipcache_entries(self, body: dict) -> dict:
        """Many entries in one transaction; a bad one refuses all, naming its index."""
        entries = body.get("entries") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            raise InvalidRequest("entries must be a list of ipcache entries", "entries")
        changes = []
        for i, entry in enumerate(entries):
            try:
                changes.append(self._remote(entry))
            except InvalidRequest as exc:
                raise InvalidRequest(f"entries[{i}]: {exc}",
                                     f"entries[{i}]" + (f".{exc.field}" if exc.field else "")) from None
        changed = self.agent.submit(PutRemotes(changes))
        return {"entries": len(changes), "changed": changed}

    @staticmethod
    def _remote(entry) -> PutRemote:
        if not isinstance(entry, dict):
            raise InvalidRequest("ipcache entry must be a JSON object")
        for k in entry:
            if k not in ("prefix", "labels", "host", "node"):
                raise InvalidRequest(f"unknown field {k!r}", k)
        prefix = parse_prefix(entry.get("prefix"))
        host = entry.get("host")
        if host is not None and (not isinstance(host, str) or not host or len(host) > 253):
            raise InvalidRequest("host must be a host name", "host")
        node = entry.get("node", False)
        if not isinstance(node, bool):
            raise InvalidRequest("node must be true or false", "node")
        labels = parse_labels(entry.get("labels") or {}, "remote")
        if not labels and not node:
            raise InvalidRequest("labels are required (or node: true for another host's own "
                                 "addresses)", "labels")
        return PutRemote(prefix, labels, host, node)

    def remove_ipcache(self, prefix: str) -> None:
        self.agent.submit(DeleteRemote(parse_prefix(prefix)))

    # ------------------------------------------------------------------ policies
    def list_policies(self) -> list[dict]:
        snap = self.agent.snapshot()
        return [{**p.ref.to_dict(), "source": p.source, "document": p.document,
                 "rules": len(p.rules), "description": p.description,
                 "problems": list(p.problems), "clauses": clause_rows(p)}
                for p in sorted(snap.policies.values(), key=lambda p: p.ref)]

    def put_policies(self, files: list[dict], *, replace_all: bool = False,
                     dry_run: bool = False) -> dict:
        large = isinstance(files, list) and sum(
            len(f["text"]) for f in files if isinstance(f, dict) and isinstance(f.get("text"), str)
        ) > TRIM_AFTER_TEXT
        with collector_paused(trim=large):
            loaded = load_files(files)
            with self.agent.locked():
                current = self.agent.engine.policies
                keep = {p.ref for p in loaded}
                remove = [r for r in current if replace_all and r not in keep]
                return self.agent.submit_locked(ChangePolicies(loaded, remove), dry_run=dry_run)

    def delete_policy(self, name: str, namespace: str | None = None, kind: str | None = None,
                      *, dry_run: bool = False) -> dict:
        if kind is not None and kind not in KINDS:
            raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}", "kind")
        with collector_paused(trim=name == "*"), self.agent.locked():
            current = self.agent.engine.policies
            if name == "*" and not namespace:
                refs = list(current)
            else:
                refs = [r for r in current if r.name == name
                        and (r.namespace or None) == (namespace or None)
                        and (kind is None or r.kind == kind)]
                if not refs:
                    raise NotFound(f"no policy named {name}" + (f" in namespace {namespace}" if namespace else ""),
                                   "name")
            return self.agent.submit_locked(ChangePolicies([], refs), dry_run=dry_run)

    # ------------------------------------------------------------------ services
    def list_services(self) -> list[dict]:
        snap = self.agent.snapshot()
        out = []
        names = {e.name for e in snap.endpoints}
        for name, svc in sorted(snap.services.items()):
            members = sorted(n for n, m in snap.memberships.items()
                             if m.service is not None and m.service.name == name and n in names)
            out.append({"name": name, "labels": svc.labels.to_strings(),
                        "members": members, "cidrs": [str(c) for c in svc.cidrs],
                        "identity_cidrs": {str(n): i.id for n, i in snap.service_cidrs.items()
                                           if i.labels.values_of("service", "service") == [name]},
                        "definition": svc.raw})
        return out

    def service_conflicts(self) -> list[dict]:
        snap = self.agent.snapshot()
        return conflicts(snap.endpoints, snap.services)

    def set_services(self, data, *, dry_run: bool = False) -> dict:
        return self.agent.submit(SetServices(parse_services(data if data is not None else {})),
                                 dry_run=dry_run)

    # ------------------------------------------------------------------ questions
    def trace(self, src: str, dst: str, dport: str, http: dict | None = None) -> dict:
        return review.live_trace(self.agent, src, dst, dport, http)

    def matrix(self, query: dict) -> dict:
        # the server has validated it already; an in-process caller's is validated here
        op = api_schema().operation("GET", "/v1/matrix")
        return review.matrix(self.agent, op.arguments(query))

    def review(self, files: list[dict], replace_all: bool = False) -> dict:
        return review.review(self.agent, load_files(files), replace_all)

    # ------------------------------------------------------------------ metrics and flows
    def metrics(self) -> str:
        from .metrics import render
        return render(self.agent)

    def _flow_source(self):
        if self.agent.flow_source is None:
            raise NotFound("flow visibility is not running (the agent has no datapath yet)")
        return self.agent.flow_source

    def flows(self, criteria: dict) -> dict:
        return self._flow_source().query(criteria)

    def follow_flows(self, criteria: dict, stopping=None):
        src = self._flow_source()
        from ..flows import FlowFilter
        f = FlowFilter.parse(criteria)  # bad criteria: 400 before the stream starts
        if f.until_ns is not None or f.first is not None:
            raise InvalidRequest("until and first select from the recorded flows; they cannot "
                                 "be followed", "follow")
        return src.follow(criteria, stopping)


def load_files(files) -> list:
    """Policy files from an API body, validated as one set: every error, or the policies."""
    if not isinstance(files, list):
        raise InvalidRequest("files must be a list of {name, text}", "files")
    policies: list = []
    errors: list[PolicyError] = []
    seen: dict = {}
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not isinstance(f.get("text"), str):
            raise InvalidRequest("each file needs a name and a text", f"files[{i}]")
        name = str(f.get("name") or f"files[{i}]")
        try:
            loaded = load_text(f["text"], name)
        except PolicyErrors as exc:
            errors.extend(exc.errors)
            continue
        for p in loaded:
            if p.ref in seen:
                errors.append(PolicyError("metadata.name", f"policy {p.ref.display} is also "
                                          f"defined in {seen[p.ref]}", file=name))
            seen[p.ref] = name
        policies.extend(loaded)
    if errors:
        raise PolicyErrors(errors)
    return policies


def parse_prefix(value) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest("prefix is required: an IP address or prefix", "prefix")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise InvalidRequest(f"{value!r} is not an IP address or prefix ({exc})", "prefix") from None
    return str(net)
