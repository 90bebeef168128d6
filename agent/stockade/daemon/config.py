"""Agent configuration: /etc/stockade/agent.yaml, every key also a command-line flag.

Keys use underscores in YAML and dashes as flags (``bpffs_dir`` <-> ``--bpffs-dir``).
Unknown keys are an error naming the file and key.
"""
from __future__ import annotations

import socket as _socket
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..errors import InvalidRequest

ENFORCEMENT = ("default", "always", "never")


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
    endpoints_map_size: int = 4096
    ipcache_map_size: int = 262144
    ct_map_size: int = 262144
    log_level: str = "info"

    def validate(self, where: str = "config") -> "AgentConfig":
        if self.enforcement not in ENFORCEMENT:
            raise InvalidRequest(f"{where}: enforcement must be one of {', '.join(ENFORCEMENT)}",
                                 "enforcement")
        if self.unknown_endpoint not in ("drop", "forward"):
            raise InvalidRequest(f"{where}: unknown_endpoint must be drop or forward",
                                 "unknown_endpoint")
        for name in ("flow_buffer_size", "policy_map_size", "endpoints_map_size",
                     "ipcache_map_size", "ct_map_size", "flow_events_rate", "flow_events_burst",
                     "drop_events_rate", "drop_events_burst"):
            if getattr(self, name) <= 0:
                raise InvalidRequest(f"{where}: {name} must be positive", name)
        for name in ("runtime_probe_interval", "runtime_relist_interval"):
            if not getattr(self, name) > 0:
                raise InvalidRequest(f"{where}: {name} must be positive", name)
        if self.flow_log_max_bytes < 0 or self.flow_log_backups < 0:
            raise InvalidRequest(f"{where}: flow_log_max_bytes and flow_log_backups must not "
                                 "be negative", "flow_log_max_bytes")
        return self

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
                "EVENTS_DROP_BURST": self.drop_events_burst}


def field_names() -> list[str]:
    return [f.name for f in fields(AgentConfig)]


def load(path: str | None, overrides: dict) -> AgentConfig:
    """Config file (if given and present) then non-None overrides (from flags)."""
    data: dict = {}
    where = path or "flags"
    if path and Path(path).exists():
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise InvalidRequest(f"{path}: cannot parse: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidRequest(f"{path}: must be a mapping of settings")
        unknown = sorted(set(data) - set(field_names()))
        if unknown:
            raise InvalidRequest(f"{path}: unknown setting {unknown[0]!r}", unknown[0])
    elif path and path != "/etc/stockade/agent.yaml":
        raise InvalidRequest(f"{path}: no such config file", "config")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return AgentConfig(**data).validate(where)
