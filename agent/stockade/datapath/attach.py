"""Attach the datapath's programs to an interface's clsact hooks with pyroute2.

Our filters are recognised by (PRIO, HANDLE) on the clsact ingress/egress parents.
``attach`` uses "replace" on that exact filter: an agent that restarts swaps the
program in one netlink call, so no packet sees a missing filter.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg import sched_bpf

from ..netlink import dump, link_indexes_with
from .errors import DatapathError

PARENT_INGRESS = 0xFFFFFFF2  # clsact ingress: from the workload -> from_endpoint
PARENT_EGRESS = 0xFFFFFFF3   # clsact egress: toward the workload -> to_endpoint
PRIO = 21
HANDLE = 0x5354
ETH_P_ALL = 0x0003

# pyroute2 0.7 does not decode a bpf filter's program id and tag (TCA_BPF_TAG = 10,
# TCA_BPF_ID = 11): teach it, so a filter can be checked to run our very program.
if not any(n == "TCA_BPF_ID" for n, _ in sched_bpf.options.nla_map):
    sched_bpf.options.nla_map = sched_bpf.options.nla_map + (
        ("TCA_BPF_FLAGS_GEN", "uint32"), ("TCA_BPF_TAG", "hex"), ("TCA_BPF_ID", "uint32"))


@dataclass(frozen=True)
class Attachment:
    ifindex: int
    hook: str       # "ingress" or "egress"
    name: str       # BPF program name as tc reports it
    prog_id: int = 0
    prio: int = PRIO


def _ensure_clsact(ipr: IPRoute, ifindex: int) -> None:
    """clsact on ``ifindex``. Another qdisc in its place (a legacy ``ingress`` qdisc
    also takes handle ffff:) is an error: our filters would land on its one hook."""
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
        kinds = {q.get_attr("TCA_KIND") for q in dump(ipr.get_qdiscs, index=ifindex)
                 if q["handle"] == 0xFFFF0000}
        if "clsact" not in kinds:
            raise DatapathError(f"ifindex {ifindex}", f"a {'/'.join(sorted(k for k in kinds if k))} "
                                "qdisc holds clsact's place (ffff:): remove it "
                                "(tc qdisc del dev X ingress)") from exc


def attach(ifindex: int, from_endpoint_fd: int, to_endpoint_fd: int,
           from_name: str = "from_endpoint", to_name: str = "to_endpoint") -> None:
    """Ensure clsact on ``ifindex`` and install (or atomically replace) both programs."""
    try:
        with IPRoute() as ipr:
            _ensure_clsact(ipr, ifindex)
            for parent, fd, name in ((PARENT_INGRESS, from_endpoint_fd, from_name),
                                     (PARENT_EGRESS, to_endpoint_fd, to_name)):
                ipr.tc("replace-filter", "bpf", ifindex, HANDLE, fd=fd, name=name,
                       parent=parent, prio=PRIO, classid=1, direct_action=True,
                       protocol=ETH_P_ALL)
    except DatapathError:
        raise
    except (NetlinkError, OSError) as exc:
        raise DatapathError(f"ifindex {ifindex}", f"cannot attach programs: {exc}") from exc


def detach(ifindex: int) -> None:
    """Remove our two filters from ``ifindex`` (missing ones and links are ignored).
    The clsact qdisc stays: other tools may have filters there."""
    try:
        with IPRoute() as ipr:
            for parent in (PARENT_INGRESS, PARENT_EGRESS):
                try:
                    ipr.tc("del-filter", "bpf", ifindex, HANDLE, parent=parent, prio=PRIO,
                           protocol=ETH_P_ALL)
                except NetlinkError as exc:
                    if exc.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                        raise
    except (NetlinkError, OSError) as exc:
        raise DatapathError(f"ifindex {ifindex}", f"cannot detach programs: {exc}") from exc


def hook_filters(ifindex: int, hook: str) -> list[Attachment]:
    """Every bpf filter on ``ifindex``'s clsact ``hook`` (ours and others'), in the order
    tc runs them (by prio); [] without clsact."""
    parent = PARENT_INGRESS if hook == "ingress" else PARENT_EGRESS
    try:
        with IPRoute() as ipr:
            msgs = dump(ipr.get_filters, index=ifindex, parent=parent)
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return []
        raise DatapathError(f"ifindex {ifindex}", f"cannot list filters: {exc}") from exc
    except OSError as exc:
        raise DatapathError(f"ifindex {ifindex}", f"cannot list filters: {exc}") from exc
    out = []
    for msg in msgs:
        opts = msg.get_attr("TCA_OPTIONS")
        if msg.get_attr("TCA_KIND") != "bpf" or opts is None:
            continue
        out.append(Attachment(ifindex, hook, opts.get_attr("TCA_BPF_NAME") or "",
                              opts.get_attr("TCA_BPF_ID") or 0, msg["info"] >> 16))
    return sorted(out, key=lambda a: a.prio)


def list_attached(ifindex: int | None = None) -> list[Attachment]:
    """Our filters on ``ifindex`` (or on every link of this namespace)."""
    out = []
    try:
        # one socket for the links and the filters; nlm_generator: the link dump streamed
        # (netlink.link_indexes), the filter dumps whole (get_filters gathers them)
        with IPRoute(nlm_generator=True) as ipr:
            indexes = [ifindex] if ifindex is not None else link_indexes_with(ipr)
            for idx in indexes:
                for parent, hook in ((PARENT_INGRESS, "ingress"), (PARENT_EGRESS, "egress")):
                    try:
                        filters = dump(ipr.get_filters, index=idx, parent=parent)
                    except NetlinkError as exc:
                        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                            continue
                        raise
                    for msg in filters:
                        if msg.get_attr("TCA_KIND") != "bpf" or msg["handle"] != HANDLE:
                            continue
                        if msg["info"] >> 16 != PRIO:
                            continue
                        opts = msg.get_attr("TCA_OPTIONS")
                        out.append(Attachment(idx, hook, opts.get_attr("TCA_BPF_NAME") or "",
                                              opts.get_attr("TCA_BPF_ID") or 0))
    except (NetlinkError, OSError) as exc:
        raise DatapathError("tc", f"cannot list filters: {exc}") from exc
    return out


def detach_all() -> list[int]:
    """Detach our filters from every link in this namespace; returns the ifindexes."""
    done = sorted({a.ifindex for a in list_attached()})
    for idx in done:
        detach(idx)
    return done
