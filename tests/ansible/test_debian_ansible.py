"""The collection with Debian 12's own ansible-core (2.14, /usr/bin/ansible-playbook, the
system Python), the oldest release it is tested with and so its requires_ansible: the
policy role (validate, services, policies, endpoints; idempotent; the empty-set guard),
stockade_ipcache ad hoc, and the agent role's install and unit paths. Everything else
runs with the ansible-core 2.19 pinned in pyproject.toml."""
import os
import shutil
import subprocess
import sys

import pytest
from test_tooling import BIN, ENV, GOOD, ROOT, inventory

DEBIAN = "/usr/bin/ansible-playbook"
# Debian's ansible-core, the system Python; the collection from this checkout (ansible.cfg)
DENV = {**ENV, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
CLI = ("-e", f"stockade_policy_cli={BIN}/stockade", "-e", f"stockade_policy_python={sys.executable}")


def debian(*args, tool=DEBIAN, timeout=300):
    assert os.path.exists(tool), f"{tool} is missing: make setup installs Debian's ansible-core"
    return subprocess.run([tool, *args], cwd=ROOT, env=DENV, capture_output=True, text=True, timeout=timeout)


def test_it_is_debians_2_14():
    r = debian("--version")
    assert r.returncode == 0 and "core 2.14." in r.stdout, r.stdout


def test_policy_role_with_ansible_2_14(agent, tmp_path):
    inv = inventory(tmp_path, agent.socket_path, GOOD)
    r = debian("-i", inv, "stockade.fleet.policy", "--diff", *CLI)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "changed=2" in r.stdout and [k[2] for k in agent.policies] == ["db"] and "vm1" in agent.endpoints
    assert "does not support Ansible version" not in r.stdout + r.stderr  # requires_ansible covers 2.14.18
    r = debian("-i", inv, "stockade.fleet.policy", *CLI)
    assert r.returncode == 0 and "changed=0" in r.stdout, r.stdout[-2000:]
    r = debian("-i", inv, "stockade.fleet.policy", *CLI, "-e", '{"stockade_policies": [], "stockade_policy_tests": []}')
    assert r.returncode != 0 and "replace_all with an empty set of policies" in r.stdout, r.stdout[-3000:]
    assert [k[2] for k in agent.policies] == ["db"]


def test_ipcache_module_with_ansible_2_14(agent):
    import json
    args = json.dumps({"entries": [{"prefix": "10.9.0.1", "labels": {"app": "x"}, "host": "h9"}],
                       "socket": agent.socket_path})
    r = debian("localhost", "-m", "stockade.fleet.stockade_ipcache", "-a", args, tool="/usr/bin/ansible")
    assert r.returncode == 0 and "CHANGED" in r.stdout, r.stdout + r.stderr
    r = debian("localhost", "-m", "stockade.fleet.stockade_ipcache", "-a", args, tool="/usr/bin/ansible")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_unit_renders_and_verifies_with_ansible_2_14(tmp_path):
    r = debian("tests/ansible/playbooks/unit.yml", "-e", f"stockade_agent_run_dir={tmp_path}",
               "-e", f"stockade_agent_venv={ROOT / '.venv'}")
    assert r.returncode == 0, r.stdout[-3000:]
    assert "RuntimeDirectory=stockade" in (tmp_path / "stockade-agent.service").read_text()


@pytest.mark.root
@pytest.mark.timeout(600)
def test_agent_role_installs_with_ansible_2_14(tmp_path):
    venv = tmp_path / "venv"
    args = ("tests/ansible/playbooks/install.yml", "-e", f"stockade_agent_venv={venv}",
            "-e", f"stockade_agent_project_dir={ROOT}", "-e", f"ansible_playbook_python={sys.executable}")
    r = debian(*args)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    v = subprocess.run([str(venv / "bin" / "stockade"), "--version"], capture_output=True, text=True, env=env)
    assert v.returncode == 0 and "0.1.0" in v.stdout, v.stderr
    r = debian(*args)
    assert r.returncode == 0 and "changed=0" in r.stdout, r.stdout[-2000:]
    shutil.rmtree(venv)
