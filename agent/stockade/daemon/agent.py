"""The agent: the one reconciler between what sources say and what the kernel enforces.

Data flows one way. Sources (the API, Podman/Docker/libvirt events, netlink link events)
submit a change (changes.py); under one lock the agent plans it in a transaction
(txn.Txn: the model, the policy engine, the datapath writes in order), writes it, then
commits and persists it, or discards it and puts the maps back. Readers (the API, flows,
metrics, the web UI) get an immutable ``Snapshot`` of the last committed version.

Methods named ``*_locked`` expect the lock to be held (``with agent.locked():``).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from typing import Any, Iterator

from prometheus_client import Histogram

from ..datapath.errors import InterfaceGone
from ..errors import StockadeError
from ..policy.countindex import CountIndex
from ..policy.describe import LineIndex
from ..policy.engine import PolicyEngine
from ..policy.identity import IdentityAllocator
from ..policy.trace import prefixes_named
from . import restore
from .changelog import ChangeLog
from .changes import Change, ChangePolicies, HostAddresses, LinkChange
from .config import AgentConfig
from .links import Link, LinkWatcher, host_addresses
from .state import Snapshot, State
from .statefiles import BUILDERS, PolicyShards
from .store import StateStore
from .txn import Txn, policy_judge

log = logging.getLogger("stockade.agent")

class Agent:
    def __init__(self, config: AgentConfig, *, read_only: bool = False):
        """``read_only``: only to read the state (statecheck.py): nothing is created or
        cleaned up in the state directory."""
        self.config = config
        self._lock = threading.RLock()
        self.store = StateStore(config.state_dir, create=not read_only)
        self.policy_shards = PolicyShards()   # what the last commit's policy shards were
        self.policy_line_index = LineIndex()  # the policies' rule lines, for change summaries
        self.policy_prefix_index = CountIndex(prefixes_named)  # the CIDRs they name
        self.alloc = IdentityAllocator()   # its numbers come with the state (restore)
        self.engine = PolicyEngine(config.enforcement)
        self.state = State()
        self.dp: Any = None
        self.live = False          # talks to the kernel: links, host addresses
        self.links: dict[int, Link] = {}
        self.attached: set[int] = set()
        self.endpoint_entries: dict[int, dict] = {}   # what this agent wrote per ifindex
        self.unprotected: list[str] = []   # managed interfaces not running our programs now
        self.attach_repairs = 0
        self.attach_degraded: dict[tuple[str, str], float] = {}   # (interface, what) -> since
        self.attach_guard: Any = None
        self.kernel_default: Any = None       # datapath.kerneldefault.KernelDefault
        self.labels_dropped: collections.Counter = collections.Counter()  # (source, cause)
        self.errors: collections.deque = collections.deque(maxlen=20)
        self.error_count = 0   # every error since start (errors keeps the last 20)
        self.started = time.time()
        self.version = 0
        self._snapshot: Snapshot | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watchers: list = []
        self.flow_source: Any = None  # daemon.flowsource.FlowSource once started
        self.l7: Any = None           # l7.proxy.L7Proxy when live
        self.fleet: Any = None        # daemon.fleet.FleetSource with the etcd: settings
        self.commit_hooks: list = []  # called (under the lock, must not block) on each commit
        self.changes = ChangeLog(None if read_only else config.change_log_path)
        self.policy_apply_seconds = Histogram(
            "stockade_policy_apply_seconds",
            "Time to plan and write a policy change (dry runs included)", registry=None,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    # ------------------------------------------------------------------ lifecycle
    def start(self, datapath=None, *, watch_links: bool = True, watch_runtimes: bool = True,
              flows: bool = True) -> None:
        """``datapath``: the real one by default; a test may give a recording one (then
        nothing here touches the kernel's links).

        The state is read and checked first: a state file that is damaged raises
        StateError before the datapath is built, so the pinned maps and programs keep
        enforcing what they enforced (nothing is reconciled from a damaged model)."""
        cfg = self.config
        self.live = datapath is None
        with self._lock:
            changed = restore.restore(self, self.store.load())
        if datapath is None:
            from ..datapath import Datapath
            # the compiled programs are kept beside the state: a boot loads them back
            datapath = Datapath(cfg.datapath_settings(), attach_mode=cfg.attach_mode,
                                 switch_min=cfg.policy_switch_entries,
                                 cache_dir=os.path.join(cfg.state_dir, "bpf"))
        self.dp = datapath
        if self.live:   # first: a stale L7 "none" bit would let pinned L7 ports skip the proxy
            self.dp.align_l7_bits()
        if self.live and cfg.kernel_default:
            self._install_kernel_default()
        if self.live:
            from ..l7.proxy import L7Proxy
            self.l7 = L7Proxy(self)
            self.l7.start()
        with self._lock:
            self.dp.set_config(audit=cfg.audit, forward_unidentified=cfg.unknown_endpoint == "forward")
            restore.reconcile(self)
            if self.live and not cfg.audit:   # started out of audit mode: no audited flow stays
                try:
                    self.dp.ct_cut_audited([e.ifindex for e in self.state.endpoints.values()
                                            if e.ifindex is not None and not e.audit],
                                           policy_judge(self.engine))
                except StockadeError as exc:
                    self.error(f"conntrack: audited entries: {exc}")
            if changed:   # records that gained what identifies them, numbers allocated
                try:
                    self._persist_locked(changed)
                except StockadeError as exc:
                    self.error(f"state after start: {exc}")
            self._committed_locked()
        if watch_links:
            watcher = LinkWatcher(self.on_link, self.on_addresses if self.live else None)
            present = watcher.start()   # the links there were once the watch began
            self._watchers.append(watcher)
            with self._lock:  # links that appeared before the watcher started
                for link in present:
                    self.try_submit_locked(LinkChange("new", link, at_start=True))
            if self.live:     # and addresses
                self.on_addresses()
        if self.kernel_default is not None:
            with self._lock:   # the set is what this agent attached, nothing else
                self._kernel_default("sync", set(self.attached))
        if self.live:
            from .attachguard import AttachGuard
            self.attach_guard = AttachGuard(self)
            self.attach_guard.start()
            self._watchers.append(self.attach_guard)
            # every managed interface runs this build's programs now: take over what the
            # previous build's conntrack recorded meanwhile (datapath/migrate.py)
            try:
                self.dp.finish_upgrade()
            except StockadeError as exc:
                self.error(f"upgrade: {exc}")
        if watch_runtimes:
            from .runtimes import start_runtime_watchers
            self._watchers += start_runtime_watchers(self, self._stop)
        t = threading.Thread(target=self._gc_loop, name="stockade-ct-gc", daemon=True)
        t.start()
        self._threads.append(t)
        if cfg.fleet_store is not None:
            from .fleet import start_fleet
            self.fleet = start_fleet(self)
        if flows:
            from .flowsource import start_flows
            self.flow_source = start_flows(self)
        programs = ("compiled" if getattr(self.dp, "compiled", False) else
                    "loaded from the kept build" if getattr(self.dp, "from_cache", False)
                    else "pinned")
        log.info("agent started: %d endpoints, %d policies, revision %d; programs %s",
                 len(self.state.endpoints), len(self.engine.policies), self.state.revision,
                 programs)

    def stop(self) -> None:
        """Stop watching; the datapath keeps enforcing the last policy."""
        self._stop.set()
        if self.fleet is not None:
            self.fleet.stop()
        for w in self._watchers:
            try:
                w.stop()
            except Exception:
                log.exception("stopping %s failed", w)
        for t in self._threads:
            t.join(timeout=2)
        if self.l7 is not None:
            self.l7.stop(remove_host=False)  # steered ports stay closed, not open
        self.changes.close()

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
            self.error_count += 1
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
                self._roll_back_locked(txn)
                if isinstance(exc, InterfaceGone):
                    log.info("%s: %s; nothing to protect", change.what, exc)
                else:
                    self.error(f"{change.what} failed, previous state kept: {exc}")
                raise
            txn.commit()
            self.changes.record(change, txn, self.state.revision)
            self._committed_locked(txn.dirty)
            return result
        finally:
            if isinstance(change, ChangePolicies):
                self.policy_apply_seconds.observe(time.perf_counter() - started)

    def _roll_back_locked(self, txn: Txn) -> None:
        """The maps back to what they were (the inverse of what was written), then the
        model: the previous generation everywhere."""
        try:
            if self.dp is not None:
                txn.unwrite(self.dp)
        except StockadeError as exc:
            self.error(f"undoing a failed change: {exc}; reconciling the maps with the model")
            txn.discard()
            restore.reconcile(self)
            return
        txn.discard()

    def try_submit_locked(self, change: Change) -> None:
        """Submit; an error goes to status and the log (for sources with no caller to tell)."""
        try:
            self.submit_locked(change)
        except InterfaceGone:
            pass
        except StockadeError as exc:
            self.error(f"{change.what}: {exc}")

    def on_link(self, kind: str, link: Link) -> None:
        with self._lock:
            self.try_submit_locked(LinkChange(kind, link))

    def on_addresses(self) -> None:
        """The host's addresses changed: they are the host identity (restore.py applies
        the same change at start). An event that leaves the set as it was (an address of
        a workload's namespace, a flag change) commits nothing."""
        ips = tuple(host_addresses())
        with self._lock:
            if set(ips) != set(self.state.meta.get("host_ips", ())):
                self.try_submit_locked(HostAddresses(ips))

    def _persist_locked(self, dirty: set[str]) -> None:
        """The files ``dirty`` names, as one generation (store.StateStore.commit)."""
        dirty = set(dirty) | ({"identities"} if self.alloc.unsaved else set())
        if not dirty:
            return
        files: dict[str, Any] = {}
        for name in sorted(dirty):
            files.update(BUILDERS[name](self))
        self.store.commit(files)
        self.alloc.saved()

    def _committed_locked(self, dirty: set[str] | None = None) -> None:
        """``dirty``: the state files the change touched (None: anything may have changed)."""
        self.version += 1
        if self.l7 is not None:
            try:
                self.l7.sync_locked()
            except StockadeError as exc:
                self.error(f"l7: {exc}")
        for hook in self.commit_hooks:
            hook(dirty)

    # ------------------------------------------------------------------ attachments
    def _install_kernel_default(self) -> None:
        """The nftables table that closes managed interfaces without our programs
        (datapath/kerneldefault.py), in place before any attach and before the API."""
        from ..datapath.kerneldefault import KernelDefault, table_name
        cfg = self.config
        kd = KernelDefault(table_name(cfg.nft_table, cfg.bpffs_dir), cfg.managed_bridges,
                           [*cfg.managed_interfaces, *cfg.kernel_default_interfaces],
                           drop=cfg.unknown_endpoint == "drop",
                           bridge_ports=cfg.kernel_default_bridge_ports)
        try:
            kd.install()
        except StockadeError as exc:
            self.error(f"kernel-side default (nftables table {kd.table}): {exc}")
            return
        self.kernel_default = kd
        if not kd.bridge_meta and cfg.managed_bridges:
            log.warning("nft has no bridge meta on this kernel: the kernel-side default "
                        "covers ports of %s by name only (kernel_default_bridge_ports %s, "
                        "on any bridge; managed_interfaces, kernel_default_interfaces)",
                        ", ".join(cfg.managed_bridges),
                        ", ".join(cfg.kernel_default_bridge_ports) or "none")

    def _kernel_default(self, op: str, ifindexes) -> None:
        """protect / unprotect / sync the kernel-side default's set; errors to status."""
        kd = self.kernel_default
        if kd is None:
            return
        try:
            getattr(kd, op)(ifindexes)
        except StockadeError as exc:
            self.error(f"kernel-side default: {op} {sorted(ifindexes)}: {exc}")

    def note_degraded(self, interface: str, what: str, since: float) -> None:
        """An attachment problem found (and repaired, or not): shown for DEGRADED_FOR s."""
        with self._lock:
            self.attach_degraded.setdefault((interface, what), since)
            self.version += 1

    def attach_status(self) -> dict:
        """{"mode", "degraded": [{"interface", "what", "since"}]}, problems of the last
        10 minutes."""
        from .attachguard import DEGRADED_FOR
        now = time.time()
        with self._lock:
            for key, since in list(self.attach_degraded.items()):
                if now - since > DEGRADED_FOR:
                    del self.attach_degraded[key]
            items = sorted(self.attach_degraded.items(), key=lambda kv: kv[1])
        att = getattr(self.dp, "_attachments", None)
        mode = att.mode if att is not None else (
            self.config.attach_mode if self.live else "none")
        return {"mode": mode, "repairs": self.attach_repairs,
                "degraded": [{"interface": i, "what": w,
                              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))}
                             for (i, w), t in items]}

    def refresh_unprotected(self) -> None:
        """``unprotected``: managed interfaces that do not run our programs right now."""
        from .changes import managed_by_config
        with self._lock:
            named = {e.interface for e in self.state.endpoints.values() if e.interface}
            now = sorted({link.name for idx, link in self.links.items()
                          if idx not in self.attached and
                          (link.name in named or managed_by_config(self, link))})
            if now != self.unprotected:
                self.unprotected = now
                self.version += 1

    # ------------------------------------------------------------------ readers
    def source_health(self) -> list[dict]:
        """Each runtime source's health as it is now (runtimes.RuntimeSource.health)."""
        out = []
        for w in list(self._watchers):
            health = getattr(w, "health", None)
            h = health() if callable(health) else None
            if h is not None:
                out.append(h)
        return out

    def add_watcher(self, watcher) -> None:
        """A source started later (runtimes.SocketWaiter); stopped with the agent."""
        if self._stop.is_set():
            watcher.stop()
            return
        self._watchers.append(watcher)

    def runtime_source(self, runtime: str):
        """The runtimes.RuntimeSource following ``runtime`` ("podman", ...), or None."""
        return next((w for w in list(self._watchers)
                     if getattr(w, "runtime", None) == runtime and hasattr(w, "enroll")), None)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the agent's one lock: for a reader that needs the live engine and model
        (not the snapshot) to stay as they are, and for calling ``*_locked`` methods.
        Reentrant, as the reconciler's own calls are."""
        with self._lock:
            yield

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
                errors=tuple(self.errors), mismatches=dict(st.mismatches),
                kvstore=dict(st.kvstore))
            self._snapshot = snap
            return snap

