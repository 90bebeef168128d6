"""EndpointSelector: which identities a rule applies to, or which peers it names.

``matchLabels`` (key -> value, all must hold) and ``matchExpressions`` (key, operator
In/NotIn/Exists/DoesNotExist, values), as in Kubernetes label selectors. A key may carry
a source prefix (``container:app``); without one it matches labels of any source. The
namespace keys (``namespace``, ``io.kubernetes.pod.namespace``) match each other and
ignore sources (labels.NAMESPACE_KEYS).

An empty selector (``{}``) selects every workload identity, never reserved entities
(host, world, ...) nor CIDR identities. A selector selects a reserved identity only when
it names a ``reserved:`` key itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..labels import ANY_SOURCE, NAMESPACE_KEYS, LabelSet, check_key, check_value, parse_pairs, split_source

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, order=True)
class Requirement:
    source: str
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: LabelSet) -> bool:
        present = labels.values_of(self.source, self.key)
        if self.operator == "In":
            return any(v in self.values for v in present)
        if self.operator == "NotIn":
            return not any(v in self.values for v in present)
        if self.operator == "Exists":
            return bool(present)
        return not present  # DoesNotExist

    def describe(self) -> str:
        key = self.key if self.source == ANY_SOURCE else f"{self.source}:{self.key}"
        if self.operator == "In" and len(self.values) == 1:
            return f"{key}={self.values[0]}"
        if self.operator == "In":
            return f"{key} in ({','.join(self.values)})"
        if self.operator == "NotIn":
            return f"{key} notin ({','.join(self.values)})"
        return key if self.operator == "Exists" else f"!{key}"


@dataclass(frozen=True, order=True)
class EndpointSelector:
    """A sanitized selector: a sorted tuple of requirements (matchLabels become ``In``)."""

    requirements: tuple[Requirement, ...] = field(default_factory=tuple)

    @classmethod
    def from_match_labels(cls, match_labels: dict[str, str]) -> "EndpointSelector":
        return cls.build(match_labels, [])

    @classmethod
    def from_filter(cls, text: str, what: str = "label") -> "EndpointSelector":
        """A filter as the CLI and the web UI take it: ``k=v,src:k2=v2,k3`` (all must
        hold; a bare key: the label exists)."""
        from ...errors import InvalidRequest
        pairs = parse_pairs(text, what)
        if not pairs:
            raise InvalidRequest(f"{what}: empty label selector", what)
        for key, value in pairs:
            why = check_key(key) or (check_value(value, split_source(key)[0]) if value else None)
            if why:
                raise InvalidRequest(f"{what}: {why}", what)
        return cls.build({k: v for k, v in pairs if v is not None},
                         [(k, "Exists", []) for k, v in pairs if v is None])

    @classmethod
    def build(cls, match_labels: dict[str, str], expressions: list[tuple[str, str, list[str]]]
              ) -> "EndpointSelector":
        reqs = set()
        for key, value in match_labels.items():
            source, name = _split(key)
            reqs.add(Requirement(source, name, "In", (str(value),)))
        for key, op, values in expressions:
            source, name = _split(key)
            reqs.add(Requirement(source, name, op, tuple(sorted(set(values)))))
        return cls(tuple(sorted(reqs)))

    @property
    def names_reserved(self) -> bool:
        return any(r.source == "reserved" for r in self.requirements)

    def names_key(self, key: str) -> bool:
        return any(r.key == key for r in self.requirements)

    @property
    def names_namespace(self) -> bool:
        """Whether a requirement is on either namespace key (then no namespace is implied)."""
        return any(r.key in NAMESPACE_KEYS for r in self.requirements)

    def with_requirement(self, req: Requirement) -> "EndpointSelector":
        return EndpointSelector(tuple(sorted(set(self.requirements) | {req})))

    def matches(self, labels: LabelSet) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        return "{" + ", ".join(r.describe() for r in self.requirements) + "}"


def _split(key: str) -> tuple[str, str]:
    """(source, key) of a selector key; namespace keys match labels of every source."""
    source, name = split_source(key)
    return (ANY_SOURCE, name) if name in NAMESPACE_KEYS else (source, name)
