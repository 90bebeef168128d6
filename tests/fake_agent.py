"""An in-memory AgentService for API, client and CLI tests: no kernel, no discovery.

It keeps the contract's shapes (daemon/contract.py) and raises the same errors the real
agent does for the same mistakes; policy text goes through the real loader, so policy
errors are real PolicyErrors. Every call is recorded in ``calls``.
"""
from __future__ import annotations

import ipaddress
import json
import threading
import time

from stockade.daemon.endpoints import static_labels
from stockade.errors import Conflict, InvalidRequest, NotFound, PolicyErrors
from stockade.policy.api.loader import load_text
from stockade.policy.sel import parse_port, parse_sel
from stockade.policy.trace import Tracer

FIRST_WORKLOAD_ID = 256


def _labels(raw) -> dict:
    if isinstance(raw, str):
        out = {}
        for item in filter(None, (s.strip() for s in raw.split(","))):
            k, sep, v = item.partition("=")
            if not sep or not k:
                raise InvalidRequest(f"label {item!r} is not key=value", "labels")
            out[k] = v
        return out
    return dict(raw or {})


def _source_labels(labels: dict, source: str) -> dict:
    return {(k if ":" in k else f"{source}:{k}"): v for k, v in labels.items()}


class FakeAgent:
    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.endpoints: dict[str, dict] = {}
        self.ipcache: dict[str, dict] = {}
        self.policies: dict[tuple, dict] = {}     # (kind, namespace, name) -> PolicyInfo
        self.identities: dict[tuple, int] = {}    # sorted label list -> id
        self.revision = 1
        self.services: dict = {}
        self.calls: list[tuple] = []
        self.fail_next: Exception | None = None   # raised by the next call, for 500 tests

    def _call(self, name, *args):
        self.calls.append((name, *args))
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc

    def _identity_locked(self, labels: dict) -> int:
        key = tuple(sorted(f"{k}={v}" for k, v in labels.items()))
        if key not in self.identities:
            self.identities[key] = FIRST_WORKLOAD_ID + len(self.identities)
        return self.identities[key]

    # ---------------------------------------------------------------- AgentService
    def health(self) -> dict:
        self._call("health")
        with self.lock:
            return {"status": "ok", "version": "0.1.0-fake",
                    "uptime_s": round(time.monotonic() - self.started, 3),
                    "enforcement": "default", "audit": False,
                    "policy_revision": self.revision, "endpoints": len(self.endpoints),
                    "identities": len(self.identities) + 2, "policies": len(self.policies),
                    "ipcache": len(self.ipcache), "errors": [], "unprotected_interfaces": []}

    def list_endpoints(self) -> list[dict]:
        self._call("list_endpoints")
        with self.lock:
            return [dict(e) for _, e in sorted(self.endpoints.items())]

    def add_endpoint(self, spec: dict) -> dict:
        self._call("add_endpoint", spec)
        name, iface = spec.get("name"), spec.get("interface")
        if not name:
            raise InvalidRequest("name must not be empty", "name")
        if not iface and not spec.get("mac"):
            raise InvalidRequest("interface or mac is required", "interface")
        if not spec.get("ips"):
            raise InvalidRequest("ips needs at least one address", "ips")
        ips = []
        for i, ip in enumerate(spec["ips"]):
            try:
                ips.append(str(ipaddress.ip_address(ip)))
            except ValueError:
                raise InvalidRequest(f"{ip!r} is not an IP address", f"ips[{i}]") from None
        # The agent's own rule: source static; other sources dropped, reserved/invalid refused.
        label_set, dropped = static_labels(spec.get("labels"))
        labels = label_set.to_dict()
        with self.lock:
            for other in self.endpoints.values():
                if iface and other["name"] != name and other["interface"] == iface:
                    raise Conflict(f"interface {iface} belongs to endpoint {other['name']}",
                                   "interface")
            mac = spec["mac"].lower() if spec.get("mac") else None
            by_mac = not iface  # as the agent: bound to the tap found from the MAC
            iface = iface or ""
            old = self.endpoints.get(name)
            if old and (old["by_mac"] or old["interface"], old["ips"], old["labels"], old["audit"],
                        old["mac"]) != (by_mac or iface, ips, labels,
                                        bool(spec.get("audit", False)), mac):
                raise Conflict(f"endpoint {name} exists with another spec", "name")
            if old:
                return dict(old)
            ep = {"name": name, "id": len(self.endpoints) + 1, "interface": iface,
                  "ifindex": None, "ips": ips, "labels": labels,
                  "identity": self._identity_locked(labels), "source": "static",
                  "audit": bool(spec.get("audit", False)), "state": "waiting-for-interface",
                  "mac": mac, "by_mac": by_mac, "dropped_labels": [d.to_dict() for d in dropped],
                  "enforcement": {"ingress": {"enforced": False, "default_deny": False},
                                  "egress": {"enforced": False, "default_deny": False}}}
            self.endpoints[name] = ep
            return dict(ep)

    def remove_endpoint(self, name: str) -> None:
        self._call("remove_endpoint", name)
        with self.lock:
            if self.endpoints.pop(name, None) is None:
                raise NotFound(f"no endpoint named {name!r}", "name")

    def list_identities(self) -> list[dict]:
        self._call("list_identities")
        with self.lock:
            out = [{"id": 1, "labels": ["reserved:host"], "kind": "reserved", "endpoints": [],
                    "local": True},
                   {"id": 2, "labels": ["reserved:world"], "kind": "reserved", "endpoints": [],
                    "local": False}]
            for key, num in sorted(self.identities.items(), key=lambda kv: kv[1]):
                eps = sorted(e["name"] for e in self.endpoints.values() if e["identity"] == num)
                out.append({"id": num, "labels": list(key), "kind": "workload",
                            "endpoints": eps, "local": bool(eps)})
            return out

    def list_ipcache(self) -> list[dict]:
        self._call("list_ipcache")
        with self.lock:
            return [dict(e) for _, e in sorted(self.ipcache.items())]

    def add_ipcache(self, entry: dict) -> dict:
        self._call("add_ipcache", entry)
        try:
            prefix = str(ipaddress.ip_network(entry.get("prefix", ""), strict=True))
        except ValueError as exc:
            raise InvalidRequest(f"prefix: {exc}", "prefix") from None
        labels = _source_labels(_labels(entry.get("labels")), "remote")
        if not labels and not entry.get("node"):
            raise InvalidRequest("labels are required (or node: true)", "labels")
        with self.lock:
            e = {"prefix": prefix, "identity": self._identity_locked(labels),
                 "labels": sorted(f"{k}={v}" for k, v in labels.items()),
                 "host": entry.get("host"), "source": "remote"}
            self.ipcache[prefix] = e
            return dict(e)

    def remove_ipcache(self, prefix: str) -> None:
        self._call("remove_ipcache", prefix)
        try:
            key = str(ipaddress.ip_network(prefix, strict=True))
        except ValueError as exc:
            raise InvalidRequest(f"prefix: {exc}", "prefix") from None
        with self.lock:
            if self.ipcache.pop(key, None) is None:
                raise NotFound(f"no ipcache entry for {key}", "prefix")

    def list_policies(self) -> list[dict]:
        self._call("list_policies")
        with self.lock:
            return [dict(p) for _, p in sorted(self.policies.items(),
                                               key=lambda kv: tuple(x or "" for x in kv[0]))]

    def _result_locked(self, old: dict, new: dict, dry_run: bool) -> dict:
        def disp(k):
            return f"{k[1]}/{k[2]}" if k[1] else k[2]
        added = sorted(disp(k) for k in new.keys() - old.keys())
        removed = sorted(disp(k) for k in old.keys() - new.keys())
        changed = sorted(disp(k) for k in new.keys() & old.keys()
                         if new[k]["document"] != old[k]["document"])
        rules_added = sorted(f"{disp(k)}: rule {i}" for k in new.keys() - old.keys()
                             for i in range(new[k]["rules"]))
        rules_removed = sorted(f"{disp(k)}: rule {i}" for k in old.keys() - new.keys()
                               for i in range(old[k]["rules"]))
        is_changed = bool(added or removed or changed)
        if is_changed and not dry_run:
            self.policies = new
            self.revision += 1
        return {"revision": self.revision, "changed": is_changed, "dry_run": dry_run,
                "diff": {"added": added, "removed": removed, "changed": changed,
                         "rules": {"added": rules_added, "removed": rules_removed},
                         "entries": {"added": len(rules_added), "removed": len(rules_removed),
                                     "sample": []}}}

    def _load(self, files: list[dict]) -> dict:
        loaded, errors = {}, []
        for f in files:
            try:
                for p in load_text(f["text"], f["name"]):
                    loaded[(p.ref.kind, p.ref.namespace or None, p.ref.name)] = {
                        **p.ref.to_dict(), "source": p.source, "document": p.document,
                        "rules": len(p.rules), "description": p.description, "problems": []}
            except PolicyErrors as exc:
                errors.extend(exc.errors)
        if errors:
            raise PolicyErrors(errors)
        return loaded

    def put_policies(self, files: list[dict], *, replace_all: bool = False,
                     dry_run: bool = False) -> dict:
        self._call("put_policies", files, replace_all, dry_run)
        loaded = self._load(files)
        with self.lock:
            new = dict(loaded) if replace_all else {**self.policies, **loaded}
            return self._result_locked(dict(self.policies), new, dry_run)

    def delete_policy(self, name: str, namespace: str | None = None,
                      kind: str | None = None, *, dry_run: bool = False) -> dict:
        self._call("delete_policy", name, namespace, kind, dry_run)
        with self.lock:
            if name == "*" and namespace is None:
                return self._result_locked(dict(self.policies), {}, dry_run)
            hits = [k for k in self.policies
                    if k[2] == name and (namespace is None or k[1] == namespace)
                    and (kind is None or k[0] == kind)]
            if not hits:
                raise NotFound(f"no policy named {name!r}", "name")
            if len(hits) > 1:
                raise InvalidRequest(f"{len(hits)} policies are named {name!r}; "
                                     "give --namespace or --kind", "name")
            new = {k: v for k, v in self.policies.items() if k not in hits}
            return self._result_locked(dict(self.policies), new, dry_run)

    def list_services(self) -> list[dict]:
        self._call("list_services")
        return [{"name": n, "labels": [f"service:service={n}"], "members": [], "cidrs": [],
                 "identity_cidrs": {}, "definition": d} for n, d in sorted(self.services.items())]

    def service_conflicts(self) -> list[dict]:
        return []

    def set_services(self, data: dict, *, dry_run: bool = False) -> dict:
        self._call("set_services", data)
        from stockade.daemon.services import parse_services
        from stockade.daemon.services import membership
        from stockade.policy.labels import LabelSet
        new = parse_services(data)  # the real validation (InvalidRequest with a field)
        old = parse_services(self.services)
        relabeled, conflicts = [], []
        with self.lock:
            for name, ep in sorted(self.endpoints.items()):
                view = {"name": name, "source": ep["source"], "interface": ep["interface"],
                        "image": None, "labels": LabelSet()}
                before, after = membership(old, view)[0], membership(new, view)
                if len(after[1]) > 1:
                    conflicts.append({"endpoint": name, "services": after[1],
                                      "chosen": after[0].name})
                if (before and before.name) != (after[0] and after[0].name):
                    labels = sorted(f"{k}={v}" for k, v in ep["labels"].items())
                    if after[0] is not None:
                        labels = sorted(labels + after[0].labels.to_strings())
                    relabeled.append({"endpoint": name, "service": after[0] and after[0].name,
                                      "labels": labels})
        changed = data != self.services or bool(relabeled)
        if not dry_run:
            self.services = dict(data)
        return {"changed": changed, "dry_run": dry_run, "relabeled": relabeled,
                "conflicts": conflicts}

    def metrics(self) -> str:
        self._call("metrics")
        return ("# HELP stockade_policy_revision Current policy revision.\n"
                "# TYPE stockade_policy_revision gauge\n"
                f"stockade_policy_revision {self.revision}\n")

    # flows: an empty ring, but criteria are checked exactly as the agent does
    def flows(self, criteria: dict) -> dict:
        from stockade.flows import FlowFilter, FlowRing
        self._call("flows", criteria)
        ring = FlowRing(16)
        rows = FlowFilter.parse(criteria).select(ring)
        return {"flows": [ring.to_dict(r) for r in rows], "count": len(rows), "connections": 0,
                "events_lost": {"rate_limit_new": 0, "rate_limit_drop": 0, "ringbuf_full": 0},
                "buffer": {"size": 0, "capacity": ring.capacity}}

    def follow_flows(self, criteria: dict, stopping=None):
        from stockade.flows import FlowFilter
        self._call("follow_flows", criteria)
        FlowFilter.parse(criteria)
        return iter([])

    # review: a dry run's diff; no evaluation of pairs or observed flows (the agent's)
    def review(self, files: list[dict], replace_all: bool = False) -> dict:
        self._call("review", files, replace_all)
        loaded = self._load(files)
        with self.lock:
            new = dict(loaded) if replace_all else {**self.policies, **loaded}
            result = self._result_locked(dict(self.policies), new, dry_run=True)
        return {"revision": result["revision"], "diff": result["diff"], "pairs": [],
                "flows": [], "flows_checked": 0}

    def _peer(self, text: str):
        if text.startswith("endpoint:"):
            with self.lock:
                ep = self.endpoints.get(text[len("endpoint:"):])
            if ep is None:
                raise NotFound(f"no endpoint named {text[len('endpoint:'):]!r}", "src")
            return parse_sel({k.split(":", 1)[-1]: v for k, v in ep["labels"].items()})
        return parse_sel(text)

    def trace(self, src: str, dst: str, dport: str) -> dict:
        """The real offline tracer over the stored documents."""
        self._call("trace", src, dst, dport)
        s, d = self._peer(src), self._peer(dst)
        proto, port = parse_port(dport)
        with self.lock:
            docs = [p["document"] for p in self.policies.values()]
        policies = [p for i, doc in enumerate(docs)
                    for p in load_text(json.dumps(doc), f"live-{i}.json")]
        return Tracer(policies).trace(s, d, proto, port)

    def matrix(self, query: dict) -> dict:
        """Every pair of known identities, each cell open (no policy evaluation here)."""
        self._call("matrix", query)
        ids = [{"id": i["id"], "name": ",".join(i["labels"]), "labels": i["labels"]}
               for i in self.list_identities()]
        label = query.get("label") or ""
        pairs = [(a, b) for a in ids for b in ids
                 if not label or any(label in x for x in a["labels"] + b["labels"])]
        page = pairs[query["offset"]:query["offset"] + query["limit"]]
        return {"rows": [{"src": a, "dst": b,
                          "cell": {"state": "open", "allow": [], "deny": [], "audit": False,
                                   "remote": False}} for a, b in page],
                "total": len(pairs), "offset": query["offset"], "limit": query["limit"]}
