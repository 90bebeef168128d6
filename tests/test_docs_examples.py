"""Docs cannot drift: every shell command in README.md's and docs/*.md's code blocks runs,
from the checkout, against a live agent where it needs one (the real agent in-process over
a recording datapath, served on a unix socket as STOCKADE_SOCKET, holding the objects the
docs name: tests/data/docs), and exits as documented; or a marker in the doc says why not.

Commands are, in a fenced block marked ``sh`` (``bash``, ``shell``, ``console``), every line
that is not blank or a ``#`` comment, with its ``\\`` continuation lines and here-document;
in any other block (fenced without a language, or indented by 4 spaces) the lines starting
with ``$ `` or, when there are none, the lines whose first word is a command (COMMANDS
below). ``json``, ``yaml`` and ``xml`` blocks hold no commands. Markers in HTML comments,
on the lines just above the block:

    <!-- docs-test: skip: REASON -->                 the whole block is not run
    <!-- docs-test: skip-line PREFIX: REASON -->      lines starting with PREFIX are not run
    <!-- docs-test: exit N -->                       the block's commands exit N (default 0)
    <!-- docs-test: cwd DIR -->                      run in DIR (of the checkout; `tmp`: an
                                                     empty directory), not the checkout
    <!-- docs-test: socket -->                       the live agent's socket stands for
                                                     /run/stockade/agent.sock
    <!-- docs-test: webui -->                        a web UI runs on the agent: its address
                                                     stands for 127.0.0.1:8470, its token is
                                                     $T, and each command prints JSON that is
                                                     not an error
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from inprocess_agent import inprocess_agent
from stockade.cli.main import cli
from stockade.daemon.flowsource import FlowSource
from stockade.daemon.server import APIServer
from webuiproc import WebUIProcess

pytestmark = pytest.mark.pure
ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FIXTURES = ROOT / "tests" / "data" / "docs"
MARKER = re.compile(r"<!--\s*docs-test:\s*(skip-line|skip|exit|cwd|socket|webui)\s*(.*?)\s*-->")
WEBUI_ADDRESS = "http://127.0.0.1:8470"
DEFAULT_SOCKET = "/run/stockade/agent.sock"
TOKEN = "docs-token-0123456789abcdef"
SHELL = {"sh", "bash", "shell", "console"}
NOT_SHELL = {"json", "yaml", "xml"}
# first words that make a line of a block without a language a command
COMMANDS = {
    "stockade", "curl", "cd", "make", "ansible", "ansible-playbook", "ansible-galaxy",
    "ansible-doc", "ansible-lint", "molecule", "python", "python3", "pip", "pip3", "eval",
    "export", "sudo", "jq", "cat", "printf", "echo", "rm", "mkdir", "cp", "mv", "ln", "ip",
    "tc", "bpftool", "git", "groupadd", "useradd", "chmod", "chown", "install", "tar", "wget",
    "ssh", "scp", "apt", "apt-get", "dnf", "yum", "bash", "sh", "env", "kill", "systemctl",
    "journalctl", "virsh", "podman", "docker", "promtool", "etcd", "etcdctl", "nft",
}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")


def _markers(lines, i) -> list[tuple[str, str]]:
    """Markers on the comment lines just above line ``i`` (one blank line may separate)."""
    out, j = [], i - 1
    if j >= 0 and not lines[j].strip():
        j -= 1
    while j >= 0 and MARKER.search(lines[j]):
        out += MARKER.findall(lines[j])
        j -= 1
    return out


def _is_command(text: str) -> bool:
    first = text.split(maxsplit=1)[0] if text.split() else ""
    return first in COMMANDS or bool(ASSIGNMENT.match(first))


def blocks(lines):
    """(line index of the block's start, language or None, [(line index, text)]) of each
    code block; language is "" for a fenced block without one and None for an indented one."""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            lang, start, body = line[3:].strip().lower(), i, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append((i, lines[i]))
                i += 1
            yield start, lang, body
        elif line.startswith("    ") and (i == 0 or not lines[i - 1].strip()) \
                and _is_command(line.strip().removeprefix("$ ")):
            start, body = i, []
            while i < len(lines) and lines[i].startswith("    "):
                body.append((i, lines[i][4:]))
                i += 1
            yield start, None, body
            continue
        i += 1


def commands(lang, body):
    """(1-based line number, command) of each command of a block (see the module's doc)."""
    if lang in NOT_SHELL:
        return
    texts = [t for _, t in body]
    prompted = lang not in SHELL and any(t.strip().startswith("$ ") for t in texts)
    k = 0
    while k < len(body):
        n, text = body[k]
        text = text.strip()
        k += 1
        if lang in SHELL:
            if not text or text.startswith("#"):
                continue
            text = text.removeprefix("$ ")
        elif prompted:
            if not text.startswith("$ "):
                continue
            text = text[2:]
        elif not _is_command(text):
            continue
        while text.endswith("\\") and k < len(body):
            text = text[:-1].rstrip() + " " + body[k][1].strip()
            k += 1
        heredoc = HEREDOC.search(text)
        if heredoc:
            here = []
            while k < len(body) and body[k][1].strip() != heredoc.group(1):
                here.append(body[k][1])
                k += 1
            k += 1
            text = "\n".join([text, *here, heredoc.group(1)])
        yield n + 1, text


def examples(docs=DOCS):
    for doc in docs:
        lines = doc.read_text().splitlines()
        for start, lang, body in blocks(lines):
            marks = _markers(lines, start)
            skip = next((why for kind, why in marks if kind == "skip"), None)
            code = int(next((v for kind, v in marks if kind == "exit"), "0"))
            cwd = next((v for kind, v in marks if kind == "cwd"), "")
            webui = any(kind == "webui" for kind, _ in marks)
            socket = any(kind == "socket" for kind, _ in marks)
            line_skips = [why.split(":", 1) for kind, why in marks if kind == "skip-line"]
            for n, text in commands(lang, body):
                reason = skip
                for prefix, why in line_skips:
                    if text.startswith(prefix.strip()):
                        reason = why.strip()
                yield pytest.param(text, code, reason, cwd, webui, socket, id=f"{doc.name}:{n}")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The agent, holding what the docs' examples name: endpoints web1, api1 and db1 (the
    first identity, 256, is web1's) and the policies of tests/data/docs/policies. Its flow
    source answers queries (an empty ring: the recording datapath has no events)."""
    api = inprocess_agent(str(tmp_path_factory.mktemp("state")))
    api.agent.flow_source = FlowSource(api.agent)
    try:
        with APIServer(api, str(tmp_path_factory.mktemp("agent") / "agent.sock")) as server:
            runner = CliRunner(mix_stderr=False)
            for i, (name, app) in enumerate((("web1", "web"), ("api1", "api"), ("db1", "db"))):
                r = runner.invoke(cli, ["--socket", server.socket_path, "endpoint", "add", "--name", name,
                                        "--interface", f"veth-{name}", "--ip", f"10.0.0.{5 + i}",
                                        "--labels", f"app={app}"])
                assert r.exit_code == 0, r.stderr
            r = runner.invoke(cli, ["--socket", server.socket_path, "policy", "import",
                                    str(FIXTURES / "policies")])
            assert r.exit_code == 0, r.stderr
            yield server.socket_path
    finally:
        api.agent.stop()


@pytest.fixture(scope="module")
def webui(live, tmp_path_factory):
    token = tmp_path_factory.mktemp("webui") / "webui.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    with WebUIProcess({"h1": live}, str(token)) as ui:
        yield ui.base


EXAMPLES = list(examples())
RUN = [p for p in EXAMPLES if not p.values[2]]


def test_examples_found_and_every_one_not_run_says_why():
    assert len(RUN) >= 30, [p.id for p in RUN]
    for p in EXAMPLES:
        if p.values[2]:
            assert len(p.values[2].strip(" :")) > 10, f"{p.id}: {p.values[0]}"


@pytest.mark.parametrize("command,code,skip,cwd,on_webui,on_socket", RUN)
def test_documented_example_runs(command, code, skip, cwd, on_webui, on_socket, live, tmp_path, request):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "STOCKADE_SOCKET": live, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYTHONPATH": f"{ROOT}/agent:{ROOT}/webui", "HOME": str(tmp_path),
           # ansible-doc and ansible-playbook find stockade.fleet in the checkout
           "ANSIBLE_COLLECTIONS_PATH": str(ROOT), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp")}
    if on_socket:
        command = command.replace(DEFAULT_SOCKET, live)
    if on_webui:
        command = command.replace(WEBUI_ADDRESS, request.getfixturevalue("webui"))
        env["T"] = TOKEN
    where = tmp_path / "cwd" if cwd == "tmp" else ROOT / cwd
    where.mkdir(exist_ok=True)
    before = set(ROOT.iterdir())
    try:
        r = subprocess.run(["bash", "-o", "pipefail", "-c", command.split(" #")[0]], cwd=where, env=env,
                           capture_output=True, text=True, timeout=60)
    finally:
        for made in set(ROOT.iterdir()) - before:   # e.g. `... > db.yaml`: the checkout stays clean
            if made.is_file():
                made.unlink()
    assert r.returncode == code, f"{command}\nexit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "[WARNING]" not in r.stderr, f"{command}\n{r.stderr[-2000:]}"   # ansible-doc of nothing exits 0
    if on_webui:   # curl -s exits 0 on any answer
        answer = json.loads(r.stdout)
        assert not (isinstance(answer, dict) and "error" in answer), f"{command}\n{r.stdout[-2000:]}"


def test_markers_give_reasons():
    for doc in DOCS:
        for kind, rest in MARKER.findall(doc.read_text()):
            if kind == "skip":
                assert rest.startswith(":") and len(rest) > 5, f"{doc.name}: skip without a reason"
            if kind == "skip-line":
                assert ":" in rest and len(rest.split(":", 1)[1].strip()) > 3, f"{doc.name}: {rest}"
            if kind == "cwd":
                assert rest == "tmp" or (ROOT / rest).is_dir(), f"{doc.name}: cwd {rest}"


def test_every_marker_applies_to_commands():
    """A marker sits above a block with commands, and a skip-line prefix matches one of
    them: a stale marker (its block rewritten or gone) fails here."""
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        used = set()
        for start, lang, body in blocks(lines):
            texts = [text for _, text in commands(lang, body)]
            j = start - 1 - (start > 0 and not lines[start - 1].strip())
            while j >= 0 and MARKER.search(lines[j]):
                if texts:
                    used.add(j)
                for kind, rest in MARKER.findall(lines[j]):
                    if kind == "skip-line":
                        prefix = rest.split(":", 1)[0].strip()
                        assert any(x.startswith(prefix) for x in texts), f"{doc.name}:{j + 1}: {prefix}"
                j -= 1
        stale = [n + 1 for n, line in enumerate(lines) if MARKER.search(line) and n not in used]
        assert not stale, f"{doc.name}: markers above no commands on lines {stale}"


def test_a_new_shell_line_is_run_or_marked(tmp_path):
    """A command added to a doc is collected (so it runs, or its marker says why not)."""
    doc = tmp_path / "new.md"
    doc.write_text("\n".join([
        "```sh", "# a comment", "ansible-playbook -i hosts.yml site.yml \\", "  --diff",
        "cat > ansible.cfg <<'CFG'", "[defaults]", "CFG", "", "```",
        "```", "$ make demo", "output, not a command", "```",
        "```", "systemctl status stockade-agent", "state directory /var/lib/stockade", "```",
        "```yaml", "stockade: not a command", "```",
        "<!-- docs-test: skip-line make: needs root and the set-up -->", "```sh", "make test", "```",
        "", "    eval \"$(_STOCKADE_COMPLETE=bash_source stockade)\"", "",
    ]))
    found = {p.values[0]: p.values[2] for p in examples([doc])}
    assert found == {
        "ansible-playbook -i hosts.yml site.yml --diff": None,
        "cat > ansible.cfg <<'CFG'\n[defaults]\nCFG": None,
        "make demo": None,
        "systemctl status stockade-agent": None,
        "make test": "needs root and the set-up",
        "eval \"$(_STOCKADE_COMPLETE=bash_source stockade)\"": None,
    }
