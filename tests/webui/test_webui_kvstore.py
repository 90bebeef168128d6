"""The Overview shows the fleet store's state: a real in-process agent connected to a real
etcd, then with etcd gone (degraded, its last view kept)."""
from __future__ import annotations

import html
import json
import re
import time

import pytest

from conftest import TOKEN
from etcdcluster import EtcdCluster
from recording_datapath import RecordingDatapath
from stockade.daemon.agent import Agent
from stockade.daemon.api import AgentAPI
from stockade.daemon.config import AgentConfig
from stockade.daemon.server import APIServer
from stockade_webui import create_app

pytestmark = pytest.mark.pure


def text(resp) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", resp.get_data(as_text=True))))


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_overview_shows_the_fleet_store(tmp_path):
    with EtcdCluster(1, name="webkv") as etcd:
        etcd.put_subnets("h2", ["10.77.2.0/24"])
        etcd.ctl("put", "/stockade/v1/endpoints/h2/10.77.2.5", json.dumps(
            {"labels": {"container:app": "web"}, "name": "w", "source": "podman", "host": "h2"}))
        etcd.ctl("put", "/stockade/v1/endpoints/h2/10.99.9.9", json.dumps(
            {"labels": {"container:app": "web"}, "name": "w", "source": "podman", "host": "h2"}))
        cfg = AgentConfig(state_dir=str(tmp_path / "state"), host_name="h1", podman_socket=None,
                          docker_socket=None, podman_events_log=None,
                          etcd={"endpoints": etcd.endpoints, "lease_ttl": 3}).validate()
        agent = Agent(cfg)
        agent.start(RecordingDatapath(), watch_links=False, watch_runtimes=False, flows=False)
        try:
            with APIServer(AgentAPI(agent), str(tmp_path / "agent.sock")) as s:
                app = create_app({"TOKEN": TOKEN, "AGENTS": [f"h1={s.socket_path}"],
                                  "TESTING": True})
                c = app.test_client()
                page = c.get("/login").get_data(as_text=True)
                csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
                assert c.post("/login", data={"token": TOKEN, "csrf_token": csrf}).status_code == 302
                # the refusal comes with the listing; "connected" with the watch's first answer
                wait_for(lambda: AgentAPI(agent).health()["kvstore"]["refused_entries"] == 1
                         and AgentAPI(agent).health()["kvstore"]["state"] == "connected")
                body = text(c.get("/"))
                assert "Fleet store connected" in body
                assert "Remote entries 1 " in body and "Refused entries 1 " in body
                assert "refused endpoints/h2/10.99.9.9: outside h2's subnets" in body
                etcd.kill(0)
                wait_for(lambda: AgentAPI(agent).health()["kvstore"]["state"] == "degraded")
                body = text(c.get("/"))
                assert "Fleet store degraded" in body and "Remote entries 1 " in body
        finally:
            agent.stop()
