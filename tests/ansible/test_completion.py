"""The stockade_agent role's bash completion tasks write a script bash loads."""
import subprocess
import sys
from pathlib import Path

from test_tooling import ROOT, playbook


def test_role_installs_bash_completion(tmp_path):
    target = tmp_path / "bash_completion.d" / "stockade"
    target.parent.mkdir()
    args = ("tests/ansible/playbooks/completion.yml", "-e", f"stockade_agent_venv={Path(sys.executable).parent.parent}",
            "-e", f"stockade_agent_completion_file={target}")
    r = playbook(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "_stockade_completion()" in target.read_text()
    check = subprocess.run(["bash", "-c", f"source {target} && complete -p stockade"],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "_stockade_completion" in check.stdout, check.stderr
    r = playbook(*args)
    assert r.returncode == 0 and "changed=0" in r.stdout, r.stdout[-2000:]
    assert ROOT.exists()
