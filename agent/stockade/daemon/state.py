"""The agent's model of this host: workloads, addresses, services and identity use.

Only the reconciler changes it, inside a transaction (txn.Txn), and only through a
``Journal``, so that a discarded transaction leaves it exactly as it was. Everything in
it is a dict of immutable values; readers get a ``Snapshot`` (copies, built once per
committed version), never the live dicts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..policy.api.cidr import Network
from ..policy.identity import Identity
from ..policy.labels import LabelSet
from .endpoints import Endpoint
from .inventory import Service

_ABSENT = object()


class Journal:
    """Writes to dicts, each remembered with what it replaced; ``undo`` puts it back."""

    def __init__(self) -> None:
        self._log: list[tuple[dict, Any, Any]] = []

    def set(self, d: dict, key, value) -> None:
        self._log.append((d, key, d.get(key, _ABSENT)))
        d[key] = value

    def delete(self, d: dict, key) -> None:
        if key in d:
            self._log.append((d, key, d[key]))
            del d[key]

    def undo(self) -> None:
        for d, key, old in reversed(self._log):
            if old is _ABSENT:
                d.pop(key, None)
            else:
                d[key] = old
        self._log.clear()


@dataclass(frozen=True, slots=True)
class IpcacheEntry:
    identity: int
    source: str            # local | remote | kvstore | cidr | host
    host: str | None = None


@dataclass(frozen=True, slots=True)
class RemoteRecord:
    """Another host's workload (or the host itself: ``node``), as the API or Ansible gave it."""

    labels: LabelSet
    host: str | None
    node: bool = False
    identity: int | None = None


@dataclass(frozen=True)
class Membership:
    service: Service | None
    matched: tuple[str, ...] = ()


@dataclass
class State:
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    by_ifindex: dict[int, str] = field(default_factory=dict)
    ipcache: dict[str, IpcacheEntry] = field(default_factory=dict)
    remote: dict[str, RemoteRecord] = field(default_factory=dict)
    # Other hosts' workloads from the fleet store (daemon/fleet.py): identity None while an
    # API entry (``remote``) or a local address holds the prefix.
    kvstore: dict[str, RemoteRecord] = field(default_factory=dict)
    cidr_ids: dict[Network, Identity] = field(default_factory=dict)       # policy prefixes
    service_cidrs: dict[Network, Identity] = field(default_factory=dict)  # services' prefixes
    services: dict[str, Service] = field(default_factory=dict)
    memberships: dict[str, Membership] = field(default_factory=dict)     # endpoint name ->
    local_refs: dict[int, int] = field(default_factory=dict)    # identity -> local endpoints
    remote_refs: dict[int, int] = field(default_factory=dict)   # identity -> remote records
    # endpoint name -> why the interface that has its name now is not its own (binding.py)
    mismatches: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=lambda: {"revision": 0, "host_ips": ()})

    @property
    def revision(self) -> int:
        return self.meta["revision"]


@dataclass(frozen=True)
class Snapshot:
    """A committed version of the agent's state, for readers (API, flows, metrics, UI)."""

    version: int
    endpoints: tuple[Endpoint, ...]
    by_ifindex: dict[int, str]
    ipcache: dict[str, IpcacheEntry]
    identities: dict[int, Identity]
    local_ids: frozenset[int]
    flags: dict
    policies: dict
    services: dict[str, Service]
    memberships: dict[str, Membership]
    service_cidrs: dict[Network, Identity]
    revision: int
    entries: int                       # policy map entries the engine holds
    links: dict[int, Any]
    attached: frozenset[int]
    unprotected: tuple[str, ...]
    errors: tuple[str, ...]
    mismatches: dict[str, str] = field(default_factory=dict)
    kvstore: dict[str, RemoteRecord] = field(default_factory=dict)
