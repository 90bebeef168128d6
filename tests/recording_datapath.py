"""A datapath kept in dicts, for running the real agent in-process without a kernel.

    agent = Agent(config)
    agent.start(RecordingDatapath(), watch_links=False, watch_runtimes=False, flows=False)

It holds what the real maps would hold (policy entries and flags, ipcache, endpoints,
attached interfaces) and records every write in ``log``, so a test can check the order
of writes too. Real enforcement is proven by the root tests; this one lets the web UI
and API tests ask the agent's real engine without root.
"""
from __future__ import annotations

from stockade.datapath.errors import CapacityError
from stockade.policy.mapstate import Delta, DirectionPolicy, Entry, Key


class RecordingDatapath:
    def __init__(self, policy_max: int = 262144):
        self.policy: dict[Key, Entry] = {}
        self.flags: dict[tuple[int, int], DirectionPolicy] = {}
        self.ipcache: dict[str, int] = {}
        self.endpoints: dict[int, dict] = {}
        self.attached: set[int] = set()
        self.config: dict = {}
        self.policy_max = policy_max
        self.log: list[tuple] = []

    # -- config, endpoints, ipcache ------------------------------------------------
    def set_config(self, **flags) -> None:
        self.config = flags

    def set_endpoint(self, ifindex: int, endpoint_id: int, identity: int, ips=(), mac=None,
                     audit: bool = False, unidentified: bool = False, link_local=(),
                     host_ifindex=None) -> None:
        self.endpoints[ifindex] = {"endpoint_id": endpoint_id, "identity": identity,
                                   "ips": tuple(ips), "unidentified": unidentified, "audit": audit}
        self.log.append(("endpoint", ifindex, identity))

    def del_endpoint(self, ifindex: int) -> bool:
        self.log.append(("endpoint", ifindex, None))
        return self.endpoints.pop(ifindex, None) is not None

    def endpoint_ifindexes(self) -> list[int]:
        return sorted(self.endpoints)

    def set_ipcache(self, prefix: str, identity: int) -> None:
        self.ipcache[prefix] = identity
        self.log.append(("ipcache", prefix, identity))

    def del_ipcache(self, prefix: str) -> bool:
        self.log.append(("ipcache", prefix, None))
        return self.ipcache.pop(prefix, None) is not None

    def ipcache_entries(self) -> dict[str, int]:
        return dict(self.ipcache)

    def attach_interface(self, ifindex: int) -> None:
        self.attached.add(ifindex)
        self.log.append(("attach", ifindex))

    def detach_interface(self, ifindex: int) -> None:
        self.attached.discard(ifindex)
        self.log.append(("detach", ifindex))

    # -- policy ----------------------------------------------------------------------
    def policy_entries(self) -> dict[Key, Entry]:
        return dict(self.policy)

    def policy_flags(self) -> dict:
        return dict(self.flags)

    def check_capacity(self, delta: Delta) -> None:
        peak = len(self.policy) + sum(1 for k in delta.adds if k not in self.policy)
        if peak > self.policy_max:
            raise CapacityError("policy", f"{peak} entries needed during the update, "
                                          f"map holds {self.policy_max}")

    def apply_delta(self, delta: Delta, *, checked: bool = False) -> None:
        if not checked:
            self.check_capacity(delta)
        delta.apply(self.policy, self.flags)
        self.log.append(("policy", len(delta.adds), len(delta.removes), len(delta.flags)))

    # -- what the agent reads for metrics --------------------------------------------
    def ct_gc(self, now_ns=None) -> int:
        return 0

    def counters(self) -> dict:
        return {}

    def count_entries(self, name: str) -> int:
        return {"policy": len(self.policy), "policy_flags": len(self.flags),
                "endpoints": len(self.endpoints),
                "ipcache4": sum(1 for p in self.ipcache if ":" not in p),
                "ipcache6": sum(1 for p in self.ipcache if ":" in p)}.get(name, 0)

    def max_entries(self, name: str) -> int:
        return self.policy_max

    def events_lost(self) -> dict:
        return {"rate_limit_new": 0, "rate_limit_drop": 0, "ringbuf_full": 0}
