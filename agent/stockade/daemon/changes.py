"""Changes: what a source (the API, a runtime, netlink, the fleet store) asks the agent to do.

Each is a small object with ``apply(txn)``; the agent (agent.Agent.submit) runs it inside
a transaction, writes the steps it planned, then commits or discards. ``apply`` changes
nothing outside the transaction (the model through its journal, the engine through its
transaction), so a dry run is the same apply, discarded.

Shared operations (identify an endpoint, release it, keep CIDR identities in step with
the policies) are the functions at the end of this module.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import Conflict, InvalidRequest, NotFound
from ..policy.api.cidr import Network
from ..policy.api.entity import RESERVED
from ..policy.api.rule import Policy, PolicyRef
from ..policy.describe import summarize
from ..policy.labels import LabelSet
from .binding import RUNTIMES as RUNTIME_SOURCES
from .binding import binding_problem
from .endpoints import Endpoint, tap_matches_mac
from .inventory import Service, effective_labels, membership
from .links import Link, list_links, matches_any
from .state import Membership, RemoteRecord
from .txn import HOST_ID, Txn, host_prefix

log = logging.getLogger("stockade.agent")
REMOTE_NODE_ID = RESERVED["remote-node"]


class Change:
    """What every change has: a short description for logs and errors."""

    what = "change"
    action = "change"

    def apply(self, txn: Txn) -> Any:
        raise NotImplementedError

    def describe(self) -> tuple[str, str]:
        """(action, object) for the change log (changelog.py)."""
        return self.action, ""

    def origin(self) -> str:
        """Who asked, when not an API peer: the runtime or the agent itself."""
        return getattr(self, "source", None) or "agent"


def _names(refs) -> str:
    names = sorted({r.display for r in refs})
    return ", ".join(names[:10]) + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")


# ---------------------------------------------------------------- endpoints
@dataclass
class UpsertEndpoint(Change):
    """Register or update a workload (static endpoints, runtimes, libvirt).

    A runtime's or libvirt's announcement, and an API registration, bind the endpoint
    to the interface they name: they know which one it is. Binding from a record
    (restore, a link that appears) is binding.py's business."""

    name: str
    interface: str | None
    ips: tuple[str, ...]
    labels: LabelSet
    source: str
    audit: bool = False
    runtime_id: str | None = None
    mac: str | None = None
    ifindex: int | None = None
    extra: dict = field(default_factory=dict)
    dropped_labels: tuple = ()    # labelsources.DroppedLabel: what it claimed and did not get
    netns: tuple[int, str | None] | None = None   # a container's namespace (inode, path)
    what = "endpoint"

    def describe(self) -> tuple[str, str]:
        return "endpoint.upsert", self.name

    def apply(self, txn: Txn) -> Endpoint:
        st, agent = txn.state, txn.agent
        old = st.endpoints.get(self.name)
        interface, ifindex = self.interface or "", self.ifindex
        by_mac = not interface
        link = None
        if by_mac:
            # A VM given by its guest MAC: bound to its tap when (and whenever) it exists.
            if not self.mac:
                raise InvalidRequest("interface or mac is required", "interface")
            link = tap_for_mac(agent.links.values(), self.mac)
            if link is None and agent.live:
                link = tap_for_mac(list_links(), self.mac)
            interface = link.name if link is not None else ""
        elif interface:
            link = find_link(agent, interface, ifindex)
        ifindex = link.ifindex if link is not None else (None if by_mac else self.ifindex)
        for other in list(st.endpoints.values()):
            if interface and other.name != self.name and other.interface == interface:
                self._settle(txn, other, link)
        if old is not None and old.source != self.source:
            raise Conflict(f"endpoint {self.name} exists (source {old.source})", "name")
        ep = Endpoint(self.name, old.id if old else next_endpoint_id(txn), interface,
                      tuple(self.ips), self.labels, self.source, self.audit, self.runtime_id,
                      self.mac, extra=dict(self.extra), by_mac=by_mac,
                      dropped_labels=tuple(self.dropped_labels), netns=self.netns,
                      link_mac=link.mac if link is not None else (
                          old.link_mac if old is not None and old.interface == interface else None))
        if old is not None and old.to_record() == ep.to_record() and \
                old.ifindex is not None and old.ifindex == ifindex:
            return old
        same = old is not None and old.to_record() == ep.to_record()
        if not same and self.dropped_labels:
            report_dropped_labels(txn, ep)
        ep = replace(ep, ifindex=ifindex)
        txn.put_endpoint(ep)
        txn.j.delete(st.mismatches, self.name)
        if ifindex is not None:
            txn.attach(ifindex, closed_on_undo=link is not None and managed_by_config(agent, link))
            txn.bind(ifindex, self.name)
        ep = identify(txn, ep)  # the new identity and entries first, then the old ones go
        if old is not None and old.audit and not ep.audit and ifindex is not None:
            txn.audit_off.add(ifindex)   # its audited flows go once the entry says enforce
        if old is not None:
            for ip in set(old.ips) - set(ep.ips):
                entry = st.ipcache.get(host_prefix(ip))
                if entry is not None and entry.identity == old.identity:
                    txn.del_ipcache(host_prefix(ip))
            if old.identity is not None:
                txn.unref_identity(old.identity, local=True)
            if old.ifindex is not None and old.ifindex != ifindex:
                txn.unbind(old.ifindex)
                txn.detach(old.ifindex)
        txn.log.append(f"endpoint {self.name} ({self.source}) {'updated' if old else 'added'}: "
                       f"identity {ep.identity}, {', '.join(ep.ips)}")
        return ep

    def _settle(self, txn: Txn, other: Endpoint, link: Link | None) -> None:
        """``other`` names the same interface. It keeps it when it holds that very link,
        unless this is a runtime's announcement from another network namespace (the
        runtime found the link from inside that namespace: ``other``'s record is stale,
        it waits and is removed when the runtime lists without it). A static name is
        refused twice over. An endpoint that only waits for a link of that name does
        not hold it."""
        holds = other.ifindex is not None and (link is None or other.ifindex == link.ifindex)
        if holds and other.ifindex is not None and self.source in RUNTIME_SOURCES and \
                other.source == self.source and self.netns is not None and other.netns != self.netns:
            txn.unbind(other.ifindex)
            txn.put_endpoint(replace(other, ifindex=None))
            txn.log.append(f"endpoint {other.name}: interface {other.interface} now belongs to "
                           f"{self.source} container {(self.runtime_id or '?')[:12]}")
            return
        if holds or (other.source == "static" and self.source == "static"):
            raise Conflict(f"interface {other.interface} already belongs to endpoint {other.name}",
                           "interface")


@dataclass
class RemoveEndpoint(Change):
    name: str
    static_only: bool = False  # the API removes static endpoints only
    runtime_id: str | None = None  # a runtime removes only the container it added
    source: str | None = None
    what = "endpoint removal"

    def describe(self) -> tuple[str, str]:
        return "endpoint.remove", self.name

    def apply(self, txn: Txn) -> bool:
        ep = txn.state.endpoints.get(self.name)
        if ep is None:
            if self.source is not None:
                return False
            raise NotFound(f"no endpoint named {self.name}", "name")
        if self.source is not None and (ep.source != self.source or
                                        (self.runtime_id is not None and ep.runtime_id != self.runtime_id)):
            return False
        if self.static_only and ep.source != "static":
            raise InvalidRequest(f"endpoint {self.name} comes from {ep.source}; it goes when the "
                                 "workload stops", "name")
        release(txn, ep)
        txn.drop_endpoint(self.name)
        txn.j.delete(txn.state.mismatches, self.name)
        txn.log.append(f"endpoint {self.name} ({ep.source}) removed")
        return True


@dataclass
class LinkChange(Change):
    """A host interface appeared ("new") or went ("del")."""

    kind: str
    link: Link
    at_start: bool = False
    what = "link"

    def describe(self) -> tuple[str, str]:
        return "endpoint.bind", self.link.name

    def origin(self) -> str:
        return "netlink"

    def apply(self, txn: Txn) -> None:
        st, agent, link = txn.state, txn.agent, self.link
        if self.kind == "del":
            agent.links.pop(link.ifindex, None)
            if link.ifindex in agent.attached:
                agent._kernel_default("unprotect", [link.ifindex])
            agent.attached.discard(link.ifindex)
            name = st.by_ifindex.get(link.ifindex)
            txn.unbind(link.ifindex)
            txn.forget_interface(link.ifindex)
            ep = st.endpoints.get(name) if name else None
            if ep is not None:
                # a VM's next tap may have another name
                txn.put_endpoint(replace(ep, ifindex=None, interface="" if ep.by_mac else ep.interface))
            return
        agent.links[link.ifindex] = link
        if not managed(txn, link):
            return
        if st.by_ifindex.get(link.ifindex) is not None:
            if link.ifindex not in agent.attached:
                txn.attach(link.ifindex)
            return
        for waiting in [e for e in st.endpoints.values() if e.ifindex is None and (
                e.interface == link.name or e.by_mac and tap_matches_mac(link.kind, link.mac, e.mac))]:
            problem = binding_problem(waiting, link)
            if problem is not None:
                txn.j.set(st.mismatches, waiting.name, problem)
                txn.log.append(f"endpoint {waiting.name} not bound: {problem}")
                continue
            ep = replace(waiting, ifindex=link.ifindex, link_mac=link.mac,
                         interface=link.name if waiting.by_mac else waiting.interface)
            txn.put_endpoint(ep)
            txn.j.delete(st.mismatches, ep.name)
            txn.bind(link.ifindex, ep.name)
            txn.attach(link.ifindex, closed_on_undo=True)
            txn.write_endpoint(ep)
            return
        if link.ifindex not in agent.attached:
            # attached first: with no endpoint entry the programs drop its packets, so
            # a failed entry write (a full map) leaves it closed, never open
            txn.attach(link.ifindex, closed_on_undo=True)
            txn.close_interface(link.ifindex)


@dataclass
class HostAddresses(Change):
    """The host's own addresses as they are now (netlink: an address came or went, such
    as the gateway address of a bridge Podman creates with its first container). Each
    is the host identity in the ipcache, as at start; an address that another entry
    holds (an endpoint's, another host's) keeps it."""

    ips: tuple[str, ...]
    what = "host addresses"

    def describe(self) -> tuple[str, str]:
        return "host.addresses", ""

    def origin(self) -> str:
        return "netlink"

    def apply(self, txn: Txn) -> None:
        st = txn.state
        old, new = set(st.meta.get("host_ips", ())), set(self.ips)
        if old == new:
            return
        for ip in sorted(old - new):
            cur = st.ipcache.get(host_prefix(ip))
            if cur is not None and cur.source == "host":
                txn.del_ipcache(host_prefix(ip))
        for ip in sorted(new - old):
            if host_prefix(ip) not in st.ipcache:
                txn.set_ipcache(host_prefix(ip), HOST_ID, "host", None)
        txn.j.set(st.meta, "host_ips", tuple(sorted(new)))
        added, gone = sorted(new - old), sorted(old - new)
        txn.log.append("host addresses: " + "; ".join(
            part for part in (f"added {', '.join(added)}" if added else "",
                              f"removed {', '.join(gone)}" if gone else "") if part))


# ---------------------------------------------------------------- other hosts' workloads
@dataclass
class PutRemote(Change):
    prefix: str
    labels: LabelSet
    host: str | None
    node: bool = False
    what = "ipcache entry"

    def describe(self) -> tuple[str, str]:
        return "ipcache.put", self.prefix

    def origin(self) -> str:
        return "agent"

    def apply(self, txn: Txn) -> dict:
        st = txn.state
        cur = st.ipcache.get(self.prefix)
        if cur is not None and cur.source not in ("remote", "kvstore"):
            raise InvalidRequest(f"{self.prefix} is a {cur.source} address of this host", "prefix")
        if cur is not None and cur.source == "kvstore":
            shadow_kv(txn, self.prefix)   # the API's entry takes precedence
        old = st.remote.get(self.prefix)
        if old is None or (old.labels, old.host, old.node) != (self.labels, self.host, self.node):
            put_remote(txn, self.prefix, RemoteRecord(self.labels, self.host, self.node))
            if old is not None and not old.node and old.identity is not None:
                txn.unref_identity(old.identity, local=False)
            txn.dirty.add("ipcache")
            txn.log.append(f"ipcache {self.prefix} -> {self.labels} (host {self.host})")
        entry = st.ipcache[self.prefix]
        return {"prefix": self.prefix, "identity": entry.identity,
                "labels": txn.agent.engine.identities[entry.identity].labels.to_strings(),
                "host": self.host, "source": "remote"}


@dataclass
class PutRemotes(Change):
    """Many PutRemote in one transaction; returns how many changed something."""
    puts: list[PutRemote]
    what = "ipcache entries"

    def apply(self, txn: Txn) -> int:
        changed, start = 0, len(txn.log)
        for put in self.puts:
            n = len(txn.log)
            put.apply(txn)
            changed += len(txn.log) > n
        if changed > LOGGED_EACH:
            txn.log[start:] = [f"ipcache: {changed} entries added or changed"]
        return changed


LOGGED_EACH = 20     # a batch changing more is logged as one line


@dataclass
class DeleteRemote(Change):
    prefix: str
    what = "ipcache removal"

    def describe(self) -> tuple[str, str]:
        return "ipcache.delete", self.prefix

    def apply(self, txn: Txn) -> None:
        rec = txn.state.remote.get(self.prefix)
        if rec is None:
            raise NotFound(f"no remote ipcache entry for {self.prefix}", "prefix")
        txn.j.delete(txn.state.remote, self.prefix)
        txn.del_ipcache(self.prefix)
        if not rec.node and rec.identity is not None:
            txn.unref_identity(rec.identity, local=False)
        txn.dirty.add("ipcache")
        txn.log.append(f"ipcache {self.prefix} removed")
        kv = txn.state.kvstore.get(self.prefix)
        if kv is not None:   # the fleet store's entry that waited behind it
            put_kv(txn, self.prefix, kv)


@dataclass
class KvstoreSync(Change):
    """Other hosts' workloads and nodes from the fleet store (daemon/fleet.py): records
    to put and prefixes to delete; ``full``: ``puts`` is all there is (a listing), every
    other kvstore record goes. An API entry for the same prefix takes precedence (the
    record waits behind it); so does a local or host address."""

    puts: dict[str, RemoteRecord]
    deletes: list[str] = field(default_factory=list)
    full: bool = False
    persist: bool = True
    what = "kvstore sync"

    def apply(self, txn: Txn) -> dict:
        st = txn.state
        deletes = [p for p in st.kvstore if p not in self.puts] if self.full else self.deletes
        n_del = sum(del_kv(txn, p) for p in deletes)
        n_put = sum(put_kv(txn, p, rec) for p, rec in self.puts.items())
        if n_del or n_put:
            if self.persist:
                txn.dirty.add("kvstore")
            txn.log.append(f"kvstore: {n_put} entries put, {n_del} removed")
        return {"put": n_put, "deleted": n_del}


@dataclass
class KvstorePersist(Change):
    """Write kvstore.json now (the fleet source defers it while entries churn)."""

    what = "kvstore persist"

    def apply(self, txn: Txn) -> None:
        txn.dirty.add("kvstore")


# ---------------------------------------------------------------- policies
@dataclass
class ChangePolicies(Change):
    upsert: list[Policy]
    remove: list[PolicyRef] = field(default_factory=list)
    what = "policy apply"

    def describe(self) -> tuple[str, str]:
        if not self.upsert:
            return "policy.delete", _names(self.remove)
        return "policy.import", _names([p.ref for p in self.upsert] + list(self.remove))

    def apply(self, txn: Txn) -> dict:
        st, engine = txn.state, txn.agent.engine
        old = dict(engine.policies)
        new = dict(old)
        for ref in self.remove:
            new.pop(ref, None)
        for p in self.upsert:
            new[p.ref] = p
        changed = [p for p in self.upsert if p.ref not in old or old[p.ref].document_json != p.document_json]
        removed = [r for r in self.remove if r in old]
        unused = sync_cidr_identities(txn, new)
        txn.engine(txn.etx.set_policies(changed, remove=removed))
        drop_cidr_identities(txn, unused)
        delta = txn.etx.delta
        summary = summarize(old, new, delta, txn.agent.policy_line_index,
                            touched=[p.ref for p in self.upsert] + self.remove)
        is_change = bool(delta) or bool(summary["added"] or summary["removed"] or summary["changed"])
        if is_change and not txn.dry_run:
            txn.j.set(st.meta, "revision", st.revision + 1)
            txn.dirty.add("revision")
        txn.dirty.add("policies")
        txn.log.append(f"policies: {len(changed)} added or changed, {len(removed)} removed; "
                       f"{summary['entries']['added']} entries added, "
                       f"{summary['entries']['removed']} removed")
        return {"revision": st.revision, "changed": is_change, "dry_run": txn.dry_run,
                "diff": summary}


# ---------------------------------------------------------------- inventory services
@dataclass
class SetServices(Change):
    services: dict[str, Service]
    what = "services change"

    def describe(self) -> tuple[str, str]:
        return "services.set", ", ".join(sorted(self.services)[:10]) or "(none)"

    def apply(self, txn: Txn) -> dict:
        st = txn.state
        old, new = dict(st.services), self.services
        relabel = []
        for ep in st.endpoints.values():
            view = workload_view(ep)
            before = effective_labels(ep.labels, membership(old, view)[0])
            svc, _ = membership(new, view)
            after = effective_labels(ep.labels, svc)
            if before != after:
                relabel.append({"endpoint": ep.name, "service": svc.name if svc else None,
                                "labels": after.to_strings()})
        changed = bool(relabel) or {k: v.raw for k, v in old.items()} != {k: v.raw for k, v in new.items()}
        result = {"changed": changed, "dry_run": txn.dry_run, "relabeled": relabel,
                  "conflicts": conflicts(st.endpoints.values(), new)}
        for name in old.keys() - new.keys():
            txn.j.delete(st.services, name)
        for name, svc in new.items():
            txn.j.set(st.services, name, svc)
        txn.dirty.add("services")
        moved = {c["endpoint"] for c in relabel}
        for ep in list(st.endpoints.values()):
            if ep.name in moved:
                identify(txn, ep)
            else:
                endpoint_labels(txn, ep)  # membership (and its conflict report) up to date
        write_service_cidrs(txn)
        if changed:
            txn.log.append(f"services: {len(new)} defined, {len(relabel)} endpoints relabeled")
        return result


# ---------------------------------------------------------------- shared operations
def report_dropped_labels(txn: Txn, ep: Endpoint) -> None:
    """Log and count the labels a new or changed endpoint does not get (labelsources)."""
    for d in ep.dropped_labels:
        txn.agent.labels_dropped[(ep.source, d.cause)] += 1
    log.warning("endpoint %s (%s): %d label(s) dropped: %s", ep.name, ep.source,
                len(ep.dropped_labels), "; ".join(f"{d.label}: {d.reason}" for d in ep.dropped_labels[:10]))


def next_endpoint_id(txn: Txn) -> int:
    used = {e.id for e in txn.state.endpoints.values()}
    n = 1
    while n in used:
        n += 1
    return n


def tap_for_mac(links, mac: str | None) -> Link | None:
    """The tap of the VM with guest MAC ``mac`` (endpoints.tap_matches_mac), if any."""
    return next((l for l in links if tap_matches_mac(l.kind, l.mac, mac)), None)


def find_link(agent, name: str, ifindex: int | None) -> Link | None:
    """The host link ``ifindex`` (when given) or named ``name``: the agent's, else the kernel's."""
    def match(link: Link) -> bool:
        return link.ifindex == ifindex if ifindex is not None else link.name == name
    found = next((link for link in agent.links.values() if match(link)), None)
    if found is None and agent.live:
        found = next((link for link in list_links() if match(link)), None)
        if found is not None:
            agent.links[found.ifindex] = found
    return found


def managed_by_config(agent, link: Link) -> bool:
    cfg = agent.config
    return matches_any(link.name, cfg.managed_interfaces) or matches_any(link.master, cfg.managed_bridges)


def managed(txn: Txn, link: Link, ignore: str | None = None) -> bool:
    if managed_by_config(txn.agent, link):
        return True
    return any(e.interface == link.name or e.by_mac and tap_matches_mac(link.kind, link.mac, e.mac)
               for e in txn.state.endpoints.values() if e.name != ignore)


def workload_view(ep: Endpoint) -> dict:
    return {"name": ep.name, "source": ep.source, "interface": ep.interface,
            "image": (ep.extra or {}).get("image"), "labels": ep.labels}


def conflicts(endpoints, services: dict[str, Service]) -> list[dict]:
    out = []
    for ep in endpoints:
        svc, matched = membership(services, workload_view(ep))
        if len(matched) > 1 and svc is not None:
            out.append({"endpoint": ep.name, "services": matched, "chosen": svc.name})
    return out


def endpoint_labels(txn: Txn, ep: Endpoint) -> LabelSet:
    """The labels ``ep``'s identity is made of: its own, plus its service's."""
    st = txn.state
    svc, matched = membership(st.services, workload_view(ep))
    old = st.memberships.get(ep.name)
    txn.j.set(st.memberships, ep.name, Membership(svc, tuple(matched)))
    if len(matched) > 1 and svc is not None and (old is None or old.matched != tuple(matched)):
        log.warning("endpoint %s matches services %s; it gets %s (first by name)",
                    ep.name, ", ".join(matched), svc.name)
    return effective_labels(ep.labels, svc)


def identify(txn: Txn, ep: Endpoint) -> Endpoint:
    """Give ``ep`` its identity; plan its ipcache and endpoint entries. The identity it
    had is released last."""
    old = ep.identity
    ident = txn.ref_identity(endpoint_labels(txn, ep), local=True)
    ep = replace(ep, identity=ident.id)
    txn.put_endpoint(ep)
    for ip in ep.ips:
        txn.set_ipcache(host_prefix(ip), ident.id, "local", txn.agent.config.host_name)
    txn.write_endpoint(ep)
    if old is not None:
        txn.unref_identity(old, local=True)
    return ep


def release(txn: Txn, ep: Endpoint) -> None:
    """Take ``ep`` out: its interface, if still there and managed, stays attached and
    unidentified (closed)."""
    agent, st = txn.agent, txn.state
    if ep.ifindex is not None:
        link = agent.links.get(ep.ifindex)
        if link is not None and managed(txn, link, ignore=ep.name):
            txn.close_interface(ep.ifindex)
        else:
            txn.detach(ep.ifindex)
        txn.unbind(ep.ifindex)
    for ip in ep.ips:
        entry = st.ipcache.get(host_prefix(ip))
        if entry is not None and entry.identity == ep.identity:
            txn.del_ipcache(host_prefix(ip))
    if ep.identity is not None:
        txn.unref_identity(ep.identity, local=True)


def put_remote(txn: Txn, prefix: str, rec: RemoteRecord) -> None:
    ident_id = REMOTE_NODE_ID if rec.node else txn.ref_identity(rec.labels, local=False).id
    txn.j.set(txn.state.remote, prefix, replace(rec, identity=ident_id))
    txn.set_ipcache(prefix, ident_id, "remote", rec.host)


def put_kv(txn: Txn, prefix: str, rec: RemoteRecord) -> bool:
    """The fleet store's ``rec`` for ``prefix``: in the ipcache unless another source
    holds the prefix (then it waits, identity None); whether anything changed."""
    st = txn.state
    old = st.kvstore.get(prefix)
    cur = st.ipcache.get(prefix)
    held = cur is not None and cur.source != "kvstore"
    if old is not None and (old.labels, old.host, old.node) == (rec.labels, rec.host, rec.node) \
            and (old.identity is None) == held:
        return False
    if held:
        if old is not None and old.identity is not None and not old.node:
            txn.unref_identity(old.identity, local=False)
        txn.j.set(st.kvstore, prefix, replace(rec, identity=None))
        return True
    ident_id = REMOTE_NODE_ID if rec.node else txn.ref_identity(rec.labels, local=False).id
    txn.j.set(st.kvstore, prefix, replace(rec, identity=ident_id))
    txn.set_ipcache(prefix, ident_id, "kvstore", rec.host)
    if old is not None and old.identity is not None and not old.node:
        txn.unref_identity(old.identity, local=False)
    return True


def del_kv(txn: Txn, prefix: str) -> bool:
    st = txn.state
    old = st.kvstore.get(prefix)
    if old is None:
        return False
    txn.j.delete(st.kvstore, prefix)
    if old.identity is not None:
        cur = st.ipcache.get(prefix)
        if cur is not None and cur.source == "kvstore":
            txn.del_ipcache(prefix)
        if not old.node:
            txn.unref_identity(old.identity, local=False)
    return True


def shadow_kv(txn: Txn, prefix: str) -> None:
    """An API entry takes ``prefix``: the fleet store's record waits behind it."""
    st = txn.state
    old = st.kvstore.get(prefix)
    if old is None or old.identity is None:
        return
    txn.j.set(st.kvstore, prefix, replace(old, identity=None))
    txn.del_ipcache(prefix)
    if not old.node:
        txn.unref_identity(old.identity, local=False)
    txn.dirty.add("kvstore")


def _sorted_nets(nets):
    return sorted(nets, key=lambda n: (n.version, n.network_address, n.prefixlen))


def sync_cidr_identities(txn: Txn, policies: Mapping) -> list[Network]:
    """Give every prefix the policies ({PolicyRef: Policy}) name a CIDR identity (and an
    ipcache entry, unless a service's identity holds the prefix); returns the prefixes no
    longer named, which ``drop_cidr_identities`` removes once the policies are in."""
    st = txn.state
    txn.agent.policy_prefix_index.update(policies)
    need = set(txn.agent.policy_prefix_index.count)
    for net in _sorted_nets(need - set(st.cidr_ids)):
        ident = txn.agent.alloc.cidr(net)
        txn.j.set(st.cidr_ids, net, ident)
        txn.set_identity(ident)
        if net not in st.service_cidrs:
            txn.set_ipcache(str(net), ident.id, "cidr", None)
    return [n for n in st.cidr_ids if n not in need]


def drop_cidr_identities(txn: Txn, nets: list[Network]) -> None:
    st = txn.state
    for net in nets:
        ident = st.cidr_ids[net]
        txn.remove_identity(ident.id)
        if net not in st.service_cidrs:
            txn.del_ipcache(str(net))
        txn.j.delete(st.cidr_ids, net)


def write_service_cidrs(txn: Txn) -> None:
    """Services' CIDRs: identities with the service's labels, which take the prefix
    over a policy's plain CIDR identity."""
    st, agent = txn.state, txn.agent
    want: dict[Network, Service] = {}
    for svc in sorted(st.services.values(), key=lambda s: s.name):
        for net in svc.cidrs:
            want.setdefault(net, svc)
    for net, svc in want.items():
        ident = agent.alloc.cidr(net, svc.labels)
        old = st.service_cidrs.get(net)
        if old is not None and old.id == ident.id:
            continue
        txn.set_identity(ident)
        txn.j.set(st.service_cidrs, net, ident)
        txn.set_ipcache(str(net), ident.id, "cidr", None)
        if old is not None:
            txn.remove_identity(old.id)
    for net in [n for n in st.service_cidrs if n not in want]:
        old = st.service_cidrs[net]
        txn.j.delete(st.service_cidrs, net)
        plain = st.cidr_ids.get(net)
        if plain is not None:
            txn.set_ipcache(str(net), plain.id, "cidr", None)
        else:
            txn.del_ipcache(str(net))
        txn.remove_identity(old.id)


__all__ = ["HOST_ID", "ChangePolicies", "DeleteRemote", "HostAddresses", "KvstorePersist",
           "KvstoreSync", "LinkChange", "PutRemote",
           "RemoveEndpoint", "SetServices", "UpsertEndpoint"]
