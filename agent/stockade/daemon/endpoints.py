"""Endpoints: workloads with a host-side interface, addresses and labels.

A static endpoint names its host interface, or (VMs) only the guest's MAC: then the
agent binds it to the tap whose host-side MAC follows from the guest MAC (see
``tap_matches_mac``) and re-binds it whenever such a tap appears again (a restarted VM
gets a new tap and a new ifindex). What identifies an endpoint's interface is recorded
with it (``link_mac``, ``netns``) and checked before it is bound again (binding.py).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from ..errors import InvalidRequest
from ..policy.labels import LabelSet, check_key, check_value, parse_pairs, split_source
from .labelsources import MAX_LISTED, DroppedLabel, admit_labels

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.\-@]{1,15}$")
SOURCES = ("static", "podman", "docker", "libvirt")
MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
TAP_KINDS = ("tun", "macvtap")


def tap_matches_mac(link_kind: str | None, link_mac: str | None, guest_mac: str | None) -> bool:
    """Whether a host interface is the tap of the VM whose guest MAC is ``guest_mac``.

    The rule: the interface is a tap (tun/tap or macvtap) and its host-side MAC is the
    guest MAC with the first octet replaced by 0xfe (libvirt's convention, which also
    keeps the bridge from learning the guest MAC on the tap itself), or equals the guest
    MAC (hypervisors that copy it). Only the host sets a tap's MAC: root creates the tap,
    the guest cannot change it from inside. That is why the binding never comes from
    ARP or from frames the guest sends, which the guest controls.
    """
    if link_kind not in TAP_KINDS or not link_mac or not guest_mac:
        return False
    link_mac, guest_mac = link_mac.lower(), guest_mac.lower()
    return link_mac == guest_mac or link_mac == "fe:" + guest_mac.split(":", 1)[1]


@dataclass(frozen=True)
class Endpoint:
    """One workload; immutable (a change is a new Endpoint, see dataclasses.replace)."""

    name: str
    id: int
    interface: str
    ips: tuple[str, ...]
    labels: LabelSet
    source: str = "static"
    audit: bool = False
    runtime_id: str | None = None
    mac: str | None = None
    ifindex: int | None = None
    identity: int | None = None
    extra: dict = field(default_factory=dict)
    by_mac: bool = False  # the interface is found from ``mac`` (tap_matches_mac)
    # Labels its source gave that it does not get (labelsources.py), at most MAX_LISTED.
    dropped_labels: tuple[DroppedLabel, ...] = ()
    # What identifies its interface (binding.py): the host-side MAC of the link it was
    # bound to, and a container's network namespace as (inode, path).
    link_mac: str | None = None
    netns: tuple[int, str | None] | None = None

    def __post_init__(self):
        object.__setattr__(self, "dropped_labels", tuple(self.dropped_labels)[:MAX_LISTED])

    @property
    def state(self) -> str:
        if self.ifindex is None:
            return "waiting-for-interface"
        return "ready" if self.identity is not None else "unidentified"

    def to_record(self) -> dict:
        """What is persisted (and compared to find out whether a spec changed)."""
        rec = {"name": self.name, "id": self.id, "interface": self.interface,
                "ips": list(self.ips), "labels": self.labels.to_dict(), "source": self.source,
                "audit": self.audit, "runtime_id": self.runtime_id, "mac": self.mac,
                "extra": self.extra,
                "dropped_labels": [d.to_dict() for d in self.dropped_labels]}
        if self.by_mac:
            rec["by_mac"] = True
            rec["interface"] = ""  # the tap's name changes with every VM start
        if self.link_mac is not None:
            rec["link_mac"] = self.link_mac
        if self.netns is not None:
            rec["netns"] = {"inode": self.netns[0], "path": self.netns[1]}
        return rec

    @classmethod
    def from_record(cls, rec: dict) -> "Endpoint":
        return cls(rec["name"], rec["id"], rec["interface"], tuple(rec["ips"]),
                   LabelSet.from_mapping(rec["labels"]), rec.get("source", "static"),
                   rec.get("audit", False), rec.get("runtime_id"), rec.get("mac"),
                   extra=rec.get("extra") or {}, by_mac=rec.get("by_mac", False),
                   dropped_labels=tuple(DroppedLabel.from_dict(d) for d in rec.get("dropped_labels") or []),
                   link_mac=rec.get("link_mac"),
                   netns=(rec["netns"]["inode"], rec["netns"].get("path")) if rec.get("netns") else None)


def label_mapping(value, field_name: str = "labels") -> dict:
    """Labels as given to the API: a mapping or ``k=v,k=v`` (None: none)."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = dict(parse_pairs(value, field_name, bare=False))
    if not isinstance(value, dict):
        raise InvalidRequest("labels must be a mapping or k=v,k=v", field_name)
    return value


def parse_labels(value, source: str, field_name: str = "labels") -> LabelSet:
    """Labels as a mapping or ``k=v,k=v``; keys without a source get ``source``, keys with
    one keep it (remote workloads' labels: ipcache). Endpoints use static_labels."""
    value = label_mapping(value, field_name)
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)) and v is not None:
            raise InvalidRequest(f"label {k!r} must map to a string", f"{field_name}.{k}")
        v = "" if v is None else str(v)
        why = check_key(k) or check_value(v, split_source(k)[0])
        if why:
            raise InvalidRequest(why, f"{field_name}.{k}")
        if split_source(k)[0] == "reserved":
            raise InvalidRequest("reserved labels cannot be given to endpoints", f"{field_name}.{k}")
    return LabelSet.from_mapping({k: "" if v is None else str(v) for k, v in value.items()}, source)


def static_labels(value, field_name: str = "labels") -> tuple[LabelSet, list[DroppedLabel]]:
    """A static endpoint's labels (source static) and those dropped for naming another
    source (labelsources.py); invalid and reserved labels are refused (InvalidRequest)."""
    labels, dropped = admit_labels(label_mapping(value, field_name), "static")
    for d in dropped:
        if d.cause in ("invalid", "reserved"):
            raise InvalidRequest(d.reason, f"{field_name}.{d.key}")
    return labels, dropped


def parse_ips(value, field_name: str = "ips") -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value:
        raise InvalidRequest("at least one IP address is required", field_name)
    out = []
    for i, v in enumerate(value):
        try:
            addr = ipaddress.ip_address(str(v))
        except ValueError:
            raise InvalidRequest(f"{v!r} is not an IP address", f"{field_name}[{i}]") from None
        if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
            raise InvalidRequest(f"{v} cannot be an endpoint address", f"{field_name}[{i}]")
        out.append(str(addr))
    if len([a for a in out if ":" not in a]) > 4 or len([a for a in out if ":" in a]) > 4:
        raise InvalidRequest("at most 4 IPv4 and 4 IPv6 addresses", field_name)
    return tuple(dict.fromkeys(out))


def parse_spec(spec) -> dict:
    """Validate a static endpoint spec from the API; returns normalized fields."""
    if not isinstance(spec, dict):
        raise InvalidRequest("endpoint must be a JSON object")
    allowed = {"name", "interface", "ips", "labels", "audit", "mac"}
    for k in spec:
        if k not in allowed:
            raise InvalidRequest(f"unknown field {k!r}", k)
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequest("name is required: letters, digits, '_', '.', '-' (max 63)", "name")
    audit = spec.get("audit", False)
    if not isinstance(audit, bool):
        raise InvalidRequest("audit must be true or false", "audit")
    mac = spec.get("mac")
    if mac is not None and (not isinstance(mac, str) or not MAC_RE.match(mac)):
        raise InvalidRequest(f"{mac!r} is not a MAC address", "mac")
    iface = spec.get("interface")
    if iface is None and mac is None:
        raise InvalidRequest("interface is required (a host interface name) unless mac is "
                             "given (a VM's guest MAC: its tap is found from it)", "interface")
    if iface is not None and (not isinstance(iface, str) or not IFNAME_RE.match(iface)):
        raise InvalidRequest("interface must be a host interface name (max 15 chars)",
                             "interface")
    labels, dropped = static_labels(spec.get("labels"))
    return {"name": name, "interface": iface, "ips": parse_ips(spec.get("ips")),
            "labels": labels, "dropped_labels": dropped, "audit": audit,
            "mac": mac.lower() if mac else None}
