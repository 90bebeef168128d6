"""A large policy change is switched in by generation, and undone the same way when its
state cannot be persisted (daemon/txn.py unwrite): the real agent in-process over raw
policy maps in dicts (tests/recording_maps.py), every single map write recorded."""
from __future__ import annotations

import errno
import os

import pytest

from recording_datapath import RecordingDatapath
from recording_maps import RawMapWriter
from stockade.daemon.agent import Agent
from stockade.daemon.api import AgentAPI
from stockade.daemon.config import AgentConfig
from stockade.daemon.links import Link
from stockade.errors import StateError

pytestmark = pytest.mark.pure


class Maps(RawMapWriter):
    def __init__(self):
        super().__init__(switch_min=8)
        self.views: list = []

    def after_write(self):
        self.views.append(self.view())


class SwitchingDatapath(RecordingDatapath):
    """RecordingDatapath with the real MapWriter's policy writes onto raw maps."""

    def __init__(self):
        super().__init__()
        self.raw = Maps()

    def policy_entries(self):
        return self.raw.policy_entries()

    def policy_flags(self):
        return self.raw.policy_flags()

    def check_capacity(self, delta):
        self.raw.check_capacity(delta)

    def apply_delta(self, delta, *, checked=False):
        self.raw.apply_delta(delta, checked=checked)
        self.policy, self.flags = self.raw.view()
        self.log.append(("policy", len(delta.adds), len(delta.removes), len(delta.flags)))

    # the transaction's hold on the old generation (datapath/writer.py)
    def policy_hold(self):
        self.raw.policy_hold()

    def policy_mark(self):
        return self.raw.policy_mark()

    def policy_undo(self, mark):
        self.raw.policy_undo(mark)
        self.policy, self.flags = self.raw.view()

    def policy_commit(self):
        self.raw.policy_commit()

    def policy_release(self):
        self.raw.policy_release()


def db_policy(ports) -> dict:
    listed = ", ".join(f'{{port: "{p}", protocol: TCP}}' for p in ports)
    return {"name": "db.yaml", "text": "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
            "metadata: {name: db}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n"
            f"  ingress: [{{fromEndpoints: [{{matchLabels: {{app: web}}}}], toPorts: [{{ports: [{listed}]}}]}}]\n"}


def raw(dp):
    return {name: set(m.items()) for name, m in dp.raw.maps.items()}


def test_a_large_change_that_cannot_be_persisted_switches_back(tmp_path, monkeypatch):
    cfg = AgentConfig(state_dir=str(tmp_path / "state"), host_name="h1", podman_socket=None,
                      docker_socket=None, podman_events_log=None)
    agent = Agent(cfg)
    agent.links.update({10: Link(10, "vweb", None, "veth", "02:00:00:00:00:0a"),
                        11: Link(11, "vdb", None, "veth", "02:00:00:00:00:0b")})
    dp = SwitchingDatapath()
    agent.start(dp, watch_links=False, watch_runtimes=False, flows=False)
    api = AgentAPI(agent)
    try:
        api.add_endpoint({"name": "web", "interface": "vweb", "ips": ["10.9.0.2"], "labels": {"app": "web"}})
        api.add_endpoint({"name": "db", "interface": "vdb", "ips": ["10.9.0.3"], "labels": {"app": "db"}})
        api.put_policies([db_policy(range(1000, 1020))])
        before, before_view = raw(dp), dp.raw.view()
        assert len(before_view[0]) >= 20
        gens_before = dp.raw.raw_generations()
        dp.raw.views.clear()
        dp.raw.events.clear()
        monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device")))
        with pytest.raises(StateError):
            api.put_policies([db_policy(range(2000, 2020))])
        monkeypatch.undo()
        # switched to the new generation and back: the same entries, the same generation
        assert raw(dp) == before and dp.raw.raw_generations() == gens_before
        # every state the programs could meet meanwhile was the old or the new one
        distinct = []
        for v in dp.raw.views:
            if v not in distinct:
                distinct.append(v)
        assert distinct[0] == before_view and len(distinct) == 2, len(distinct)
        # the old generation was kept intact until the end: never rewritten nor deleted;
        # undoing was one flags update back (no second switch), then the new one went
        touched = [e[2] for e in dp.raw.events if len(e) == 3 and e[1] == "policy"]
        assert not set(touched) & {k for k, _ in before["policy"]}
        flags_writes = [e for e in dp.raw.events if len(e) == 3 and e[1] == "policy_flags"]
        assert len(flags_writes) == 2, flags_writes   # the switch and its undo
        # with room again the change goes through, switched once more
        api.put_policies([db_policy(range(2000, 2020))])
        assert {g for _, _, g in dp.raw.raw_generations()} == {1 - g for _, _, g in gens_before}
    finally:
        agent.stop()
