"""Identities: a number for each canonical label set, allocated and persisted locally.

Reserved numbers keep Cilium's (1 host, 2 world, 3 unmanaged, 4 health, 5 init,
6 remote-node). Workload label sets get numbers from 256 up; CIDR identities (one per
prefix a policy names) get numbers from ``CIDR_BASE`` up, as Cilium's local scope. Nothing
outside this host depends on a number: other hosts' workloads are known by IP + labels.
"""
from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
    """Label set -> number, stable across restarts when given a ``path`` to persist to."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self._numbers: dict[str, int] = {}
        if self.path and self.path.exists():
            try:
                self._numbers = {k: int(v) for k, v in json.loads(self.path.read_text()).items()}
            except (OSError, ValueError) as exc:
                raise IdentityError(f"{self.path}: cannot read identities: {exc}") from exc

    def _next(self, base: int) -> int:
        used = {n for n in self._numbers.values() if (n >= CIDR_BASE) == (base >= CIDR_BASE)}
        n = max(used, default=base - 1) + 1
        return n if n >= base else base

    def workload(self, labels: LabelSet) -> Identity:
        return Identity(self._number(str(labels), FIRST_WORKLOAD), labels, WORKLOAD_KIND)

    def cidr(self, prefix: Network, extra: LabelSet | None = None) -> Identity:
        labels = cidr_labels(prefix).merged(extra or ())
        return Identity(self._number(str(labels), CIDR_BASE), labels, CIDR_KIND, prefix)

    def _number(self, key: str, base: int) -> int:
        if key not in self._numbers:
            self._numbers[key] = self._next(base)
            self._save()
        return self._numbers[key]

    def _save(self) -> None:
        if not self.path:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".identities.")
            with os.fdopen(fd, "w") as f:
                json.dump(self._numbers, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise IdentityError(f"{self.path}: cannot persist identities: {exc}") from exc


def most_specific(prefixes: dict[Network, int], addr_or_net: str) -> int | None:
    """LPM over ``prefixes`` (prefix -> identity) for an address or prefix."""
    net = ipaddress.ip_network(addr_or_net, strict=False)
    best = None
    for prefix, ident in prefixes.items():
        if inside(net, prefix):
            if best is None or prefix.prefixlen > best[0].prefixlen:
                best = (prefix, ident)
    return best[1] if best else None
