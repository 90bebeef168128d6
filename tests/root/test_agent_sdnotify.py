"""The real agent tells systemd it is ready (Type=notify in the role's unit)."""
import socket

import pytest


@pytest.mark.root
def test_agent_reports_ready_once_it_serves(tmp_path):
    """The real agent sends READY=1 only after its API answers (so Before= in the unit
    holds the runtimes back until the datapath and the last policy are in place)."""
    from agentproc import AgentProcess
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(90)
        with AgentProcess(env={"NOTIFY_SOCKET": path}) as agent:
            assert s.recv(64) == b"READY=1"
            assert agent.client.health()["status"]
