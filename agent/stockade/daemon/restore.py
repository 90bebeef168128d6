"""Start-up: the model from the state directory, then the (possibly pinned, possibly
stale) maps made equal to it.

``restore`` builds the model from a generation the store has read and checked
(store.StateStore.load) and checks every record the schemas cannot judge (policy
documents, labels, addresses, services, identity numbers); any problem is a StateError
naming the file and the record, raised before anything is written to the maps.
Endpoints are bound to the interfaces their records identify (binding.py).

The datapath has kept enforcing while the agent was away; ``reconcile`` only writes
differences, in the writer's safe order, so a restart opens nothing.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import IdentityError, PolicyErrors, StateError, StockadeError
from ..policy.api.validation import sanitize_document
from ..policy.identity import IdentityAllocator, reserved_identities
from ..policy.mapstate import diff as state_diff
from .binding import binding_problem
from .changes import (
    HostAddresses,
    drop_cidr_identities,
    identify,
    put_kv,
    put_remote,
    sync_cidr_identities,
    tap_for_mac,
    write_service_cidrs,
)
from .endpoints import Endpoint, parse_labels
from .inventory import parse_services
from .links import host_addresses, list_links
from .state import RemoteRecord
from .statefiles import POLICIES
from .txn import Txn

if TYPE_CHECKING:
    from .agent import Agent
    from .store import Generation

log = logging.getLogger("stockade.agent")


class _Records:
    """Turns a problem in record ``where`` of ``name`` into a StateError naming both."""

    def __init__(self, agent: "Agent", name: str):
        self.path = agent.store.path(name)

    def fail(self, where: str, exc) -> StateError:
        field = getattr(exc, "field", None)
        text = str(exc)
        if field and not text.startswith(str(field)) and isinstance(exc, StockadeError) \
                and not isinstance(exc, PolicyErrors):
            text = f"{field}: {text}"
        return StateError(self.path, f"{where}: {text}")


def restore(agent: "Agent", gen: "Generation") -> set[str]:
    """Fill the model and the engine from ``gen`` (the lock is held). Returns the state
    files the model now says differently (records that gained what identifies their
    interface, identity numbers allocated; policies still in format 1's single
    policies.json, to be written as shards), for the caller to persist."""
    try:
        agent.alloc = IdentityAllocator(gen["identities.json"])
    except IdentityError as exc:
        raise StateError(agent.store.path("identities.json"), str(exc)) from None
    txn = Txn(agent)
    st = txn.state
    for ident in reserved_identities():
        txn.set_identity(ident)
    HostAddresses(tuple(host_addresses()) if agent.live else ()).apply(txn)
    _restore_ipcache(agent, txn, gen["ipcache.json"])
    _restore_kvstore(agent, txn, gen["kvstore.json"])
    policies = []
    for name, recs in gen.policy_files:
        for i, rec in enumerate(recs):
            try:
                policies.append(stored_policy(rec))
            except StockadeError as exc:
                raise _Records(agent, name).fail(f"document {i}", exc) from None
    drop_cidr_identities(txn, sync_cidr_identities(txn, {p.ref: p for p in policies}))
    txn.engine(txn.etx.set_policies(policies))
    txn.j.set(st.meta, "revision", gen["revision.json"])
    try:
        services = parse_services(gen["services.json"])
    except StockadeError as exc:
        raise _Records(agent, "services.json").fail("$", exc) from None
    for name, svc in services.items():
        txn.j.set(st.services, name, svc)
    write_service_cidrs(txn)
    changed = _restore_endpoints(agent, txn, gen["endpoints.json"])
    txn.commit()  # nothing is written step by step: reconcile() writes the differences
    unsharded = any(name == POLICIES for name, _ in gen.policy_files)   # format 1: migrated
    return ({"endpoints"} if changed else set()) | ({"identities"} if agent.alloc.unsaved else set()) \
        | ({"policies"} if unsharded else set())


def _restore_ipcache(agent: "Agent", txn: Txn, recs: list) -> None:
    records = _Records(agent, "ipcache.json")
    seen = set()
    for i, rec in enumerate(recs):
        try:
            prefix = str(ipaddress.ip_network(rec["prefix"], strict=True))
            labels = parse_labels(rec["labels"], "remote")
        except (StockadeError, ValueError) as exc:
            raise records.fail(f"[{i}]", exc) from None
        if prefix in seen:
            raise records.fail(f"[{i}]", f"prefix {prefix} is listed twice")
        seen.add(prefix)
        put_remote(txn, prefix, RemoteRecord(labels, rec.get("host"), rec.get("node", False)))


def _restore_kvstore(agent: "Agent", txn: Txn, recs: list) -> None:
    """The fleet store's last view: enforced until etcd answers (then listed again)."""
    records = _Records(agent, "kvstore.json")
    for i, rec in enumerate(recs):
        try:
            prefix = str(ipaddress.ip_network(rec["prefix"], strict=True))
            labels = parse_labels(rec["labels"], "remote")
        except (StockadeError, ValueError) as exc:
            raise records.fail(f"[{i}]", exc) from None
        put_kv(txn, prefix, RemoteRecord(labels, rec["host"], rec.get("node", False)))


def _endpoint(records: _Records, i: int, rec: dict) -> Endpoint:
    try:
        for ip in rec["ips"]:
            ipaddress.ip_address(ip)
        labels = parse_labels(rec["labels"], "unspec")
    except (StockadeError, ValueError) as exc:
        raise records.fail(f"[{i}] ({rec['name']})", exc) from None
    return replace(Endpoint.from_record(rec), labels=labels)


def _restore_endpoints(agent: "Agent", txn: Txn, recs: list) -> bool:
    """Each endpoint, bound to the link its record identifies, if that link is there;
    whether any record changed (gained a link's MAC)."""
    st = txn.state
    records = _Records(agent, "endpoints.json")
    links = list_links() if agent.live else list(agent.links.values())
    by_name = {link.name: link for link in links}
    names, ids, changed = set(), set(), False
    for i, rec in enumerate(recs):
        ep = _endpoint(records, i, rec)
        if ep.name in names or ep.id in ids:
            raise records.fail(f"[{i}] ({ep.name})", "its name or id is given twice")
        names.add(ep.name)
        ids.add(ep.id)
        link = tap_for_mac(links, ep.mac) if ep.by_mac else by_name.get(ep.interface)
        if link is not None and link.ifindex not in st.by_ifindex:
            problem = binding_problem(ep, link)
            if problem is None:
                ep = replace(ep, ifindex=link.ifindex, link_mac=link.mac,
                             interface=link.name if ep.by_mac else ep.interface)
                txn.bind(link.ifindex, ep.name)
                changed = changed or ep.to_record() != rec
            else:
                txn.j.set(st.mismatches, ep.name, problem)
                log.warning("endpoint %s is not bound: %s", ep.name, problem)
        txn.put_endpoint(ep)
        identify(txn, ep)
    return changed


def stored_policy(record: dict):
    """A policy record of the state (a shard, or format 1's policies.json). One this
    version refuses is still read as the version that stored it compiled it (never
    dropped: that would open what it denies); it is named in status until it is replaced
    or deleted."""
    try:
        return sanitize_document(record["document"], source=record.get("source", ""))
    except PolicyErrors as exc:
        try:
            policy = sanitize_document(record["document"], source=record.get("source", ""),
                                       strict=False)
        except PolicyErrors:
            raise StockadeError(f"stored policy cannot be read: {exc}") from None
    for problem in policy.problems:  # health() reports them while the policy stays
        log.error("stored policy %s is refused by this version (still enforced as "
                  "stored; replace or delete it): %s", policy.ref.display, problem)
    return policy


def reconcile(agent: "Agent") -> None:
    """Make the maps equal the model (the lock is held)."""
    dp, engine, st = agent.dp, agent.engine, agent.state
    dp.apply_delta(state_diff(dp.policy_entries(), engine.entries, dp.policy_flags(),
                              engine.flags))
    current = dp.ipcache_entries()
    for prefix, e in st.ipcache.items():
        if current.get(prefix) != e.identity:
            dp.set_ipcache(prefix, e.identity)
    for prefix in set(current) - set(st.ipcache):
        dp.del_ipcache(prefix)
    live = {l.ifindex for l in list_links()} if agent.live else set(st.by_ifindex)
    for ifindex in dp.endpoint_ifindexes():
        if ifindex not in live:
            dp.del_endpoint(ifindex)
            agent.endpoint_entries.pop(ifindex, None)
    txn = Txn(agent)
    for ep in st.endpoints.values():
        if ep.ifindex is not None:
            txn.attach(ep.ifindex)
            txn.write_endpoint(ep)
    txn.write(dp)
    txn.commit()
