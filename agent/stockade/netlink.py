"""Netlink dumps that survive a busy host, and lean reads of links and addresses.

The kernel interrupts a dump (NLM_F_DUMP_INTR) when the objects it lists change
meanwhile, as links and addresses do while containers start: the dump is taken again,
with a short backoff, rather than failing the caller (an agent failing its start).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, NamedTuple, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

ATTEMPTS = 12          # about 1.6 s of backoff in all

T = TypeVar("T")


def dump(call: Callable[..., Any], *args, **kwargs) -> list:
    """``list(call(*args, **kwargs))``, retried while the kernel interrupts the dump."""
    delay = 0.005
    for attempt in range(ATTEMPTS):
        try:
            return list(call(*args, **kwargs))
        except NetlinkDumpInterrupted:
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ links, lean
# A host with a thousand containers has a thousand veths. pyroute2 decodes every
# attribute of every link, and by default gathers a whole dump before it returns:
# a thousand decoded links at once are some 30 MB of Python objects, and memory
# the allocator keeps afterwards. So the dumps here are streamed (an IPRoute made
# with nlm_generator=True yields each message as it is read), each message is
# reduced at once to the few fields used, and the kernel is asked to leave out
# the statistics (IFLA_EXT_MASK RTEXT_FILTER_SKIP_STATS).

RTEXT_FILTER_SKIP_STATS = 1 << 3


class LinkInfo(NamedTuple):
    """What the agent uses of a link: its ifindex, name, kind (IFLA_INFO_KIND), master's
    index, peer's index (IFLA_LINK: a veth's other end), the peer's namespace id
    (IFLA_LINK_NETNSID) and MAC."""
    ifindex: int
    name: str
    kind: str | None
    master: int | None
    link: int | None
    netnsid: int | None
    mac: str | None


def link_info(msg) -> LinkInfo:
    info = msg.get_attr("IFLA_LINKINFO")
    return LinkInfo(msg["index"], msg.get_attr("IFLA_IFNAME"),
                    info.get_attr("IFLA_INFO_KIND") if info is not None else None,
                    msg.get_attr("IFLA_MASTER"), msg.get_attr("IFLA_LINK"),
                    msg.get_attr("IFLA_LINK_NETNSID"), msg.get_attr("IFLA_ADDRESS"))


def link_index(msg) -> int:
    return msg["index"]


def _links_with(ipr, extract: Callable[[Any], T]) -> Iterator[T]:
    # match=None: without it, pyroute2 takes ext_mask for a filter on the replies
    for msg in ipr.link("dump", match=None, ext_mask=RTEXT_FILTER_SKIP_STATS):
        yield extract(msg)


def _streamed_links(extract: Callable[[Any], T]) -> Iterator[T]:
    with IPRoute(nlm_generator=True) as ipr:
        yield from _links_with(ipr, extract)


def link_infos() -> list[LinkInfo]:
    """The LinkInfo of every link of this namespace, the dump streamed and taken
    again when interrupted."""
    return dump(_streamed_links, link_info)


def link_indexes() -> list[int]:
    """The index of every link of this namespace (as ``link_infos``)."""
    return dump(_streamed_links, link_index)


def link_indexes_with(ipr) -> list[int]:
    """link_indexes on an open IPRoute: streamed when it was made with
    nlm_generator=True (pyroute2 finishes a dump before it raises the interruption,
    so the socket serves the next request)."""
    return dump(_links_with, ipr, link_index)


def get_link(index: int) -> LinkInfo:
    """The LinkInfo of link ``index``; NetlinkError (ENODEV) when there is none."""
    with IPRoute() as ipr:
        return get_link_with(ipr, index)


def get_link_with(ipr, index: int) -> LinkInfo:
    """get_link on an open IPRoute."""
    (msg,) = ipr.link("get", index=index, ext_mask=RTEXT_FILTER_SKIP_STATS)
    return link_info(msg)


def _streamed_addresses() -> Iterator[str]:
    with IPRoute(nlm_generator=True) as ipr:
        for msg in ipr.addr("dump"):
            addr = msg.get_attr("IFA_ADDRESS")
            if addr:
                yield addr


def addresses() -> list[str]:
    """IFA_ADDRESS of every address of this namespace, the dump streamed."""
    return dump(_streamed_addresses)
