"""Network namespaces with veth pairs for root tests.

    with Topology() as topo:
        a = topo.add_workload("a", ["10.213.7.1/24", "fd57:ade::1/64"])
        a.host_ifindex        # host-side veth, enslaved to the topology's bridge
        sock = a.socket(socket.AF_INET, socket.SOCK_STREAM)   # created inside a.ns

Every host-side veth sits on one bridge in the root namespace (no address on it, so
the root namespace never routes to the workloads): workloads of one topology share a
link. Only names this object created are ever deleted, and everything is deleted on
exit, also after a failure half way through ``add_workload``.
Names: "sk" + pid + tag (namespace), + "h" (host veth), "sk" + pid + "br" (bridge).

"The root namespace" above is the test's: tests/conftest.py runs every tests/root test in
a network namespace of the session's own (``OwnNamespace``), so a demo agent holding the
one-agent-per-namespace lock in the machine's root namespace (daemon/nslock.py) and its
interfaces are never touched, and the test agents' bridges, veths, taps, Podman
bridges, nftables tables and sysctls live in that namespace only.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
# The namespace a test session or benchmark started in (a path a child may open), for
# what must reach outside (apt-get download of the VM kernel): set by OwnNamespace.
OUTER_ENV = "STOCKADE_TEST_OUTER_NETNS"


def run(*argv: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def unshare_net() -> None:
    """Move the calling thread (or a child before exec) into a new network namespace
    with its loopback up."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
        req = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", req)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


class OwnNamespace:
    """A network namespace of this process's own, with no name in /run/netns: it goes
    when the last process in it exits and the fd closes, however the session ends.

        own = OwnNamespace()
        own.enter()     # the calling thread (and what it starts from now on) is in it
        own.leave()     # back where it was
        own.close()

    Threads and processes started while inside stay in it."""

    def __init__(self):
        self.outer = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        box: dict = {}

        def make():
            try:
                unshare_net()
                box["fd"] = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except BaseException as exc:
                box["error"] = exc
        t = threading.Thread(target=make)
        t.start()
        t.join()
        if "error" in box:
            os.close(self.outer)
            raise box["error"]
        self.fd: int = box["fd"]
        self.outer_path = f"/proc/{os.getpid()}/fd/{self.outer}"

    def enter(self) -> None:
        _setns(self.fd)
        os.environ[OUTER_ENV] = self.outer_path

    def leave(self) -> None:
        _setns(self.outer)

    def close(self) -> None:
        os.environ.pop(OUTER_ENV, None)
        os.close(self.fd)
        os.close(self.outer)


def outer_namespace() -> None:
    """``preexec_fn`` for a child that must reach outside the test's namespace (the
    network): it joins the namespace the session started in. No-op outside one."""
    path = os.environ.get(OUTER_ENV)
    if path:
        fd = os.open(path, os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)


def link_mac(ifname: str) -> str:
    """The MAC of ``ifname`` in the calling thread's namespace (sysfs shows the
    namespace it was mounted in, not the test's)."""
    return json.loads(run("ip", "-j", "link", "show", "dev", ifname).stdout)[0]["address"]


def in_netns(ns: str, fn, *args, **kwargs):
    """Run ``fn(*args)`` in a thread that joined network namespace ``ns`` (a name in
    /run/netns, or a path); sockets it creates belong to ``ns`` and stay usable from
    any thread."""
    box: dict = {}

    def target():
        try:
            fd = os.open(ns if ns.startswith("/") else f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


@dataclass
class Workload:
    ns: str
    host_if: str
    host_ifindex: int
    mac: str                       # MAC of the workload's eth0
    addrs: list[str] = field(default_factory=list)  # with prefix length

    @property
    def ip4(self) -> str:
        return next(a.split("/")[0] for a in self.addrs if ":" not in a)

    @property
    def ip6(self) -> str:
        return next(a.split("/")[0] for a in self.addrs if ":" in a)

    @property
    def ips(self) -> list[str]:
        return [a.split("/")[0] for a in self.addrs]

    def exec(self, *argv: str, check: bool = True, timeout: float = 10):
        return run("ip", "netns", "exec", self.ns, *argv, check=check, timeout=timeout)

    def socket(self, family=socket.AF_INET, type=socket.SOCK_STREAM, proto=0):
        return in_netns(self.ns, socket.socket, family, type, proto)

    def eth0_ifindex(self) -> int:
        return in_netns(self.ns, socket.if_nametoindex, "eth0")


def bridge_mac(name: str) -> str:
    """A fixed, locally administered MAC for bridge ``name``. A bridge left to choose takes
    its lowest port's MAC and changes it when a lower one joins: a workload whose ARP
    cache holds the old one (another port's) then has its frames to the host passed up
    as PACKET_OTHERHOST and silently dropped by IP until it resolves the host again."""
    return "02:" + ":".join(f"{b:02x}" for b in hashlib.sha256(name.encode()).digest()[:5])


class Topology:
    """A bridge in the root namespace plus one namespace per workload. The bridge's MAC is
    fixed (bridge_mac) unless ``fixed_mac=False``: then it takes its lowest port's, as
    a bridge made by Podman or by hand does, for tests of what follows that MAC."""

    def __init__(self, tag: str | None = None, fixed_mac: bool = True):
        self.prefix = f"sk{os.getpid()}{tag or ''}"
        self.bridge = f"{self.prefix}br"
        assert len(self.bridge) <= 15, self.bridge
        self.fixed_mac = fixed_mac
        self._links: list[str] = []
        self._netns: list[str] = []
        self.workloads: dict[str, Workload] = {}

    def __enter__(self) -> "Topology":
        try:
            mac = ["address", bridge_mac(self.bridge)] if self.fixed_mac else []
            run("ip", "link", "add", self.bridge, *mac, "type", "bridge", "stp_state", "0")
            self._links.append(self.bridge)
            _disable_ipv6(self.bridge)
            run("ip", "link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_workload(self, tag: str, addrs: list[str]) -> Workload:
        ns, host = f"{self.prefix}{tag}", f"{self.prefix}{tag}h"
        assert len(host) <= 15, host
        try:
            run("ip", "netns", "add", ns)
            self._netns.append(ns)
            run("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._links.append(host)
            _disable_ipv6(host)
            run("ip", "link", "set", host, "master", self.bridge, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            for a in addrs:
                extra = ["nodad"] if ":" in a else []
                run("ip", "-n", ns, "addr", "add", a, "dev", "eth0", *extra)
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            mac = json.loads(run("ip", "-n", ns, "-j", "link", "show", "eth0").stdout)[0]["address"]
        except BaseException:
            self.close()
            raise
        w = Workload(ns, host, socket.if_nametoindex(host), mac, list(addrs))
        self.workloads[tag] = w
        return w

    def remove_workload(self, tag: str) -> None:
        """Delete one workload's namespace and veth (as a runtime removes a container);
        its names may be used again by ``add_workload``."""
        w = self.workloads.pop(tag)
        run("ip", "link", "del", w.host_if, check=False)
        run("ip", "netns", "del", w.ns, check=False)
        self._links.remove(w.host_if)
        self._netns.remove(w.ns)

    def close(self) -> None:
        """Delete what we created, newest first; errors are ignored (gone already)."""
        for name in reversed(self._links):
            run("ip", "link", "del", name, check=False)
        for ns in reversed(self._netns):
            run("ip", "netns", "del", ns, check=False)
        self._links.clear()
        self._netns.clear()


def _disable_ipv6(ifname: str) -> None:
    """No link-local address on host-side links: keeps the root namespace quiet."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
