"""Host interfaces: which are managed, and a netlink watcher for link changes.

An interface is managed when its name matches ``managed_interfaces`` (default vnet*,
tap*), when its master bridge matches ``managed_bridges`` (podman0, cni-podman0,
docker0, virbr*), or when a static endpoint names it.
"""
from __future__ import annotations

import fnmatch
import logging
import select
import threading
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

from .. import netlink

log = logging.getLogger("stockade.links")


@dataclass(frozen=True)
class Link:
    ifindex: int
    name: str
    master: str | None
    kind: str | None
    mac: str | None


def _link_of(info: netlink.LinkInfo, names: dict[int, str]) -> Link:
    return Link(info.ifindex, info.name, names.get(info.master) if info.master else None,
                info.kind, info.mac)


def matches_any(name: str | None, patterns) -> bool:
    return bool(name) and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def list_links() -> list[Link]:
    infos = netlink.link_infos()
    names = {i.ifindex: i.name for i in infos}
    return [_link_of(i, names) for i in infos]


def host_addresses() -> list[str]:
    """Every address configured in this (the host's) network namespace."""
    return sorted(set(netlink.addresses()))


class LinkWatcher:
    """Calls ``on_link(kind, Link)`` with kind "new" or "del" from a thread, and, given
    ``on_addresses``, ``on_addresses()`` once per batch of messages in which an
    address of the host came or went."""

    def __init__(self, on_link, on_addresses=None):
        self.on_link = on_link
        self.on_addresses = on_addresses
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._names: dict[int, str] = {}
        self._ipr = IPRoute()
        groups = RTMGRP_LINK
        if on_addresses is not None:
            groups |= RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
        self._ipr.bind(groups=groups)

    def start(self) -> list[Link]:
        """Start the thread; returns the links there were once the watch began (a
        change after that comes as an event)."""
        links = list_links()
        self._names = {l.ifindex: l.name for l in links}
        self._thread = threading.Thread(target=self._run, name="stockade-links", daemon=True)
        self._thread.start()
        return links

    def stop(self) -> None:
        self._stop.set()
        try:
            self._ipr.close()
        except Exception:  # closing an already broken socket
            pass
        if self._thread:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._ipr], [], [], 0.5)
                if not ready:
                    continue
                msgs = self._ipr.get()
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                log.exception("netlink link watch failed; continuing")
                continue
            addresses = False
            for msg in msgs:
                event = msg.get("event")
                if event in ("RTM_NEWADDR", "RTM_DELADDR"):
                    addresses = True
                    continue
                if event not in ("RTM_NEWLINK", "RTM_DELLINK"):
                    continue
                name = msg.get_attr("IFLA_IFNAME")
                if event == "RTM_NEWLINK":
                    self._names[msg["index"]] = name
                link = _link_of(netlink.link_info(msg), self._names)
                if event == "RTM_DELLINK":
                    self._names.pop(msg["index"], None)
                try:
                    self.on_link("new" if event == "RTM_NEWLINK" else "del", link)
                except Exception:
                    log.exception("handling link event for %s failed", name)
            if addresses and self.on_addresses is not None:
                try:
                    self.on_addresses()
                except Exception:
                    log.exception("handling an address event failed")
