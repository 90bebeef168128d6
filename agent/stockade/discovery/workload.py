"""What discovery knows about one running workload."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

EventKind = Literal["added", "removed", "synced"]


@dataclass(frozen=True)
class Workload:
    """A running container (or other workload) as seen by a runtime.

    runtime: which watcher found it ("podman", "docker", ...).
    id: the runtime's full container ID.
    name: container name without Docker's leading "/".
    image: the image reference the container was created from (Config.Image).
    labels: container labels; empty dict when it has none. Docker and Podman merge
        the image's labels into them.
    image_labels: the labels of the image itself (to tell which container labels came
        from the image); None when unknown (the image could not be read, or a workload
        without an image).
    ips: every IPv4 and IPv6 address the runtime reports, first seen first.
    host_ifname / host_ifindex: the host end of the container's veth, in the
        agent's network namespace; None when the container has no veth (host
        network, macvlan, no network) or it could not be resolved.
    mac: the container interface's MAC address; None when unknown.
    pid: the container's init PID on the host; None when not running.
    netns_path / netns_inode: the container's network namespace (the runtime's
        SandboxKey, else /proc/PID/ns/net) and its inode (netns.py); None when unknown.
    """

    runtime: str
    id: str
    name: str
    image: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    image_labels: dict[str, str] | None = field(default=None, hash=False)
    ips: tuple[str, ...] = ()
    host_ifname: str | None = None
    host_ifindex: int | None = None
    mac: str | None = None
    pid: int | None = None
    netns_path: str | None = None
    netns_inode: int | None = None


@dataclass
class WorkloadEvent:
    """A change seen by a watcher.

    kind "added" is an upsert: the same ID may be added again (restart, or a
    resync after reconnecting) and the newest workload replaces the old one.
    kind "removed" carries the last workload that was added for that ID.
    kind "synced" (watchers asked for it) follows every full listing: ``workload`` is
    None and ``workloads`` holds every running workload.
    """

    kind: EventKind
    workload: Workload | None
    workloads: tuple[Workload, ...] = ()
