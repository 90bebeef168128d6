"""The web UI asks the agent and holds no policy logic: no module of it imports the
policy compiler or the daemon, neither when imported nor inside a function."""
from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

import stockade_webui

pytestmark = pytest.mark.pure

FORBIDDEN = ("stockade.daemon", "stockade.policy.compiler")
PACKAGE = pathlib.Path(stockade_webui.__file__).parent

PROBE = """
import importlib, json, pkgutil, sys
import stockade_webui
names = [m.name for m in pkgutil.walk_packages(stockade_webui.__path__, "stockade_webui.")]
for name in names:
    importlib.import_module(name)
stockade_webui.create_app({"TOKEN": "t" * 32, "AGENTS": ["/nonexistent/agent.sock"]})
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_importing_every_web_ui_module_loads_no_compiler_or_daemon():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout
    got = json.loads(out)
    assert len(got["modules"]) >= 10 and "stockade_webui.views" in got["modules"]
    assert [m for m in got["loaded"] if _forbidden(m)] == []


def test_no_web_ui_source_names_the_compiler_or_the_daemon():
    """Imports inside functions too (the subprocess test sees only what import runs)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {n}" for n in names if _forbidden(n)]
    assert found == []
