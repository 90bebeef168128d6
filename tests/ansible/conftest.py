"""Fixtures for the Ansible side: the modules imported as Ansible would run them, and a
fake agent (tests/fake_agent.py) served by the real API server on a unix socket."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COLLECTION = ROOT / "ansible_collections" / "stockade" / "fleet"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# The modules import the collection's module_utils by its FQCN, as on a managed host.
_load("ansible_collections.stockade.fleet.plugins.module_utils.stockade",
      COLLECTION / "plugins" / "module_utils" / "stockade.py")


@pytest.fixture(scope="session")
def modules():
    return {name: _load(f"stockade_modules_{name}", COLLECTION / "plugins" / "modules" / f"{name}.py")
            for name in ("stockade_info", "stockade_endpoint", "stockade_ipcache",
                         "stockade_policy", "stockade_services")}


@pytest.fixture
def agent(tmp_path):
    from fake_agent import FakeAgent
    from stockade.daemon.server import APIServer
    fake = FakeAgent()
    with APIServer(fake, str(tmp_path / "agent.sock")) as server:
        fake.socket_path = server.socket_path
        yield fake


@pytest.fixture
def run(modules, capsys):
    """run(module_name, args, check=False, diff=False) -> the module's result dict."""
    from ansible.module_utils.testing import patch_module_args

    def _run(name, args, check=False, diff=False):
        args = dict(args, _ansible_check_mode=check, _ansible_diff=diff)
        with patch_module_args(args):
            with pytest.raises(SystemExit):
                modules[name].main()
        out = capsys.readouterr().out
        return json.loads(out)

    return _run
