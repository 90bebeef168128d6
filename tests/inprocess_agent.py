"""The real agent in-process: its engine, reconciler and API over a recording datapath
(tests/recording_datapath.py), no kernel and no root. For tests of what the agent
answers (matrix, review, live trace); enforcement itself is proven under tests/root."""
from __future__ import annotations

from recording_datapath import RecordingDatapath
from stockade.daemon.agent import Agent
from stockade.daemon.api import AgentAPI
from stockade.daemon.config import AgentConfig


def inprocess_agent(state_dir: str, **settings) -> AgentAPI:
    cfg = AgentConfig(state_dir=state_dir, host_name="h1", podman_socket=None,
                      docker_socket=None, podman_events_log=None, **settings)
    agent = Agent(cfg)
    agent.start(RecordingDatapath(), watch_links=False, watch_runtimes=False, flows=False)
    return AgentAPI(agent)
