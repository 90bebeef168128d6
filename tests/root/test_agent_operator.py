"""What an operator sees of a real agent process: the change log (file and stderr), the
metrics on the socket and the TCP listener, and the CLI's answers."""
from __future__ import annotations

import json
import os

import pytest

from agentproc import AgentProcess
from policydocs import ingress_policy

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def agent():
    with AgentProcess(change_log_path="/run/stockade-operator-test-changes.jsonl") as a:
        a.change_log = "/run/stockade-operator-test-changes.jsonl"
        yield a
    if os.path.exists("/run/stockade-operator-test-changes.jsonl"):
        os.unlink("/run/stockade-operator-test-changes.jsonl")


def test_change_log_names_who_changed_what(agent, tmp_path):
    pol = tmp_path / "db.yaml"
    pol.write_text(ingress_policy("oplog-db", "db", "web", 5432))
    agent.cli("endpoint", "add", "--name", "oplog-web", "--interface", "oplogweb0",
              "--ip", "10.213.90.2", "--labels", "app=web")
    agent.cli("policy", "import", str(pol))
    agent.cli("policy", "delete", "oplog-db")
    agent.cli("endpoint", "remove", "oplog-web")
    with open(agent.change_log) as f:
        got = [json.loads(line) for line in f]
    assert [(e["action"], e["object"]) for e in got] == [
        ("endpoint.upsert", "oplog-web"), ("policy.import", "oplog-db"),
        ("policy.delete", "oplog-db"), ("endpoint.remove", "oplog-web")]
    for e in got:
        assert e["uid"] == 0 and e["pid"] not in (None, agent.proc.pid, os.getpid())
        assert e["source"] == "api"
    log = agent.log_path.read_text()
    on_stderr = [json.loads(line.split("stockade.changes: ", 1)[1]) for line in log.splitlines()
                 if "stockade.changes: " in line]
    assert on_stderr == got
    assert "HTTP Request" not in log
