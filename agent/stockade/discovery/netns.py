"""Network namespaces as identities: which namespace a container's interface lives in.

A namespace is known by its inode on nsfs (what ``stat /proc/PID/ns/net`` and a bind
mount such as Podman's ``/run/netns/netns-…`` both show) while it exists. The agent
records it with a container's endpoint and, after a restart, binds the endpoint to a
host interface again only if that interface is a veth whose other end is still in that
namespace: an interface name alone is reused by runtimes.

From the host side, a veth names the peer's namespace by a namespace id (IFLA_LINK_NETNSID),
local to the host namespace; ``veth_peer_in_netns`` opens the recorded path, checks that
it is still the recorded namespace (its inode) and asks the kernel for that namespace's id.
"""
from __future__ import annotations

import errno
import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..netlink import get_link_with
from .errors import DiscoveryError


def netns_inode(path: str) -> int | None:
    """The inode of the network namespace at ``path`` (None: gone)."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def veth_peer_in_netns(host_ifindex: int, inode: int, path: str | None) -> bool:
    """Whether host interface ``host_ifindex`` is a veth whose peer is in the network
    namespace with ``inode``, found at ``path``. False when the namespace is gone, the
    path now names another one, or the link is not such a veth. Raises DiscoveryError
    when netlink fails."""
    if not path:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_ino != inode:
            return False
        with IPRoute() as ipr:
            try:
                link = get_link_with(ipr, host_ifindex)
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    return False
                raise
            nsid = link.netnsid
            if link.kind != "veth" or nsid is None:
                return False
            found = ipr.get_netnsid(fd=fd)
            return bool(found) and found.get("nsid") == nsid
    except (OSError, NetlinkError) as exc:
        raise DiscoveryError(f"ifindex {host_ifindex}: cannot tell its peer's namespace: {exc}") from exc
    finally:
        os.close(fd)
