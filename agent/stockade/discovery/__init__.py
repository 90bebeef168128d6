"""Workload discovery: find containers on this host and follow their lifecycle.

    Workload, WorkloadEvent       what is found (workload.py)
    DockerAPI                     Docker-compatible REST client, Docker or Podman (docker_api.py)
    DockerWatcher                 snapshot() and events() over one socket (watcher.py)
    find_host_veth                host end of a container's veth (veth.py)
    link_local_addresses          a workload interface's IPv6 link-local addresses (veth.py)
    peer_link_local_addresses     the same, found from the host end of its veth (veth.py)
    PodmanEventsLog               inotify tail of Podman's events.log, the low-latency path (podman_events.py)
    start/stop_podman_service     run Podman's API service when it is missing (podman_service.py)
    LibvirtWatcher                libvirt domains (VMs) as workloads (libvirt.py; the bindings
                                  are imported only when it connects)
"""

from .docker_api import DockerAPI, EventStream, workload_from_inspect
from .errors import DiscoveryError, RuntimeAPIError, RuntimeUnavailable, ServiceStartError
from .libvirt import METADATA_NS, LibvirtWatcher
from .podman_events import DEFAULT_EVENTS_LOG, PodmanEventsLog
from .podman_service import (
    PodmanService,
    ensure_podman_service,
    socket_answers,
    start_podman_service,
    stop_podman_service,
)
from .veth import HostVeth, find_host_veth, link_local_addresses, peer_link_local_addresses
from .watcher import DockerWatcher
from .workload import Workload, WorkloadEvent

__all__ = [
    "DEFAULT_EVENTS_LOG", "DiscoveryError", "DockerAPI", "DockerWatcher", "EventStream", "HostVeth",
    "LibvirtWatcher", "METADATA_NS",
    "PodmanEventsLog", "PodmanService", "RuntimeAPIError", "RuntimeUnavailable", "ServiceStartError",
    "Workload", "WorkloadEvent", "ensure_podman_service", "find_host_veth",
    "link_local_addresses", "peer_link_local_addresses", "socket_answers", "start_podman_service", "stop_podman_service",
    "workload_from_inspect",
]
