"""Agent configuration: /etc/stockade/agent.yaml, every key also a command-line flag.

Keys use underscores in YAML and dashes as flags (``bpffs_dir`` <-> ``--bpffs-dir``; a key
of a block such as ``etcd: {endpoints: [...]}`` <-> ``--etcd-endpoints``). The types live in
agent.schema.json (JSON Schema, packaged beside this file), the defaults here. To add a key:
a field below and a property in the schema (with its description, which is the flag's help);
the flag is made from the schema (cli/agent_daemon.py). A block is a dataclass field with a
dataclass default and an ``object`` property with its own ``properties``.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
import socket as _socket
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from ..errors import InvalidRequest

ENFORCEMENT = ("default", "always", "never")


class ConfigError(InvalidRequest):
    """agent.yaml or a flag that does not match agent.schema.json (the agent exits 78)."""


@dataclass
class EtcdConfig:
    """The fleet store (docs/agent.md, "The fleet store"): the ``etcd:`` block; no
    endpoints: off."""

    endpoints: list[str] = field(default_factory=list)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    prefix: str = "/stockade/v1"
    lease_ttl: int = 20

    def check(self, where: str, host_name: str) -> None:
        """What the schema cannot say."""
        from ..kvstore import KvstoreError
        from ..kvstore.client import parse_endpoint
        tls = False
        for e in self.endpoints:
            try:
                tls |= parse_endpoint(e)[1]
            except KvstoreError as exc:
                raise ConfigError(f"{where}: etcd.endpoints: {exc}", "etcd.endpoints") from None
        if tls and not self.ca:
            raise ConfigError(f"{where}: etcd.ca is required with https:// endpoints", "etcd.ca")
        if bool(self.cert) != bool(self.key):
            raise ConfigError(f"{where}: etcd.cert and etcd.key go together", "etcd.cert")
        if "/" in host_name or not host_name:
            raise ConfigError(f"{where}: host_name {host_name!r} cannot name etcd keys", "host_name")


@dataclass
class AgentConfig:
    socket: str = "/run/stockade/agent.sock"
    socket_group: str = "stockade"
    bpffs_dir: str = "/sys/fs/bpf/stockade"
    state_dir: str = "/var/lib/stockade"
    enforcement: str = "default"
    audit: bool = False
    # What happens to packets of an interface whose workload is not identified yet.
    unknown_endpoint: str = "drop"  # or "forward" (migrations)
    # How programs are attached: tcx BPF links (pinned, owned: Linux 6.6+), tc clsact
    # filters, or auto (tcx where the kernel has it).
    attach_mode: str = "auto"
    # The kernel-side default (datapath/kerneldefault.py): an nftables table dropping
    # frames of managed interfaces that do not run the programs (while the agent is down).
    kernel_default: bool = True
    kernel_default_interfaces: list[str] = field(default_factory=list)
    # without nft bridge meta: bridge ports covered by name, on any bridge
    kernel_default_bridge_ports: list[str] = field(default_factory=lambda: ["veth*"])
    nft_table: str | None = None
    managed_bridges: list[str] = field(default_factory=lambda: [
        "podman0", "cni-podman0", "docker0", "virbr*"])
    managed_interfaces: list[str] = field(default_factory=lambda: ["vnet*", "tap*"])
    podman_socket: str | None = "/run/podman/podman.sock"
    podman_start_service: bool = False
    podman_events_log: str | None = "/run/libpod/events/events.log"
    docker_socket: str | None = "/var/run/docker.sock"
    # Docker and Podman merge an image's LABELs into its containers' labels: by default a
    # container label whose key and value are its image's own is dropped (labelsources.py).
    # True lets an image's author give its containers identities (docs/agent.md).
    trust_image_labels: bool = False
    # libvirt connection for VM discovery (e.g. qemu:///system); None: off. Off by default
    # so that a host without VMs never loads the bindings; the agent reconnects when
    # libvirtd starts later.
    libvirt_uri: str | None = None
    # Also take VM addresses from the QEMU guest agent (the guest answers it: off).
    libvirt_trust_guest_agent: bool = False
    host_name: str = field(default_factory=_socket.gethostname)
    flow_buffer_size: int = 65535
    # Optional flow log: JSON lines, rotated when over max_bytes (0: never), backups kept.
    flow_log_path: str | None = None
    flow_log_max_bytes: int = 100 * 1024 * 1024
    flow_log_backups: int = 5
    # Change log: every committed change as a JSON line (daemon/changelog.py), also on stderr.
    change_log_path: str | None = None
    # Flow events per second per CPU (and burst) for new-connection verdicts and for
    # drops; over the budget events are counted as lost, packet counters stay exact.
    flow_events_rate: int = 20000
    flow_events_burst: int = 2000
    drop_events_rate: int = 5000
    drop_events_burst: int = 1000
    ct_gc_interval: float = 30.0
    # Runtime sources (Podman, Docker): a quiet event stream is probed this often (a
    # runtime that does not answer within 2 s is taken as hung: reconnect and re-list),
    # and every container is listed again this often whatever the events said.
    runtime_probe_interval: float = 5.0
    runtime_relist_interval: float = 60.0
    metrics_listen: str | None = None  # e.g. 127.0.0.1:9962
    policy_map_size: int = 262144
    # A policy change of this many entries or more for one (identity, direction) is
    # written by a generation switch (datapath/writer.py): atomic, needs room for both.
    policy_switch_entries: int = 32
    endpoints_map_size: int = 4096
    ipcache_map_size: int = 262144
    ct_map_size: int = 262144
    log_level: str = "info"
    # L7 (HTTP rules): the transparent proxy (docs/policy.md, "HTTP rules"). It starts
    # when the first HTTP rule applies to a local endpoint.
    l7_haproxy: str = "/usr/sbin/haproxy"
    l7_user: str = "haproxy"                 # the proxy runs as this user
    # Its configuration, maps and sockets; None: "l7" beside the socket, so that a second
    # agent (its own --socket) never writes or removes this one's.
    l7_run_dir: str | None = None
    l7_proxy_port: int = 15001               # its transparent listener
    l7_mark: int = 0x5D170000                # skb mark of steered packets (high 16 bits)
    l7_route_table: int = 2317               # policy route table of steered packets
    l7_rule_priority: int = 2317             # ip rule preference
    l7_nft_table: str = "stockade_l7"        # nft table (family inet)
    l7_slots: int = 8                        # rules per rule set before a proxy restart
    l7_match_limit: int = 100000             # PCRE2 match limit of each HTTP pattern
    # The fleet store on etcd: off without endpoints (nothing changes then).
    etcd: EtcdConfig = field(default_factory=EtcdConfig)

    @property
    def l7_dir(self) -> str:
        return self.l7_run_dir or os.path.join(os.path.dirname(self.socket) or ".", "l7")

    def validate(self, where: str = "config") -> "AgentConfig":
        """Check every setting against agent.schema.json (raises ConfigError)."""
        if isinstance(self.etcd, dict):
            check({"etcd": self.etcd}, where)
            self.etcd = _build(EtcdConfig, self.etcd)
        check(self.to_dict(), where)
        if self.etcd.endpoints:
            self.etcd.check(where, self.host_name)
        return self

    @property
    def fleet_store(self) -> "EtcdConfig | None":
        """The etcd settings when the fleet store is on."""
        return self.etcd if self.etcd is not None and self.etcd.endpoints else None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    def datapath_settings(self) -> dict:
        """Build settings of the BPF program (must match existing pinned maps)."""
        return {"STOCKADE_PIN_DIR": self.bpffs_dir, "ENDPOINTS_MAX": self.endpoints_map_size,
                "IPCACHE_MAX": self.ipcache_map_size, "POLICY_MAX": self.policy_map_size,
                "POLICY_FLAGS_MAX": max(1024, self.endpoints_map_size * 2),
                "CT_MAX": self.ct_map_size,
                "EVENTS_NEW_RATE": self.flow_events_rate,
                "EVENTS_NEW_BURST": self.flow_events_burst,
                "EVENTS_DROP_RATE": self.drop_events_rate,
                "EVENTS_DROP_BURST": self.drop_events_burst,
                "L7_MARK": self.l7_mark}


def field_names() -> list[str]:
    return [f.name for f in fields(AgentConfig)]


@functools.cache
def schema() -> dict:
    """The JSON Schema of agent.yaml (agent/stockade/daemon/agent.schema.json)."""
    return json.loads(resources.files(__package__).joinpath("agent.schema.json").read_text())


_TYPE_WORDS = {"boolean": "a boolean (true or false)", "integer": "an integer", "number": "a number",
               "string": "a string", "array": "a list", "object": "a mapping", "null": "null"}


def _type_word(t) -> str:
    names = t if isinstance(t, list) else [t]
    return " or ".join(_TYPE_WORDS.get(n, n) for n in names)


def _given(value) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    text = json.dumps(value, default=str)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({kind})"


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: jsonschema.ValidationError, where: str, flags: bool) -> tuple[str, str]:
    path = list(err.absolute_path)
    if err.validator == "additionalProperties":
        known = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(known))
        key = _key_path(path + [extra[0]])
        close = difflib.get_close_matches(extra[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return key, f"{where}: unknown setting {key!r}{hint}"
    key = _key_path(path) or "(top)"
    v = err.validator_value
    expected = {
        "type": lambda: _type_word(v),
        "enum": lambda: "one of " + ", ".join(json.dumps(x) for x in v),
        "minimum": lambda: f"a number >= {v}",
        "exclusiveMinimum": lambda: f"a number > {v}",
        "maximum": lambda: f"a number <= {v}",
        "minLength": lambda: "a non-empty string",
        "pattern": lambda: f"a string matching {v}",
    }.get(str(err.validator), lambda: err.message)()
    name = ("--" + key.replace(".", "-").replace("_", "-")) if flags else key
    return key, f"{where}: {name}: expected {expected}, got {_given(err.instance)}"


def check(data, where: str, *, flags: bool = False) -> None:
    """Validate settings (a whole or partial agent.yaml) against the schema; every problem is
    named in one ConfigError: the key, what was expected and what was given."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of settings, got {_given(data)}", None)
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        found = [_message(e, where, flags) for e in errors]
        raise ConfigError("\n".join(m for _, m in found), found[0][0])


def _build(cls, data: dict):
    """A settings dataclass from a mapping; blocks (fields whose default is a dataclass,
    e.g. ``etcd:``) are built from their own mappings, keeping their defaults."""
    kw = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.default_factory is not MISSING:
            default = f.default_factory()
            if is_dataclass(default) and isinstance(value, dict):
                value = _build(type(default), value)
        kw[f.name] = value
    return cls(**kw)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_file(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", "config") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}", "config") from exc
    data = {} if data is None else data
    check(data, path)
    return data


def load(path: str | None, overrides: dict) -> AgentConfig:
    """Config file (if given and present) then overrides (from flags: a value of None there
    sets the key to null; a block is a nested mapping). Raises ConfigError."""
    data: dict = {}
    if path and Path(path).exists():
        data = read_file(path)
    elif path and path != "/etc/stockade/agent.yaml":
        raise ConfigError(f"{path}: no such config file", "config")
    check(overrides, "flags", flags=True)
    return _build(AgentConfig, _merge(data, overrides)).validate(path or "flags")
