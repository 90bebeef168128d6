"""The agent: endpoints, identities, ipcache and policy, kept in the BPF maps.

Data flows one way: sources (API, Podman/Docker events, netlink) change the model
(endpoints, identities, policies); the compiler turns each change into a delta; the
datapath writes it. Every change happens under one lock, in an order that never opens
the datapath: a new interface is attached and marked unidentified (dropped) before its
workload is known; an endpoint's identity and policy entries are written before the
endpoint entry that points at them; a failed write keeps the previous state.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import threading
import time

from .. import __version__
from ..errors import Conflict, InvalidRequest, NotFound, PolicyError, PolicyErrors, StockadeError
from ..policy.api.loader import load_text
from ..policy.api.validation import sanitize_document
from ..policy.compiler import Compiler
from ..policy.identity import (CIDR_KIND, Identity, IdentityAllocator, RESERVED_KIND,
                               reserved_identities)
from ..policy.api.entity import RESERVED
from ..policy.mapstate import DIRECTIONS, Delta, DirectionPolicy, diff as state_diff
from . import policydiff
from .config import AgentConfig
from .endpoints import Endpoint, parse_labels, parse_spec, tap_matches_mac
from .links import Link, LinkWatcher, host_addresses, list_links, matches_any
from .service import ServiceAPI
from .serviceops import ServiceOps
from .state import StateStore

log = logging.getLogger("stockade.agent")
HOST_ID = RESERVED["host"]
REMOTE_NODE_ID = RESERVED["remote-node"]


def host_prefix(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


class Agent(ServiceAPI, ServiceOps):
    def __init__(self, config: AgentConfig):
        self.config = config
        self._lock = threading.RLock()
        self.store = StateStore(config.state_dir)
        self.alloc = IdentityAllocator(self.store.path("identities.json"))
        self.compiler = Compiler(config.enforcement)
        self.endpoints: dict[str, Endpoint] = {}
        self.by_ifindex: dict[int, str] = {}
        self.identities: dict[int, Identity] = {}
        self._local_refs: collections.Counter = collections.Counter()
        self._remote_refs: collections.Counter = collections.Counter()
        self.ipcache: dict[str, dict] = {}    # prefix -> {identity, source, host}
        self.remote: dict[str, dict] = {}     # prefix -> {labels, host, node}
        self.policies: dict = {}              # PolicyRef -> Policy
        self.cidr_ids: dict = {}              # network -> Identity
        self.host_ips: list[str] = []
        self.revision = 0
        self.errors: collections.deque = collections.deque(maxlen=20)
        self.attached: set[int] = set()
        self.links: dict[int, Link] = {}
        self.unprotected: list[str] = []
        self.started = time.time()
        self.dp = None
        self._watchers: list = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.on_change = []  # callbacks(kind) for metrics/flows, outside the lock
        self.flow_source = None  # daemon.flowsource.FlowSource, from start()
        self.services: dict = {}        # name -> services.Service
        self.memberships: dict = {}     # endpoint name -> (Service or None, [matched names])
        self.service_cidrs: dict = {}   # network -> Identity (CIDR identity with service labels)
        for ident in reserved_identities():
            self.identities[ident.id] = ident
            self.compiler.add_identity(ident)

    # ------------------------------------------------------------------ lifecycle
    def start(self, datapath=None, *, watch_links: bool = True, watch_runtimes: bool = True) -> None:
        from ..datapath import Datapath
        cfg = self.config
        self.dp = datapath or Datapath(cfg.datapath_settings())
        with self._lock:
            self.dp.set_config(audit=cfg.audit, forward_unidentified=cfg.unknown_endpoint == "forward")
            self._restore_locked()
            self._reconcile_maps_locked()
        if watch_links:
            self._link_watcher = LinkWatcher(self._on_link)
            self._link_watcher.start()
            self._watchers.append(self._link_watcher)
            with self._lock:  # links that appeared before the watcher started
                for link in list_links():
                    self._on_link_locked("new", link, at_start=True)
        if watch_runtimes:
            from .runtimes import start_runtime_watchers
            self._watchers += start_runtime_watchers(self, self._stop)
        t = threading.Thread(target=self._gc_loop, name="stockade-ct-gc", daemon=True)
        t.start()
        self._threads.append(t)
        from .flowsource import start_flows
        from .metrics import instrument
        instrument(self)
        self.flow_source = start_flows(self)
        log.info("agent started: %d endpoints, %d policies, revision %d",
                 len(self.endpoints), len(self.policies), self.revision)

    def stop(self) -> None:
        """Stop watching; the datapath keeps enforcing the last policy."""
        self._stop.set()
        for w in self._watchers:
            try:
                w.stop()
            except Exception:
                log.exception("stopping %s failed", w)
        for t in self._threads:
            t.join(timeout=2)

    def _gc_loop(self) -> None:
        while not self._stop.wait(self.config.ct_gc_interval):
            try:
                self.dp.ct_gc()
            except StockadeError as exc:
                self._error(f"conntrack gc: {exc}")

    def _error(self, msg: str) -> None:
        log.error("%s", msg)
        self.errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {msg}")

    # ------------------------------------------------------------------ restore
    def _restore_locked(self) -> None:
        self.host_ips = host_addresses()
        for ip in self.host_ips:
            self.ipcache[host_prefix(ip)] = {"identity": HOST_ID, "source": "host", "host": None}
        for rec in self.store.read("ipcache.json", []):
            self.remote[rec["prefix"]] = {"labels": parse_labels(rec["labels"], "remote"),
                                          "host": rec.get("host"), "node": rec.get("node", False)}
            self._ipcache_remote_locked(rec["prefix"])
        docs = self.store.read("policies.json", [])
        policies = []
        for d in docs:
            try:
                policies.append(sanitize_document(d["document"], source=d.get("source", "")))
            except PolicyErrors as exc:
                self._error(f"stored policy {d.get('source')} no longer valid: {exc}")
        self._set_cidr_identities_locked(policies)
        self.compiler.set_policies(policies)
        self.policies = {p.ref: p for p in policies}
        self.revision = self.store.read("revision.json", 0)
        self._restore_services_locked()
        links = {l.name: l for l in list_links()}
        for rec in self.store.read("endpoints.json", []):
            ep = Endpoint.from_record(rec)
            self.endpoints[ep.name] = ep
            link = links.get(ep.interface) if ep.interface else self._tap_for_mac(
                links.values(), ep.mac) if ep.by_mac else None
            if link is not None and ep.by_mac:
                ep.interface = link.name
            if link is not None:
                ep.ifindex = link.ifindex
                self.by_ifindex[link.ifindex] = ep.name
            self._identify_locked(ep)

    def _reconcile_maps_locked(self) -> None:
        """Make the (possibly pinned, possibly stale) maps equal the model."""
        dp = self.dp
        delta = state_diff(dp.policy_entries(), self.compiler.entries, dp.policy_flags(),
                           self.compiler.flags)
        dp.apply_delta(delta)
        current = dp.ipcache_entries()
        for prefix, e in self.ipcache.items():
            if current.get(prefix) != e["identity"]:
                dp.set_ipcache(prefix, e["identity"])
        for prefix in set(current) - set(self.ipcache):
            dp.del_ipcache(prefix)
        live = {l.ifindex: l for l in list_links()}
        for ifindex in dp.endpoint_ifindexes():
            if ifindex not in live:
                dp.del_endpoint(ifindex)
        for ep in self.endpoints.values():
            if ep.ifindex is not None:
                self._attach_locked(ep.ifindex, live.get(ep.ifindex))
                self._write_endpoint_locked(ep)

    # ------------------------------------------------------------------ identities
    def _ref_identity_locked(self, labels, local: bool) -> Identity:
        ident = self.alloc.workload(labels)
        was_local = self._local_refs[ident.id] > 0
        was_known = was_local or self._remote_refs[ident.id] > 0
        (self._local_refs if local else self._remote_refs)[ident.id] += 1
        if local and not was_local:
            if was_known:
                self._apply_locked(self.compiler.remove_identity(ident.id))
            self._apply_locked(self.compiler.add_identity(ident, local=True))
        elif not was_known:
            self._apply_locked(self.compiler.add_identity(ident, local=False))
        self.identities[ident.id] = ident
        return ident

    def _unref_identity_locked(self, ident_id: int, local: bool) -> None:
        refs = self._local_refs if local else self._remote_refs
        refs[ident_id] -= 1
        if refs[ident_id] > 0:
            return
        del refs[ident_id]
        if local and self._remote_refs[ident_id] > 0:
            self._apply_locked(self.compiler.remove_identity(ident_id))
            self._apply_locked(self.compiler.add_identity(self.identities[ident_id], local=False))
        elif self._local_refs[ident_id] <= 0 and self._remote_refs[ident_id] <= 0:
            self._apply_locked(self.compiler.remove_identity(ident_id))
            self.identities.pop(ident_id, None)

    def _apply_locked(self, delta: Delta) -> None:
        if self.dp is not None and delta:
            self.dp.apply_delta(delta)

    # ------------------------------------------------------------------ endpoints
    def _identify_locked(self, ep: Endpoint) -> None:
        """Give ``ep`` its identity; write its policy, ipcache and endpoint entries."""
        old = ep.identity
        ident = self._ref_identity_locked(self._effective_labels_locked(ep), local=True)
        ep.identity = ident.id
        for ip in ep.ips:
            self._set_ipcache_locked(host_prefix(ip), ident.id, "local", self.config.host_name)
        if ep.ifindex is not None and self.dp is not None:
            self._write_endpoint_locked(ep)
        if old is not None:
            self._unref_identity_locked(old, local=True)

    def _write_endpoint_locked(self, ep: Endpoint) -> None:
        if self.dp is None or ep.ifindex is None:
            return
        if ep.identity is None:
            self.dp.set_endpoint(ep.ifindex, ep.id, 0, unidentified=True)
        else:
            # its link-local addresses are the only fe80::/10 sources the datapath lets
            # it use (stable-privacy ones are not derived from the MAC)
            from ..discovery import DiscoveryError, peer_link_local_addresses
            try:
                link_local = peer_link_local_addresses(ep.ifindex)[:3]
            except DiscoveryError as exc:
                self._error(f"endpoint {ep.name}: link-local addresses: {exc}")
                link_local = []
            self.dp.set_endpoint(ep.ifindex, ep.id, ep.identity, ips=ep.ips, mac=ep.mac,
                                 audit=ep.audit, link_local=link_local)

    def _release_locked(self, ep: Endpoint) -> None:
        """Take ``ep`` out: its interface (if still there and managed) is left attached
        and unidentified, so it stays closed."""
        if ep.ifindex is not None and self.dp is not None:
            link = self.links.get(ep.ifindex)
            if link is not None and self._managed(link, ignore=ep.name):
                self.dp.set_endpoint(ep.ifindex, 0, 0, unidentified=True)
            else:
                self._detach_locked(ep.ifindex)
            self.by_ifindex.pop(ep.ifindex, None)
        for ip in ep.ips:
            p = host_prefix(ip)
            if self.ipcache.get(p, {}).get("identity") == ep.identity:
                self._del_ipcache_locked(p)
        if ep.identity is not None:
            self._unref_identity_locked(ep.identity, local=True)
        ep.identity = None

    def _next_endpoint_id(self) -> int:
        used = {e.id for e in self.endpoints.values()}
        n = 1
        while n in used:
            n += 1
        return n

    def upsert_endpoint(self, *, name: str, interface: str, ips, labels, source: str,
                        audit: bool = False, runtime_id=None, mac=None, ifindex=None,
                        extra: dict | None = None) -> Endpoint:
        with self._lock:
            old = self.endpoints.get(name)
            by_mac = not interface
            if by_mac:
                # A VM given by its guest MAC: bind to its tap when (and whenever) it exists.
                if not mac:
                    raise InvalidRequest("interface or mac is required", "interface")
                link = self._tap_for_mac(self.links.values(), mac)
                if link is None and self.dp is not None:
                    link = self._tap_for_mac(list_links(), mac)
                interface = link.name if link is not None else ""
                ifindex = link.ifindex if link is not None else None
            for other in self.endpoints.values():
                if interface and other.name != name and other.interface == interface:
                    raise Conflict(f"interface {interface} already belongs to endpoint {other.name}",
                                   "interface")
            if old is not None and old.source != source:
                raise Conflict(f"endpoint {name} exists (source {old.source})", "name")
            ep = Endpoint(name, old.id if old else self._next_endpoint_id(), interface, tuple(ips),
                          labels, source, audit, runtime_id, mac, extra=extra or {}, by_mac=by_mac)
            if old is not None and old.to_record() == ep.to_record() and old.ifindex is not None:
                return old
            if ifindex is None and interface:
                link = next((l for l in self.links.values() if l.name == interface), None)
                if link is None and self.dp is not None:
                    link = next((l for l in list_links() if l.name == interface), None)
                    if link is not None:
                        self.links[link.ifindex] = link
                ifindex = link.ifindex if link else None
            ep.ifindex = ifindex
            if old is not None:
                # New identity and entries first, then the old ones go.
                ep.identity = None
                self.endpoints[name] = ep
                old_ident, old_ips = old.identity, old.ips
                if ifindex is not None:
                    self._attach_locked(ifindex, self.links.get(ifindex))
                    self.by_ifindex[ifindex] = name
                self._identify_locked(ep)
                for ip in set(old_ips) - set(ep.ips):
                    if self.ipcache.get(host_prefix(ip), {}).get("identity") == old_ident:
                        self._del_ipcache_locked(host_prefix(ip))
                if old_ident is not None:
                    self._unref_identity_locked(old_ident, local=True)
                if old.ifindex is not None and old.ifindex != ifindex:
                    self.by_ifindex.pop(old.ifindex, None)
                    self._detach_locked(old.ifindex)
            else:
                self.endpoints[name] = ep
                if ifindex is not None:
                    self._attach_locked(ifindex, self.links.get(ifindex))
                    self.by_ifindex[ifindex] = name
                self._identify_locked(ep)
            self._save_endpoints_locked()
            return ep

    def drop_endpoint(self, name: str) -> None:
        with self._lock:
            ep = self.endpoints.pop(name, None)
            if ep is None:
                raise NotFound(f"no endpoint named {name}", "name")
            self._release_locked(ep)
            self.memberships.pop(name, None)
            self._save_endpoints_locked()

    def _save_endpoints_locked(self) -> None:
        self.store.write("endpoints.json", [e.to_record() for e in self.endpoints.values()])

    # ------------------------------------------------------------------ links
    def _managed(self, link: Link, ignore: str | None = None) -> bool:
        cfg = self.config
        if matches_any(link.name, cfg.managed_interfaces) or matches_any(link.master, cfg.managed_bridges):
            return True
        return any(e.interface == link.name or e.by_mac and tap_matches_mac(link.kind, link.mac, e.mac)
                   for e in self.endpoints.values() if e.name != ignore)

    @staticmethod
    def _tap_for_mac(links, mac: str | None) -> Link | None:
        """The tap of the VM with guest MAC ``mac`` (endpoints.tap_matches_mac), if any."""
        return next((l for l in links if tap_matches_mac(l.kind, l.mac, mac)), None)

    def _attach_locked(self, ifindex: int, link: Link | None) -> None:
        from ..datapath import attach
        if self.dp is None or ifindex in self.attached:
            return
        attach(ifindex, self.dp.from_endpoint_fd, self.dp.to_endpoint_fd)
        self.attached.add(ifindex)

    def _detach_locked(self, ifindex: int) -> None:
        from ..datapath import detach
        if self.dp is None:
            return
        self.dp.del_endpoint(ifindex)
        if ifindex in self.attached:
            detach(ifindex)
            self.attached.discard(ifindex)

    def _on_link(self, kind: str, link: Link) -> None:
        with self._lock:
            self._on_link_locked(kind, link)

    def _on_link_locked(self, kind: str, link: Link, at_start: bool = False) -> None:
        if kind == "del":
            self.links.pop(link.ifindex, None)
            self.attached.discard(link.ifindex)
            name = self.by_ifindex.pop(link.ifindex, None)
            if self.dp is not None:
                self.dp.del_endpoint(link.ifindex)
            if name and name in self.endpoints:
                self.endpoints[name].ifindex = None
                if self.endpoints[name].by_mac:
                    self.endpoints[name].interface = ""  # the next tap may have another name
            return
        self.links[link.ifindex] = link
        if not self._managed(link):
            return
        name = self.by_ifindex.get(link.ifindex)
        if name is None:
            waiting = next((e for e in self.endpoints.values()
                            if e.ifindex is None and (e.interface == link.name or e.by_mac and
                                                      tap_matches_mac(link.kind, link.mac, e.mac))),
                           None)
            if waiting is not None:
                if waiting.by_mac:
                    waiting.interface = link.name
                waiting.ifindex = link.ifindex
                self.by_ifindex[link.ifindex] = waiting.name
                self._attach_locked(link.ifindex, link)
                self._write_endpoint_locked(waiting)
                return
            if link.ifindex not in self.attached:
                if at_start:
                    from ..datapath import list_attached
                    if not list_attached(link.ifindex):
                        self.unprotected.append(link.name)
                # Unknown until a runtime or the API identifies it: closed.
                self.dp.set_endpoint(link.ifindex, 0, 0, unidentified=True)
                self._attach_locked(link.ifindex, link)
        elif link.ifindex not in self.attached:
            self._attach_locked(link.ifindex, link)

    # ------------------------------------------------------------------ ipcache
    def _set_ipcache_locked(self, prefix: str, identity: int, source: str, host) -> None:
        self.ipcache[prefix] = {"identity": identity, "source": source, "host": host}
        if self.dp is not None:
            self.dp.set_ipcache(prefix, identity)

    def _del_ipcache_locked(self, prefix: str) -> None:
        if self.ipcache.pop(prefix, None) is not None and self.dp is not None:
            self.dp.del_ipcache(prefix)

    def _ipcache_remote_locked(self, prefix: str) -> None:
        rec = self.remote[prefix]
        if rec["node"]:
            ident_id = REMOTE_NODE_ID
        else:
            ident_id = self._ref_identity_locked(rec["labels"], local=False).id
        rec["identity"] = ident_id
        self._set_ipcache_locked(prefix, ident_id, "remote", rec["host"])

    # ------------------------------------------------------------------ policies
    def _prefixes(self, policies) -> set:
        out = set()
        for p in policies:
            for r in p.rules:
                for items in (r.ingress, r.egress, r.ingress_deny, r.egress_deny):
                    for pr in items:
                        for c in pr.cidrs:
                            out.update(c.prefixes())
        return out

    def _set_cidr_identities_locked(self, policies) -> tuple[Delta, list, list]:
        """Add CIDR identities the policies need (returns delta, added, unused)."""
        need = self._prefixes(policies)
        delta = Delta({}, set(), {})
        added = []
        for net in sorted(need - set(self.cidr_ids), key=lambda n: (n.version, n.network_address, n.prefixlen)):
            ident = self.alloc.cidr(net)
            self.cidr_ids[net] = ident
            self.identities[ident.id] = ident
            policydiff.merge(delta, self.compiler.add_identity(ident))
            added.append(net)
        unused = [n for n in self.cidr_ids if n not in need]
        return delta, added, unused

    def _load_files(self, files) -> list:
        if not isinstance(files, list):
            raise InvalidRequest("files must be a list of {name, text}", "files")
        policies, errors, seen = [], [], {}
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

    def change_policies(self, upsert: list, remove: list, *, dry_run: bool) -> dict:
        with self._lock:
            old = dict(self.policies)
            new = dict(old)
            for ref in remove:
                new.pop(ref, None)
            for p in upsert:
                new[p.ref] = p
            changed = [p for p in upsert if p.ref not in old or old[p.ref].document != p.document]
            removed = [r for r in remove if r in old]
            delta, added_cidrs, _ = self._set_cidr_identities_locked(new.values())
            policydiff.merge(delta, self.compiler.set_policies(changed, remove=removed))
            unused = [n for n in self.cidr_ids if n not in self._prefixes(new.values())]
            for net in unused:
                policydiff.merge(delta, self.compiler.remove_identity(self.cidr_ids[net].id))
            summary = policydiff.summarize(old, new, delta)
            is_change = bool(delta) or bool(summary["added"] or summary["removed"] or summary["changed"])
            try:
                if dry_run:
                    raise _Revert()
                if delta:
                    self.dp.check_capacity(delta)
                for net in added_cidrs:
                    if net not in self.service_cidrs:  # a service's identity takes the prefix
                        self._set_ipcache_locked(str(net), self.cidr_ids[net].id, "cidr", None)
                self.dp.apply_delta(delta)
            except BaseException as exc:
                # Put the compiler back exactly as it was; the maps were not touched
                # (dry run, capacity) or the writer failed part way (logged below).
                for net in unused:
                    self.compiler.add_identity(self.cidr_ids[net])
                self.compiler.set_policies([old[r] for r in removed] +
                                           [old[p.ref] for p in changed if p.ref in old],
                                           remove=[p.ref for p in changed if p.ref not in old])
                for net in added_cidrs:
                    self.compiler.remove_identity(self.cidr_ids[net].id)
                    self.identities.pop(self.cidr_ids[net].id, None)
                    del self.cidr_ids[net]
                    self._del_ipcache_locked(str(net))
                if isinstance(exc, _Revert):
                    return {"revision": self.revision, "changed": is_change, "dry_run": True,
                            "diff": summary}
                if not isinstance(exc, StockadeError):
                    raise
                self._error(f"policy apply failed, previous policy kept: {exc}")
                # The writer may have written part of the delta: write the old state back.
                self._reconcile_maps_locked()
                raise
            for net in unused:
                if net not in self.service_cidrs:
                    self._del_ipcache_locked(str(net))
                self.identities.pop(self.cidr_ids[net].id, None)
                del self.cidr_ids[net]
            self.policies = new
            if is_change:
                self.revision += 1
                self.store.write("revision.json", self.revision)
            self.store.write("policies.json", [{"source": p.source, "document": p.document}
                                               for p in self.policies.values()])
            return {"revision": self.revision, "changed": is_change, "dry_run": False, "diff": summary}


class _Revert(Exception):
    """Internal: undo a dry run."""
