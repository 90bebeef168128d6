"""The proxy's request log -> L7 flow records.

HAProxy writes one line per request (``haproxy.LOG_FORMAT``, tab separated, the
client's parts through the json converter, ended by "\n") to its stdout, a pipe only
the agent and the proxy hold (``log stdout format raw``): nothing else on the host can
write a record. A thread here reads it, splits the lines, parses each into a
``LogRecord`` and hands batches of them to a sink (the flow source). Nothing here
trusts a line: one that does not parse is counted (``garbled``) and dropped.

The pipe is a stream with a large buffer (``PIPE_SIZE``, F_SETPIPE_SZ): a burst waits
in it for the reader. The proxy never blocks on it (it makes the pipe non-blocking):
a line that finds the pipe full is dropped and HAProxy counts it (``DroppedLogs`` in
``show info``), which proxy.py reads into ``dropped`` - never a silent loss. Memory is
bounded: the pipe, a partial line of at most ``MAX_LINE`` bytes and batches of at most
``BATCH`` records.
"""
from __future__ import annotations

import collections
import fcntl
import functools
import ipaddress
import json
import logging
import os
import select
import threading
from pathlib import Path
from typing import Callable, NamedTuple

log = logging.getLogger("stockade.l7")

TAG = "stockade-l7"
NFIELDS = 24
BATCH = 512
PIPE_SIZE = 4 << 20         # the pipe's buffer: 4 MiB (about 16,000 lines), as the kernel allows
READ_SIZE = 1 << 16
MAX_LINE = 16384            # longer (the proxy writes at most 8 KB): garbled, dropped to its end
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
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


_TAG_START = TAG.encode() + b"\t"
_FLAGS = {"1": True, "0": False, "-": None}
_IDENT_END = 1 << 32
# Addresses as the proxy writes them -> their canonical text (str(ip_address(...))): one
# client sends many requests, and ipaddress parsing was the most of a line's cost.
# Bounded (least recently used out): many clients cost misses, never memory. A value
# that is not an address raises, and is not cached.
ADDR_CACHE_MAX = 4096


@functools.lru_cache(maxsize=ADDR_CACHE_MAX)
def canonical_address(value: str) -> str:
    """``value`` as ipaddress writes it; ValueError when it is not an address."""
    return str(ipaddress.ip_address(value))


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
    """One log line -> a LogRecord; ValueError (or one of its kind) when it is not one."""
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
    """The pipe the proxy's stdout writes its request log to, read by a thread, and
    what it saw. One pipe for the reader's life: every (re)started proxy gets its write
    end, so the lines of one that died are read all the same."""

    def __init__(self, sink: Callable[[list[LogRecord]], None], pipe_size: int = PIPE_SIZE):
        self.sink = sink
        self.pipe_size = pipe_size
        self.size = 0                  # the pipe's capacity (bytes), once made
        self._rfd: int | None = None
        self._wfd: int | None = None
        self.received = 0
        self.garbled = 0
        self.sink_errors = 0
        self.dropped = 0               # lines the proxy dropped (its DroppedLogs; set by proxy.py)
        # (verdict, status code) -> requests; at most CODE_SERIES codes apart
        self.requests: collections.Counter = collections.Counter()
        self._codes: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ensure(self) -> int:
        """The pipe exists and a thread reads it (idempotent); its write end, for the
        proxy's stdout."""
        with self._lock:
            if self._wfd is None:
                rfd, wfd = os.pipe2(os.O_CLOEXEC)
                self.size = _grow(wfd, self.pipe_size)
                os.set_blocking(rfd, False)
                self._rfd, self._wfd = rfd, wfd
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, args=(rfd,),
                                                name="stockade-l7-log", daemon=True)
                self._thread.start()
            return self._wfd

    def _run(self, rfd: int) -> None:
        poller = select.poll()
        poller.register(rfd, select.POLLIN)
        rest = b""                     # a line not ended yet
        skipping = False               # in a line longer than MAX_LINE: dropped to its end
        while not self._stop.is_set():
            if not poller.poll(500):
                continue
            try:
                data = os.read(rfd, READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            lines = data.split(b"\n")
            lines[0] = rest + lines[0]
            rest = lines.pop()
            if skipping and lines:
                lines.pop(0)          # the end of the over-long line
                skipping = False
            if len(rest) > MAX_LINE:
                if not skipping:
                    self.received += 1
                    self.garbled += 1
                skipping, rest = True, b""
            batch: list[LogRecord] = []
            add = self._add
            for raw in lines:
                add(batch, raw)
                if len(batch) >= BATCH:
                    self._hand(batch)
                    batch = []
            if batch:
                self._hand(batch)

    def _hand(self, batch: list[LogRecord]) -> None:
        try:
            self.sink(batch)
        except Exception:   # a flow-side failure must not stop the log reading
            self.sink_errors += 1
            log.exception("l7: handling request records failed")

    def _add(self, batch: list, data: bytes) -> None:
        self.received += 1
        while True:
            try:
                rec = parse_line(data)
                break
            except (ValueError, KeyError, UnicodeDecodeError, OverflowError):
                self.garbled += 1
            # A line the proxy only partly wrote (a write larger than PIPE_BUF into an
            # almost full pipe) runs into the next one, which starts with the tag: read
            # from there. (Only once the whole does not parse: a field may end with the
            # tag's text, but holds no tab, so a line read from inside another one never
            # has the fields of a whole line.)
            at = data.find(_TAG_START, 1)
            if at == -1:
                return
            data = data[at:]
            self.received += 1
        code = rec.status if rec.status in self._codes or len(self._codes) < CODE_SERIES else -1
        if code != -1:
            self._codes.add(code)
        self.requests[(rec.verdict, code)] += 1
        batch.append(rec)

    def stats(self) -> dict:
        return {"received": self.received, "garbled": self.garbled,
                "dropped": self.dropped, "sink_errors": self.sink_errors,
                "pipe_bytes": self.size}

    def stop(self) -> None:
        """Reads what is left (the proxy is stopped first), then closes the pipe."""
        with self._lock:
            wfd, self._wfd = self._wfd, None
            if wfd is not None:
                os.close(wfd)          # the reader sees the end once no proxy holds it
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=2)
            self._stop.set()
            thread.join(timeout=2)
        with self._lock:
            rfd, self._rfd = self._rfd, None
            if rfd is not None:
                os.close(rfd)


def _grow(fd: int, want: int) -> int:
    """The pipe ``fd`` made ``want`` bytes (at most /proc/sys/fs/pipe-max-size without
    CAP_SYS_RESOURCE; a refusal keeps what it has); its capacity."""
    try:
        return fcntl.fcntl(fd, F_SETPIPE_SZ, want)
    except OSError:
        try:
            limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
            return fcntl.fcntl(fd, F_SETPIPE_SZ, min(want, limit))
        except (OSError, ValueError):
            return fcntl.fcntl(fd, F_GETPIPE_SZ)
