"""An etcd v3 client over gRPC: TLS with client certificates, several endpoints, failover.

It speaks etcd's gRPC API through aetcd's generated bindings (``aetcd.rpc``). aetcd's own
``Client`` is asyncio-only, plaintext-only and talks to one endpoint; the agent is
threaded and needs TLS with client certificates (etcd's RBAC takes the user from the
certificate's CN, over gRPC only) and failover, so the channels are made here.

Every call goes to the current endpoint; an endpoint that does not answer (UNAVAILABLE,
a deadline) makes the call move on to the next one, until each was tried once: then
``Unavailable`` is raised. Errors the caller must act on have their own class:
``Compacted`` (a watch or range asked for a compacted revision), ``LeaseNotFound``
(the lease expired while the client was cut off), ``PermissionDenied`` (RBAC).
"""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import grpc
from aetcd import rpc

from .errors import Compacted, KvstoreError, LeaseNotFound, PermissionDenied, Unavailable

# Keys per range request of a listing: about 1 MB of endpoint records a page; 100,000
# keys listed in about half the time pages of 1,000 took (round trips)
PAGE = 5000
_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
          grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
# Watch streams are cancelled by a member that loses its leader (etcd's WithRequireLeader).
REQUIRE_LEADER = (("hasleader", "true"),)


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes [prefix, end) every key starting with ``prefix``."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[:i + 1])
    return b"\0"


class KV(NamedTuple):
    """One key as listed. Tuples: a listing makes one per key, and a tuple is the
    cheapest object to make and hold."""

    key: bytes
    value: bytes
    mod_revision: int
    lease: int


class Event(NamedTuple):
    kind: str            # "put" | "delete"
    key: bytes
    value: bytes
    revision: int


def parse_endpoint(url: str) -> tuple[str, bool]:
    """``https://10.0.0.1:2379`` -> ("10.0.0.1:2379", True)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise KvstoreError(f"etcd endpoint {url!r} must be http://HOST:PORT or https://HOST:PORT")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port or 2379}", parts.scheme == "https"


def _error(exc: grpc.RpcError, where: str) -> KvstoreError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.PERMISSION_DENIED or "permission denied" in details:
        return PermissionDenied(f"{where}: {details}")
    if "required revision has been compacted" in details:
        return Compacted(f"{where}: {details}", 0)
    if "requested lease not found" in details:
        return LeaseNotFound(f"{where}: {details}")
    return Unavailable(f"{where}: {code.name}: {details}") if code in _RETRY else \
        KvstoreError(f"{where}: {code.name}: {details}")


class EtcdClient:
    def __init__(self, endpoints: list[str], *, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, timeout: float = 3.0):
        if not endpoints:
            raise KvstoreError("no etcd endpoints")
        self.timeout = timeout
        self._targets = [parse_endpoint(u) for u in endpoints]
        self._creds = None
        if any(tls for _, tls in self._targets):
            try:
                self._creds = grpc.ssl_channel_credentials(
                    root_certificates=Path(ca).read_bytes() if ca else None,
                    private_key=Path(key).read_bytes() if key else None,
                    certificate_chain=Path(cert).read_bytes() if cert else None)
            except OSError as exc:
                raise KvstoreError(f"etcd TLS files: {exc}") from exc
        self._lock = threading.Lock()
        self._channels: dict[int, grpc.Channel] = {}
        self.current = 0
        self.reachable: dict[int, bool] = {}

    @property
    def endpoints(self) -> list[str]:
        return [t for t, _ in self._targets]

    def _channel(self, i: int) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(i)
            if ch is None:
                target, tls = self._targets[i]
                # etcd answers pings more often than every 5 s with GOAWAY (too_many_pings),
                # which cuts the watch stream: the live-watch check does the fast part
                opts = [("grpc.keepalive_time_ms", 15000), ("grpc.keepalive_timeout_ms", 5000),
                        ("grpc.keepalive_permit_without_calls", 1),
                        ("grpc.initial_reconnect_backoff_ms", 200),
                        ("grpc.max_reconnect_backoff_ms", 2000),
                        ("grpc.max_receive_message_length", 64 << 20)]
                ch = grpc.secure_channel(target, self._creds, opts) if tls else \
                    grpc.insecure_channel(target, opts)
                self._channels[i] = ch
            return ch

    def _call(self, stub_class, method: str, request, where: str, timeout: float | None = None):
        """``request`` on the current endpoint, then each other one until one answers."""
        n = len(self._targets)
        last: KvstoreError | None = None
        start = self.current
        for k in range(n):
            i = (start + k) % n
            stub = stub_class(self._channel(i))
            try:
                out = getattr(stub, method)(request, timeout=timeout or self.timeout)
            except grpc.RpcError as exc:
                err = _error(exc, f"{self._targets[i][0]}: {where}")
                if not isinstance(err, Unavailable):
                    raise err from None
                self.reachable[i] = False
                last = err
                continue
            self.reachable[i] = True
            self.current = i
            return out
        raise last or Unavailable(where)

    # ------------------------------------------------------------------ kv
    def list_prefix(self, prefix: bytes, page: int = PAGE) -> tuple[list[KV], int]:
        """Every key under ``prefix`` at one revision, ``page`` keys per request; the
        revision. Pages after the first read at the first one's revision."""
        end = prefix_end(prefix)
        out: list[KV] = []
        key, revision = prefix, 0
        while True:
            resp = self._call(rpc.KVStub, "Range", rpc.RangeRequest(
                key=key, range_end=end, limit=page, revision=revision), "range",
                timeout=self.timeout * 3)
            if not revision:
                revision = resp.header.revision
            out.extend(KV(kv.key, kv.value, kv.mod_revision, kv.lease) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return out, revision
            key = resp.kvs[-1].key + b"\0"

    def get(self, key: bytes) -> KV | None:
        resp = self._call(rpc.KVStub, "Range", rpc.RangeRequest(key=key), "get")
        return KV(resp.kvs[0].key, resp.kvs[0].value, resp.kvs[0].mod_revision,
                  resp.kvs[0].lease) if resp.kvs else None

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        return self._call(rpc.KVStub, "Put", rpc.PutRequest(key=key, value=value, lease=lease),
                          "put").header.revision

    def write(self, puts: list[tuple[bytes, bytes, int]], deletes: tuple[bytes, ...] | list[bytes] = ()) -> int:
        """Puts (key, value, lease) and deletes, in transactions of at most 128 operations
        (etcd's default limit); the last revision."""
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v, lease=lease))
               for k, v, lease in puts]
        ops += [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k)) for k in deletes]
        rev = 0
        for i in range(0, len(ops), 128):
            rev = self._call(rpc.KVStub, "Txn", rpc.TxnRequest(success=ops[i:i + 128]),
                             "txn").header.revision
        return rev

    def delete(self, key: bytes) -> int:
        return self._call(rpc.KVStub, "DeleteRange", rpc.DeleteRangeRequest(key=key),
                          "delete").header.revision

    def delete_prefix(self, prefix: bytes) -> int:
        return self._call(rpc.KVStub, "DeleteRange", rpc.DeleteRangeRequest(
            key=prefix, range_end=prefix_end(prefix)), "delete").header.revision

    def compact(self, revision: int) -> None:
        self._call(rpc.KVStub, "Compact", rpc.CompactionRequest(revision=revision, physical=True),
                   "compact")

    # ------------------------------------------------------------------ leases
    def grant(self, ttl: int) -> int:
        resp = self._call(rpc.LeaseStub, "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl), "lease grant")
        if resp.error:
            raise KvstoreError(f"lease grant: {resp.error}")
        return resp.ID

    def keepalive(self, lease: int) -> int:
        """Refresh ``lease``; its TTL. Raises LeaseNotFound when etcd no longer has it."""
        n = len(self._targets)
        last: KvstoreError | None = None
        for k in range(n):
            i = (self.current + k) % n
            try:
                for reply in rpc.LeaseStub(self._channel(i)).LeaseKeepAlive(
                        iter([rpc.LeaseKeepAliveRequest(ID=lease)]), timeout=self.timeout):
                    self.reachable[i] = True
                    self.current = i
                    if reply.TTL <= 0:
                        raise LeaseNotFound(f"lease {lease:x} not found")
                    return reply.TTL
                last = Unavailable(f"{self._targets[i][0]}: keepalive: no answer")
            except grpc.RpcError as exc:
                err = _error(exc, f"{self._targets[i][0]}: keepalive")
                if not isinstance(err, Unavailable):
                    raise err from None
                self.reachable[i] = False
                last = err
        raise last or Unavailable("keepalive")

    def revoke(self, lease: int) -> None:
        self._call(rpc.LeaseStub, "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease), "lease revoke")

    # ------------------------------------------------------------------ cluster
    def probe(self) -> int:
        """How many endpoints answer a status request now (each asked once, briefly)."""
        n = 0
        for i in range(len(self._targets)):
            try:
                rpc.MaintenanceStub(self._channel(i)).Status(rpc.StatusRequest(),
                                                             timeout=min(self.timeout, 1.0))
                self.reachable[i] = True
                n += 1
            except grpc.RpcError:
                self.reachable[i] = False
        return n

    # ------------------------------------------------------------------ watch
    def watch(self, prefix: bytes, start_revision: int) -> "Watch":
        return Watch(self, prefix, start_revision)

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()


class Watch:
    """One watch stream on the current endpoint: ``next(timeout)`` gives a list of events
    (empty for a progress answer), raises Compacted, or Unavailable when the stream ended
    (a member went, lost its leader, or the stream was cut)."""

    def __init__(self, client: EtcdClient, prefix: bytes, start_revision: int):
        self.client, self.revision = client, start_revision - 1
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._requests.put(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=prefix, range_end=prefix_end(prefix), start_revision=start_revision)))
        self.endpoint = client._targets[client.current][0]
        stub = rpc.WatchStub(client._channel(client.current))
        self._call = stub.Watch(self._iter_requests(), metadata=REQUIRE_LEADER)
        self._thread = threading.Thread(target=self._read, name="stockade-etcd-watch", daemon=True)
        self._thread.start()

    def _iter_requests(self):
        while True:
            req = self._requests.get()
            if req is None:
                return
            yield req

    def _read(self) -> None:
        try:
            for resp in self._call:
                self._responses.put(resp)
            self._responses.put(Unavailable(f"{self.endpoint}: watch stream ended"))
        except grpc.RpcError as exc:
            self._responses.put(_error(exc, f"{self.endpoint}: watch"))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which reconnects
            self._responses.put(Unavailable(f"{self.endpoint}: watch: {exc}"))

    def request_progress(self) -> None:
        self._requests.put(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    def next(self, timeout: float) -> list[Event] | None:
        """The next response's events ([] for created/progress), None on timeout."""
        try:
            resp = self._responses.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(resp, Exception):
            raise resp
        if resp.compact_revision:
            raise Compacted(f"{self.endpoint}: watch: revision {self.revision + 1} compacted "
                            f"(oldest {resp.compact_revision})", resp.compact_revision)
        if resp.canceled:
            reason = resp.cancel_reason or "canceled"
            raise Unavailable(f"{self.endpoint}: watch canceled: {reason}")
        out = []
        for ev in resp.events:
            out.append(Event("delete" if ev.type == 1 else "put", ev.kv.key, ev.kv.value,
                             ev.kv.mod_revision))
        # What was delivered up to: the last event's revision, or a progress answer's
        # header (etcd answers progress only once the watcher has caught up). A created
        # answer's header is the store's revision while the events since start_revision
        # may still be on their way: resuming from it would skip them.
        if out:
            self.revision = max(self.revision, out[-1].revision)
        elif resp.header.revision and not resp.created:
            self.revision = max(self.revision, resp.header.revision)
        self.last_response = time.monotonic()
        return out

    def cancel(self) -> None:
        self._requests.put(None)
        self._call.cancel()
