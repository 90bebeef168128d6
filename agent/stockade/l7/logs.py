"""The proxy's request log -> L7 flow records.

HAProxy sends one datagram per request (``haproxy.LOG_FORMAT``, tab separated, the
client's parts through the json converter) to a unix datagram socket the agent owns
in the proxy's run directory. A thread here reads it, parses each line into a
``LogRecord`` and hands batches of them to a sink (the flow source). Nothing here
trusts a line: one that does not parse is counted (``garbled``) and dropped. Memory is
bounded: the socket's receive buffer (the kernel drops what does not fit, and HAProxy
counts it) and batches of at most ``BATCH`` records.
"""
from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Callable, NamedTuple

log = logging.getLogger("stockade.l7")

TAG = "stockade-l7"
NFIELDS = 24
BATCH = 512
RCVBUF = 1 << 20
MAX_DATAGRAM = 16384
MAX_TEXT = 4096             # longest url / header value kept (the proxy logs up to 8 KB)
CODE_SERIES = 64            # distinct status codes counted apart; the rest as "other"


class LogRecord(NamedTuple):
    """One request the proxy logged (immutable; a tuple: built fast, once per request)."""
    client: str
    client_port: int
    server: str
    server_port: int
    src_identity: int | None
    dst_identity: int | None
    rule_set: int | None        # the server's ingress rule set applied (l7.rules.RuleSets); None: none
    allowed: bool | None        # every rule set applied passed; None: refused before policy
                                # (a bad request)
    method: str
    path: str
    protocol: str
    status: int
    tq_ms: int                  # time to receive the request
    tr_ms: int                  # server response time (-1: none)
    ta_ms: int                  # active time of the request
    host: str
    user_agent: str
    termination: str
    log_ns: int                 # when the proxy logged it (the response's end)
    accept_ns: int
    egress_rule_set: int | None = None  # the client's egress rule set applied; None: none
    egress_allowed: bool | None = None  # its verdict (None: none applied)

    @property
    def request_ns(self) -> int:
        return self.accept_ns + max(self.tq_ms, 0) * 1_000_000

    @property
    def latency_ns(self) -> int:
        return max(0, self.log_ns - self.request_ns)

    @property
    def verdict(self) -> str:
        return "FORWARDED" if self.allowed else "DROPPED"


_FLAGS = {"1": True, "0": False, "-": None}
_IDENT_END = 1 << 32
# Addresses as the proxy writes them -> their canonical text (str(ip_address(...))): one
# client sends many requests, and ipaddress parsing was the most of a line's cost.
# Bounded: cleared when full (many clients: the cost of a miss, never memory).
ADDR_CACHE_MAX = 4096
_addrs: dict[str, str] = {}


def canonical_address(value: str) -> str:
    """``value`` as ipaddress writes it; ValueError when it is not an address."""
    text = _addrs.get(value)
    if text is None:
        text = str(ipaddress.ip_address(value))
        if len(_addrs) >= ADDR_CACHE_MAX:
            _addrs.clear()
        _addrs[value] = text
    return text


def _text(value: str) -> str:
    """A json-escaped field (``-``: missing) -> its text, at most MAX_TEXT characters."""
    if value == "-":
        return ""
    if value.isascii() and value.isprintable() and '"' not in value:
        # Printable ASCII with no escape but "\/" (the json converter escapes every
        # "/"): json.loads would give the same, without its cost per line.
        plain = value.replace("\\/", "/") if "\\" in value else value
        if "\\" not in plain:
            return plain[:MAX_TEXT]
    text = json.loads(f'"{value}"')
    if not isinstance(text, str):
        raise ValueError("not a string")
    text.encode("utf-8")   # a lone surrogate (\ud800) is not text: UnicodeEncodeError
    return text[:MAX_TEXT]


def _ident(value: str) -> int | None:
    if value == "-":
        return None
    n = int(value)
    if not 0 <= n < _IDENT_END:
        raise ValueError("identity out of range")
    return n


def _port(value: str) -> int:
    n = int(value)
    if not 0 <= n <= 65535:
        raise ValueError("port out of range")
    return n


def _token(value: str, limit: int = 64) -> str:
    if len(value) > limit or not value.isprintable():
        raise ValueError("bad token")
    return value


def parse_line(data: bytes) -> LogRecord:
    """One datagram -> a LogRecord; ValueError (or one of its kind) when it is not one."""
    f = data.decode("utf-8").rstrip("\n").split("\t")
    if len(f) != NFIELDS or f[0] != TAG:
        raise ValueError(f"{len(f)} fields")
    ok = _FLAGS[f[8]]
    client, server = canonical_address(f[1]), canonical_address(f[3])
    method = "" if f[9] == "<BADREQ>" else _token(f[9])
    proto = "" if f[11] == "<BADREQ>" else _token(f[11])
    status = int(f[12])
    if not 0 <= status <= 999:
        raise ValueError("status out of range")
    accept_ns = (int(f[20]) * 1000 + int(f[21])) * 1_000_000
    return LogRecord(client, _port(f[2]), server, _port(f[4]),
                     _ident(f[5]), _ident(f[6]), _ident(f[7]),
                     ok if method else None,
                     method, _text(f[10]), proto, status,
                     int(f[13]), int(f[14]), int(f[15]), _text(f[16]),
                     _text(f[17]), _token(f[18], 8),
                     int(f[19]) * 1000, accept_ns,
                     _ident(f[22]),
                     _FLAGS[f[23]] if method else None)


class LogReader:
    """Binds the log socket, reads it in a thread, counts what it saw."""

    def __init__(self, path: Path, sink: Callable[[list[LogRecord]], None],
                 owner: tuple[int, int] | None = None):
        self.path = Path(path)
        self.sink = sink
        self.owner = owner
        self.sock: socket.socket | None = None
        self.received = 0
        self.garbled = 0
        self.sink_errors = 0
        # (verdict, status code) -> requests; at most CODE_SERIES codes apart
        self.requests: collections.Counter = collections.Counter()
        self._codes: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ensure(self) -> None:
        """The socket exists and a thread reads it (idempotent; rebinds a removed file)."""
        with self._lock:
            if self.sock is not None and self.path.exists():
                return
            old, self.sock = self.sock, None
            if old is not None:
                old.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            s.bind(str(self.path))
            if self.owner is not None:
                os.chown(self.path, *self.owner)
            os.chmod(self.path, 0o600)
            s.settimeout(0.5)
            self.sock = s
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stockade-l7-log",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.sock
            if s is None:
                self._stop.wait(0.2)
                continue
            batch: list[LogRecord] = []
            try:
                data = s.recv(MAX_DATAGRAM)
                batch_add = self._add
                batch_add(batch, data)
                s.setblocking(False)
                try:
                    while len(batch) < BATCH:
                        batch_add(batch, s.recv(MAX_DATAGRAM))
                except BlockingIOError:
                    pass
                finally:
                    s.settimeout(0.5)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                if not self._stop.is_set():
                    self._stop.wait(0.2)   # closed under us (ensure rebinding): next one
                continue
            if batch:
                try:
                    self.sink(batch)
                except Exception:   # a flow-side failure must not stop the log reading
                    self.sink_errors += 1
                    log.exception("l7: handling request records failed")

    def _add(self, batch: list, data: bytes) -> None:
        self.received += 1
        try:
            rec = parse_line(data)
        except (ValueError, KeyError, UnicodeDecodeError, OverflowError):
            self.garbled += 1
            return
        code = rec.status if rec.status in self._codes or len(self._codes) < CODE_SERIES else -1
        if code != -1:
            self._codes.add(code)
        self.requests[(rec.verdict, code)] += 1
        batch.append(rec)

    def stats(self) -> dict:
        return {"received": self.received, "garbled": self.garbled,
                "sink_errors": self.sink_errors}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            with contextlib.suppress(OSError):
                self.path.unlink()
