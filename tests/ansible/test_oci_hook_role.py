"""The stockade_agent role's OCI hook tasks write a hooks.d file whose command, run as
Podman runs it, reaches the agent on the configured socket."""
import json
import subprocess
import sys
from pathlib import Path

from test_tooling import playbook

from fake_agent import FakeAgent
from stockade.daemon.server import APIServer

CID = "cd" * 32


def test_role_installs_the_oci_hook(tmp_path):
    hooks, sock = tmp_path / "hooks.d", str(tmp_path / "agent.sock")
    args = ("tests/ansible/playbooks/oci_hook.yml",
            "-e", f"stockade_agent_venv={Path(sys.executable).parent.parent}",
            "-e", f"stockade_agent_oci_hooks_dir={hooks}", "-e", f"stockade_agent_socket={sock}")
    r = playbook(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    spec = json.loads((hooks / "stockade.json").read_text())
    assert spec["stages"] == ["createRuntime"] and spec["when"] == {"always": True}
    hook = spec["hook"]
    assert hook["args"][1:3] == ["-I", "-S"] and hook["args"][-4:] == ["--socket", sock, "--timeout", "2"]
    assert Path(hook["args"][3]).name == "hook.py"
    with APIServer(FakeAgent(), sock):
        proc = subprocess.run([hook["path"], *hook["args"][1:]], capture_output=True, timeout=10,
                              input=json.dumps({"id": CID, "pid": 1, "status": "created"}).encode())
    assert proc.returncode == 0
    assert b"does not follow Podman" in proc.stderr   # the agent answered
    r = playbook(*args)
    assert r.returncode == 0 and "changed=0" in r.stdout, r.stdout[-2000:]
