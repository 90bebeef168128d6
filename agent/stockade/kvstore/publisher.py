"""This host's keys in etcd, kept equal to what the owner wants, under its own leases.

``set_desired({key: value})`` says what should be there; a thread puts and deletes the
difference (woken at once: a change is written within milliseconds) and keeps the leases
alive every TTL/3. Keys are spread over leases of at most ``per_lease`` keys. A
keepalive answered "lease not found" (etcd expired it while this host was cut off) makes
it grant a new lease and put that lease's keys again at once.

At start and after every failure it lists what this host owns in etcd (``owned``:
prefixes and single keys) and deletes what is not wanted: an agent that restarts
removes the keys of workloads that went while it was down.
"""
from __future__ import annotations

import logging
import threading
import time

from .backoff import Backoff
from .client import EtcdClient
from .errors import KvstoreError, LeaseNotFound

log = logging.getLogger("stockade.kvstore")


class Publisher:
    def __init__(self, client: EtcdClient, ttl: int, owned: list[bytes], *,
                 per_lease: int = 1000):
        self.client, self.ttl, self.owned, self.per_lease = client, ttl, owned, per_lease
        self._desired: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.published: dict[bytes, tuple[bytes, int]] = {}    # key -> (value, lease)
        self.leases: dict[int, set[bytes]] = {}                 # lease -> its keys
        self.synced = False
        self.connected = False
        self.last_error: str | None = None
        self.last_keepalive = 0.0                                # monotonic
        self.leases_lost = 0
        self.writes = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stockade-etcd-publish", daemon=True)
        self._thread.start()

    def stop(self, revoke: bool = False) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if revoke:
            for lease in list(self.leases):
                try:
                    self.client.revoke(lease)
                except KvstoreError:
                    pass

    def set_desired(self, desired: dict[bytes, bytes]) -> None:
        with self._lock:
            self._desired = dict(desired)
        self._wake.set()

    def pending(self) -> bool:
        """Whether what is wanted differs from what was written."""
        with self._lock:
            desired = self._desired
        return not self.synced or {k: v for k, (v, _) in self.published.items()} != desired

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        backoff = Backoff()
        interval = max(0.5, self.ttl / 3)
        while not self._stop.is_set():
            try:
                if time.monotonic() - self.last_keepalive >= interval or not self.leases:
                    self._keepalive()
                if not self.synced:
                    self._resync()
                self._push()
                self.connected, self.last_error = True, None
                backoff.reset()
                wait = max(0.0, interval - (time.monotonic() - self.last_keepalive))
            except KvstoreError as exc:
                if self.connected or self.last_error != str(exc):
                    log.warning("etcd publish: %s", exc)
                self.connected, self.synced, self.last_error = False, False, str(exc)
                wait = backoff.next()
            self._wake.wait(wait)
            self._wake.clear()

    def _keepalive(self) -> None:
        if not self.leases:
            self.leases[self.client.grant(self.ttl)] = set()
        for lease in list(self.leases):
            try:
                self.client.keepalive(lease)
            except LeaseNotFound:
                self._lease_lost(lease)
        self.last_keepalive = time.monotonic()

    def _lease_lost(self, lease: int) -> None:
        """A new lease in its place; its keys are put again by the next push."""
        self.leases_lost += 1
        keys = self.leases.pop(lease)
        log.warning("etcd lease %x not found: granting a new one, putting its %d keys again",
                    lease, len(keys))
        new = self.client.grant(self.ttl)
        self.leases[new] = set()
        for k in keys:
            self.published.pop(k, None)

    def _resync(self) -> None:
        """What this host owns in etcd now: unwanted keys deleted, the rest known."""
        with self._lock:
            desired = self._desired
        found: dict[bytes, tuple[bytes, int]] = {}
        for p in self.owned:
            if p.endswith(b"/"):
                items, _ = self.client.list_prefix(p)
            else:
                kv = self.client.get(p)
                items = [kv] if kv is not None else []
            for kv in items:
                found[kv.key] = (kv.value, kv.lease)
        stale = [k for k in found if k not in desired]
        if stale:
            self.client.write([], stale)
            log.info("etcd: deleted %d stale keys of this host", len(stale))
        ours = set(self.leases)
        self.published = {k: v for k, v in found.items() if k in desired and v[1] in ours}
        for lease in self.leases:
            self.leases[lease] = {k for k, (_, lz) in self.published.items() if lz == lease}
        self.synced = True

    def _lease_for(self, assigned: dict[int, int]) -> int:
        for lease, keys in self.leases.items():
            if len(keys) + assigned.get(lease, 0) < self.per_lease:
                return lease
        lease = self.client.grant(self.ttl)
        self.leases[lease] = set()
        self.client.keepalive(lease)
        return lease

    def _push(self) -> None:
        with self._lock:
            desired = self._desired
        deletes = [k for k in self.published if k not in desired]
        puts = []
        assigned: dict[int, int] = {}
        for k, v in desired.items():
            cur = self.published.get(k)
            if cur is not None and cur[0] == v:
                continue
            lease = cur[1] if cur is not None else self._lease_for(assigned)
            if cur is None:
                assigned[lease] = assigned.get(lease, 0) + 1
            puts.append((k, v, lease))
        if not puts and not deletes:
            return
        try:
            self.client.write(puts, deletes)
        except LeaseNotFound:
            # a lease went between its keepalive and this write: find which, start over
            self._keepalive()
            raise KvstoreError("a lease expired during a write; writing again") from None
        self.writes += 1
        for k in deletes:
            _, lease = self.published.pop(k)
            self.leases.get(lease, set()).discard(k)
        for k, v, lease in puts:
            self.published[k] = (v, lease)
            self.leases.setdefault(lease, set()).add(k)
        for lease in [lz for lz, keys in self.leases.items() if not keys][1:]:
            del self.leases[lease]
            try:
                self.client.revoke(lease)
            except KvstoreError:
                pass
