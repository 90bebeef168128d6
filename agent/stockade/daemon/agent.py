"""The agent: the one reconciler between what sources say and what the kernel enforces.

Data flows one way. Sources (the API, Podman/Docker/libvirt events, netlink link events)
submit a change (changes.py); under one lock the agent plans it in a transaction
(txn.Txn: the model, the policy engine, the datapath writes in order), writes it, then
commits and persists it, or discards it and puts the maps back. Readers (the API, flows,
metrics, the web UI) get an immutable ``Snapshot`` of the last committed version.

Methods named ``*_locked`` expect the lock to be held.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from prometheus_client import Histogram

from ..errors import StockadeError
from ..policy.engine import PolicyEngine
from ..policy.identity import IdentityAllocator
from . import restore
from .changes import Change, ChangePolicies, LinkChange
from .config import AgentConfig
from .links import Link, LinkWatcher, list_links
from .state import Snapshot, State
from .store import StateStore
from .txn import Txn

log = logging.getLogger("stockade.agent")

# What each state file holds, written when a transaction marks it dirty.
STATE_FILES = {
    "endpoints": ("endpoints.json", lambda st, eng: [e.to_record() for e in st.endpoints.values()]),
    "ipcache": ("ipcache.json", lambda st, eng: [
        {"prefix": p, "labels": r.labels.to_dict(), "host": r.host, "node": r.node}
        for p, r in sorted(st.remote.items())]),
    "policies": ("policies.json", lambda st, eng: [{"source": p.source, "document": p.document}
                                                   for p in eng.policies.values()]),
    "revision": ("revision.json", lambda st, eng: st.revision),
    "services": ("services.json", lambda st, eng: {k: v.raw for k, v in st.services.items()}),
}


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self._lock = threading.RLock()
        self.store = StateStore(config.state_dir)
        self.alloc = IdentityAllocator(self.store.path("identities.json"))
        self.engine = PolicyEngine(config.enforcement)
        self.state = State()
        self.dp: Any = None
        self.live = False          # talks to the kernel: links, host addresses
        self.links: dict[int, Link] = {}
        self.attached: set[int] = set()
        self.unprotected: list[str] = []
        self.labels_dropped: collections.Counter = collections.Counter()  # (source, cause)
        self.errors: collections.deque = collections.deque(maxlen=20)
        self.started = time.time()
        self.version = 0
        self._snapshot: Snapshot | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watchers: list = []
        self.flow_source: Any = None  # daemon.flowsource.FlowSource once started
        self.policy_apply_seconds = Histogram(
            "stockade_policy_apply_seconds",
            "Time to plan and write a policy change (dry runs included)", registry=None,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    # ------------------------------------------------------------------ lifecycle
    def start(self, datapath=None, *, watch_links: bool = True, watch_runtimes: bool = True,
              flows: bool = True) -> None:
        """``datapath``: the real one by default; a test may give a recording one (then
        nothing here touches the kernel's links)."""
        cfg = self.config
        if datapath is None:
            from ..datapath import Datapath
            datapath = Datapath(cfg.datapath_settings())
            self.live = True
        self.dp = datapath
        with self._lock:
            self.dp.set_config(audit=cfg.audit, forward_unidentified=cfg.unknown_endpoint == "forward")
            restore.restore(self)
            restore.reconcile(self)
            self._committed_locked()
        if watch_links:
            watcher = LinkWatcher(self.on_link)
            watcher.start()
            self._watchers.append(watcher)
            with self._lock:  # links that appeared before the watcher started
                for link in list_links():
                    self.try_submit_locked(LinkChange("new", link, at_start=True))
        if watch_runtimes:
            from .runtimes import start_runtime_watchers
            self._watchers += start_runtime_watchers(self, self._stop)
        t = threading.Thread(target=self._gc_loop, name="stockade-ct-gc", daemon=True)
        t.start()
        self._threads.append(t)
        if flows:
            from .flowsource import start_flows
            self.flow_source = start_flows(self)
        log.info("agent started: %d endpoints, %d policies, revision %d",
                 len(self.state.endpoints), len(self.engine.policies), self.state.revision)

    def stop(self) -> None:
        """Stop watching; the datapath keeps enforcing the last policy."""
        self._stop.set()
        for w in self._watchers:
            try:
                w.stop()
            except Exception:
                log.exception("stopping %s failed", w)
        for t in self._threads:
            t.join(timeout=2)

    @property
    def stopping(self) -> threading.Event:
        return self._stop

    def add_thread(self, t: threading.Thread) -> None:
        self._threads.append(t)

    def _gc_loop(self) -> None:
        while not self._stop.wait(self.config.ct_gc_interval):
            try:
                self.dp.ct_gc()
            except StockadeError as exc:
                self.error(f"conntrack gc: {exc}")

    def error(self, msg: str) -> None:
        """An error shown in status (the last 20) and the log."""
        log.error("%s", msg)
        with self._lock:
            self.errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {msg}")
            self.version += 1

    # ------------------------------------------------------------------ changes
    def submit(self, change: Change, *, dry_run: bool = False) -> Any:
        """Plan ``change``; unless ``dry_run``, write it, commit it and persist it. A
        failed write is discarded and the maps are put back: the previous state keeps
        working."""
        with self._lock:
            return self.submit_locked(change, dry_run=dry_run)

    def submit_locked(self, change: Change, *, dry_run: bool = False) -> Any:
        started = time.perf_counter()
        txn = Txn(self, dry_run=dry_run)
        try:
            try:
                result = change.apply(txn)
            except BaseException:
                txn.discard()
                raise
            if dry_run:
                txn.discard()
                return result
            try:
                if self.dp is not None:
                    txn.write(self.dp)
                self._persist_locked(txn.dirty)
            except StockadeError as exc:
                txn.discard()
                self.error(f"{change.what} failed, previous state kept: {exc}")
                if self.dp is not None:
                    restore.reconcile(self)  # the writer may have written part of it
                raise
            txn.commit()
            for line in txn.log:
                log.info("%s", line)
            self._committed_locked()
            return result
        finally:
            if isinstance(change, ChangePolicies):
                self.policy_apply_seconds.observe(time.perf_counter() - started)

    def try_submit_locked(self, change: Change) -> None:
        """Submit; an error goes to status and the log (for sources with no caller to tell)."""
        try:
            self.submit_locked(change)
        except StockadeError as exc:
            self.error(f"{change.what}: {exc}")

    def on_link(self, kind: str, link: Link) -> None:
        with self._lock:
            self.try_submit_locked(LinkChange(kind, link))

    def _persist_locked(self, dirty: set[str]) -> None:
        for name in sorted(dirty):
            path, build = STATE_FILES[name]
            self.store.write(path, build(self.state, self.engine))

    def _committed_locked(self) -> None:
        self.version += 1

    # ------------------------------------------------------------------ readers
    def snapshot(self) -> Snapshot:
        """The last committed version, as immutable copies (built once per version)."""
        snap = self._snapshot
        if snap is not None and snap.version == self.version:
            return snap
        with self._lock:
            st, e = self.state, self.engine
            snap = Snapshot(
                version=self.version, endpoints=tuple(st.endpoints.values()),
                by_ifindex=dict(st.by_ifindex), ipcache=dict(st.ipcache),
                identities=dict(e.identities), local_ids=frozenset(e.local_ids),
                flags=dict(e.flags), policies=dict(e.policies), services=dict(st.services),
                memberships=dict(st.memberships), service_cidrs=dict(st.service_cidrs),
                revision=st.revision, entries=len(e.entries), links=dict(self.links),
                attached=frozenset(self.attached), unprotected=tuple(self.unprotected),
                errors=tuple(self.errors))
            self._snapshot = snap
            return snap

