"""Container runtimes (Podman, Docker) and libvirt as endpoint sources.

Each configured runtime socket gets a DockerWatcher; its events become endpoints
(name = container name, labels = container labels, interface = host-side veth).
With ``libvirt_uri`` set, a LibvirtWatcher does the same for VMs (name = domain name,
labels = the domain's Stockade metadata, interface = the tap, mac = the guest MAC).
After every full listing, each running workload is an endpoint and endpoints of that
source that no longer run are removed (RuntimeSource); each source's health (connected,
last event, last listing, errors) is in ``stockade status``.

Labels get the runtime's own source (``container:``, ``libvirt:``); labels that name
another source, are invalid, or (unless ``trust_image_labels``) come from the container's
image are dropped and reported with the endpoint (labelsources.py). A container whose
image labels cannot be read is not identified while they are not trusted: its interface
stays closed and the error shows in ``stockade status``.
"""
from __future__ import annotations

import json
import logging
import os
import threading

from ..discovery import DockerWatcher, ensure_podman_service, stop_podman_service
from ..discovery.errors import DiscoveryError
from ..discovery.netns import netns_inode
from ..discovery.veth import find_host_veth, interface_addresses
from ..discovery.workload import Workload, WorkloadEvent
from ..errors import StockadeError
from .changes import RemoveEndpoint, UpsertEndpoint
from .labelsources import admit_labels

log = logging.getLogger("stockade.runtimes")


class RuntimeSource:
    """One runtime (or libvirt) as a source of endpoints.

    Level-triggered: after every full listing of the runtime (at start, after a
    reconnect, and every ``runtime_relist_interval``) each running workload must be a
    ready endpoint on its interface, and endpoints of this source that no longer run
    are removed; events only make that happen sooner."""

    def __init__(self, agent, runtime: str, socket_path: str | None, events_log: str | None,
                 stop_event: threading.Event, service=None, watcher=None):
        cfg = agent.config
        self.agent, self.runtime, self.service = agent, runtime, service
        if watcher is None and not socket_path:
            raise ValueError(f"{runtime}: a runtime source needs a socket or a watcher")
        self.watcher = watcher or DockerWatcher(
            socket_path or "", runtime, events_log=events_log, sync_events=True,
            probe_interval=cfg.runtime_probe_interval, relist_interval=cfg.runtime_relist_interval)
        self._thread = self.watcher.start(self._on_event, stop_event)

    def health(self) -> dict | None:
        h = getattr(self.watcher, "health", None)
        return h.to_dict() if h is not None else None

    def _on_event(self, ev: WorkloadEvent) -> None:
        if ev.kind == "synced":
            self._reconcile(ev.workloads)
            return
        w = ev.workload
        if w is None:
            return
        try:
            if ev.kind == "added":
                self._upsert(w)
            else:
                self.agent.submit(RemoveEndpoint(w.name, source=self.runtime, runtime_id=w.id))
        except StockadeError as exc:
            self.agent.error(f"{self.runtime} container {w.name}: {exc}")
        except Exception:
            log.exception("%s event for %s failed", self.runtime, w.name)

    def _upsert(self, w: Workload):
        """The workload as an endpoint: the Endpoint the agent now has, or a string that
        says why it is not managed (reported in status where it is an error). Raises
        StockadeError when the change fails."""
        name = w.name
        if not w.host_ifname or not w.ips:
            log.info("%s workload %s has no host interface or address; not managed",
                     self.runtime, name)
            return "it has no host interface or no address"
        image_labels = None
        if self.runtime in ("podman", "docker") and not self.agent.config.trust_image_labels:
            if w.image_labels is None:
                why = (f"the labels of its image {w.image!r} cannot be read, so its own "
                       "cannot be told from the image's; not identified")
                self.agent.error(f"{self.runtime} container {name}: {why}")
                return why
            image_labels = w.image_labels
        labels, dropped = admit_labels(w.labels, self.runtime, image_labels=image_labels)
        # Containers: no MAC (their veth MAC is not the workload's to keep).
        # VMs: the guest MAC libvirt configured.
        return self.agent.submit(UpsertEndpoint(
            name, w.host_ifname, tuple(w.ips), labels, self.runtime, runtime_id=w.id,
            mac=w.mac if self.runtime == "libvirt" else None, ifindex=w.host_ifindex,
            extra={"image": w.image}, dropped_labels=tuple(dropped),
            netns=(w.netns_inode, w.netns_path) if w.netns_inode else None))

    def enroll(self, cid: str, pid: int, bundle: str | None, wait: float):
        """A container Podman is starting (the OCI hook, hook.py): the Endpoint, or why
        not. Its name, image and labels come from its create event (waited for up to
        ``wait`` s), its interface and addresses from its network namespace; then the
        same path as an event's. The runtime is not asked about the container: it holds
        the container's lock until the hook returns."""
        created = getattr(self.watcher, "created", None)
        if created is None:
            return f"{self.runtime} has no create events to identify containers by"
        if not self.watcher.events_log or not os.path.exists(self.watcher.events_log):
            return (f"{self.runtime}: no events log is followed (podman_events_log), so "
                    "create events are not seen in time")
        info = created.wait(cid, wait)
        if info is None:
            return f"no create event for container {cid[:12]} within {wait:g}s"
        netns_ino = netns_inode(f"/proc/{pid}/ns/net")
        if netns_ino is None:
            return f"process {pid} is gone"
        if netns_ino == netns_inode("/proc/self/ns/net"):
            return f"container {info.name} shares the host's network namespace"
        veth = find_host_veth(pid)
        if veth is None:
            return f"container {info.name} has no veth into this host's namespace"
        ips = interface_addresses(pid, veth.container_ifindex)
        netns_path = bundle_netns_path(bundle) or f"/proc/{pid}/ns/net"
        try:
            image_labels = self.watcher.image_labels_by_name(info.image)
        except DiscoveryError as exc:
            log.warning("%s: image of %s: %s", self.runtime, info.name, exc)
            image_labels = None
        if image_labels is None and not self.agent.config.trust_image_labels:
            return f"the labels of its image {info.image!r} cannot be read now"  # events: later
        w = Workload(runtime=self.runtime, id=cid, name=info.name, image=info.image,
                     labels=dict(info.labels), image_labels=image_labels, ips=tuple(ips),
                     host_ifname=veth.ifname, host_ifindex=veth.ifindex, mac=veth.mac, pid=pid,
                     netns_path=netns_path, netns_inode=netns_ino)
        return self._upsert(w)

    def _reconcile(self, workloads) -> None:
        """Every running workload an endpoint ready on its interface (submitted again if
        an earlier attempt failed); endpoints of this source that do not run removed."""
        mine = {e.name: e for e in self.agent.snapshot().endpoints if e.source == self.runtime}
        for w in workloads:
            ep = mine.get(w.name)
            if ep is None or ep.runtime_id != w.id or ep.state != "ready" or \
                    ep.interface != (w.host_ifname or ""):
                self._on_event(WorkloadEvent("added", w))
        for name in sorted(set(mine) - {w.name for w in workloads}):
            try:
                self.agent.submit(RemoveEndpoint(name, source=self.runtime))
            except StockadeError as exc:
                self.agent.error(f"{self.runtime}: removing {name}: {exc}")

    def stop(self) -> None:
        self.watcher.close()
        if self.service is not None:
            stop_podman_service(self.service)


MAX_BUNDLE_CONFIG = 4 << 20   # bytes of an OCI bundle's config.json read


def bundle_netns_path(bundle: str | None) -> str | None:
    """The network namespace path in an OCI bundle's config.json (what Podman reports as
    the container's SandboxKey); None when it is not there or not readable."""
    if not bundle:
        return None
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            data = json.loads(f.read(MAX_BUNDLE_CONFIG))
        for ns in data["linux"]["namespaces"]:
            if ns.get("type") == "network" and isinstance(ns.get("path"), str) and ns["path"]:
                return ns["path"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


class SocketWaiter:
    """A configured runtime whose socket does not exist yet (at boot the agent starts
    before podman.socket): checked every ``interval`` s, and once the socket is there
    its RuntimeSource is made and handed to ``add``. Meanwhile the runtime's containers
    stay dropped until identified, and status lists the source as waiting (not a
    fault: the runtime may not be installed)."""

    def __init__(self, runtime: str, socket_path: str, make, add, stop_event: threading.Event,
                 interval: float = 1.0):
        self.runtime, self.socket_path = runtime, socket_path
        self._make, self._add, self._interval = make, add, interval
        self._stop = stop_event
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stockade-wait-{runtime}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not (self._stop.is_set() or self._done.is_set()):
            if os.path.exists(self.socket_path):
                log.info("%s: %s appeared; following it", self.runtime, self.socket_path)
                self._add(self._make())
                self._done.set()
                return
            self._stop.wait(self._interval)

    def health(self) -> dict | None:
        if self._done.is_set():
            return None               # the RuntimeSource reports from now on
        return {"name": self.runtime, "where": self.socket_path, "connected": False,
                "waiting": "the socket does not exist (yet)", "since": None,
                "last_event": None, "last_sync": None, "errors": 0, "last_error": None,
                "last_error_at": None, "retrying": 0}

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=2)


def start_runtime_watchers(agent, stop_event: threading.Event) -> list:
    """A source per configured runtime; a runtime whose socket is not there yet gets a
    SocketWaiter that adds its source when the socket appears."""
    cfg = agent.config
    out: list = []

    def podman():
        service = None
        if cfg.podman_start_service:
            try:
                service = ensure_podman_service(cfg.podman_socket)
            except StockadeError as exc:
                agent.error(f"podman service: {exc}")
        # the events log is followed once it exists (PodmanEventsLog waits for it)
        return RuntimeSource(agent, "podman", cfg.podman_socket, cfg.podman_events_log or None,
                             stop_event, service)

    def docker():
        return RuntimeSource(agent, "docker", cfg.docker_socket, None, stop_event)

    runtimes = []
    if cfg.podman_socket:
        runtimes.append(("podman", cfg.podman_socket, podman, cfg.podman_start_service))
    if cfg.docker_socket and cfg.docker_socket != cfg.podman_socket:
        runtimes.append(("docker", cfg.docker_socket, docker, False))
    for runtime, socket_path, make, starts_itself in runtimes:
        if starts_itself or os.path.exists(socket_path):
            out.append(make())
        else:
            out.append(SocketWaiter(runtime, socket_path, make, agent.add_watcher, stop_event))
    if cfg.libvirt_uri:
        try:
            from ..discovery.libvirt import LibvirtWatcher, _libvirt
            _libvirt()
        except StockadeError as exc:
            agent.error(f"libvirt: {exc}")
        else:
            # The watcher reconnects by itself: libvirtd may start after the agent.
            watcher = LibvirtWatcher(cfg.libvirt_uri, trust_guest_agent=cfg.libvirt_trust_guest_agent,
                                     sync_events=True)
            out.append(RuntimeSource(agent, "libvirt", None, None, stop_event, watcher=watcher))
    return out
