"""Start-up: the model from the state directory, then the (possibly pinned, possibly
stale) maps made equal to it.

The datapath has kept enforcing while the agent was away; ``reconcile`` only writes
differences, in the writer's safe order, so a restart opens nothing.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import PolicyErrors, StockadeError
from ..policy.api.validation import sanitize_document
from ..policy.identity import reserved_identities
from ..policy.mapstate import diff as state_diff
from .changes import drop_cidr_identities, identify, put_remote, sync_cidr_identities, tap_for_mac, write_service_cidrs
from .endpoints import Endpoint, parse_labels
from .inventory import parse_services
from .links import host_addresses, list_links
from .state import RemoteRecord
from .txn import HOST_ID, Txn, host_prefix

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("stockade.agent")


def restore(agent: "Agent") -> None:
    """Fill the model and the engine from the state directory (the lock is held)."""
    txn = Txn(agent)
    st, store = txn.state, agent.store
    for ident in reserved_identities():
        txn.set_identity(ident)
    host_ips = tuple(host_addresses()) if agent.live else ()
    txn.j.set(st.meta, "host_ips", host_ips)
    for ip in host_ips:
        txn.set_ipcache(host_prefix(ip), HOST_ID, "host", None)
    for rec in store.read("ipcache.json", []):
        put_remote(txn, rec["prefix"], RemoteRecord(parse_labels(rec["labels"], "remote"),
                                                    rec.get("host"), rec.get("node", False)))
    policies = [stored_policy(agent, i, d) for i, d in enumerate(store.read("policies.json", []))]
    drop_cidr_identities(txn, sync_cidr_identities(txn, policies))
    txn.engine(txn.etx.set_policies(policies))
    txn.j.set(st.meta, "revision", store.read("revision.json", 0))
    for name, svc in parse_services(store.read("services.json", {})).items():
        txn.j.set(st.services, name, svc)
    write_service_cidrs(txn)
    links = {l.name: l for l in list_links()} if agent.live else {}
    for rec in store.read("endpoints.json", []):
        ep = Endpoint.from_record(rec)
        link = links.get(ep.interface) if ep.interface else (
            tap_for_mac(links.values(), ep.mac) if ep.by_mac else None)
        if link is not None:
            ep = replace(ep, ifindex=link.ifindex, interface=link.name if ep.by_mac else ep.interface)
            txn.bind(link.ifindex, ep.name)
        txn.put_endpoint(ep)
        identify(txn, ep)
    txn.commit()  # nothing is written step by step: reconcile() writes the differences


def stored_policy(agent: "Agent", index: int, record: dict):
    """A policy from policies.json. One this version refuses is still read as the
    version that stored it compiled it (never dropped: that would open what it denies);
    it is named in status until it is replaced or deleted."""
    where = f"{agent.store.path('policies.json')}: document {index}"
    try:
        return sanitize_document(record["document"], source=record.get("source", ""))
    except PolicyErrors as exc:
        try:
            policy = sanitize_document(record["document"], source=record.get("source", ""),
                                       strict=False)
        except PolicyErrors:
            raise StockadeError(f"{where}: stored policy cannot be read: {exc}") from None
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
    txn = Txn(agent)
    for ep in st.endpoints.values():
        if ep.ifindex is not None:
            txn.attach(ep.ifindex)
            txn.write_endpoint(ep)
    txn.write(dp)
    txn.commit()
