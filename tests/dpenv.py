"""A datapath on real veths for root tests: one program build, a topology, both
programs attached to chosen host-side veths, and map writes from mapstate types.

    with datapath_env(SETTINGS, {"a": [...], "b": [...]}) as env:
        env.reset()                      # endpoints A (1001) and B (1002), ipcache
        env.policy({Key(...): ALLOW}, {(1001, EGRESS): DEFAULT_DENY})
        env.count(EGRESS, Verdict.DROPPED, Reason.SPOOFED)

Workloads listed in ``unattached`` are built but carry no programs (a router, a
host that is not an endpoint). Everything is removed on exit, also after a failure.
"""
from __future__ import annotations

import contextlib

from netns import Topology
from stockade.datapath import Datapath, attach, detach
from stockade.policy.mapstate import diff

ID_A, ID_B, ID_C = 1001, 1002, 1003


class Env:
    def __init__(self, dp, topo, workloads):
        self.dp, self.topo, self.w = dp, topo, workloads
        for tag, w in workloads.items():
            setattr(self, tag, w)
        self.endpoints = {"a": ID_A, "b": ID_B}

    def reset(self):
        """Empty maps; A and B are endpoints (C, if any, is not)."""
        dp = self.dp
        dp.flush()
        for n, (tag, ident) in enumerate(self.endpoints.items()):
            w = self.w[tag]
            dp.set_endpoint(w.host_ifindex, n + 1, ident, w.ips, mac=w.mac)
            for ip in w.ips:
                dp.set_ipcache(ip, ident)

    def policy(self, entries=None, flags=None):
        """Replace the whole policy state (as the agent would, through a delta)."""
        self.dp.apply_delta(diff(self.dp.policy_entries(), entries or {},
                                 self.dp.policy_flags(), flags or {}))

    def count(self, direction, verdict, reason) -> int:
        return self.dp.counters().get((direction, verdict, reason), (0, 0))[0]


@contextlib.contextmanager
def datapath_env(settings, workloads: dict[str, list[str]], tag: str | None = None,
                 unattached: tuple[str, ...] = ()):
    topo = Topology(tag)
    dp = None
    try:
        topo.__enter__()
        built = {name: topo.add_workload(name, addrs) for name, addrs in workloads.items()}
        dp = Datapath(settings)
        for name, w in built.items():
            if name not in unattached:
                attach(w.host_ifindex, dp.from_endpoint_fd, dp.to_endpoint_fd)
        yield Env(dp, topo, built)
    finally:
        for w in topo.workloads.values():
            detach(w.host_ifindex)
        topo.close()
        if dp is not None:
            dp.cleanup()
            dp.close()
