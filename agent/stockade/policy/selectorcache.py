"""Selector cache: for every peer selector in use, the identities it selects.

A selector is one of ``("endpoints", EndpointSelector)``, ``("cidr", CIDRRule)`` or
``("entity", name)``. Adding or removing an identity reports which selectors' selections
changed, so the compiler recomputes only what those selectors touch (as Cilium's
selectorcache.go). Selections are frozensets, so callers can keep them.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from .api.entity import RESERVED
from .api.selector import EndpointSelector
from .identity import CIDR_KIND, RESERVED_KIND, WORKLOAD_KIND, Identity
from .labels import NAMESPACE_KEYS

# ("endpoints", EndpointSelector) | ("cidr", CIDRRule) | ("cidrgroup", str) | ("entity", str)
Selector = tuple[str, Any]
ALL = ("entity", "all")  # compiles to the wildcard peer, never expanded


def selects(selector: Selector, ident: Identity) -> bool:
    kind, value = selector
    if kind == "endpoints":
        if ident.kind == RESERVED_KIND and not value.names_reserved:
            return False
        if not value.requirements:
            return ident.kind == WORKLOAD_KIND
        if ident.kind == CIDR_KIND and not any(r.operator in ("In", "Exists") for r in value.requirements):
            # A CIDR identity is selected by what it has (a service's labels), never
            # for lacking a label: else whether outside addresses match a NotIn
            # selector would depend on which prefixes other policies name.
            return False
        return value.matches(ident.labels)
    if kind == "cidrgroup":  # an inventory service's CIDRs (cidrGroupRef)
        return ident.kind == CIDR_KIND and value in ident.labels.values_of("service", "service")
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


def _index_names(key: str) -> tuple[str, ...]:
    """The label keys a requirement on ``key`` looks at (both namespace spellings)."""
    return NAMESPACE_KEYS if key in NAMESPACE_KEYS else (key,)


class SelectorCache:
    def __init__(self):
        self.identities: dict[int, Identity] = {}
        self.selections: dict[Selector, frozenset[int]] = {}
        self._users: dict[Selector, int] = {}
        self._index: dict[tuple[str, str], set[int]] = {}  # (key, value) -> identity ids
        self._sel_index: dict[tuple[str, str] | None, set[Selector]] = {}  # None: unindexed

    @staticmethod
    def index_keys(sel: EndpointSelector) -> list[tuple[str, str]] | None:
        """(key, value) pairs one of which every selected identity has (the values of
        one ``In`` requirement), or None when the selector has no ``In``."""
        reqs = [r for r in sel.requirements if r.operator == "In"]
        if not reqs:
            return None
        best = min(reqs, key=lambda r: len(r.values))
        return [(k, v) for k in _index_names(best.key) for v in best.values]

    def _index_selector(self, sel: Selector, add: bool) -> None:
        found = self.index_keys(sel[1]) if sel[0] == "endpoints" else None
        keys: list[tuple[str, str] | None] = [None] if found is None else list(found)
        for k in keys:
            bucket = self._sel_index.setdefault(k, set())
            if add:
                bucket.add(sel)
            else:
                bucket.discard(sel)

    def selectors_for(self, ident: Identity) -> set[Selector]:
        """Selectors that may select ``ident`` (by its labels' index; unindexed ones too)."""
        return self._selectors_for(ident)

    def _selectors_for(self, ident: Identity):
        out = set(self._sel_index.get(None, ()))
        for label in ident.labels:
            out |= self._sel_index.get((label.key, label.value), set())
        return out

    def candidates(self, sel: EndpointSelector, among: Collection[int] | None = None) -> Collection[int]:
        """Identities that may match ``sel``: narrowed through the label index by its
        smallest ``In`` requirement; ``among`` (default: all identities) otherwise."""
        best = None
        for req in sel.requirements:
            if req.operator == "In":
                ids = set().union(*(self._index.get((k, v), ()) for k in _index_names(req.key)
                                    for v in req.values))
                if best is None or len(ids) < len(best):
                    best = ids
        pool = self.identities if among is None else among
        if best is None:
            return pool
        return {i for i in best if i in pool}

    def add_selector(self, sel: Selector) -> frozenset[int]:
        self._users[sel] = self._users.get(sel, 0) + 1
        if sel not in self.selections:
            pool = self.candidates(sel[1]) if sel[0] == "endpoints" else self.identities
            self.selections[sel] = frozenset(
                i for i in pool if selects(sel, self.identities[i]))
            self._index_selector(sel, True)
        return self.selections[sel]

    def remove_selector(self, sel: Selector) -> None:
        self._users[sel] -= 1
        if not self._users[sel]:
            del self._users[sel], self.selections[sel]
            self._index_selector(sel, False)

    def add_identity(self, ident: Identity) -> list[Selector]:
        """Returns the selectors that now also select ``ident``."""
        self.identities[ident.id] = ident
        for label in ident.labels:
            self._index.setdefault((label.key, label.value), set()).add(ident.id)
        changed = []
        for sel in self._selectors_for(ident):
            ids = self.selections[sel]
            if ident.id not in ids and selects(sel, ident):
                self.selections[sel] = ids | {ident.id}
                changed.append(sel)
        return changed

    def remove_identity(self, ident_id: int) -> list[Selector]:
        ident = self.identities.pop(ident_id, None)
        for label in ident.labels if ident else ():
            self._index[(label.key, label.value)].discard(ident_id)
        changed = []
        for sel, ids in self.selections.items():
            if ident_id in ids:
                self.selections[sel] = ids - {ident_id}
                changed.append(sel)
        return changed

    def get(self, sel: Selector) -> frozenset[int]:
        return self.selections[sel]
