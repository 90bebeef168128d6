"""What BPF programs run on a host interface, whichever way they are attached (tcx
links first, then tc clsact filters): for tests of agents in either attach mode."""
from __future__ import annotations

import socket

from stockade.datapath import tcx
from stockade.datapath.attach import hook_filters
from stockade.datapath.attachments import HOOKS, programs_on


def _ifindex(ifname: str) -> int | None:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


def attached(ifname: str) -> bool:
    """Our program judges what comes from ``ifname``'s workload."""
    idx = _ifindex(ifname)
    return idx is not None and "from_endpoint" in programs_on(idx)["ingress"]


def program_ids(ifname: str) -> list[int]:
    """Ids of the programs run on ``ifname`` (both hooks, in run order)."""
    idx = _ifindex(ifname)
    if idx is None:
        return []
    out: list[int] = []
    for hook in HOOKS:
        if tcx.supported():
            out += [e.prog_id for e in tcx.query(idx, hook)]
        out += [f.prog_id for f in hook_filters(idx, hook)]
    return out


def program_tags(ifname: str) -> tuple[str, ...]:
    """Tags of the programs run on ``ifname`` (both hooks)."""
    tags = []
    for pid in program_ids(ifname):
        info = tcx.prog_info_by_id(pid)
        if info is not None:
            tags.append(info.tag)
    return tuple(tags)
