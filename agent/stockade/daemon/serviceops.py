"""The agent's side of inventory-defined services (services.py): membership, relabelling,
CIDR identities with service labels."""
from __future__ import annotations

import logging

from ..policy.labels import LabelSet
from . import policydiff
from .services import effective_labels, membership, parse_services

log = logging.getLogger("stockade.services")


class ServiceOps:
    """Mixed into Agent."""

    def _workload_view(self, ep) -> dict:
        return {"name": ep.name, "source": ep.source, "interface": ep.interface,
                "image": (ep.extra or {}).get("image"), "labels": ep.labels}

    def _effective_labels_locked(self, ep) -> LabelSet:
        svc, matched = membership(self.services, self._workload_view(ep))
        old = self.memberships.get(ep.name)
        self.memberships[ep.name] = (svc, matched)
        if len(matched) > 1 and (old is None or old[1] != matched):
            msg = (f"endpoint {ep.name} matches services {', '.join(matched)}; "
                   f"it gets {svc.name} (first by name)")
            log.warning("%s", msg)
        return effective_labels(ep.labels, svc)

    def _restore_services_locked(self) -> None:
        self.services = parse_services(self.store.read("services.json", {}))
        self._write_service_cidrs_locked()

    def _write_service_cidrs_locked(self) -> None:
        want = {}
        for svc in sorted(self.services.values(), key=lambda s: s.name):
            for net in svc.cidrs:
                want.setdefault(net, svc)
        for net, svc in want.items():
            ident = self.alloc.cidr(net, svc.labels)
            old = self.service_cidrs.get(net)
            if old is not None and old.id == ident.id:
                continue
            self.identities[ident.id] = ident
            self._apply_locked(self.compiler.add_identity(ident))
            self.service_cidrs[net] = ident
            self._set_ipcache_locked(str(net), ident.id, "cidr", None)
            if old is not None:
                self._apply_locked(self.compiler.remove_identity(old.id))
                self.identities.pop(old.id, None)
        for net in [n for n in self.service_cidrs if n not in want]:
            old = self.service_cidrs.pop(net)
            plain = self.cidr_ids.get(net)
            if plain is not None:
                self._set_ipcache_locked(str(net), plain.id, "cidr", None)
            else:
                self._del_ipcache_locked(str(net))
            self._apply_locked(self.compiler.remove_identity(old.id))
            self.identities.pop(old.id, None)

    def set_services(self, data, *, dry_run: bool = False) -> dict:
        """Replace the service definitions; relabel workloads whose membership changes."""
        new = parse_services(data if data is not None else {})
        with self._lock:
            old = self.services
            changes = []
            for ep in self.endpoints.values():
                view = self._workload_view(ep)
                before = effective_labels(ep.labels, membership(old, view)[0])
                svc, matched = membership(new, view)
                after = effective_labels(ep.labels, svc)
                if before != after:
                    changes.append({"endpoint": ep.name, "service": svc.name if svc else None,
                                    "labels": after.to_strings()})
            result = {"changed": bool(changes) or {k: v.raw for k, v in old.items()} != {k: v.raw for k, v in new.items()},
                      "dry_run": dry_run, "relabeled": changes,
                      "conflicts": self._conflicts(new)}
            if dry_run:
                return result
            self.services = new
            self.store.write("services.json", {k: v.raw for k, v in new.items()})
            for ep in self.endpoints.values():
                if any(c["endpoint"] == ep.name for c in changes):
                    self._identify_locked(ep)
                else:
                    self._effective_labels_locked(ep)
            self._write_service_cidrs_locked()
            return result

    def _conflicts(self, services) -> list[dict]:
        out = []
        for ep in self.endpoints.values():
            svc, matched = membership(services, self._workload_view(ep))
            if len(matched) > 1:
                out.append({"endpoint": ep.name, "services": matched, "chosen": svc.name})
        return out

    def list_services(self) -> list[dict]:
        with self._lock:
            out = []
            for name, svc in sorted(self.services.items()):
                members = sorted(n for n, (s, _) in self.memberships.items()
                                 if s is not None and s.name == name and n in self.endpoints)
                out.append({"name": name, "labels": svc.labels.to_strings(),
                            "members": members, "cidrs": [str(c) for c in svc.cidrs],
                            "identity_cidrs": {str(n): i.id for n, i in self.service_cidrs.items()
                                               if i.labels.values_of("service", "service") == [name]},
                            "definition": svc.raw})
            return out

    def service_conflicts(self) -> list[dict]:
        with self._lock:
            return self._conflicts(self.services)
