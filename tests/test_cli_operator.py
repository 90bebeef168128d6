"""The CLI as an operator uses it: NotFound exits 1, get commands printing one object,
policy validate/import of a directory and of stdin, the global --socket, shell completion,
and an example in every command's --help. Against the API server and the fake agent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from fake_agent import FakeAgent
from stockade.cli.main import cli
from stockade.daemon.server import APIServer

pytestmark = pytest.mark.pure
ROOT = Path(__file__).resolve().parents[1]
POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: lb}}]
      toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
BAD = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\nspec: {endpointSelector: 3}\n"


@pytest.fixture
def sock(tmp_path):
    with APIServer(FakeAgent(), str(tmp_path / "agent.sock")) as s:
        runner = CliRunner(mix_stderr=False)
        assert runner.invoke(cli, ["endpoint", "add", "--socket", s.socket_path, "--name", "web1",
                                   "--interface", "veth1", "--ip", "10.0.0.5",
                                   "--labels", "app=web"]).exit_code == 0
        (tmp_path / "web.yaml").write_text(POLICY)
        assert runner.invoke(cli, ["policy", "import", "--socket", s.socket_path,
                                   str(tmp_path / "web.yaml")]).exit_code == 0
        yield s.socket_path


def run(*args, input=None):
    return CliRunner(mix_stderr=False).invoke(cli, list(args), input=input)


@pytest.mark.parametrize("args,message", [
    (["policy", "get", "no-such-policy"], "no policy named no-such-policy"),
    (["endpoint", "get", "nope"], "no endpoint named nope"),
    (["identity", "get", "999999"], "no identity 999999"),
    (["endpoint", "remove", "nope"], "no endpoint named nope"),
    (["policy", "delete", "nope"], "nope"),
])
def test_not_found_exits_1(sock, args, message):
    r = run(*args, "--socket", sock)
    assert r.exit_code == 1 and message in r.stderr, (r.stdout, r.stderr)


def test_get_prints_one_object(sock):
    ep = json.loads(run("endpoint", "get", "web1", "-o", "json", "--socket", sock).stdout)
    assert isinstance(ep, dict) and ep["name"] == "web1" and ep["ips"] == ["10.0.0.5"]
    assert yaml.safe_load(run("endpoint", "get", "web1", "-o", "yaml", "--socket", sock).stdout) == ep
    table = run("endpoint", "get", "web1", "--socket", sock).stdout
    assert "name:" in table and "web1" in table and "10.0.0.5" in table
    ident = json.loads(run("identity", "get", str(ep["identity"]), "-o", "json", "--socket", sock).stdout)
    assert ident["id"] == ep["identity"] and "web1" in ident["endpoints"]
    assert yaml.safe_load(run("identity", "get", "2", "-o", "yaml", "--socket", sock).stdout)["kind"] == "reserved"
    pol = json.loads(run("policy", "get", "web", "-o", "json", "--socket", sock).stdout)
    assert isinstance(pol, dict) and pol["name"] == "web"
    docs = list(yaml.safe_load_all(run("policy", "get", "web", "-o", "yaml", "--socket", sock).stdout))
    assert [d["metadata"]["name"] for d in docs] == ["web"]
    assert isinstance(json.loads(run("policy", "get", "-o", "json", "--socket", sock).stdout), list)


NOTE = "Load balancers reach\n  the web tier on 80."


def test_get_shows_the_top_level_description(sock, tmp_path):
    """A top-level ``description`` is kept with the policy: a column in the table (on one
    line, shortened past 60 characters), the whole text in -o json; none shows '-' and ''."""
    (tmp_path / "described.yaml").write_text((ROOT / "tests" / "policies" / "valid" / "description.yaml").read_text())
    (tmp_path / "note.yaml").write_text(POLICY.replace("name: web}", "name: note}", 1).replace(
        "kind: CiliumNetworkPolicy\n", "kind: CiliumNetworkPolicy\ndescription: " + json.dumps(NOTE) + "\n", 1))
    r = run("policy", "import", "--socket", sock, str(tmp_path / "described.yaml"), str(tmp_path / "note.yaml"))
    assert r.exit_code == 0, (r.stdout, r.stderr)

    by_name = {p["name"]: p for p in json.loads(run("policy", "get", "-o", "json", "--socket", sock).stdout)}
    assert by_name["rule1"]["description"] == "L3-L4 policy to restrict deathstar access to empire ships only"
    assert by_name["note"]["description"] == NOTE
    assert by_name["web"]["description"] == ""
    one = json.loads(run("policy", "get", "rule1", "-o", "json", "--socket", sock).stdout)
    assert one["description"] == by_name["rule1"]["description"]

    header, *rows = run("policy", "get", "--socket", sock).stdout.splitlines()
    assert header.split() == ["KIND", "NAMESPACE", "NAME", "RULES", "SOURCE", "DESCRIPTION"]
    column = header.index("DESCRIPTION")
    described = {row.split()[2]: row[column:] for row in rows}
    assert described == {
        "note": "Load balancers reach the web tier on 80.",
        "rule1": "L3-L4 policy to restrict deathstar access to empire ships o…",
        "web": "-"}


def test_global_socket_and_env(sock, monkeypatch):
    assert run("--socket", sock, "endpoint", "get", "web1").exit_code == 0
    monkeypatch.setenv("STOCKADE_SOCKET", sock)
    assert run("endpoint", "list").exit_code == 0
    # the command's own --socket wins over the global one and the environment
    r = run("--socket", sock, "endpoint", "list", "--socket", "/nonexistent/agent.sock")
    assert r.exit_code == 1 and "/nonexistent/agent.sock" in r.stderr


def test_validate_directory_and_stdin(tmp_path):
    d = tmp_path / "policies"
    (d / "sub").mkdir(parents=True)
    (d / "web.yaml").write_text(POLICY)
    (d / "sub" / "db.yml").write_text(POLICY.replace("name: web", "name: db"))
    (d / "notes.txt").write_text("not a policy")
    r = run("policy", "validate", str(d))
    assert r.exit_code == 0 and "2 policies in 2 files are valid" in r.stdout, r.stdout + r.stderr
    r = run("policy", "validate", "-", input=POLICY)
    assert r.exit_code == 0 and "1 policies in 1 files are valid" in r.stdout and "<stdin>" in r.stdout
    r = run("policy", "validate", "-", input=BAD)
    assert r.exit_code == 1 and "<stdin>: document 0 (bad): spec.endpointSelector" in r.stderr, r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("policy", "validate", str(empty))
    assert r.exit_code == 2 and "no .yaml, .yml or .json files" in r.stderr
    r = run("policy", "test", str(ROOT / "inventories/demo/policy_tests.yaml"),
            str(ROOT / "inventories/demo/policies"))
    assert r.exit_code == 0, r.stdout + r.stderr


def test_import_directory_and_stdin(sock, tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "db.yaml").write_text(POLICY.replace("name: web", "name: db"))
    r = run("policy", "import", "--dry-run", "-o", "json", str(d), "--socket", sock)
    assert r.exit_code == 0 and json.loads(r.stdout)["diff"]["added"] == ["db"]
    r = run("policy", "import", "--dry-run", "-o", "json", "-", "--socket", sock,
            input=POLICY.replace("name: web", "name: api"))
    assert r.exit_code == 0 and json.loads(r.stdout)["diff"]["added"] == ["api"]


def test_shell_completion():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}/agent", "_STOCKADE_COMPLETE": "bash_source"}
    cmd = [sys.executable, "-c", "from stockade.cli.main import main; main()"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "_stockade_completion()" in r.stdout
    env.update(_STOCKADE_COMPLETE="bash_complete", COMP_WORDS="stockade pol", COMP_CWORD="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert "plain,policy" in r.stdout.splitlines()
    env.update(COMP_WORDS="stockade observe --to-", COMP_CWORD="2")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert "plain,--to-endpoint" in r.stdout.splitlines()
    assert "_STOCKADE_COMPLETE" in (ROOT / "docs/cli.md").read_text()


def _commands(group: click.Group, path=()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):   # the CLI's groups import their commands lazily
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))


@pytest.mark.parametrize("path", [p for p, c in _commands(cli) if not isinstance(c, click.Group)],
                         ids=lambda p: " ".join(p))
def test_every_command_has_examples(path):
    r = CliRunner().invoke(cli, [*path, "--help"], terminal_width=200)
    assert r.exit_code == 0
    body = r.output.split("Example", 1)
    assert len(body) == 2, f"stockade {' '.join(path)} --help has no examples"
    assert f"stockade {' '.join(path)}" in body[1]
