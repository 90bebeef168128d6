"""Inventory-defined services: identities given to workloads by matching, not labelling.

A definition (what Ansible pushes, already narrowed to this host):

    backup:
      labels: {tier: storage}          # service=<name> is added automatically
      members:                         # any matcher selects a workload
        - {container_name: "backup-*"}
        - {image: "*/restic:*"}
        - {container_labels: {matchLabels: {role: backup}}}
        - {libvirt_domain: "bk-vm*"}
        - {endpoint: "nas-ns"}          # a static endpoint's name
        - {interface: "tap-bk*"}
      cidrs: [192.0.2.0/24]            # machines Stockade does not run on

A workload that matches several services gets the labels of the first of them in name
order; the others are reported as conflicts (API, CLI, log). Service labels carry the
source ``service``; they are merged with the workload's own labels. A key may say
``service:`` itself; a key naming another source (``static:role``) is refused, as is
``service`` (the name gives it), so a definition cannot claim what another source vouches
for (labelsources.py).
"""
from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass, field

from ..errors import InvalidRequest
from ..policy.api.selector import EndpointSelector
from ..policy.labels import Label, LabelSet, check_key, check_value, split_source

MATCHERS = ("container_name", "image", "container_labels", "libvirt_domain", "endpoint", "interface")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9\-.]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Member:
    kind: str
    pattern: str = ""
    selector: EndpointSelector | None = None

    def matches(self, w: dict) -> bool:
        """``w``: {"name", "source", "interface", "image", "labels": LabelSet (own)}."""
        if self.kind == "container_labels":
            return (w["source"] in ("podman", "docker") and self.selector is not None
                    and self.selector.matches(w["labels"]))
        value = {
            "container_name": w["name"] if w["source"] in ("podman", "docker") else None,
            "image": w.get("image") if w["source"] in ("podman", "docker") else None,
            "libvirt_domain": w["name"] if w["source"] == "libvirt" else None,
            "endpoint": w["name"] if w["source"] == "static" else None,
            "interface": w.get("interface"),
        }[self.kind]
        return value is not None and fnmatch.fnmatchcase(value, self.pattern)


@dataclass(frozen=True)
class Service:
    name: str
    labels: LabelSet
    members: tuple[Member, ...] = ()
    cidrs: tuple = ()
    raw: dict = field(default_factory=dict, compare=False)

    def matches(self, w: dict) -> bool:
        return any(m.matches(w) for m in self.members)


def parse_services(data) -> dict[str, Service]:
    """Validate a {name: definition} mapping; errors name the field path."""
    if not isinstance(data, dict):
        raise InvalidRequest("services must be a mapping of name -> definition", "services")
    out = {}
    for name, d in data.items():
        path = f"services.{name}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidRequest(f"{name!r}: a service name is lower-case letters, digits, '-', '.'", path)
        if not isinstance(d, dict):
            raise InvalidRequest("must be a mapping with labels, members and/or cidrs", path)
        for k in d:
            if k not in ("labels", "members", "cidrs", "hosts", "description"):
                raise InvalidRequest(f"unknown field {k!r}", f"{path}.{k}")
        labels = {"service": name}
        raw = d.get("labels") or {}
        if not isinstance(raw, dict):
            raise InvalidRequest("labels must be a mapping of key -> value", f"{path}.labels")
        for k, v in raw.items():
            key, value = _service_label(k, v, f"{path}.labels.{k}")
            labels[key] = value
        members = []
        for i, m in enumerate(d.get("members") or []):
            members.append(_member(m, f"{path}.members[{i}]"))
        cidrs = []
        for i, c in enumerate(d.get("cidrs") or []):
            try:
                cidrs.append(ipaddress.ip_network(str(c), strict=True))
            except ValueError as exc:
                raise InvalidRequest(f"{c!r} is not a CIDR ({exc})", f"{path}.cidrs[{i}]") from None
        if not members and not cidrs:
            raise InvalidRequest("a service needs members or cidrs", path)
        out[name] = Service(name, LabelSet(Label("service", k, v) for k, v in labels.items()),
                            tuple(members), tuple(cidrs), d)
    return out


def _service_label(key, value, path: str) -> tuple[str, str]:
    """(key without source, value) of one label of a definition; InvalidRequest names ``path``."""
    if not isinstance(key, str):
        raise InvalidRequest(f"label key {key!r} is not a string", path)
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise InvalidRequest(f"label {key!r} must map to a string", path)
    source, name = split_source(key, "service")
    if source != "service":
        raise InvalidRequest(f"label source {source!r} is not service: a service's labels "
                             f"always have source service (write {name!r})", path)
    if name == "service":
        raise InvalidRequest("the service label is the service's name, added automatically", path)
    value = "" if value is None else str(value)
    why = check_key(name) or check_value(value)
    if why:
        raise InvalidRequest(why, path)
    return name, value


def _member(m, path: str) -> Member:
    if not isinstance(m, dict):
        raise InvalidRequest("a member is a mapping with one matcher", path)
    keys = [k for k in m if k != "hosts"]
    if len(keys) != 1 or keys[0] not in MATCHERS:
        raise InvalidRequest(f"a member has exactly one of {', '.join(MATCHERS)}", path)
    kind = keys[0]
    value = m[kind]
    if kind == "container_labels":
        if not isinstance(value, dict) or set(value) - {"matchLabels", "matchExpressions"}:
            raise InvalidRequest("container_labels takes matchLabels and/or matchExpressions", f"{path}.{kind}")
        from ..policy.api.validation import _Sanitizer
        s = _Sanitizer("")
        sel = s.selector(value, f"{path}.{kind}", peer=True)
        if s.errors:
            raise InvalidRequest(s.errors[0].msg, s.errors[0].path)
        return Member(kind, selector=sel)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{kind} takes a name or glob", f"{path}.{kind}")
    return Member(kind, pattern=value)


def membership(services: dict[str, Service], w: dict) -> tuple[Service | None, list[str]]:
    """(the service whose labels the workload gets, every service it matches)."""
    matched = [s for name, s in sorted(services.items()) if s.matches(w)]
    return (matched[0] if matched else None), [s.name for s in matched]


def effective_labels(own: LabelSet, service: Service | None) -> LabelSet:
    return own if service is None else own.merged(service.labels)
