"""The attachment guard: every managed interface keeps running our programs, first.

A thread checks every interface the agent attached (datapath.attachments.check) at
least every ``CHECK_INTERVAL`` seconds, and at once when rtnetlink reports a tc change
(a filter or qdisc added or removed: ``tc filter del``, ``tc qdisc del dev X clsact``).
A missing program, another program in our place, or (tcx) a foreign program running
ahead of ours is repaired under the agent's lock, logged, counted
(``stockade_attach_repairs_total``) and shown in status as degraded for
``DEGRADED_FOR`` seconds.

It also keeps ``agent.unprotected`` live: managed interfaces that do not run our
programs right now (never attached because the attach failed, or broken and not
repaired).
"""
from __future__ import annotations

import logging
import select
import socket
import threading
import time

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_TC

from ..errors import StockadeError

log = logging.getLogger("stockade.attach")
CHECK_INTERVAL = 0.5
DEGRADED_FOR = 600.0
RETRY_EVERY = 5.0


class AttachGuard:
    def __init__(self, agent):
        self.agent = agent
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._events: threading.Thread | None = None
        self._ipr: IPRoute | None = None
        self.passes = 0
        self._retried: dict[int, float] = {}

    def start(self) -> None:
        try:
            self._ipr = IPRoute()
            self._ipr.bind(groups=RTMGRP_TC)
        except OSError as exc:   # polling alone still meets the deadline
            log.warning("cannot listen for tc changes (%s); checking every %.2fs", exc,
                        CHECK_INTERVAL)
            self._ipr = None
        self._thread = threading.Thread(target=self._run, name="stockade-attach-guard",
                                        daemon=True)
        self._thread.start()
        if self._ipr is not None:
            self._events = threading.Thread(target=self._listen, name="stockade-tc-events",
                                            daemon=True)
            self._events.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in (self._thread, self._events):
            if t is not None:
                t.join(timeout=2)
        if self._ipr is not None:
            try:
                self._ipr.close()
            except Exception:  # an already broken socket
                pass

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                ipr = self._ipr
                if ipr is None:
                    return
                ready, _, _ = select.select([ipr], [], [], 0.5)
                if ready:
                    ipr.get()
                    self._wake.set()
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                time.sleep(0.1)
            except Exception:   # a message pyroute2 cannot decode still means a change
                self._wake.set()

    def _run(self) -> None:
        prepare = getattr(getattr(self.agent.dp, "attachments", None), "prepare", None)
        if prepare is not None:
            with self.agent.locked():
                try:
                    prepare()
                except Exception:
                    log.exception("cannot load the programs' second copy")
        while not self._stop.is_set():
            self._wake.wait(CHECK_INTERVAL)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check_all()
            except Exception:
                log.exception("attachment check failed; retrying")

    def check_all(self) -> None:
        a = self.agent
        dp = a.dp
        if dp is None or not hasattr(dp, "check_interface"):
            return
        for ifindex in sorted(a.attached):
            try:
                problems = dp.check_interface(ifindex)
            except StockadeError as exc:
                log.warning("checking ifindex %d: %s", ifindex, exc)
                continue
            if problems:
                self._repair(ifindex, problems)
        self.passes += 1
        a.refresh_unprotected()
        self._retry_unprotected()

    def _retry_unprotected(self) -> None:
        """A managed interface whose attach failed is tried again (every RETRY_EVERY s)."""
        from .changes import LinkChange
        a = self.agent
        now = time.monotonic()
        with a.locked():
            for idx, link in list(a.links.items()):
                if link.name not in a.unprotected or idx in a.attached:
                    continue
                if now - self._retried.get(idx, 0.0) < RETRY_EVERY:
                    continue
                self._retried[idx] = now
                a.try_submit_locked(LinkChange("new", link))

    def _repair(self, ifindex: int, problems) -> None:
        a = self.agent
        with a.locked():
            if ifindex not in a.attached:
                return          # detached meanwhile, on purpose
            link = a.links.get(ifindex)
            name = link.name if link is not None else f"ifindex {ifindex}"
            now = time.time()
            if not _exists(ifindex):
                # gone (a container exited): nothing to repair, the link watcher removes it
                a._kernel_default("unprotect", [ifindex])
                a.attached.discard(ifindex)
                a.version += 1
                return
            try:
                a.dp.attach_interface(ifindex)
            except StockadeError as exc:
                if not _exists(ifindex):
                    a.attached.discard(ifindex)
                    a.version += 1
                    return
                a.error(f"interface {name}: cannot restore its programs: {exc}")
                for p in problems:
                    a.note_degraded(name, f"{p.hook}: {p.what}; not repaired", now)
                # not ours any more: unprotected (retried), and the kernel-side default
                # drops it again where it covers it
                a._kernel_default("unprotect", [ifindex])
                a.attached.discard(ifindex)
                a.version += 1
                return
            a.attach_repairs += 1
            for p in problems:
                log.warning("interface %s %s: %s; our program is restored (%s)",
                            name, p.hook, p.what, a.dp.attachments.mode)
                a.note_degraded(name, f"{p.hook}: {p.what}", now)


def _exists(ifindex: int) -> bool:
    try:
        socket.if_indextoname(ifindex)
        return True
    except OSError:
        return False
