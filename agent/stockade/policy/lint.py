"""Warnings for selectors that can never match: "policy X selects nothing on any host".

Checked on the controller against the inventory's service definitions and the label
sets of the workloads the hosts report; a warning does not fail validation (the workload
may simply not exist yet).
"""
from __future__ import annotations

from typing import Iterable, Mapping

from .api.rule import Policy
from .api.selector import EndpointSelector
from .labels import Label, LabelSet, split_source


def service_label_sets(services: Mapping) -> list[LabelSet]:
    """From a ``stockade_services`` mapping (name -> {labels: ...})."""
    out = []
    for name, d in (services or {}).items():
        labels = {split_source(k, "service")[1]: str(v)
                  for k, v in ((d or {}).get("labels") or {}).items()}
        labels["service"] = name
        out.append(LabelSet(Label("service", k, v) for k, v in labels.items()))
    return out


def workload_label_sets(workloads: Iterable) -> list[LabelSet]:
    """From label mappings, or endpoint dicts (``stockade endpoint list -o json``)."""
    out = []
    for w in workloads or []:
        labels = w.get("labels", {}) if isinstance(w, Mapping) and "labels" in w else w
        out.append(LabelSet.from_mapping(labels or {}))
    return out


def unmatched_selectors(policies: list[Policy], label_sets: list[LabelSet],
                        service_names: Iterable[str] | None = None) -> list[str]:
    """``service_names`` given: also check that every cidrGroupRef names a service."""
    warnings = []

    def check(policy: Policy, sel: EndpointSelector, path: str, what: str) -> None:
        if sel.names_reserved or not sel.requirements:
            return
        if not any(sel.matches(ls) for ls in label_sets):
            warnings.append(f"policy {policy.ref.display} {what} nothing on any host: "
                            f"{path} {sel} matches no defined service and no known workload")

    for p in policies:
        for r in p.rules:
            check(p, r.endpoint_selector, f"{r.path}.endpointSelector", "selects")
            for direction, _deny, pr in r.clauses():
                field = "fromEndpoints" if direction == "ingress" else "toEndpoints"
                for i, sel in enumerate(pr.endpoints):
                    check(p, sel, f"{pr.path}.{field}[{i}]", "selects")
                for c in pr.cidrs:
                    if c.group and service_names is not None and c.group not in service_names:
                        warnings.append(f"policy {p.ref.display} selects nothing on any host: "
                                        f"cidrGroupRef {c.group} in {pr.path} names no defined service")
    return warnings
