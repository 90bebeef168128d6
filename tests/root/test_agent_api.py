"""The API contract against a live agent (schemathesis), and the CLI end to end."""
import json

import pytest

from agentproc import AgentProcess
from api_contract import run_schemathesis
from netns import Topology

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def agent():
    with AgentProcess() as a:
        yield a


def test_schemathesis_finds_no_5xx_and_no_contract_violation(agent):
    sent = run_schemathesis(agent.socket, max_examples=10)
    assert sent > 50
    assert agent.client.health()["status"] in ("ok", "degraded")


POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: "5432", protocol: TCP}]}]}]
"""


def test_cli_end_to_end(agent, tmp_path):
    agent.client.delete_all_policies()
    pol = tmp_path / "db.yaml"
    pol.write_text(POLICY)
    with Topology("c") as topo:
        w = topo.add_workload("a", ["10.213.22.1/24"])
        r = agent.cli("endpoint", "add", "--name", "cli-a", "--interface", w.host_if,
                      "--ip", w.ip4, "--labels", "app=db,tier=data")
        assert "cli-a" in r.stdout
        eps = json.loads(agent.cli("endpoint", "list", "-o", "json").stdout)
        assert any(e["name"] == "cli-a" and e["state"] == "ready" for e in eps)
        r = agent.cli("policy", "import", "--dry-run", str(pol))
        assert "db" in r.stdout and not agent.client.policies()
        r = json.loads(agent.cli("policy", "import", "-o", "json", str(pol)).stdout)
        assert r["changed"] and r["diff"]["added"] == ["db"]
        again = json.loads(agent.cli("policy", "import", "-o", "json", str(pol)).stdout)
        assert not again["changed"]
        got = json.loads(agent.cli("policy", "get", "-o", "json").stdout)
        assert [p["name"] for p in got] == ["db"]
        ids = json.loads(agent.cli("identity", "list", "-o", "json").stdout)
        assert any("static:app=db" in i["labels"] for i in ids)
        agent.cli("ipcache", "add", "10.213.99.0/24", "--labels", "app=web", "--host", "h2")
        ipc = json.loads(agent.cli("ipcache", "list", "-o", "json").stdout)
        assert any(e["prefix"] == "10.213.99.0/24" and e["host"] == "h2" for e in ipc)
        agent.cli("ipcache", "remove", "10.213.99.0/24")
        status = json.loads(agent.cli("status", "-o", "json", check=False).stdout)
        assert status["policies"] == 1 and status["endpoints"] == 1
        bad = tmp_path / "bad.yaml"
        bad.write_text(POLICY.replace('"5432"', '"http"'))
        r = agent.cli("policy", "import", str(bad), check=False)
        assert r.returncode == 1 and "spec.ingress[0].toPorts[0].ports[0].port" in r.stderr
        agent.cli("policy", "delete", "db")
        agent.cli("endpoint", "remove", "cli-a")
        assert json.loads(agent.cli("endpoint", "list", "-o", "json").stdout) == []
