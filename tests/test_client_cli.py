"""The client and the agent CLI commands against the server and fake agent, over a socket."""
from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from fake_agent import FakeAgent
from stockade.cli.main import cli
from stockade.client import AgentUnreachable, APIError, Client, ClientError
from stockade.daemon.server import APIServer
from stockade.errors import PolicyErrors

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: lb}}]
      toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


@pytest.fixture
def sock(tmp_path):
    with APIServer(FakeAgent(), str(tmp_path / "agent.sock")) as s:
        yield s.socket_path


@pytest.fixture
def policy_file(tmp_path):
    p = tmp_path / "web.yaml"
    p.write_text(POLICY)
    return str(p)


def run(sock, *args):
    return CliRunner(mix_stderr=False).invoke(cli, [*args, "--socket", sock])


# ---------------------------------------------------------------- client

def test_client_round_trip(sock, policy_file):
    with Client(sock) as c:
        assert c.health()["status"] == "ok"
        ep = c.add_endpoint(name="web1", interface="veth1", ips=["10.0.0.5"], labels={"app": "web"})
        assert c.endpoints() == [ep]
        assert c.add_ipcache("10.2.0.0/16", {"app": "db"}, "h2")["prefix"] == "10.2.0.0/16"
        c.remove_ipcache("10.2.0.0/16")
        assert c.put_policies([policy_file], dry_run=True)["diff"]["added"] == ["shop/web"]
        assert c.put_policies([{"name": "w.yaml", "text": POLICY}])["changed"]
        assert c.delete_policy("web", namespace="shop", dry_run=True)["dry_run"]
        assert c.delete_all_policies()["diff"]["removed"] == ["shop/web"]
        c.remove_endpoint("web1")
        assert "stockade_policy_revision" in c.metrics()
        assert any(i["kind"] == "reserved" for i in c.identities())


def test_client_ipcache_entries_in_one_transaction(sock):
    entries = [{"prefix": f"10.3.{i // 250}.{i % 250 + 1}", "labels": {"app": f"p{i % 7}"},
                "host": "h2"} for i in range(600)]
    with Client(sock) as c:
        assert c.add_ipcache_entries(entries) == {"entries": 600, "changed": 600}
        got = {e["prefix"]: e for e in c.ipcache() if e["source"] == "remote"}
        assert set(got) == {f"{e['prefix']}/32" for e in entries}
        assert len({got[f"10.3.0.{k + 1}/32"]["identity"] for k in range(7)}) == 7
        assert c.add_ipcache_entries(entries[:5]) == {"entries": 5, "changed": 0}
        bad = [*entries[:3], {"prefix": "10.4.0.1", "labels": {"app": "x"}},
               {"prefix": "not-an-ip", "labels": {"app": "x"}}]
        with pytest.raises(APIError) as info:
            c.add_ipcache_entries(bad)
        assert info.value.status == 400 and info.value.field.startswith("entries[4]")
        assert not any(e["prefix"] == "10.4.0.1/32" for e in c.ipcache())   # all or nothing
        with pytest.raises(APIError):
            c._json("PATCH", "/v1/ipcache", json={"entries": "x"})


def test_client_api_error_carries_the_body(sock):
    with Client(sock) as c, pytest.raises(APIError) as info:
        c.put_policies([{"name": "x.yaml", "text": "kind: Nope"}])
    assert info.value.status == 400 and info.value.errors and "x.yaml" in str(info.value)
    assert isinstance(info.value, ClientError)


def test_client_unreachable(tmp_path):
    path = str(tmp_path / "none.sock")
    with Client(path) as c, pytest.raises(AgentUnreachable) as info:
        c.health()
    assert str(info.value).startswith(f"cannot reach the agent at {path}: ")
    assert isinstance(info.value.__cause__, FileNotFoundError)  # the socket is missing


def test_client_unreadable_policy_file(tmp_path):
    with Client(str(tmp_path / "s"), transport=httpx.MockTransport(lambda r: None)) as c:
        with pytest.raises(PolicyErrors, match="cannot read"):
            c.put_policies([str(tmp_path / "missing.yaml")])


def test_client_with_mock_transport_and_non_json_error():
    def handler(request):
        assert request.url.raw_path == b"/v1/ipcache/10.0.0.0%2F8"
        return httpx.Response(502, text="bad gateway")
    with Client(transport=httpx.MockTransport(handler)) as c, pytest.raises(APIError) as info:
        c.remove_ipcache("10.0.0.0/8")
    assert info.value.status == 502 and "bad gateway" in str(info.value)


# ---------------------------------------------------------------- CLI

def test_status_table_and_json(sock):
    r = run(sock, "status")
    assert r.exit_code == 0 and "status:" in r.output and "ok" in r.output
    r = run(sock, "status", "-o", "json")
    assert r.exit_code == 0 and json.loads(r.output)["status"] == "ok"


def test_endpoint_commands(sock):
    r = run(sock, "endpoint", "add", "--name", "web1", "--interface", "veth-web1",
            "--ip", "10.0.0.5,10.0.0.6", "--labels", "app=web,tier=front", "--audit")
    assert r.exit_code == 0, r.stderr
    r = run(sock, "endpoint", "list")
    lines = r.output.splitlines()
    assert lines[0].split()[:3] == ["NAME", "ID", "INTERFACE"]
    assert lines[1].split()[0] == "web1" and "10.0.0.5,10.0.0.6" in lines[1]
    assert lines[0].index("INTERFACE") == lines[1].index("veth-web1"), "columns align"
    r = run(sock, "endpoint", "list", "-o", "json")
    assert json.loads(r.output)[0]["labels"] == {"static:app": "web", "static:tier": "front"}
    assert run(sock, "endpoint", "remove", "web1").exit_code == 0
    r = run(sock, "endpoint", "remove", "web1")
    assert r.exit_code == 1 and "no endpoint named web1" in r.stderr


@pytest.mark.parametrize("args,code,text", [
    (["endpoint", "add", "--name", "a", "--interface", "b", "--ip", "x"], 1, "not an IP"),
    (["endpoint", "add", "--name", "a", "--interface", "b", "--ip", "10.0.0.1",
      "--labels", "novalue"], 1, "not key=value"),
    (["endpoint", "add", "--name", "a"], 2, "Missing option"),
    (["ipcache", "add", "10.0.0.0/8", "--labels", ""], 1, "at least one"),
    (["policy", "delete"], 2, "either NAME or --all"),
    (["policy", "delete", "web", "--all"], 2, "either NAME or --all"),
    (["policy", "delete", "nope"], 1, "no policy named"),
], ids=["bad-ip", "bad-labels", "missing-option", "empty-labels", "delete-nothing",
        "delete-both", "delete-unknown"])
def test_cli_refusals(sock, args, code, text):
    r = run(sock, *args)
    assert r.exit_code == code
    assert text in r.stderr


def test_identity_and_ipcache_commands(sock):
    r = run(sock, "ipcache", "add", "10.1.2.0/24", "--labels", "app=db", "--host", "h2")
    assert r.exit_code == 0 and "10.1.2.0/24 -> identity" in r.output
    r = run(sock, "ipcache", "list")
    assert r.output.splitlines()[0].split() == ["PREFIX", "IDENTITY", "SOURCE", "HOST", "LABELS"]
    assert "remote:app=db" in r.output
    assert json.loads(run(sock, "identity", "list", "-o", "json").output)[-1]["labels"] == [
        "remote:app=db"]
    assert "reserved:world" in run(sock, "identity", "list").output
    assert run(sock, "ipcache", "remove", "10.1.2.0/24").exit_code == 0
    assert json.loads(run(sock, "ipcache", "list", "-o", "json").output) == []


def test_policy_import_get_delete(sock, policy_file):
    r = run(sock, "policy", "import", "--dry-run", policy_file)
    assert r.exit_code == 0 and "dry run: would change" in r.output and "+ shop/web" in r.output
    assert "rules: +1 -0" in r.output
    r = run(sock, "policy", "import", "-o", "json", policy_file)
    assert json.loads(r.output)["changed"] is True
    r = run(sock, "policy", "get")
    assert r.output.split("\n")[1].split()[:4] == ["CiliumNetworkPolicy", "shop", "web", "1"]
    assert json.loads(run(sock, "policy", "get", "-o", "json").output)[0]["document"]["kind"]
    assert "endpointSelector" in run(sock, "policy", "get", "web", "-o", "yaml").output
    r = run(sock, "policy", "delete", "--all", "--dry-run")
    assert r.exit_code == 0 and "- shop/web" in r.output
    r = run(sock, "policy", "delete", "web", "--namespace", "shop")
    assert r.exit_code == 0 and "applied" in r.output
    assert json.loads(run(sock, "policy", "get", "-o", "json").output) == []


def test_policy_import_invalid_file_exits_1_with_every_error(sock, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace('port: "80"', 'port: "http2"'))
    r = run(sock, "policy", "import", str(bad))
    assert r.exit_code == 1 and "http2" in r.stderr and "bad.yaml" in r.stderr
    r = run(sock, "policy", "import", "-o", "json", str(bad))
    assert r.exit_code == 1 and json.loads(r.output)["error"]["errors"][0]["file"] == str(bad)


def test_connection_failure_is_exit_1_with_a_clear_message(tmp_path):
    path = str(tmp_path / "gone.sock")
    for args in (["status"], ["endpoint", "list"], ["policy", "get"]):
        r = run(path, *args)
        assert r.exit_code == 1
        assert f"cannot reach the agent at {path}" in r.stderr


def test_socket_from_environment(sock):
    r = CliRunner(mix_stderr=False).invoke(cli, ["status", "-o", "json"],
                                           env={"STOCKADE_SOCKET": sock})
    assert r.exit_code == 0 and json.loads(r.output)["status"] == "ok"
