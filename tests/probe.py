"""A stream of numbered UDP probes from one workload to another, for measuring holes.

    with Probe(w["c"], w["b"], w["b"].ip4, 7001) as p:
        t0 = time.monotonic(); remove_the_filter(); t1 = time.monotonic()
        ...
    p.leaked_after(t1)        # probes sent after t1 that arrived
    p.open_for(t1)            # seconds from t1 to the first probe dropped after the hole

Each probe carries its number; the sender records when it sent each one (monotonic
clock), the receiver which ones arrived. Used by tests/root/test_attach.py and by
bench/attach_bench.py.
"""
from __future__ import annotations

import socket
import struct
import threading
import time


class Probe:
    def __init__(self, sender, receiver, addr: str, port: int, interval: float = 0.0005):
        self.sender, self.receiver = sender, receiver
        self.addr, self.port, self.interval = addr, port, interval
        self.sent: list[float] = []           # send time of probe n at index n
        self.received: set[int] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "Probe":
        fam = socket.AF_INET6 if ":" in self.addr else socket.AF_INET
        self._rx = self.receiver.socket(fam, socket.SOCK_DGRAM)
        self._rx.bind((self.addr, self.port))
        self._rx.settimeout(0.2)
        self._tx = self.sender.socket(fam, socket.SOCK_DGRAM)
        self._threads = [threading.Thread(target=self._recv, daemon=True),
                         threading.Thread(target=self._send, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._tx.close()
        self._rx.close()

    def _send(self) -> None:
        n, nxt = 0, time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now < nxt:
                time.sleep(max(0.0, nxt - now - 0.0002))
                continue
            self.sent.append(now)
            try:
                self._tx.sendto(struct.pack("!Q", n), (self.addr, self.port))
            except OSError:
                pass
            n += 1
            nxt += self.interval

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._rx.recv(64)
            except OSError:
                continue
            if len(data) >= 8:
                self.received.add(struct.unpack("!Q", data[:8])[0])

    # ------------------------------------------------------------------ results
    def settle(self, seconds: float = 0.2) -> None:
        """Wait for probes in flight."""
        time.sleep(seconds)

    def leaked_after(self, t: float) -> int:
        """Probes sent after ``t`` that reached the receiver."""
        return sum(1 for n in self.received if n < len(self.sent) and self.sent[n] > t)

    def leaked_between(self, t0: float, t1: float) -> int:
        return sum(1 for n in self.received if n < len(self.sent) and t0 < self.sent[n] <= t1)

    def open_for(self, t: float) -> float:
        """Seconds from ``t`` to the first probe dropped after the last one that arrived
        (sent after ``t``): how long the hole lasted. 0.0 when none arrived."""
        after = [n for n in self.received if n < len(self.sent) and self.sent[n] > t]
        if not after:
            return 0.0
        last = max(after)
        nxt = next((n for n in range(last + 1, len(self.sent)) if n not in self.received), None)
        end = self.sent[nxt] if nxt is not None else self.sent[-1]
        return end - t

    def max_interval(self, t0: float, t1: float) -> float:
        """The longest gap between two probes sent within [t0, t1]."""
        ts = [s for s in self.sent if t0 <= s <= t1]
        return max((b - a for a, b in zip(ts, ts[1:], strict=False)), default=0.0)
