"""Identities: a number for each canonical label set, allocated and persisted locally.

Reserved numbers keep Cilium's (1 host, 2 world, 3 unmanaged, 4 health, 5 init,
6 remote-node). Workload label sets get numbers from 256 up; CIDR identities (one per
prefix a policy names) get numbers from ``CIDR_BASE`` up, as Cilium's local scope. Nothing
outside this host depends on a number: other hosts' workloads are known by IP + labels.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import IdentityError
from .api.cidr import Network, inside
from .api.entity import RESERVED
from .labels import Label, LabelSet

FIRST_WORKLOAD = 256
CIDR_BASE = 1 << 24

RESERVED_KIND, WORKLOAD_KIND, CIDR_KIND = "reserved", "workload", "cidr"


@dataclass(frozen=True)
class Identity:
    id: int
    labels: LabelSet
    kind: str = WORKLOAD_KIND
    prefix: Network | None = None  # CIDR identities only

    @property
    def is_world(self) -> bool:
        return self.id == RESERVED["world"] or self.kind == CIDR_KIND

    @property
    def short_name(self) -> str:
        """``app=web,tier=front`` (sources left out), ``cidr:10.0.0.0/8``, ``reserved:world``."""
        if self.kind == CIDR_KIND and self.prefix is not None:
            return f"cidr:{self.prefix}"
        if self.kind == RESERVED_KIND:
            return ",".join(str(l) for l in self.labels)
        return ",".join(f"{l.key}={l.value}" if l.value else l.key for l in self.labels) or "(no labels)"

    def to_dict(self) -> dict:
        out = {"id": self.id, "labels": self.labels.to_strings(), "kind": self.kind}
        if self.prefix is not None:
            out["prefix"] = str(self.prefix)
        return out


def reserved_identities() -> list[Identity]:
    return [Identity(num, LabelSet([Label("reserved", name, "")]), RESERVED_KIND)
            for name, num in RESERVED.items()]


def cidr_labels(prefix: Network) -> LabelSet:
    return LabelSet([Label("cidr", str(prefix), ""), Label("reserved", "world", "")])


class IdentityAllocator:
    """Label set -> number, stable across restarts: the agent persists ``numbers()`` in
    its state (identities.json) and gives them back here.

    Numbers allocated since the last ``saved()`` are remembered in order, so that a
    transaction that is discarded (a dry run, a failed write) gives back the numbers it
    took: ``mark()`` before, ``undo(mark)`` after.
    """

    def __init__(self, numbers: dict[str, int] | None = None):
        self._numbers: dict[str, int] = {}
        owners: dict[int, str] = {}
        for key, n in (numbers or {}).items():
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise IdentityError(f"{key!r}: identity {n!r} is not a positive integer")
            if n in owners:
                raise IdentityError(f"identity {n} is given to two label sets: {owners[n]!r} "
                                    f"and {key!r}")
            owners[n] = key
            self._numbers[key] = n
        self._added: list[str] = []
        self._top: dict[bool, int] = {}     # the highest number of each class (CIDR or not)

    def _next(self, base: int) -> int:
        cidr = base >= CIDR_BASE
        top = self._top.get(cidr)
        if top is None:
            top = max((n for n in self._numbers.values() if (n >= CIDR_BASE) == cidr),
                      default=base - 1)
        n = max(top + 1, base)
        self._top[cidr] = n
        return n

    def workload(self, labels: LabelSet) -> Identity:
        return Identity(self._number(str(labels), FIRST_WORKLOAD), labels, WORKLOAD_KIND)

    def cidr(self, prefix: Network, extra: LabelSet | None = None) -> Identity:
        labels = cidr_labels(prefix).merged(extra or ())
        return Identity(self._number(str(labels), CIDR_BASE), labels, CIDR_KIND, prefix)

    def _number(self, key: str, base: int) -> int:
        if key not in self._numbers:
            self._numbers[key] = self._next(base)
            self._added.append(key)
        return self._numbers[key]

    # -- persistence, by the agent's state store ------------------------------------
    def numbers(self) -> dict[str, int]:
        return dict(self._numbers)

    @property
    def unsaved(self) -> bool:
        return bool(self._added)

    def saved(self) -> None:
        self._added.clear()

    def mark(self) -> int:
        return len(self._added)

    def undo(self, mark: int) -> None:
        """Forget the numbers allocated since ``mark``."""
        for key in self._added[mark:]:
            self._numbers.pop(key, None)
        del self._added[mark:]
        self._top.clear()


def most_specific(prefixes: dict[Network, int], addr_or_net: str) -> int | None:
    """LPM over ``prefixes`` (prefix -> identity) for an address or prefix."""
    net = ipaddress.ip_network(addr_or_net, strict=False)
    best = None
    for prefix, ident in prefixes.items():
        if inside(net, prefix):
            if best is None or prefix.prefixlen > best[0].prefixlen:
                best = (prefix, ident)
    return best[1] if best else None
