"""Labels: ``source:key=value``, as Cilium writes them.

A label's source says where it came from: ``container`` (Podman/Docker labels),
``libvirt``, ``static`` (registered endpoints), ``service`` (inventory services),
``reserved`` (Stockade's own identities), ``cidr``. A selector key without a source, or
with ``any:``, matches labels from every source.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, NamedTuple

ANY_SOURCE = "any"
# Two spellings of a workload's namespace: Stockade's and Kubernetes' (as Cilium writes
# it). Either one matches the other, whatever the label's source.
NAMESPACE_KEYS = ("namespace", "io.kubernetes.pod.namespace")
SOURCES = {"any", "container", "docker", "podman", "libvirt", "static", "service",
           "reserved", "cidr", "unspec", "k8s", "remote"}

_NAME = r"[A-Za-z0-9]([A-Za-z0-9_.\-]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9]([a-z0-9\-.]{0,251}[a-z0-9])?"
KEY_RE = re.compile(rf"^({_PREFIX}/)?{_NAME}$")
VALUE_RE = re.compile(rf"^({_NAME})?$")
CIDR_VALUE_RE = re.compile(r"^[0-9a-fA-F:.]+/[0-9]+$")


class Label(NamedTuple):
    source: str
    key: str
    value: str

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}" if self.value else f"{self.source}:{self.key}"


def split_source(key: str, default: str = ANY_SOURCE) -> tuple[str, str]:
    """``container:app`` -> (``container``, ``app``); ``app`` -> (default, ``app``)."""
    if ":" in key:
        source, _, name = key.partition(":")
        return source, name
    return default, key


def check_key(key: str) -> str | None:
    """Returns why ``key`` (which may carry a source prefix) is not a valid label key."""
    source, name = split_source(key)
    if source not in SOURCES:
        return f"unknown label source {source!r} (one of {', '.join(sorted(SOURCES))})"
    if source == "cidr":
        return None
    if not KEY_RE.match(name):
        return f"{key!r} is not a valid label key"
    return None


def check_value(value: str, source: str = ANY_SOURCE) -> str | None:
    if not isinstance(value, str):
        return f"label value must be a string, not {type(value).__name__}"
    if source == "cidr" and CIDR_VALUE_RE.match(value):
        return None
    if not VALUE_RE.match(value):
        return f"{value!r} is not a valid label value"
    return None


def parse_pairs(text: str, what: str = "labels", *, bare: bool = True) -> list[tuple[str, str | None]]:
    """``k=v,container:k2=v2,k3`` -> [(key, value or None for a bare key)]: the one
    reader of the ``k=v,...`` text the CLI, the API and filters take. A key may carry a
    source. ``bare=False``: every item needs ``=``."""
    from ..errors import InvalidRequest
    out = []
    items = [p.strip() for p in str(text).split(",")]
    if not bare and len(items) > 1 and "" in items:
        raise InvalidRequest(f"{what}: '' is not key=value", what)  # a stray comma
    for item in filter(None, items):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not key or (not sep and not bare):
            raise InvalidRequest(f"{what}: {item!r} is not key=value", what)
        out.append((key, value.strip() if sep else None))
    return out


class LabelSet(tuple):
    """An immutable, sorted, de-duplicated tuple of Labels: the canonical form of an
    identity."""

    def __new__(cls, labels: Iterable[Label] = ()):
        return super().__new__(cls, sorted(set(labels)))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str], source: str = "unspec") -> "LabelSet":
        out = []
        for key, value in mapping.items():
            src, name = split_source(key, source)
            out.append(Label(src, name, "" if value is None else str(value)))
        return cls(out)

    @classmethod
    def parse(cls, text: str, source: str = "unspec") -> "LabelSet":
        """``k=v,container:k2=v2`` -> LabelSet. Empty text gives the empty set."""
        return cls.from_mapping({k: v or "" for k, v in parse_pairs(text)}, source)

    @classmethod
    def from_strings(cls, labels) -> "LabelSet":
        """``["container:app=web", "reserved:world"]`` (``to_strings``) -> LabelSet."""
        out = []
        for text in labels:
            source, _, rest = str(text).partition(":")
            key, _, value = rest.partition("=")
            out.append(Label(source, key, value))
        return cls(out)

    def values_of(self, source: str, key: str) -> list[str]:
        if key in NAMESPACE_KEYS:
            return [l.value for l in self if l.key in NAMESPACE_KEYS]
        return [l.value for l in self if l.key == key and (source == ANY_SOURCE or l.source == source)]

    def has(self, source: str, key: str) -> bool:
        return any(l.key == key and (source == ANY_SOURCE or l.source == source) for l in self)

    def merged(self, other: Iterable[Label]) -> "LabelSet":
        return LabelSet(list(self) + list(other))

    def to_strings(self) -> list[str]:
        return [str(l) for l in self]

    def to_dict(self) -> dict[str, str]:
        return {f"{l.source}:{l.key}": l.value for l in self}

    def __str__(self) -> str:
        return ",".join(self.to_strings())
