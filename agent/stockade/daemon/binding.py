"""Rebinding: whether a host interface is the one an endpoint's record identifies.

An endpoint that waits for its interface (after a restart, or after its link went away)
is bound to a link again only when the link is provably the same workload's, never by
name alone (runtimes reuse veth names, libvirt reuses vnetN, scripts re-create tap0):

* a container (podman, docker): the link is a veth whose peer is in the network
  namespace recorded with it (inode and path, discovery/netns.py), and its MAC is the
  one recorded. The runtime confirms the container id when it lists the container.
* a VM (libvirt, or a static endpoint given by guest MAC): the link is a tap whose MAC
  follows from the guest MAC (endpoints.tap_matches_mac); libvirt confirms the domain
  UUID (the endpoint's runtime id) when it lists the domain.
* a static endpoint: the link has the name and the MAC recorded when it was bound.

An ifindex identifies nothing across reboots or VM restarts; it is never compared.
A mismatch is reported (``stockade status``: binding mismatches) and the link stays
closed, as every managed interface without an identified workload does; the record
keeps waiting. Registering a static endpoint again through the API binds it to the
interface that has its name now (the operator says it is that one).
"""
from __future__ import annotations

from ..discovery.errors import DiscoveryError
from .endpoints import Endpoint, tap_matches_mac
from .links import Link

RUNTIMES = ("podman", "docker")


def binding_problem(ep: Endpoint, link: Link) -> str | None:
    """Why ``link`` is not the interface ``ep``'s record identifies (None: it is)."""
    where = f"interface {link.name}"
    if ep.by_mac or ep.source == "libvirt":
        if tap_matches_mac(link.kind, link.mac, ep.mac):
            return None
        return (f"{where} is not the tap of guest MAC {ep.mac} (a {link.kind or 'non-tap'} "
                f"link with MAC {link.mac})")
    if ep.source in RUNTIMES:
        if ep.netns is None and ep.link_mac is None:
            return (f"nothing recorded identifies {where} (a record from before rebinding by "
                    f"identity); waiting for {ep.source} to announce container "
                    f"{(ep.runtime_id or '?')[:12]}")
        if ep.netns is not None:
            from ..discovery.netns import veth_peer_in_netns
            inode, path = ep.netns
            try:
                inside = veth_peer_in_netns(link.ifindex, inode, path)
            except DiscoveryError as exc:
                return f"{where}: {exc}"
            if not inside:
                return (f"{where} does not lead into the network namespace of container "
                        f"{(ep.runtime_id or '?')[:12]} (inode {inode})")
    if ep.link_mac is not None and (link.mac or "").lower() != ep.link_mac.lower():
        return f"{where} has MAC {link.mac}, not {ep.link_mac} as recorded"
    return None
