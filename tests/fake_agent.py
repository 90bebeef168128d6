"""The agent behind API, client, CLI and Ansible module tests: the real one, in-process.

``FakeAgent()`` is ``stockade.daemon.api.AgentAPI`` over a real ``Agent`` (engine,
reconciler, state files in a temporary directory) with a recording datapath instead of
the kernel (tests/recording_datapath.py), so every answer is the real agent's. What it
adds is for tests only: ``calls`` records each API call, ``fail_next`` makes the next
call raise (500 tests), flows come from an empty flow ring, and read-only views
(``policies``, ``endpoints``, ``services``, ``revision``) show the state. It holds no
policy logic of its own.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref

from inprocess_agent import inprocess_agent
from stockade.daemon.api import AgentAPI

RECORDED = ("health", "list_endpoints", "add_endpoint", "remove_endpoint", "list_identities",
            "list_ipcache", "add_ipcache", "remove_ipcache", "list_policies", "put_policies",
            "delete_policy", "list_services", "service_conflicts", "set_services", "metrics",
            "trace", "matrix", "review")


class FakeAgent(AgentAPI):
    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="stockade-test-agent-")
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        super().__init__(inprocess_agent(self._dir).agent)
        weakref.finalize(self, self.agent.stop)
        self.calls: list[tuple] = []
        self.fail_next: Exception | None = None
        for name in RECORDED:
            setattr(self, name, self._recorded(name, getattr(self, name)))

    def _recorded(self, name, fn):
        def call(*args, **kwargs):
            self.calls.append((name, *args, *kwargs.values()))
            if self.fail_next is not None:
                exc, self.fail_next = self.fail_next, None
                raise exc
            return fn(*args, **kwargs)
        return call

    # flows: an empty ring, but criteria are checked exactly as the agent does
    def flows(self, criteria: dict) -> dict:
        from stockade.flows import FlowFilter, FlowRing
        self.calls.append(("flows", criteria))
        ring = FlowRing(16)
        rows = FlowFilter.parse(criteria).select(ring)
        return {"flows": [ring.to_dict(r) for r in rows], "count": len(rows), "connections": 0,
                "events_lost": {"rate_limit_new": 0, "rate_limit_drop": 0, "ringbuf_full": 0},
                "buffer": {"size": 0, "capacity": ring.capacity}}

    def follow_flows(self, criteria: dict, stopping=None):
        from stockade.flows import FlowFilter
        self.calls.append(("follow_flows", criteria))
        FlowFilter.parse(criteria)
        return iter([])

    # read-only views for assertions
    @property
    def policies(self) -> dict[tuple, dict]:
        return {(p["kind"], p["namespace"], p["name"]): p for p in AgentAPI.list_policies(self)}

    @property
    def endpoints(self) -> dict[str, dict]:
        return {e["name"]: e for e in AgentAPI.list_endpoints(self)}

    @property
    def services(self) -> dict[str, dict]:
        return {s["name"]: s["definition"] for s in AgentAPI.list_services(self)}

    @property
    def revision(self) -> int:
        return self.agent.state.revision
