"""The AgentService contract (contract.py) on top of the agent's core operations."""
from __future__ import annotations

import ipaddress
import time

from .. import __version__
from ..errors import InvalidRequest, NotFound
from ..policy.api.rule import KINDS
from ..policy.mapstate import DIRECTION_NAMES, DirectionPolicy
from .endpoints import parse_labels, parse_spec


class ServiceAPI:
    """Mixed into Agent; every method takes the agent's lock where it reads state."""

    # health ---------------------------------------------------------------------
    def health(self) -> dict:
        with self._lock:
            problems = [f"policy {p.ref.display}: {msg}" for p in self.policies.values()
                        for msg in p.problems]
            return {"status": "degraded" if self.errors or problems else "ok",
                    "version": __version__, "policy_problems": problems,
                    "uptime_s": round(time.time() - self.started, 1),
                    "enforcement": self.config.enforcement, "audit": self.config.audit,
                    "host": self.config.host_name,
                    "policy_revision": self.revision, "endpoints": len(self.endpoints),
                    "identities": len(self.identities), "policies": len(self.policies),
                    "ipcache": len(self.ipcache), "errors": list(self.errors),
                    "unprotected_interfaces": sorted(set(self.unprotected))}

    # endpoints ------------------------------------------------------------------
    def _endpoint_dict(self, ep) -> dict:
        enf = {}
        for d in (0, 1):
            f = self.compiler.flags.get((ep.identity, d), DirectionPolicy()) if ep.identity else DirectionPolicy()
            enf[DIRECTION_NAMES[d]] = {"enforced": f.enforced, "default_deny": f.default_deny}
        ident = self.identities.get(ep.identity) if ep.identity is not None else None
        svc, matched = self.memberships.get(ep.name, (None, []))
        return {"name": ep.name, "id": ep.id, "interface": ep.interface, "ifindex": ep.ifindex,
                "ips": list(ep.ips), "labels": (ident.labels if ident else ep.labels).to_dict(),
                "service": svc.name if svc else None, "identity": ep.identity,
                "source": ep.source, "audit": ep.audit or self.config.audit, "state": ep.state,
                "mac": ep.mac, "by_mac": ep.by_mac, "enforcement": enf,
                "dropped_labels": [d.to_dict() for d in ep.dropped_labels]}

    def list_endpoints(self) -> list[dict]:
        with self._lock:
            return [self._endpoint_dict(e) for e in sorted(self.endpoints.values(), key=lambda e: e.name)]

    def add_endpoint(self, spec: dict) -> dict:
        s = parse_spec(spec)
        ep = self.upsert_endpoint(name=s["name"], interface=s["interface"], ips=s["ips"],
                                  labels=s["labels"], source="static", audit=s["audit"], mac=s["mac"],
                                  dropped_labels=s["dropped_labels"])
        with self._lock:
            return self._endpoint_dict(ep)

    def remove_endpoint(self, name: str) -> None:
        with self._lock:
            ep = self.endpoints.get(name)
            if ep is None:
                raise NotFound(f"no endpoint named {name}", "name")
            if ep.source != "static":
                raise InvalidRequest(f"endpoint {name} comes from {ep.source}; it goes when the "
                                     "workload stops", "name")
        self.drop_endpoint(name)

    # identities -----------------------------------------------------------------
    def list_identities(self) -> list[dict]:
        with self._lock:
            users: dict[int, list[str]] = {}
            for e in self.endpoints.values():
                if e.identity is not None:
                    users.setdefault(e.identity, []).append(e.name)
            out = []
            for ident in sorted(self.identities.values(), key=lambda i: i.id):
                d = ident.to_dict()
                d["endpoints"] = sorted(users.get(ident.id, []))
                d["local"] = ident.id in self.compiler.local_ids
                out.append(d)
            return out

    # ipcache --------------------------------------------------------------------
    def list_ipcache(self) -> list[dict]:
        with self._lock:
            out = []
            for prefix, e in sorted(self.ipcache.items()):
                ident = self.identities.get(e["identity"])
                out.append({"prefix": prefix, "identity": e["identity"],
                            "labels": ident.labels.to_strings() if ident else [],
                            "host": e["host"], "source": e["source"]})
            return out

    def add_ipcache(self, entry: dict) -> dict:
        if not isinstance(entry, dict):
            raise InvalidRequest("ipcache entry must be a JSON object")
        for k in entry:
            if k not in ("prefix", "labels", "host", "node"):
                raise InvalidRequest(f"unknown field {k!r}", k)
        prefix = _parse_prefix(entry.get("prefix"))
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
        with self._lock:
            cur = self.ipcache.get(prefix)
            if cur is not None and cur["source"] != "remote":
                raise InvalidRequest(f"{prefix} is a {cur['source']} address of this host", "prefix")
            old = self.remote.get(prefix)
            rec = {"labels": labels, "host": host, "node": node}
            if old is None or (old["labels"], old["host"], old["node"]) != (labels, host, node):
                self.remote[prefix] = rec
                self._ipcache_remote_locked(prefix)
                if old is not None and not old["node"]:
                    self._unref_identity_locked(old["identity"], local=False)
                self._save_remote_locked()
            e = self.ipcache[prefix]
            return {"prefix": prefix, "identity": e["identity"],
                    "labels": self.identities[e["identity"]].labels.to_strings(),
                    "host": host, "source": "remote"}

    def remove_ipcache(self, prefix: str) -> None:
        prefix = _parse_prefix(prefix)
        with self._lock:
            rec = self.remote.pop(prefix, None)
            if rec is None:
                raise NotFound(f"no remote ipcache entry for {prefix}", "prefix")
            self._del_ipcache_locked(prefix)
            if not rec["node"]:
                self._unref_identity_locked(rec["identity"], local=False)
            self._save_remote_locked()

    def _save_remote_locked(self) -> None:
        self.store.write("ipcache.json", [
            {"prefix": p, "labels": r["labels"].to_dict(), "host": r["host"], "node": r["node"]}
            for p, r in sorted(self.remote.items())])

    # policies -------------------------------------------------------------------
    def list_policies(self) -> list[dict]:
        with self._lock:
            return [{**p.ref.to_dict(), "source": p.source, "document": p.document,
                     "rules": len(p.rules), "description": p.description,
                     "problems": list(p.problems)}
                    for p in sorted(self.policies.values(), key=lambda p: p.ref)]

    def put_policies(self, files: list[dict], *, replace_all: bool = False,
                     dry_run: bool = False) -> dict:
        loaded = self._load_files(files)
        with self._lock:
            remove = [r for r in self.policies if replace_all and r not in {p.ref for p in loaded}]
            return self.change_policies(loaded, remove, dry_run=dry_run)

    def delete_policy(self, name: str, namespace: str | None = None, kind: str | None = None,
                      *, dry_run: bool = False) -> dict:
        if kind is not None and kind not in KINDS:
            raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}", "kind")
        with self._lock:
            if name == "*" and not namespace:
                refs = list(self.policies)
            else:
                refs = [r for r in self.policies if r.name == name
                        and (r.namespace or None) == (namespace or None)
                        and (kind is None or r.kind == kind)]
                if not refs:
                    raise NotFound(f"no policy named {name}" + (f" in namespace {namespace}" if namespace else ""),
                                   "name")
            return self.change_policies([], refs, dry_run=dry_run)

    def metrics(self) -> str:
        from .metrics import render
        return render(self)

    # flows ----------------------------------------------------------------------
    def _flow_source(self):
        if getattr(self, "flow_source", None) is None:
            raise NotFound("flow visibility is not running (the agent has no datapath yet)")
        return self.flow_source

    def flows(self, criteria: dict) -> dict:
        return self._flow_source().query(criteria)

    def follow_flows(self, criteria: dict, stopping=None):
        src = self._flow_source()
        from ..flows import FlowFilter
        FlowFilter.parse(criteria)  # bad criteria: 400 before the stream starts
        return src.follow(criteria, stopping)


def _parse_prefix(value) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest("prefix is required: an IP address or prefix", "prefix")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise InvalidRequest(f"{value!r} is not an IP address or prefix ({exc})", "prefix") from None
    return str(net)
