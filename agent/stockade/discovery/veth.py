"""Find the host end of a container's veth.

The container side is read over netlink from inside the container's network
namespace (setns in a short-lived thread, so the agent's own threads never
change namespace). Reading /sys/class/net/eth0/iflink via `nsenter -n` is
wrong: /sys keeps showing the namespace it was mounted in, i.e. the host's.

The peer index found there is looked up in the agent's own namespace and
accepted only if it is a veth whose peer index points back at the container
interface, so a coincidental index match in another namespace is rejected.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..netlink import dump, get_link, get_link_with, link_infos
from .errors import DiscoveryError

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class HostVeth:
    ifname: str
    ifindex: int
    container_ifindex: int
    mac: str | None


def _run_in_netns(ns_path: str, fn):
    """Run fn() in a new thread that has joined the netns at ns_path."""
    box: dict = {}

    def target() -> None:
        try:
            fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err), ns_path)
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc
        # The thread ends here, still inside the container's netns; nothing reuses it.

    thread = threading.Thread(target=target, name="stockade-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _container_links() -> list[tuple[int, str, int | None, str | None]]:
    return [(link.ifindex, link.name, link.link, link.mac) for link in link_infos()]


def _pick(links, mac: str | None, ifname: str):
    """Prefer the interface with the runtime's MAC, then ifname, then any veth-like link."""
    peered = [link for link in links if link[2] and link[1] != "lo"]
    if mac:
        for link in peered:
            if link[3] and link[3].lower() == mac.lower():
                return link
    for link in peered:
        if link[1] == ifname:
            return link
    return peered[0] if len(peered) == 1 else None


def _host_link(peer_index: int, container_index: int) -> str | None:
    try:
        link = get_link(peer_index)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise
    if link.kind != "veth" or link.link != container_index:
        return None
    return link.name


def find_host_veth(
    pid: int | None = None,
    *,
    netns_path: str | None = None,
    mac: str | None = None,
    ifname: str = "eth0",
) -> HostVeth | None:
    """Return the host end of the veth behind a container's interface.

    pid or netns_path names the container's network namespace (pid wins; the
    path is Docker's/Podman's NetworkSettings.SandboxKey). mac picks the
    container interface when it has several; ifname is the fallback.
    Returns None when there is no such veth in the agent's namespace (host
    networking, the container already gone). Raises DiscoveryError when the
    namespace exists but netlink fails.
    """
    path = f"/proc/{pid}/ns/net" if pid else netns_path
    if not path:
        return None
    try:
        links = _run_in_netns(path, _container_links)
    except FileNotFoundError:
        return None  # process exited or netns removed: nothing to attach to
    except (OSError, NetlinkError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ESRCH):
            return None
        raise DiscoveryError(f"reading links in {path}: {exc}") from exc
    chosen = _pick(links, mac, ifname)
    if chosen is None:
        return None
    c_index, _, peer_index, c_mac = chosen
    try:
        host_name = _host_link(peer_index, c_index)
    except (OSError, NetlinkError) as exc:
        raise DiscoveryError(f"looking up host ifindex {peer_index}: {exc}") from exc
    if host_name is None:
        return None
    return HostVeth(ifname=host_name, ifindex=peer_index, container_ifindex=c_index, mac=c_mac)


def _link_local_of(ifindex: int | None, ifname: str) -> list[str]:
    import ipaddress
    import socket
    with IPRoute() as ipr:
        if ifindex is None:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return []
            ifindex = found[0]
        out = []
        for msg in dump(ipr.get_addr, family=socket.AF_INET6, index=ifindex):
            addr = ipaddress.IPv6Address(msg.get_attr("IFA_ADDRESS"))
            if addr.is_link_local and str(addr) not in out:
                out.append(str(addr))
        return out


def link_local_addresses(
    pid: int | None = None,
    *,
    netns_path: str | None = None,
    ifindex: int | None = None,
    ifname: str = "eth0",
) -> list[str]:
    """The IPv6 link-local addresses of a workload's interface, read in its network
    namespace (tentative ones included: duplicate address detection claims them).

    They may be stable-privacy (RFC 7217) rather than derived from the MAC, so the
    datapath must be told them (``Datapath.set_endpoint(link_local=...)``): they are
    the only fe80::/10 sources the endpoint may use. ``pid`` or ``netns_path`` names
    the namespace (as for find_host_veth); ``ifindex`` (HostVeth.container_ifindex)
    or ``ifname`` the interface. Returns [] when the namespace or interface is gone;
    raises DiscoveryError when netlink fails.
    """
    path = f"/proc/{pid}/ns/net" if pid else netns_path
    if not path:
        return []
    return _addresses_in_netns(path, lambda: _link_local_of(ifindex, ifname))


def _addresses_in_netns(path: str, read) -> list[str]:
    """``read()`` run in the network namespace at ``path``; [] when the namespace or
    the interface is gone, DiscoveryError when netlink fails."""
    try:
        return _run_in_netns(path, read)
    except FileNotFoundError:
        return []
    except (OSError, NetlinkError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ESRCH):
            return []
        if isinstance(exc, NetlinkError) and exc.code == errno.ENODEV:
            return []
        raise DiscoveryError(f"reading addresses in {path}: {exc}") from exc


def _addresses_of(ifindex: int) -> list[str]:
    import ipaddress
    with IPRoute() as ipr:
        found = [ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
                 for msg in dump(ipr.get_addr, index=ifindex)]
    v4 = [str(a) for a in found if a.version == 4]
    v6 = [str(a) for a in found if a.version == 6 and not a.is_link_local]
    return list(dict.fromkeys(v4 + v6))


def interface_addresses(pid: int, ifindex: int) -> list[str]:
    """The addresses (IPv4 first, IPv6 without link-local) of interface ``ifindex`` in
    the network namespace of process ``pid``: a container's, read before the runtime
    can be asked (the OCI hook). [] when the namespace or interface is gone; raises
    DiscoveryError when netlink fails."""
    return _addresses_in_netns(f"/proc/{pid}/ns/net", lambda: _addresses_of(ifindex))


def _netns_candidates():
    """Paths of network namespaces on this host: the named ones first (ip netns,
    Podman's netavark, Docker), then every process's, each namespace once."""
    import glob
    seen = set()
    paths = sorted(glob.glob("/run/netns/*")) + sorted(glob.glob("/run/docker/netns/*"))
    paths += [f"/proc/{p}/ns/net" for p in sorted(os.listdir("/proc")) if p.isdigit()]
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            yield path


def peer_netns(host_ifindex: int) -> tuple[str, int] | None:
    """(namespace path, ifindex there) of the other end of the veth ``host_ifindex``
    (in the agent's namespace), found by the peer namespace's id; None when the link
    is not a veth into another namespace (a tap, a gone link)."""
    try:
        with IPRoute() as ipr:
            link = get_link_with(ipr, host_ifindex)
            nsid, peer = link.netnsid, link.link
            if nsid is None or peer is None:
                return None
            for path in _netns_candidates():
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    found = ipr.get_netnsid(fd=fd)
                except NetlinkError:
                    continue
                finally:
                    os.close(fd)
                if found and found.get("nsid") == nsid:
                    return path, peer
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise DiscoveryError(f"looking up ifindex {host_ifindex}: {exc}") from exc
    return None


def peer_link_local_addresses(host_ifindex: int) -> list[str]:
    """The IPv6 link-local addresses of the workload behind host-side veth
    ``host_ifindex`` (link_local_addresses of its peer); [] for a tap or a veth whose
    namespace cannot be found."""
    found = peer_netns(host_ifindex)
    if found is None:
        return []
    return link_local_addresses(netns_path=found[0], ifindex=found[1])
