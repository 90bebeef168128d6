"""The change log: every committed change as a JSON line in change_log_path and on stderr,
with who made it (the API peer's uid and pid from SO_PEERCRED), over the real API server
and the real agent in-process (recording datapath)."""
from __future__ import annotations

import json
import logging
import os

import pytest

from policydocs import ingress_policy
from recording_datapath import RecordingDatapath
from stockade.client import Client
from stockade.daemon.agent import Agent
from stockade.daemon.api import AgentAPI
from stockade.daemon.config import AgentConfig
from stockade.daemon.server import APIServer

FIELDS = ["time", "uid", "pid", "source", "action", "object", "revision", "summary"]


@pytest.fixture
def served(tmp_path):
    log_path = tmp_path / "log" / "changes.jsonl"
    cfg = AgentConfig(state_dir=str(tmp_path / "state"), host_name="h1", podman_socket=None,
                      docker_socket=None, podman_events_log=None, change_log_path=str(log_path))
    agent = Agent(cfg)
    agent.start(RecordingDatapath(), watch_links=False, watch_runtimes=False, flows=False)
    with APIServer(AgentAPI(agent), str(tmp_path / "agent.sock")) as server:
        with Client(server.socket_path) as client:
            yield agent, client, log_path
    agent.stop()


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_change_is_logged_with_its_peer(served, caplog):
    agent, c, path = served
    caplog.set_level(logging.INFO, logger="stockade.changes")
    c.add_endpoint(name="web1", interface="vweb1", ips=["10.9.0.2"], labels={"app": "web"})
    c.add_endpoint(name="db1", interface="vdb1", ips=["10.9.0.3"], labels={"app": "db"})
    c.put_policies([{"name": "db.yaml", "text": ingress_policy("db", "db", "web", 5432)}])
    c.put_policies([{"name": "db.yaml", "text": ingress_policy("db", "db", "web", 5432)}],
                   dry_run=True)
    c.add_ipcache(prefix="10.20.0.5/32", labels={"app": "remote"}, host="h2")
    c.remove_ipcache("10.20.0.5/32")
    c.put_services({"web": {"labels": {"tier": "front"}, "members": [{"endpoint": "web1"}]}})
    c.delete_policy("db")
    c.remove_endpoint("db1")
    got = lines(path)
    assert [(e["action"], e["object"]) for e in got] == [
        ("endpoint.upsert", "web1"), ("endpoint.upsert", "db1"), ("policy.import", "db"),
        ("ipcache.put", "10.20.0.5/32"), ("ipcache.delete", "10.20.0.5/32"),
        ("services.set", "web"), ("policy.delete", "db"),
        ("endpoint.remove", "db1")]
    for e in got:
        assert list(e) == FIELDS
        assert (e["uid"], e["pid"], e["source"]) == (os.getuid(), os.getpid(), "api")
        assert e["time"].endswith("Z") and e["summary"]
    by_action = {e["action"]: e for e in got}
    assert by_action["policy.import"]["revision"] == 1
    assert by_action["policy.delete"]["revision"] == 2
    assert "1 added or changed" in by_action["policy.import"]["summary"]
    # the same lines on stderr (the logger "stockade.changes"), nothing for the dry run
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "stockade.changes"]
    assert logged == got


def test_refused_and_dry_run_changes_are_not_logged(served):
    from stockade.client import ClientError
    agent, c, path = served
    c.add_endpoint(name="web1", interface="vweb1", ips=["10.9.0.2"], labels={"app": "web"})
    with pytest.raises(ClientError):
        c.delete_policy("no-such-policy")
    with pytest.raises(ClientError):
        c.remove_ipcache("10.1.2.3/32")
    assert [e["action"] for e in lines(path)] == ["endpoint.upsert"]


def test_agent_sources_are_named_without_a_peer(tmp_path):
    from stockade.daemon.changes import UpsertEndpoint
    from stockade.policy.labels import LabelSet
    cfg = AgentConfig(state_dir=str(tmp_path / "state"), host_name="h1", podman_socket=None,
                      docker_socket=None, podman_events_log=None,
                      change_log_path=str(tmp_path / "changes.jsonl"))
    agent = Agent(cfg)
    agent.start(RecordingDatapath(), watch_links=False, watch_runtimes=False, flows=False)
    try:
        agent.submit(UpsertEndpoint("c1", "veth1", ("10.88.0.5",),
                                    LabelSet.from_mapping({"app": "x"}, "container"), "podman",
                                    runtime_id="ab" * 32))
    finally:
        agent.stop()
    (e,) = lines(tmp_path / "changes.jsonl")
    assert (e["uid"], e["pid"], e["source"], e["action"], e["object"]) == (
        None, None, "podman", "endpoint.upsert", "c1")
