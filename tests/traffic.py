"""Real traffic between test namespaces (tests/netns.py workloads)."""
from __future__ import annotations

import socket

FAIL_TIMEOUT = 1


def fam(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def tcp_ok(client, server, addr, port, timeout=FAIL_TIMEOUT) -> bool:
    """Connect client -> server:port and echo one message back."""
    srv = server.socket(fam(addr), socket.SOCK_STREAM)
    cli = client.socket(fam(addr), socket.SOCK_STREAM)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((addr, port))
        srv.listen(4)
        srv.settimeout(timeout)
        cli.settimeout(timeout)
        try:
            cli.connect((addr, port))
            conn, _ = srv.accept()
        except OSError:
            return False
        with conn:
            conn.settimeout(timeout)
            cli.sendall(b"ping")
            conn.sendall(conn.recv(16))
            return cli.recv(16) == b"ping"
    finally:
        cli.close()
        srv.close()


def udp_ok(client, server, addr, port, size=16, timeout=FAIL_TIMEOUT, src=None) -> bool:
    srv = server.socket(fam(addr), socket.SOCK_DGRAM)
    cli = client.socket(fam(addr), socket.SOCK_DGRAM)
    try:
        srv.bind((addr, port))
        srv.settimeout(timeout)
        if src:
            cli.bind((src, 0))
        cli.sendto(b"x" * size, (addr, port))
        try:
            return len(srv.recv(65535)) == size
        except OSError:
            return False
    finally:
        cli.close()
        srv.close()


def udp_reply_ok(client, server, addr, port, timeout=FAIL_TIMEOUT) -> bool:
    """UDP request and its reply (the reply must pass as part of the flow)."""
    srv = server.socket(fam(addr), socket.SOCK_DGRAM)
    cli = client.socket(fam(addr), socket.SOCK_DGRAM)
    try:
        srv.bind((addr, port))
        srv.settimeout(timeout)
        cli.settimeout(timeout)
        cli.sendto(b"q", (addr, port))
        try:
            data, peer = srv.recvfrom(64)
            srv.sendto(b"r" + data, peer)
            return cli.recv(64) == b"rq"
        except OSError:
            return False
    finally:
        cli.close()
        srv.close()


def ping_ok(w, addr) -> bool:
    return w.exec("ping", "-c1", f"-W{FAIL_TIMEOUT}", addr, check=False).returncode == 0


def eventually(fn, timeout=10.0, interval=0.1):
    """Poll ``fn`` until it returns true (tests poll up to 10 s, never sleep blindly)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def send_frames(w, frames, ifname: str = "eth0") -> None:
    """Send raw Ethernet frames out of ``w``'s ``ifname`` (AF_PACKET)."""
    s = w.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        s.bind((ifname, 0))
        for f in frames:
            s.send(f)
    finally:
        s.close()


class Capture:
    """Frames arriving at ``w``'s ``ifname`` while the block runs (AF_PACKET, all
    protocols; outgoing frames excluded, or, with ``outgoing``, only those).

        with Capture(b) as cap:
            send_frames(a, [frame])
        assert cap.wait(lambda f: f[12:14] == b"\\x86\\xdd", timeout=1)
    """

    def __init__(self, w, ifname: str = "eth0", outgoing: bool = False):
        self.w, self.ifname, self.outgoing = w, ifname, outgoing
        self.frames: list[bytes] = []

    def __enter__(self) -> "Capture":
        import threading
        self.sock = self.w.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((self.ifname, 0))
        self.sock.settimeout(0.05)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        PACKET_OUTGOING = 4
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if (addr[2] == PACKET_OUTGOING) == self.outgoing:
                self.frames.append(data)

    def wait(self, match, timeout: float = 1.0) -> bool:
        """Poll until a captured frame satisfies ``match`` (or the timeout)."""
        return bool(eventually(lambda: any(match(f) for f in list(self.frames)), timeout, 0.02))

    def seen(self, match) -> bool:
        return any(match(f) for f in list(self.frames))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(2)
        self.sock.close()
