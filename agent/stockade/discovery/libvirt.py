"""Turn libvirt domains (VMs) into WorkloadEvents.

Same shape as DockerWatcher: ``snapshot()``, ``events(stop_event)`` (a blocking
generator: first "added" for every interface of every running domain, then live
changes) and ``start(callback, stop_event)``.

One Workload per domain interface that has a host tap (others are skipped): id = "<domain uuid>/<guest MAC>",
name = the domain name (first interface) or "<domain>.<n>" (n-th interface, from 1),
host_ifname/host_ifindex = libvirt's ``<target dev>`` (vnetN), mac = the guest MAC.

Identity and addresses come from what the host's administrator wrote, never from the
guest: labels from the domain's ``<metadata>`` element in the Stockade namespace
(METADATA_NS); addresses from that element first, then libvirt's DHCP leases, then the
guest agent (only when ``trust_guest_agent``; the guest answers it). ARP is never used: the
guest controls what it answers. The metadata element::

    <stockade:endpoint xmlns:stockade="https://stockade.dev/xmlns/endpoint/1">
      <label key="app">db</label>
      <ip>10.88.250.20</ip>                         <!-- first interface -->
      <interface mac="52:54:00:aa:00:02"><ip>10.1.0.5</ip></interface>
    </stockade:endpoint>

Threads: libvirt's default event loop runs in one thread (virEventRunDefaultImpl);
its callbacks only queue the domain UUID. The consuming thread looks domains up and
yields the difference with what it knew. Every ``resync_interval`` seconds all domains
are listed again (leases that arrive after boot, missed events).

Latency: libvirt's "started" event comes when QEMU runs, about a second after libvirt
created the tap (the tap stays closed meanwhile: the agent attaches every managed tap
as unidentified). To bind sooner, a netlink thread watches for new tun/macvtap links
and triggers a listing at once (coalesced): the starting domain's live XML already
names its tap, so the endpoint is ready ~0.1 s after the tap appears. When libvirtd goes away the connection is reopened with
backoff (0.1 s doubling to 5 s) and everything is listed again. A hung libvirtd is found by
libvirt's keepalive (KEEPALIVE_INTERVAL s, KEEPALIVE_COUNT unanswered: the connection is
closed, then reopened). ``health`` (health.SourceHealth) says how it is going; with
``sync_events`` every listing is also yielded as a "synced" WorkloadEvent.
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any

from .errors import RuntimeAPIError, RuntimeUnavailable
from .health import SourceHealth
from .workload import Workload, WorkloadEvent

log = logging.getLogger(__name__)

METADATA_NS = "https://stockade.dev/xmlns/endpoint/1"
DEFAULT_URI = "qemu:///system"
DEFAULT_SOCKET = "/var/run/libvirt/libvirt-sock"

_SYNC, _DOMAIN, _STOP = "sync", "domain", "stop"
_loop_lock = threading.Lock()
_loop_started = False


def _libvirt():
    try:
        import libvirt  # Debian's python3-libvirt
    except ImportError as exc:
        raise RuntimeUnavailable(DEFAULT_SOCKET, "the libvirt Python bindings are not "
                                 "installed (apt-get install python3-libvirt)") from exc
    return libvirt


def _start_event_loop() -> None:
    """Register and run libvirt's default event loop once per process."""
    global _loop_started
    libvirt = _libvirt()
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default; they are raised (and logged) here.
        libvirt.registerErrorHandler(lambda *_: None, None)

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:  # keep the loop alive; log and go on
                    log.exception("libvirt event loop iteration failed")
                    time.sleep(0.1)

        threading.Thread(target=run, name="stockade-libvirt-loop", daemon=True).start()
        _loop_started = True


def parse_metadata(text: str | None) -> tuple[dict[str, str], list[str], dict[str, list[str]]]:
    """(labels, ips for the first interface, ips by guest MAC) from the metadata element."""
    if not text:
        return {}, [], {}
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise RuntimeAPIError("libvirt metadata", f"not XML: {exc}") from exc
    labels: dict[str, str] = {}
    ips: list[str] = []
    by_mac: dict[str, list[str]] = {}
    for el in root:
        tag = el.tag.split("}", 1)[-1]
        key, text, mac = el.get("key"), (el.text or "").strip(), el.get("mac")
        if tag == "label" and key:
            labels[key] = text
        elif tag == "ip" and text:
            ips.append(text)
        elif tag == "interface" and mac:
            by_mac[mac.lower()] = [(i.text or "").strip() for i in el
                                   if i.tag.split("}", 1)[-1] == "ip" and (i.text or "").strip()]
    return labels, ips, by_mac


def domain_interfaces(xml: str) -> list[tuple[str, str | None]]:
    """(guest MAC, host tap name or None) for each <interface> of a live domain XML."""
    root = ET.fromstring(xml)
    out = []
    for iface in root.findall("./devices/interface"):
        mac_el, target = iface.find("mac"), iface.find("target")
        address = mac_el.get("address") if mac_el is not None else None
        if not address:
            continue
        out.append((address.lower(), target.get("dev") if target is not None else None))
    return out


class LibvirtWatcher:
    """Watch one libvirt connection (``uri``, e.g. qemu:///system).

    trust_guest_agent: also take addresses reported by the QEMU guest agent when neither
    the metadata nor a DHCP lease gives one. Off by default: the guest answers it.
    """

    runtime_name = "libvirt"
    BACKOFF_MIN = 0.1
    BACKOFF_MAX = 5.0
    KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3

    def __init__(self, uri: str = DEFAULT_URI, *, trust_guest_agent: bool = False,
                 resync_interval: float = 10.0, sync_events: bool = False) -> None:
        self.uri = uri
        self.trust_guest_agent = trust_guest_agent
        self.resync_interval = resync_interval
        self.sync_events = sync_events
        self.synced = threading.Event()
        self.health = SourceHealth("libvirt", uri)
        self._conn: Any = None
        self._callbacks: list[int] = []
        self._close_cb = False
        self._pending_link_sync = threading.Event()

    # -- connection ----------------------------------------------------------------
    def _open(self, inbox: queue.Queue | None = None):
        libvirt = _libvirt()
        _start_event_loop()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise RuntimeUnavailable(self.uri, str(exc)) from exc
        if inbox is not None:
            try:
                conn.setKeepAlive(self.KEEPALIVE_INTERVAL, self.KEEPALIVE_COUNT)
            except libvirt.libvirtError as exc:   # a local driver without keepalive
                log.debug("libvirt keepalive: %s", exc)

            def on_domain(_conn, dom, *_args) -> None:
                self.health.event()
                inbox.put((_DOMAIN, dom.UUIDString()))

            for ev in (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                       libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                       libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE):
                self._callbacks.append(conn.domainEventRegisterAny(None, ev, on_domain, None))
            conn.registerCloseCallback(lambda *_: inbox.put((_SYNC, "closed")), None)
            self.health.up()
            self._close_cb = True
        self._conn = conn
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for cb in self._callbacks:
            try:
                conn.domainEventDeregisterAny(cb)
            except Exception:  # connection already broken
                pass
        self._callbacks.clear()
        if self._close_cb:
            self._close_cb = False
            try:
                conn.unregisterCloseCallback()
            except Exception:
                pass
        try:
            conn.close()
        except Exception:
            pass

    # -- one-shot ----------------------------------------------------------------
    def domain_workloads(self, dom) -> list[Workload]:
        """The workloads of one domain; [] when it is not running."""
        libvirt = _libvirt()
        try:
            if not dom.isActive():
                return []
            xml = dom.XMLDesc(0)
            name, uuid = dom.name(), dom.UUIDString()
            try:
                meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS,
                                    libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError:
                meta = None  # no Stockade metadata
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return []
            raise RuntimeAPIError(f"libvirt domain {dom.UUIDString()}", str(exc)) from exc
        try:
            labels, first_ips, ips_by_mac = parse_metadata(meta)
        except RuntimeAPIError as exc:
            log.warning("domain %s: %s; ignoring its metadata", name, exc)
            labels, first_ips, ips_by_mac = {}, [], {}
        leases = None
        out = []
        for n, (mac, tap) in enumerate(domain_interfaces(xml)):
            ips = ips_by_mac.get(mac) or (first_ips if n == 0 else [])
            if not ips:
                if leases is None:
                    leases = self._addresses(dom, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)
                    if not leases and self.trust_guest_agent:
                        leases = self._addresses(dom, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT)
                ips = leases.get(mac, [])
            if not tap:
                continue  # no host tap (user networking, or stopping): nothing to police
            try:
                ifindex = socket.if_nametoindex(tap)
            except OSError:
                continue  # the tap is gone already (stopping)
            out.append(Workload(runtime="libvirt", id=f"{uuid}/{mac}",
                                name=name if n == 0 else f"{name}.{n}", image="",
                                labels=labels, ips=tuple(dict.fromkeys(ips)), host_ifname=tap,
                                host_ifindex=ifindex, mac=mac, pid=None))
        return out

    @staticmethod
    def _addresses(dom, source) -> dict[str, list[str]]:
        libvirt = _libvirt()
        try:
            found = dom.interfaceAddresses(source, 0) or {}
        except libvirt.libvirtError:
            return {}  # no lease network, no guest agent
        out: dict[str, list[str]] = {}
        for info in found.values():
            mac = (info.get("hwaddr") or "").lower()
            out.setdefault(mac, []).extend(a["addr"] for a in info.get("addrs") or [] if a.get("addr"))
        return out

    def snapshot(self) -> list[Workload]:
        """Every interface of every running domain; sorted by ID."""
        conn = self._conn or self._open()
        libvirt = _libvirt()
        try:
            doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as exc:
            raise RuntimeUnavailable(self.uri, str(exc)) from exc
        found = [w for d in doms for w in self.domain_workloads(d)]
        return sorted(found, key=lambda w: w.id)

    # -- streaming ---------------------------------------------------------------
    def start(self, callback: Callable[[WorkloadEvent], None],
              stop_event: threading.Event) -> threading.Thread:
        def loop() -> None:
            for event in self.events(stop_event):
                callback(event)

        thread = threading.Thread(target=loop, name="stockade-watch-libvirt", daemon=True)
        thread.start()
        return thread

    def events(self, stop_event: threading.Event | None = None) -> Iterator[WorkloadEvent]:
        stop_event = stop_event or threading.Event()
        inbox: queue.Queue = queue.Queue()
        known: dict[str, Workload] = {}   # workload id -> workload
        backoff = self.BACKOFF_MIN
        halt = threading.Event()

        def wait_stop() -> None:
            while not halt.is_set():
                if stop_event.wait(0.25):
                    inbox.put((_STOP, None))
                    return

        threading.Thread(target=wait_stop, name="stockade-libvirt-stop", daemon=True).start()
        threading.Thread(target=self._watch_taps, args=(halt, inbox), name="stockade-libvirt-taps",
                         daemon=True).start()
        try:
            while not stop_event.is_set():
                if self._conn is None:
                    try:
                        self._open(inbox)
                    except RuntimeUnavailable as exc:
                        self.health.down(str(exc))
                        log.warning("libvirt: %s; retrying in %.1fs", exc, backoff)
                        stop_event.wait(backoff)
                        backoff = min(backoff * 2, self.BACKOFF_MAX)
                        continue
                    backoff = self.BACKOFF_MIN
                    inbox.put((_SYNC, "connected"))
                try:
                    kind, item = inbox.get(timeout=self.resync_interval)
                except queue.Empty:
                    kind, item = _SYNC, "interval"
                if kind == _STOP:
                    return
                try:
                    if kind == _SYNC:
                        if item == "closed":
                            self.health.down("the connection to libvirtd closed")
                            self.close()
                            continue
                        if item == "link":
                            self._pending_link_sync.clear()  # later taps queue a new one
                        log.debug("libvirt: listing domains (%s)", item)
                        now = self.snapshot()
                        yield from self._diff(known, now, None)
                        if self.sync_events:
                            yield WorkloadEvent("synced", None, tuple(now))
                        self.health.synced()
                        self.synced.set()
                    else:
                        yield from self._domain_changed(known, item)
                except (RuntimeUnavailable, RuntimeAPIError) as exc:
                    log.warning("libvirt: %s; reconnecting", exc)
                    self.health.down(str(exc))
                    self.close()
        finally:
            halt.set()
            self.close()

    def _watch_taps(self, halt: threading.Event, inbox: queue.Queue) -> None:
        """Queue one listing whenever new tun/macvtap links appear (see module doc)."""
        import select

        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK
        try:
            ipr = IPRoute()
            ipr.bind(groups=RTMGRP_LINK)
        except OSError as exc:
            log.warning("libvirt: cannot watch links (%s); relying on libvirt events", exc)
            return
        try:
            while not halt.is_set():
                ready, _, _ = select.select([ipr], [], [], 0.25)
                if not ready:
                    continue
                for msg in ipr.get():
                    if msg.get("event") != "RTM_NEWLINK":
                        continue
                    info = msg.get_attr("IFLA_LINKINFO")
                    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                    if kind in ("tun", "macvtap") and not self._pending_link_sync.is_set():
                        self._pending_link_sync.set()
                        inbox.put((_SYNC, "link"))
        except (OSError, ValueError) as exc:
            if not halt.is_set():
                log.warning("libvirt: link watch ended: %s", exc)
        finally:
            ipr.close()

    def _domain_changed(self, known: dict[str, Workload], uuid: str) -> Iterator[WorkloadEvent]:
        libvirt = _libvirt()
        try:
            dom = self._conn.lookupByUUIDString(uuid)
            now = self.domain_workloads(dom)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise RuntimeUnavailable(self.uri, str(exc)) from exc
            now = []  # undefined transient domain
        yield from self._diff(known, now, uuid)

    @staticmethod
    def _diff(known: dict[str, Workload], now: list[Workload], uuid: str | None
              ) -> Iterator[WorkloadEvent]:
        """Events that turn ``known`` (restricted to one domain when uuid is given) into ``now``."""
        scope = [k for k in known if uuid is None or k.startswith(uuid + "/")]
        current = {w.id: w for w in now}
        for wid in sorted(set(scope) - set(current)):
            log.debug("libvirt: removed %s", wid)
            yield WorkloadEvent("removed", known.pop(wid))
        for wid, w in sorted(current.items()):
            if known.get(wid) != w:
                known[wid] = w
                log.debug("libvirt: added %s on %s", w.name, w.host_ifname)
                yield WorkloadEvent("added", w)
