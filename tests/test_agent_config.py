"""Typed agent configuration: agent.schema.json enforced by the loader, `stockade agent
--check-config`, the agent's start (exit 78) and the role's validate step; every key is a
flag and documented."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from stockade.cli import agent_daemon
from stockade.cli.main import cli
from stockade.daemon.config import AgentConfig, ConfigError, _build, check, load, schema

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.pure


@pytest.mark.parametrize("text,key,expected,given", [
    ('audit: "no"\n', "audit", "expected a boolean", 'got "no" (a string)'),
    ("flow_buffer_size: abc\n", "flow_buffer_size", "expected an integer", 'got "abc" (a string)'),
    ("managed_bridges: podman0\n", "managed_bridges", "expected a list", 'got "podman0" (a string)'),
    ("managed_interfaces: [tap*, 3]\n", "managed_interfaces[1]", "expected a string", "got 3 (an integer)"),
    ("enforcement: sometimes\n", "enforcement", 'expected one of "default", "always", "never"',
     'got "sometimes"'),
    ("flow_buffer_size: 0\n", "flow_buffer_size", "expected a number >= 1", "got 0 (an integer)"),
    ("ct_gc_interval: -1.5\n", "ct_gc_interval", "expected a number > 0", "got -1.5 (a number)"),
    ("podman_start_service: 1\n", "podman_start_service", "expected a boolean", "got 1 (an integer)"),
    ("socket: ''\n", "socket", "expected a non-empty string", 'got "" (a string)'),
], ids=["audit-string", "int-string", "list-string", "list-item", "enum", "minimum",
        "exclusive-minimum", "bool-int", "empty-string"])
def test_check_config_names_key_expected_and_given(tmp_path, text, key, expected, given):
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "stockade.cli.main", "agent", "--check-config", str(path)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": f"{ROOT}/agent"})
    assert r.returncode == 78, r.stderr
    assert "Traceback" not in r.stderr
    assert f"{path}: {key}: {expected}" in r.stderr and given in r.stderr, r.stderr


def test_unknown_key_suggests_the_close_one(tmp_path):
    (tmp_path / "a.yaml").write_text("flow_bufer_size: 10\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'flow_bufer_size' \(did you mean 'flow_buffer_size'\?\)"):
        load(str(tmp_path / "a.yaml"), {})


def test_every_problem_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("audit: 'yes'\nflow_buffer_size: x\nlog_level: loud\n")
    with pytest.raises(ConfigError) as err:
        load(str(tmp_path / "a.yaml"), {})
    assert [line.split(": ")[1] for line in str(err.value).splitlines()] == [
        "audit", "flow_buffer_size", "log_level"]


def test_yaml_booleans_and_valid_file_pass(tmp_path):
    (tmp_path / "a.yaml").write_text("audit: no\nmanaged_bridges: [br0]\npodman_socket: null\n"
                                     "flow_buffer_size: 10\nct_gc_interval: 5\n")
    cfg = load(str(tmp_path / "a.yaml"), {})
    assert (cfg.audit, cfg.managed_bridges, cfg.podman_socket, cfg.flow_buffer_size) == (
        False, ["br0"], None, 10)
    r = CliRunner().invoke(cli, ["agent", "--check-config", str(tmp_path / "a.yaml")])
    assert r.exit_code == 0 and "ok" in r.output


def test_defaults_match_the_schema():
    AgentConfig().validate()
    assert {f.name for f in fields(AgentConfig)} == set(schema()["properties"])


def test_agent_refuses_to_start_with_78(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_daemon, "run", lambda cfg: pytest.fail("started"))
    (tmp_path / "a.yaml").write_text('audit: "no"\n')
    r = CliRunner().invoke(cli, ["agent", "--config", str(tmp_path / "a.yaml")])
    assert r.exit_code == 78 and "cannot start" in r.output and "audit: expected a boolean" in r.output
    r = CliRunner().invoke(cli, ["agent", "--config", str(tmp_path / "none.yaml")])
    assert r.exit_code == 78 and "no such config file" in r.output


def _started_with(monkeypatch, args, config_text=None, tmp_path=None):
    seen = []
    monkeypatch.setattr(agent_daemon, "run", lambda cfg: seen.append(cfg) or 0)
    monkeypatch.setenv("STOCKADE_SHARED_NAMESPACE", "1")  # run() never starts: no lock needed
    if config_text is not None:
        (tmp_path / "a.yaml").write_text(config_text)
        args = ["--config", str(tmp_path / "a.yaml"), *args]
    r = CliRunner().invoke(cli, ["agent", *args])
    assert r.exit_code == 0, r.output
    return seen[0]


def test_list_flags_and_off_values(monkeypatch, tmp_path):
    cfg = _started_with(monkeypatch, ["--managed-bridges", "br0,br1", "--managed-bridges", "lab*",
                                      "--managed-interfaces", "", "--podman-socket", "",
                                      "--no-audit", "--flow-buffer-size", "7"],
                        "audit: true\nmanaged_interfaces: [tap*]\nflow_buffer_size: 9\n", tmp_path)
    assert cfg.managed_bridges == ["br0", "br1", "lab*"]
    assert cfg.managed_interfaces == [] and cfg.podman_socket is None
    assert cfg.audit is False and cfg.flow_buffer_size == 7


def test_flag_values_are_checked_too(monkeypatch):
    monkeypatch.setattr(agent_daemon, "run", lambda cfg: pytest.fail("started"))
    r = CliRunner().invoke(cli, ["agent", "--flow-buffer-size", "0", "--config", "/nonexistent/agent.yaml"])
    assert r.exit_code == 78 and "no such config file" in r.output
    r = CliRunner().invoke(cli, ["agent", "--flow-buffer-size", "0"])
    assert r.exit_code == 78 and "flags: --flow-buffer-size: expected a number >= 1, got 0" in r.output
    r = CliRunner().invoke(cli, ["agent", "--flow-buffer-size", "abc"])
    assert r.exit_code == 2 and "'abc' is not a valid integer" in r.output


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _keys(props: dict, prefix: str = ""):
    for key, prop in props.items():
        if prop.get("type") == "object" and "properties" in prop:
            yield from _keys(prop["properties"], f"{prefix}{key}_")
        else:
            yield prefix + key


def test_every_key_is_a_flag_with_help_and_documented():
    help_text = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["agent", "--help"], terminal_width=200).output
    docs = (ROOT / "docs/agent.md").read_text()
    table = set(re.findall(r"`([a-z0-9_.]+)`", "\n".join(l for l in docs.splitlines() if l.startswith("| `"))))
    for key, prop in schema()["properties"].items():
        assert prop.get("description"), key
    for key in _keys(schema()["properties"]):
        assert _flag(key) in help_text, key
    for key in schema()["properties"]:
        assert key in table or any(k.startswith(key + ".") for k in table), f"{key} not in docs/agent.md"


def test_schema_is_packaged():
    py = (ROOT / "pyproject.toml").read_text()
    assert "agent.schema.json" in py
    json.loads((ROOT / "agent/stockade/daemon/agent.schema.json").read_text())


@pytest.mark.parametrize("settings,error", [
    ({"audit": "no"}, 'audit: expected a boolean (true or false), got "no" (a string)'),
    ({"managed_bridges": "podman0"}, 'managed_bridges: expected a list, got "podman0" (a string)'),
    ({}, None),
], ids=["audit-string", "list-string", "good"])
def test_role_validate_step_refuses_a_bad_agent_yaml(tmp_path, settings, error):
    """The role's own task (template agent.yaml.j2 with its validate command), verbatim from
    tasks/present.yml, run by ansible-playbook on localhost with this checkout's stockade."""
    role = ROOT / "ansible_collections/stockade/fleet/roles/stockade_agent"
    (task,) = [t for t in yaml.safe_load((role / "tasks/present.yml").read_text())
               if t.get("ansible.builtin.template", {}).get("src") == "agent.yaml.j2"]
    (tmp_path / "templates").symlink_to(role / "templates")
    dest = tmp_path / "etc" / "agent.yaml"
    dest.parent.mkdir()
    bin_dir = Path(sys.executable).parent
    play = [{"hosts": "localhost", "connection": "local", "gather_facts": False,
             "vars_files": [str(role / "defaults/main.yml")],
             "tasks": [task],
             "handlers": [{"name": task["notify"], "ansible.builtin.debug": {"msg": "restart"}}]}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    (tmp_path / "vars.json").write_text(json.dumps({   # extra vars: over the role's defaults
        "ansible_python_interpreter": sys.executable, "stockade_agent_venv": str(bin_dir.parent),
        "stockade_agent_config_file": str(dest), "stockade_agent_settings": settings}))
    (tmp_path / "ansible.cfg").write_text("[defaults]\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}/agent", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
           "ANSIBLE_REMOTE_TEMP": str(tmp_path / "tmp"),
           "ANSIBLE_CONFIG": str(tmp_path / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    r = subprocess.run([str(bin_dir / "ansible-playbook"), "-i", "localhost,", "-e", "@vars.json", "play.yml"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    if error is None:
        assert r.returncode == 0, r.stdout[-3000:]
        assert yaml.safe_load(dest.read_text())["host_name"] == "localhost"
    else:
        assert r.returncode == 2 and "failed to validate" in r.stdout and '"exit_status": 78' in r.stdout, \
            r.stdout[-3000:]
        assert json.dumps(error)[1:-1] in r.stdout and "Traceback" not in r.stdout, r.stdout[-3000:]
        assert not dest.exists()


# A block (the fleet's `etcd:` is one): a dataclass field with a dataclass default and an
# object property in the schema; flags --BLOCK-KEY.
@dataclass
class _Block:
    endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:2379"])
    timeout: float = 2.0


@dataclass
class _Settings:
    name: str = "x"
    etcd: _Block = field(default_factory=_Block)


_PROPS = {"name": {"type": "string", "description": "A name."},
          "etcd": {"type": "object", "additionalProperties": False, "description": "A block.",
                   "properties": {"endpoints": {"type": "array", "items": {"type": "string"},
                                                "description": "Endpoints."},
                                  "timeout": {"type": "number", "exclusiveMinimum": 0,
                                              "description": "Seconds."}}}}


def test_blocks_get_flags_and_keep_their_defaults():
    seen = []

    @click.command()
    def cmd(**flags):
        seen.append(agent_daemon._flag_overrides(flags, _PROPS))
    for option in reversed(agent_daemon._setting_options(_PROPS, _Settings())):
        cmd = option(cmd)
    r = CliRunner().invoke(cmd, ["--help"])
    assert "--etcd-endpoints" in r.output and "--etcd-timeout" in r.output
    assert "http://127.0.0.1:2379" in r.output
    r = CliRunner().invoke(cmd, ["--etcd-timeout", "5"])
    assert r.exit_code == 0, r.output
    assert seen[-1] == {"etcd": {"timeout": 5.0}}
    built = _build(_Settings, {"etcd": {"timeout": 5.0}})
    assert built.etcd == _Block(timeout=5.0)
    assert _build(_Settings, {}).etcd == _Block()


def test_block_errors_name_the_nested_key(monkeypatch):
    import stockade.daemon.config as config
    monkeypatch.setattr(config, "schema", lambda: {"type": "object", "additionalProperties": False,
                                                   "properties": _PROPS})
    with pytest.raises(ConfigError, match=r"f: etcd.timeout: expected a number > 0, got 0"):
        config.check({"etcd": {"timeout": 0}}, "f")
    with pytest.raises(ConfigError, match=r"unknown setting 'etcd.endpoint'"):
        config.check({"etcd": {"endpoint": []}}, "f")
    with pytest.raises(ConfigError, match=r"--etcd-timeout: expected"):
        config.check({"etcd": {"timeout": 0}}, "flags", flags=True)
    assert check is not None


def test_the_l7_directory_is_beside_the_socket_unless_set():
    """A second agent (its own --socket) never writes or removes the first one's proxy
    files: two test agents shared /run/stockade/l7 and raced on its configuration."""
    from stockade.daemon.config import AgentConfig
    assert AgentConfig().l7_dir == "/run/stockade/l7"
    assert AgentConfig(socket="/tmp/debug/agent.sock").l7_dir == "/tmp/debug/l7"
    assert AgentConfig(socket="/tmp/debug/agent.sock", l7_run_dir="/srv/l7").l7_dir == "/srv/l7"
