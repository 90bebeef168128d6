"""A large policy change switches generations atomically (issue 14.8), on real programs
and veths: while the policy of A's egress flips between two large states again and
again, A opens a new TCP connection every millisecond to a port both states allow
(through different entries: 80/tcp exact vs 0-1023/tcp) and one to a port both deny
(through entries that swap peer class: the case that opened a hole in issue 14.6).
Every allowed connection completes on its first SYN, no denied one reaches B.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time

import pytest

from dpenv import ID_A, ID_B, datapath_env
from netns import CLONE_NEWNET, _libc
from stockade.policy.mapstate import ANY_PEER, EGRESS, PROTO_TCP, DirectionPolicy, Entry, Key, lookup

pytestmark = pytest.mark.root

SETTINGS = {
    "STOCKADE_PIN_DIR": f"/sys/fs/bpf/stockade-test-{os.getpid()}-switch",
    "POLICY_MAX": 4096,
    "CT_MAX": 65536,
    "CT_ENDPOINT_MAX": 65536,      # budgets are not what this test is about
    "CT_TIMEOUT_CLOSE_S": 1,
}
ALLOWED, DENIED = 80, 9999
ALLOW, DENY = Entry(False), Entry(True)
DEFAULT_DENY = DirectionPolicy(True, True)
FILLER = 150                       # entries each state has of its own: a large change


def tcp(peer, port, plen=16):
    return Key(ID_A, peer, EGRESS, PROTO_TCP, port, plen)


OLD = {tcp(ID_B, ALLOWED): ALLOW, tcp(ID_B, DENIED): DENY,
       tcp(ANY_PEER, 8192, 3): ALLOW,                       # 8192-16383 to anyone
       **{tcp(ID_B, 20000 + i): ALLOW for i in range(FILLER)}}
NEW = {tcp(ID_B, 0, 6): ALLOW,                              # 0-1023
       tcp(ID_B, 9984, 12): ALLOW,                          # 9984-9999 to B ...
       tcp(ANY_PEER, DENIED): DENY,                         # ... but 9999 denied to anyone
       **{tcp(ID_B, 30000 + i): ALLOW for i in range(FILLER)}}
FLAGS = {(ID_A, EGRESS): DEFAULT_DENY}


def verdict(entries, port):
    return lookup(entries, FLAGS, ID_A, ID_B, EGRESS, PROTO_TCP, port)[0]


class ConnProbe:
    """From namespace ``ns``: every ``interval`` a new non-blocking TCP connection to
    each of ``ports`` (RST on close: no TIME_WAIT). A connection counts as ``ok`` when
    it is established, ``refused`` on a RST (the SYN got through), ``timeout`` when
    neither happened within ``timeout`` s (its SYN was dropped: a retransmit would only
    come after 1 s)."""

    def __init__(self, ns: str, addr: str, ports, interval=0.001, timeout=0.5):
        self.ns, self.addr, self.ports = ns, addr, tuple(ports)
        self.interval, self.timeout = interval, timeout
        self.stats = {p: {"sent": 0, "ok": 0, "refused": 0, "timeout": 0} for p in self.ports}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self):
        try:
            fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(errno.EPERM, f"setns {self.ns}")
            finally:
                os.close(fd)
            self._loop()
        except BaseException as exc:   # reported by the test
            self.error = exc

    def _loop(self):
        poller = select.poll()
        pending: dict[int, tuple[socket.socket, int, float]] = {}
        nxt = time.monotonic()
        while True:
            now = time.monotonic()
            stopping = self._stop.is_set()
            if not stopping and now >= nxt:
                for port in self.ports:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.setblocking(False)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.connect_ex((self.addr, port))
                    pending[s.fileno()] = (s, port, now)
                    poller.register(s.fileno(), select.POLLOUT)
                    self.stats[port]["sent"] += 1
                nxt += self.interval
            elif stopping and not pending:
                return
            for fd, _ev in poller.poll(0.2):
                s, port, _t = pending.pop(fd)
                poller.unregister(fd)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                self.stats[port]["ok" if err == 0 else "refused"] += 1
                s.close()
            now = time.monotonic()
            for fd, (s, port, t) in list(pending.items()):
                if now - t > self.timeout:
                    del pending[fd]
                    poller.unregister(fd)
                    self.stats[port]["timeout"] += 1
                    s.close()


class Server:
    """Listens on ``ports`` in B's namespace and accepts (and closes) everything."""

    def __init__(self, w, ports):
        self.socks = []
        for port in ports:
            s = w.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((w.ip4, port))
            s.listen(4096)
            s.setblocking(False)
            self.socks.append(s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        for s in self.socks:
            s.close()

    def _run(self):
        while not self._stop.is_set():
            ready, _, _ = select.select(self.socks, [], [], 0.1)
            for s in ready:
                while True:
                    try:
                        c, _ = s.accept()
                    except OSError:
                        break
                    c.close()


@pytest.fixture
def env():
    with datapath_env(SETTINGS, {"a": ["10.213.71.1/24"], "b": ["10.213.71.2/24"]},
                      tag="sw") as env:
        env.reset()
        yield env


def test_a_large_change_never_drops_what_both_allow_nor_passes_what_both_deny(env):
    assert verdict(OLD, ALLOWED) == verdict(NEW, ALLOWED) == "allow"
    assert verdict(OLD, DENIED) == verdict(NEW, DENIED) == "deny"
    dp = env.dp
    assert dp.switch_min <= FILLER      # these changes are switched, not written in order
    env.policy(OLD, FLAGS)
    gens = []
    with Server(env.b, (ALLOWED, DENIED)), \
            ConnProbe(env.a.ns, env.b.ip4, (ALLOWED, DENIED)) as probe:
        time.sleep(0.3)
        end = time.monotonic() + 3.0
        state = OLD
        while time.monotonic() < end:
            state = NEW if state is OLD else OLD
            env.policy(state, FLAGS)
            gens.append(dp._gens[(ID_A, EGRESS)])
            time.sleep(0.005)
        time.sleep(0.3)
    assert probe.error is None, probe.error
    ok, bad = probe.stats[ALLOWED], probe.stats[DENIED]
    assert len(gens) >= 50 and set(gens) == {0, 1}, len(gens)    # switched back and forth
    assert ok["sent"] >= 1000, ok                                # about one per ms
    assert ok["ok"] == ok["sent"] and ok["timeout"] == ok["refused"] == 0, ok
    assert bad["ok"] == bad["refused"] == 0 and bad["timeout"] == bad["sent"], bad
    # one generation in the map, the last state in force
    assert dp.policy_entries().keys() == state.keys()
    from stockade.datapath import maps as m
    from stockade.datapath.writer import _gen_of
    raw = dp._items("policy", m.PolicyKey, m.PolicyValue)
    assert {_gen_of(k) for k, _ in raw} == {gens[-1]} and len(raw) == len(state)


def test_grace_periods_come_from_the_kernel():
    """The writer's wait between a switch and deleting the old generation is the
    kernel's (a map-in-map update), not its fallback sleep."""
    from stockade.datapath.bpfsys import wait_for_programs
    wait_for_programs()
    wait_for_programs()
