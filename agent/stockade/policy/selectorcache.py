"""Selector cache: for every peer selector in use, the identities it selects.

A selector is one of ``("endpoints", EndpointSelector)``, ``("cidr", CIDRRule)`` or
``("entity", name)``. Adding or removing an identity reports which selectors' selections
changed, so the compiler recomputes only what those selectors touch (as Cilium's
selectorcache.go). Selections are frozensets, so callers can keep them.
"""
from __future__ import annotations

from typing import Hashable

from .api.entity import RESERVED
from .identity import CIDR_KIND, RESERVED_KIND, WORKLOAD_KIND, Identity

Selector = tuple[str, Hashable]
ALL = ("entity", "all")  # compiles to the wildcard peer, never expanded


def selects(selector: Selector, ident: Identity) -> bool:
    kind, value = selector
    if kind == "endpoints":
        if ident.kind == RESERVED_KIND and not value.names_reserved:
            return False
        if not value.requirements:
            return ident.kind == WORKLOAD_KIND
        return value.matches(ident.labels)
    if kind == "cidr":
        if ident.kind == CIDR_KIND:
            return value.selects(ident.prefix)
        # A /0 covers what no other prefix covers: world.
        return ident.id == RESERVED["world"] and value.cidr.prefixlen == 0
    if value == "cluster":
        return not ident.is_world
    if value == "world":
        return ident.is_world
    return ident.id == RESERVED.get(value)


class SelectorCache:
    def __init__(self):
        self.identities: dict[int, Identity] = {}
        self.selections: dict[Selector, frozenset[int]] = {}
        self._users: dict[Selector, int] = {}

    def add_selector(self, sel: Selector) -> frozenset[int]:
        self._users[sel] = self._users.get(sel, 0) + 1
        if sel not in self.selections:
            self.selections[sel] = frozenset(
                i for i, ident in self.identities.items() if selects(sel, ident))
        return self.selections[sel]

    def remove_selector(self, sel: Selector) -> None:
        self._users[sel] -= 1
        if not self._users[sel]:
            del self._users[sel], self.selections[sel]

    def add_identity(self, ident: Identity) -> list[Selector]:
        """Returns the selectors that now also select ``ident``."""
        self.identities[ident.id] = ident
        changed = []
        for sel, ids in self.selections.items():
            if ident.id not in ids and selects(sel, ident):
                self.selections[sel] = ids | {ident.id}
                changed.append(sel)
        return changed

    def remove_identity(self, ident_id: int) -> list[Selector]:
        self.identities.pop(ident_id, None)
        changed = []
        for sel, ids in self.selections.items():
            if ident_id in ids:
                self.selections[sel] = ids - {ident_id}
                changed.append(sel)
        return changed

    def get(self, sel: Selector) -> frozenset[int]:
        return self.selections[sel]
