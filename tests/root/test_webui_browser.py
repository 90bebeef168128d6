"""The web UI in a real browser (Playwright + Debian's chromium) against `stockade webui`
under waitress and a real agent with real endpoints and real traffic, deployed as the
role deploys it: the UI started as root with ``--user``, so it reads its token and then
runs as an unprivileged user whose only access to the agent is the socket group. Its
Review page shows the agent's own plan (a read-only request a group member may make).

Screenshots go to tests/artifacts/webui/ (kept after the run, gitignored).
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import webuiproc
from agentproc import AgentProcess
from netns import Topology
from policydocs import ingress_policy
from traffic import eventually, tcp_ok

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts" / "webui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

LIVE = "---\n".join([ingress_policy("db", "db", "web", 5432),
                      ingress_policy("cache", "cache", "web", 6379),
                      ingress_policy("api", "api", "web", 8080, deny_port=22)])

# The proposal moves db behind api: web -> db:5432 would be blocked, api -> db allowed.
PROPOSED = ingress_policy("db", "db", "api", 5432)

WEB_TO_DB = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui_user():
    with webuiproc.ui_user() as user:
        yield user


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Four namespaced workloads as agent endpoints (cache in audit mode), live policy,
    real connections."""
    with Topology("ui") as topo:
        ws = {name: topo.add_workload(name, [f"10.213.71.{i}/24"])
              for i, name in enumerate(("web", "db", "api", "cache"), start=1)}
        agent = AgentProcess()
        import os
        os.chmod(agent.run_dir, 0o711)  # the UI reaches the socket; the socket's mode decides
        with agent:
            c = agent.client
            for name, w in ws.items():
                c.add_endpoint(name=f"{name}1", interface=w.host_if, ips=[w.ip4],
                               labels={"app": name, "tier": "front" if name == "web" else "back"},
                               audit=name == "cache")
            assert eventually(lambda: all(e["state"] == "ready" for e in c.endpoints()))
            c.put_policies([{"name": "live.yaml", "text": LIVE}])
            for _ in range(WEB_TO_DB):
                assert tcp_ok(ws["web"], ws["db"], ws["db"].ip4, 5432)
            assert not tcp_ok(ws["api"], ws["db"], ws["db"].ip4, 5432, timeout=0.3)
            assert eventually(lambda: len(c.flows(verdict="DROPPED")["flows"]) >= 1
                              and c.flows(to_port=5432, verdict="FORWARDED")["connections"] >= WEB_TO_DB)
            yield {"agent": agent, "workloads": ws}


@pytest.fixture(scope="module")
def server(world, ui_user, tmp_path_factory):
    d = tmp_path_factory.mktemp("webui")
    token_file = d / "webui.token"
    r = subprocess.run([sys.executable, "-m", "stockade.cli.main", "webui", "--init-token",
                        "--token-file", str(token_file)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    port = free_port()
    log = open(d / "webui.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "stockade.cli.main", "webui",
                             "--bind", f"127.0.0.1:{port}", "--token-file", str(token_file),
                             "--socket", f"host1={world['agent'].socket}",
                             "--user", ui_user.pw_name],
                            stdout=log, stderr=subprocess.STDOUT, cwd="/")
    try:
        def up():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                return proc.poll() is not None
        assert eventually(up, timeout=20) and proc.poll() is None, (d / "webui.log").read_text()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uid = next(l.split()[1:] for l in status.splitlines() if l.startswith("Uid:"))
        assert set(uid) == {str(ui_user.pw_uid)}, status  # not root: the deployed set-up
        yield {"url": f"http://127.0.0.1:{port}", "token": token_file.read_text().strip(), "dir": d}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900}, base_url=server["url"])
        errors: list[str] = []
        pg = ctx.new_page()
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.errors = errors
        try:
            yield pg
        finally:
            ctx.close()


def shot(page, name):
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_browser_login_matrix_review(page, server, world, tmp_path):
    # logged out: the login page
    page.goto("/")
    assert "/login" in page.url
    shot(page, "01-login")
    page.fill("#token", "wrong-token-wrong-token")
    page.click("button[type=submit]")
    assert page.locator(".banner.bad").inner_text() == "That token is not right."
    page.fill("#token", server["token"])
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/$"))
    assert "host1" in page.inner_text("main") and "Policy revision" in page.inner_text("main")
    shot(page, "02-overview")

    page.click("nav >> text=Endpoints")
    page.fill("input[type=search]", "10.213.71.2")          # filters as you type
    assert page.locator("#endpoints tbody tr:visible").count() == 1
    page.fill("input[type=search]", "")
    shot(page, "03-endpoints")

    page.click("nav >> text=Policies")
    assert "endpoints {app=web}" in page.inner_text("main")
    shot(page, "04-policies")

    # the matrix: web -> db allows 5432, web -> api allows 8080 and denies 22
    page.click("nav >> text=Matrix")
    ids = {e["labels"]["static:app"]: e["identity"] for e in world["agent"].client.endpoints()}
    cell = page.locator(f'td.cell[data-src="{ids["web"]}"][data-dst="{ids["db"]}"]')
    assert "5432/tcp" in cell.inner_text() and "allow" in cell.get_attribute("class")
    deny_cell = page.locator(f'td.cell[data-src="{ids["web"]}"][data-dst="{ids["api"]}"]')
    assert "8080/tcp" in deny_cell.inner_text() and "✕ 22/tcp" in deny_cell.inner_text()
    closed = page.locator(f'td.cell[data-src="{ids["api"]}"][data-dst="{ids["db"]}"]')
    assert "deny" in closed.get_attribute("class")
    audited = page.locator(f'td.cell[data-src="{ids["api"]}"][data-dst="{ids["cache"]}"]')
    assert "audit" in audited.get_attribute("class")           # cache is in audit mode
    shot(page, "05-matrix")
    page.fill("input[name=label]", "tier=back")
    page.click("form.filters button")
    assert page.locator("table.matrix thead th.col").count() == 3
    shot(page, "06-matrix-filtered")

    # review: upload the proposal, see the diff and the connections it would change
    proposed = tmp_path / "db.yaml"
    proposed.write_text(PROPOSED)
    page.click("nav >> text=Review")
    page.set_input_files("#files", str(proposed))
    page.click("button.primary")
    page.wait_for_selector("#review-flows")
    assert "review failed" not in page.inner_text("main")  # the agent answered a non-root UI
    flows_text = page.inner_text("#review-flows")
    m = re.search(r"would block (\d+) connections seen in the last hour from app=web,tier=front "
                  r"to app=db,tier=back:5432", flows_text)
    assert m and int(m.group(1)) >= WEB_TO_DB, flows_text
    assert re.search(r"would allow \d+ connections? seen in the last hour from app=api,tier=back "
                     r"to app=db,tier=back:5432", flows_text), flows_text
    assert "~ db" in page.inner_text("#review-summary")
    pairs = page.inner_text("#review-pairs")
    assert "app=web,tier=front" in pairs and "5432/tcp" in pairs
    rules = page.inner_text("#review-rules")
    assert "+" in rules and "−" in rules
    shot(page, "07-review")
    # nothing was applied
    live = {p["name"]: p for p in world["agent"].client.policies()}
    assert live["db"]["document"]["spec"]["ingress"][0]["fromEndpoints"] == [{"matchLabels": {"app": "web"}}]

    # an invalid proposal shows file, document and field
    bad = tmp_path / "bad.yaml"
    bad.write_text(PROPOSED.replace('"5432"', '"postgres-port"'))
    page.set_input_files("#files", str(bad))
    page.click("button.primary")
    page.wait_for_selector("#review-errors")
    err = page.inner_text("#review-errors")
    assert "bad.yaml" in err and "0 (db)" in err and "spec.ingress[0].toPorts[0].ports[0].port" in err
    shot(page, "08-review-invalid")

    # flows: live table, auto-refreshed, verdict colours
    page.click("nav >> text=Flows")
    assert page.locator("#flow-rows tr.verdict-forwarded").count() >= 1
    assert page.locator("#flow-rows tr.verdict-dropped").count() >= 1
    ws = world["workloads"]
    tcp_ok(ws["web"], ws["db"], ws["db"].ip4, 5432)            # a new connection shows up
    page.locator("#flow-rows tr.fresh").first.wait_for(timeout=8000)    # no eval: the CSP forbids it
    shot(page, "09-flows")
    page.select_option("select[name=verdict]", "DROPPED")
    page.click("#flow-filters button")
    assert page.locator("#flow-rows tr.verdict-forwarded").count() == 0
    assert page.locator("#flow-rows tr.verdict-dropped").count() >= 1

    page.click("nav >> text=Service map")
    assert page.locator("svg#servicemap g.edge.fwd").count() >= 1
    assert page.locator("svg#servicemap g.edge.drop").count() >= 1
    shot(page, "10-service-map")
    assert not [e for e in page.errors if "Content Security Policy" in e], page.errors


def test_user_option_drops_root_to_the_user_and_the_stockade_group():
    import grp
    code = ("import os; from stockade.cli.webui_cmd import drop_privileges; "
            "drop_privileges('nobody'); print(os.getuid(), os.geteuid(), sorted(os.getgroups()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    uid, euid, groups = r.stdout.split(" ", 2)
    import pwd
    assert int(uid) == int(euid) == pwd.getpwnam("nobody").pw_uid
    try:
        assert str(grp.getgrnam("stockade").gr_gid) in groups
    except KeyError:
        pytest.fail("no stockade group: scripts/setup.sh creates it")
