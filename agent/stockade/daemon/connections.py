"""The API server's connections: accepted, parked while idle, served by a bounded pool.

    Acceptor (one thread)                         WorkerPool (``workers`` threads)
      accept ── over the uid's cap? ── 503, close   take a readable connection: root's
        │                                           first; members' only while fewer than
        ▼                                           workers - root_workers are busy with
      parked (selector) ── readable ──▶ queue ──▶   members and their uid has fewer than
        ▲   idle past idle_timeout: closed          member_workers busy
        └──────────────── keep-alive ◀───────────── serve one request
                                                    a flow stream: the worker leaves the
                                                    pool (counted as a stream of its uid)
                                                    and a new worker takes its place

A parked connection costs a socket and a few kilobytes, no thread. Every read has a
deadline for the whole phase it belongs to (request line and headers; the body), not
only per recv, so a peer that sends one byte a second is cut off; every write has a
timeout, so a peer that stops reading is too. uid 0 is "root"; every other uid, and a
peer whose credentials are unknown (uid -1), is a "member" (of the socket's group: the
socket's mode decides who may connect at all).
"""
from __future__ import annotations

import io
import logging
import selectors
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import HTTPError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
ROOT = 0


@dataclass(frozen=True)
class Limits:
    """Every limit of the API server. Connections and streams are counted per uid."""

    member_body: int = 4 * MiB          # a member's body (dry runs and review only)
    root_body: int = 64 * MiB           # root's body (policy files may be 16 MiB)
    header_bytes: int = 64 * 1024       # request line and headers
    header_timeout: float = 10.0        # from the first byte to the end of the headers
    body_timeout: float = 10.0          # a body's deadline: this ...
    body_rate: float = 1 * MiB          # ... plus its length at this many bytes a second
    write_timeout: float = 30.0         # one response write (a stream's one chunk)
    idle_timeout: float = 60.0          # a keep-alive connection with no request
    linger_bytes: int = 64 * 1024       # a refused request's unread body, drained up to this
    linger_timeout: float = 1.0         # ... for this long, so its sender reads our answer
    workers: int = 12
    root_workers: int = 4               # never busy with members' requests
    member_workers: int = 4             # busy with one member uid's requests at most
    member_connections: int = 32        # open connections of one member uid
    members_connections: int = 128      # open connections of all members together
    root_connections: int = 256
    member_streams: int = 4             # flow streams of one member uid
    members_streams: int = 16           # flow streams of all members together
    root_streams: int = 32

    def __post_init__(self):
        if not 0 <= self.root_workers < self.workers:
            raise ValueError("root_workers must leave members at least one of the workers")

    def body_deadline(self, length: int) -> float:
        return self.body_timeout + length / self.body_rate


def is_root(uid: int) -> bool:
    return uid == ROOT


class HeadersTooLarge(Exception):
    """The request line and headers went over Limits.header_bytes."""


class SocketReader(io.RawIOBase):
    """A socket's reads under a deadline (monotonic time) for the whole current phase,
    and optionally a byte budget; ``nonblocking`` reads return None when nothing waits."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline: float | None = None
        self.budget: int | None = None
        self.nonblocking = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int | None:
        view = memoryview(b)
        if self.budget is not None:
            if self.budget <= 0:
                raise HeadersTooLarge
            view = view[:self.budget]
        if self.nonblocking:
            self.sock.settimeout(0.0)  # with a timeout, Python would wait for data
            try:
                n = self.sock.recv_into(view)
            except BlockingIOError:
                return None
        else:
            timeout = None
            if self.deadline is not None:
                timeout = self.deadline - time.monotonic()
                if timeout <= 0:
                    raise TimeoutError("read deadline passed")
            self.sock.settimeout(timeout)
            n = self.sock.recv_into(view)
        if self.budget is not None:
            self.budget -= n
        return n


class SocketWriter(io.RawIOBase):
    """Writes of a whole buffer each, within ``timeout`` (sendall's total time)."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock, self.timeout = sock, timeout

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(b)
        return len(b)


class Connection:
    """One accepted peer. ``uid`` is -1 when the kernel gave no credentials."""

    def __init__(self, sock: socket.socket, cred, limits: Limits):
        self.sock, self.cred = sock, cred
        self.uid = cred.uid if cred is not None else -1
        self.raw = SocketReader(sock)
        self.rfile = io.BufferedReader(self.raw, 16 * 1024)
        self.wfile = SocketWriter(sock, limits.write_timeout)
        self.last_active = time.monotonic()
        self.closed = False
        self.on_close: Callable[["Connection"], None] | None = None

    def has_input(self) -> bool:
        """A next request (or EOF) is already here, buffered or in the socket."""
        self.raw.nonblocking = True
        try:
            return bool(self.rfile.peek(1))
        except OSError:
            return True  # let a worker find the error
        finally:
            self.raw.nonblocking = False

    def linger(self, limit: int, timeout: float) -> None:
        """Answered but the request's body unread: stop writing, then read and drop up to
        ``limit`` bytes for ``timeout`` s. A peer still sending its body would otherwise
        get EPIPE instead of our answer."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + timeout
            while limit > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.sock.settimeout(left)
                data = self.sock.recv(min(limit, 16 * 1024))
                if not data:
                    return
                limit -= len(data)
        except OSError:
            pass

    def shutdown(self) -> None:
        """Wake whoever blocks on it (server stop)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        finally:
            if self.on_close:
                self.on_close(self)


class WorkerPool:
    """Connections and workers counted per uid (see the module docstring)."""

    def __init__(self, limits: Limits, serve: Callable[[Connection], None]):
        self.limits, self.serve = limits, serve
        self._cond = threading.Condition()
        self._queues: dict[int, deque[Connection]] = {}
        self._order: deque[int] = deque()       # member uids with queued connections
        self._busy: Counter[int] = Counter()
        self._busy_members = 0
        self._streams: Counter[int] = Counter()
        self._conns: Counter[int] = Counter()
        self.open: set[Connection] = set()
        self._threads: set[threading.Thread] = set()
        self._local = threading.local()
        self._stopping = False

    # ---------------------------------------------------------------- connections
    def admit(self, conn: Connection) -> str | None:
        """Count a new connection in; None, or why it is refused."""
        uid, lim = conn.uid, self.limits
        with self._cond:
            if is_root(uid):
                if self._conns[uid] >= lim.root_connections:
                    return f"root already has {lim.root_connections} connections open"
            else:
                if self._conns[uid] >= lim.member_connections:
                    return f"uid {uid} already has {lim.member_connections} connections open"
                members = sum(n for u, n in self._conns.items() if not is_root(u))
                if members >= lim.members_connections:
                    return (f"non-root peers already have {lim.members_connections} "
                            "connections open")
            self._conns[uid] += 1
            self.open.add(conn)
        conn.on_close = self._closed
        return None

    def _closed(self, conn: Connection) -> None:
        with self._cond:
            self.open.discard(conn)
            self._conns[conn.uid] -= 1
            if not self._conns[conn.uid]:
                del self._conns[conn.uid]

    def connections(self, uid: int) -> int:
        with self._cond:
            return self._conns[uid]

    # ---------------------------------------------------------------- workers
    def start(self) -> None:
        for _ in range(self.limits.workers):
            self._spawn()

    def _spawn(self) -> None:
        t = threading.Thread(target=self._work, name="stockade-api-worker", daemon=True)
        with self._cond:
            self._threads.add(t)
        t.start()

    def submit(self, conn: Connection) -> None:
        with self._cond:
            q = self._queues.setdefault(conn.uid, deque())
            q.append(conn)
            if not is_root(conn.uid) and conn.uid not in self._order:
                self._order.append(conn.uid)
            self._cond.notify_all()

    def _pop_locked(self, uid: int) -> Connection:
        q = self._queues[uid]
        conn = q.popleft()
        if not q:
            del self._queues[uid]
            if uid in self._order:
                self._order.remove(uid)
        return conn

    def _take_locked(self) -> Connection | None:
        if self._queues.get(ROOT):
            return self._pop_locked(ROOT)
        lim = self.limits
        if self._busy_members >= lim.workers - lim.root_workers:
            return None
        for _ in range(len(self._order)):
            uid = self._order[0]
            self._order.rotate(-1)
            if self._busy[uid] < lim.member_workers:
                return self._pop_locked(uid)
        return None

    def _count_locked(self, uid: int, n: int) -> None:
        self._busy[uid] += n
        if not self._busy[uid]:
            del self._busy[uid]
        if not is_root(uid):
            self._busy_members += n

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cond:
                conn = None
                while not self._stopping and (conn := self._take_locked()) is None:
                    self._cond.wait()
                if self._stopping or conn is None:
                    self._threads.discard(me)
                    if conn is not None:
                        conn.close()
                    return
                self._count_locked(conn.uid, +1)
            self._local.stream = False
            try:
                self.serve(conn)
            except BaseException:  # noqa: BLE001 - a worker must survive any request
                log.exception("API worker: unexpected error; closing the connection")
                conn.close()
            finally:
                with self._cond:
                    if self._local.stream:
                        self._streams[conn.uid] -= 1
                    else:
                        self._count_locked(conn.uid, -1)
                    self._cond.notify_all()
            if self._local.stream:
                with self._cond:
                    self._threads.discard(me)
                return

    def begin_stream(self, conn: Connection) -> None:
        """The calling worker is about to stream for as long as the peer listens: it
        leaves the pool (a new worker takes its place) and counts as a stream of the
        uid. HTTPError 503 when the uid (or all members) already have their share."""
        uid, lim = conn.uid, self.limits
        with self._cond:
            if is_root(uid):
                if self._streams[uid] >= lim.root_streams:
                    raise HTTPError(503, f"root already has {lim.root_streams} flow streams open")
            else:
                if self._streams[uid] >= lim.member_streams:
                    raise HTTPError(503, f"uid {uid} already has {lim.member_streams} flow "
                                         "streams open")
                members = sum(n for u, n in self._streams.items() if not is_root(u))
                if members >= lim.members_streams:
                    raise HTTPError(503, f"non-root peers already have {lim.members_streams} "
                                         "flow streams open")
            self._streams[uid] += 1
            self._count_locked(uid, -1)
            self._local.stream = True
        self._spawn()

    def stats(self) -> dict:
        with self._cond:
            return {"threads": len(self._threads), "busy": dict(self._busy),
                    "streams": dict(+self._streams), "connections": dict(self._conns),
                    "queued": {u: len(q) for u, q in self._queues.items()}}

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            threads, conns = list(self._threads), list(self.open)
            queued = [c for q in self._queues.values() for c in q]
            self._queues.clear()
            self._order.clear()
            self._cond.notify_all()
        for conn in conns:
            conn.shutdown()
        for conn in queued:
            conn.close()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


class Acceptor:
    """Accepts on ``listener``, parks idle connections, hands readable ones to the pool."""

    def __init__(self, listener: socket.socket, pool: WorkerPool, limits: Limits,
                 accept: Callable[[socket.socket], Connection | None]):
        self.listener, self.pool, self.limits, self._accept = listener, pool, limits, accept
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._returned: deque[Connection] = deque()
        self._idle: set[Connection] = set()
        self._stop = threading.Event()
        self._emfile_logged = False

    def park(self, conn: Connection) -> None:
        """A worker is done with ``conn`` and it stays open (keep-alive)."""
        conn.last_active = time.monotonic()
        if conn.has_input():
            self.pool.submit(conn)
            return
        self._returned.append(conn)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending

    def stop(self) -> None:
        self._stop.set()
        self._wake()

    def run(self) -> None:
        self.listener.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ, "listener")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                for key, _ in self._sel.select(timeout=1.0):
                    if key.data == "listener":
                        self._accept_all()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._unpark(key.data)
                        self.pool.submit(key.data)
                while self._returned:
                    self._repark(self._returned.popleft())
                self._expire()
        finally:
            for conn in list(self._idle):
                self._unpark(conn)
                conn.close()
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _accept_all(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE/ENFILE: back off; the peer waits in the backlog
                if not self._emfile_logged:
                    log.warning("API: cannot accept a connection: %s", exc)
                    self._emfile_logged = True
                time.sleep(0.05)
                return
            self._emfile_logged = False
            conn = self._accept(sock)
            if conn is not None:
                self._repark(conn)

    def _repark(self, conn: Connection) -> None:
        if conn.closed:
            return
        try:
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        except (ValueError, OSError):  # closed under us
            conn.close()
            return
        conn.last_active = time.monotonic()
        self._idle.add(conn)

    def _unpark(self, conn: Connection) -> None:
        self._idle.discard(conn)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.limits.idle_timeout
        for conn in [c for c in self._idle if c.last_active < cutoff]:
            self._unpark(conn)
            conn.close()
