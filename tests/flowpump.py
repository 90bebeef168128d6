"""Long-lived flows through the datapath, counted at the receivers, in a process of its
own (so the test's own work never delays a packet): tests/root/test_connections_survive.py.

    python tests/flowpump.py '{"a": NS, "b": NS, "c": NS, "a_ip": ..., "b_ip": ..., ...}'

* TCP: ``tcp`` connections from namespace a to b:tcp_port; a sends 64 bytes on each
  every ``interval`` seconds; b counts what arrives. A connection is broken when a send
  or receive fails or b reads end-of-stream.
* UDP: ``udp`` flows; a sends one datagram to b:udp_port+i to open each, then stays
  silent while b sends to a on it every ``interval``. a's ingress admits nothing from b,
  so these arrive only as replies: through conntrack. A restart that lost conntrack
  would stop them for good.
* Denied: c sends a datagram to b:deny_udp_port and to a:deny_udp_port every
  ``interval`` and tries a TCP connection to b:deny_tcp_port every 0.2 s; b and a count
  every one that is delivered (the policy denies them all).

Commands on stdin, one per line: ``report`` prints one JSON line: totals since the start,
and for every flow the longest gap between two arrivals since the last report (the
silence up to now included); ``stop`` ends the pump. It prints ``{"ready": true}`` once
every flow is open.
"""
from __future__ import annotations

import errno
import json
import os
import select
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from netns import in_netns  # noqa: E402

PAYLOAD = b"x" * 64


class Flow:
    def __init__(self, name: str):
        self.name = name
        self.received = 0
        self.last = time.monotonic()
        self.max_gap = 0.0
        self.broken: str | None = None

    def arrived(self, n: int) -> None:
        now = time.monotonic()
        self.max_gap = max(self.max_gap, now - self.last)
        self.last, self.received = now, self.received + n

    def window(self) -> float:
        """The longest gap since the last call (the current silence included); resets."""
        gap = max(self.max_gap, time.monotonic() - self.last)
        self.max_gap = 0.0
        return gap


class Pump:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.interval = cfg.get("interval", 0.005)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.tcp: list[Flow] = []
        self.udp: list[Flow] = []
        self.denied = {"udp_to_b": 0, "udp_to_a": 0, "tcp_to_b": 0}
        self.send_errors = {"tcp_again": 0, "udp": 0}
        self.probes_sent = 0
        self.readers: dict[int, tuple] = {}     # fd -> (socket, handler)
        self.poll = select.epoll()

    def sock(self, ns: str, family=socket.AF_INET, kind=socket.SOCK_STREAM):
        return in_netns(self.cfg[ns], socket.socket, family, kind)

    def read(self, s, handler) -> None:
        s.setblocking(False)
        self.readers[s.fileno()] = (s, handler)
        self.poll.register(s.fileno(), select.EPOLLIN)

    def open(self) -> None:
        c = self.cfg
        srv = self.sock("b")
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((c["b_ip"], c["tcp_port"]))
        srv.listen(128)
        self.tcp_clients = []
        for i in range(c["tcp"]):
            cli = self.sock("a")
            cli.settimeout(5)
            cli.connect((c["b_ip"], c["tcp_port"]))
            conn, _ = srv.accept()
            cli.setblocking(False)
            flow = Flow(f"tcp{i}")
            self.tcp.append(flow)
            self.tcp_clients.append((cli, flow))
            self.read(conn, lambda s, f=flow: self._tcp_in(s, f))
        srv.close()
        self.pushers = []
        for i in range(c["udp"]):
            rx = self.sock("b", kind=socket.SOCK_DGRAM)
            rx.bind((c["b_ip"], c["udp_port"] + i))
            rx.settimeout(5)
            opener = self.sock("a", kind=socket.SOCK_DGRAM)
            opener.connect((c["b_ip"], c["udp_port"] + i))
            opener.send(b"open")
            _, peer = rx.recvfrom(64)
            rx.connect(peer)
            rx.setblocking(False)
            flow = Flow(f"udp{i}")
            self.udp.append(flow)
            self.pushers.append(rx)
            self.read(opener, lambda s, f=flow: self._udp_in(s, f))
        for ns, key in (("b", "udp_to_b"), ("a", "udp_to_a")):
            trap = self.sock(ns, kind=socket.SOCK_DGRAM)
            trap.bind((c[f"{ns}_ip"], c["deny_udp_port"]))
            self.read(trap, lambda s, k=key: self._denied_udp(s, k))
        trap = self.sock("b")
        trap.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        trap.bind((c["b_ip"], c["deny_tcp_port"]))
        trap.listen(16)
        self.read(trap, self._denied_tcp)
        self.prober = self.sock("c", kind=socket.SOCK_DGRAM)
        self.prober.setblocking(False)

    # -- receivers -------------------------------------------------------------------
    def _tcp_in(self, s, flow: Flow) -> None:
        try:
            data = s.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            flow.broken = flow.broken or f"recv: {exc}"
            self._forget(s)
            return
        if not data:
            flow.broken = flow.broken or "end of stream"
            self._forget(s)
            return
        flow.arrived(len(data))

    def _udp_in(self, s, flow: Flow) -> None:
        while True:
            try:
                s.recv(64)
            except OSError:
                return
            flow.arrived(1)

    def _denied_udp(self, s, key: str) -> None:
        while True:
            try:
                s.recv(64)
            except OSError:
                return
            with self.lock:
                self.denied[key] += 1

    def _denied_tcp(self, s) -> None:
        try:
            conn, _ = s.accept()
        except OSError:
            return
        conn.close()
        with self.lock:
            self.denied["tcp_to_b"] += 1

    def _forget(self, s) -> None:
        self.poll.unregister(s.fileno())
        self.readers.pop(s.fileno(), None)

    def receive(self) -> None:
        while not self.stop.is_set():
            for fd, _ in self.poll.poll(0.2):
                entry = self.readers.get(fd)
                if entry is not None:
                    entry[1](entry[0])

    # -- senders ---------------------------------------------------------------------
    def send(self) -> None:
        c = self.cfg
        pending: list[tuple[socket.socket, float]] = []
        next_tick, next_probe = time.monotonic(), 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now < next_tick:
                time.sleep(next_tick - now)
                continue
            next_tick = max(next_tick + self.interval, now)   # behind: no burst to catch up
            for cli, flow in self.tcp_clients:
                if flow.broken:
                    continue
                try:
                    cli.send(PAYLOAD)
                except BlockingIOError:
                    self.send_errors["tcp_again"] += 1
                except OSError as exc:
                    flow.broken = f"send: {exc}"
            for rx in self.pushers:
                try:
                    rx.send(b"push")
                except OSError:
                    self.send_errors["udp"] += 1
            for ip in (c["b_ip"], c["a_ip"]):
                try:
                    self.prober.sendto(b"probe", (ip, c["deny_udp_port"]))
                    self.probes_sent += 1
                except OSError:
                    pass
            if now >= next_probe:
                next_probe = now + 0.2
                s = self.sock("c")
                s.setblocking(False)
                err = s.connect_ex((c["b_ip"], c["deny_tcp_port"]))
                if err not in (0, errno.EINPROGRESS):
                    s.close()
                else:
                    pending.append((s, now))
                while pending and now - pending[0][1] > 1.0:
                    pending.pop(0)[0].close()

    def report(self) -> dict:
        with self.lock:
            denied = dict(self.denied)
        return {"tcp_broken": {f.name: f.broken for f in self.tcp if f.broken},
                "tcp_received": sum(f.received for f in self.tcp),
                "udp_received": sum(f.received for f in self.udp),
                "tcp_max_gap": max(f.window() for f in self.tcp),
                "udp_max_gap": max(f.window() for f in self.udp),
                "denied_delivered": denied, "probes_sent": self.probes_sent,
                "send_errors": dict(self.send_errors)}


def main() -> int:
    pump = Pump(json.loads(sys.argv[1]))
    pump.open()
    threads = [threading.Thread(target=pump.receive, daemon=True),
               threading.Thread(target=pump.send, daemon=True)]
    for t in threads:
        t.start()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "report":
            print(json.dumps(pump.report()), flush=True)
        elif cmd == "stop":
            break
    pump.stop.set()
    for t in threads:
        t.join(timeout=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
