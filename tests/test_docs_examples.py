"""Docs cannot drift: every command example in README.md and docs/*.md runs, from the
checkout, against a live agent where it needs one (the real agent in-process over a
recording datapath, served on a unix socket as STOCKADE_SOCKET), and exits as documented.

An example is a line of a fenced code block (or a 4-space indented block) that starts
with ``stockade``, ``$ stockade``, ``curl`` or ``cd``. Markers in HTML comments, on the
lines just above the block:

    <!-- docs-test: skip: REASON -->                 the whole block is not run
    <!-- docs-test: skip-line PREFIX: REASON -->      lines starting with PREFIX are not run
    <!-- docs-test: exit N -->                       the block's commands exit N (default 0)
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from inprocess_agent import inprocess_agent
from stockade.daemon.server import APIServer

pytestmark = pytest.mark.pure
ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*docs-test:\s*(skip-line|skip|exit)\s*(.*?)\s*-->")
COMMAND = re.compile(r"^(\$ )?(stockade|curl|cd) ")


def _markers(lines, i) -> list[tuple[str, str]]:
    """Markers on the comment lines just above line ``i`` (one blank line may separate)."""
    out, j = [], i - 1
    if j >= 0 and not lines[j].strip():
        j -= 1
    while j >= 0 and MARKER.search(lines[j]):
        out += MARKER.findall(lines[j])
        j -= 1
    return out


def examples():
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            fenced = line.startswith("```")
            indented = line.startswith("    ") and (i == 0 or not lines[i - 1].strip()) and \
                COMMAND.match(line[4:].strip())
            if not (fenced or indented):
                i += 1
                continue
            start = i
            body: list[tuple[int, str]] = []
            if fenced:
                i += 1
                while i < len(lines) and not lines[i].startswith("```"):
                    body.append((i, lines[i]))
                    i += 1
            else:
                while i < len(lines) and lines[i].startswith("    "):
                    body.append((i, lines[i][4:]))
                    i += 1
            i += 1
            marks = _markers(lines, start)
            commands = []
            for n, text in body:
                text = text.strip()
                if not COMMAND.match(text):
                    continue
                if text.startswith("$ "):
                    text = text[2:]
                while text.endswith("\\") and n + 1 < len(lines):
                    n += 1
                    text = text[:-1] + " " + lines[n].strip()
                commands.append((n + 1, text))
            if not commands:
                continue
            skip = next((why for kind, why in marks if kind == "skip"), None)
            code = int(next((v for kind, v in marks if kind == "exit"), "0"))
            line_skips = [why.split(":", 1) for kind, why in marks if kind == "skip-line"]
            for n, text in commands:
                reason = skip
                for prefix, why in line_skips:
                    if text.startswith(prefix.strip()):
                        reason = why.strip()
                yield pytest.param(text, code, reason, id=f"{doc.name}:{n}")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    api = inprocess_agent(str(tmp_path_factory.mktemp("state")))
    with APIServer(api, str(tmp_path_factory.mktemp("agent") / "agent.sock")) as server:
        yield server.socket_path
    api.agent.stop()


EXAMPLES = list(examples())
RUN = [p for p in EXAMPLES if not p.values[2]]


def test_examples_found_and_every_one_not_run_says_why():
    assert len(RUN) >= 15, [p.id for p in RUN]
    for p in EXAMPLES:
        if p.values[2]:
            assert len(p.values[2].strip(" :")) > 10, f"{p.id}: {p.values[0]}"


@pytest.mark.parametrize("command,code,skip", RUN)
def test_documented_example_runs(command, code, skip, live, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "STOCKADE_SOCKET": live, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYTHONPATH": f"{ROOT}/agent:{ROOT}/webui"}
    before = set(ROOT.iterdir())
    try:
        r = subprocess.run(["bash", "-o", "pipefail", "-c", command.split(" #")[0]], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    finally:
        for made in set(ROOT.iterdir()) - before:   # e.g. `... > db.yaml`: the checkout stays clean
            if made.is_file():
                made.unlink()
    assert r.returncode == code, f"{command}\nexit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


def test_markers_give_reasons():
    for doc in DOCS:
        for kind, rest in MARKER.findall(doc.read_text()):
            if kind == "skip":
                assert rest.startswith(":") and len(rest) > 5, f"{doc.name}: skip without a reason"
            if kind == "skip-line":
                assert ":" in rest and len(rest.split(":", 1)[1].strip()) > 3, f"{doc.name}: {rest}"
