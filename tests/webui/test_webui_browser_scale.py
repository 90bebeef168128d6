"""The web UI at scale in a real browser (Playwright + Debian's chromium): 50 identities
with flows between them, served by `stockade webui` under waitress (as
test_webui_cli.py starts it) from the in-process agent of conftest.py.

The service map must stay readable: from the rendered geometry (getBoundingClientRect
of the SVG node labels and edges, and points along each edge), no edge crosses a node
label and no two labels overlap. Matrix and Endpoints show a page, with page links.

Screenshots go to tests/artifacts/webui-scale/ (kept after the run, gitignored).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import TOKEN, FlowAgent, flow
from stockade.daemon.server import APIServer
from webuiproc import WebUIProcess

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts" / "webui-scale"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
N = 50
TEAMS = ("payments", "search", "identity", "billing", "catalog")


def labels(i: int) -> dict:
    return {"app": f"svc-{i:02d}", "team": TEAMS[i % len(TEAMS)],
            "tier": "front" if i < N // 2 else "back"}


@pytest.fixture(scope="module")
def scale_socket(tmp_path_factory):
    """50 endpoints; each front service talks to three back ones, one of them denied."""
    d = tmp_path_factory.mktemp("scale")
    a = FlowAgent(str(d / "state"))
    eps = [a.add_endpoint({"name": f"svc{i:02d}", "interface": f"vs{i}",
                           "ips": [f"10.30.{i // 200}.{i % 200 + 1}"], "labels": labels(i)})
           for i in range(N)]
    a.put_policies([{"name": "back.yaml", "text": (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: back}\nspec:\n"
        "  endpointSelector: {matchLabels: {tier: back}}\n"
        "  ingress: [{fromEndpoints: [{matchLabels: {tier: front}}],"
        " toPorts: [{ports: [{port: '8080', protocol: TCP}]}]}]\n")}])
    ring, sport = [], 30000
    for i in range(N // 2):
        for k, (port, verdict) in enumerate(((8080, "FORWARDED"), (8080, "FORWARDED"), (22, "DROPPED"))):
            dst = eps[N // 2 + (i * 3 + k * 7) % (N // 2)]
            sport += 1
            ring.append(flow(eps[i], dst, sport, port, verdict=verdict, ago=60 + sport % 50))
    ring += [flow(eps[N - 1], eps[N - 2], 40001, 9000, ago=30),     # back to back
             flow(eps[3], eps[4], 40002, 443, ago=30),              # front to front
             flow(eps[5], eps[5], 40003, 8080, ago=30)]             # to itself
    a.flow_ring = sorted(ring, key=lambda f: f["time"])
    with APIServer(a, str(d / "agent.sock")) as s:
        yield s.socket_path


@pytest.fixture(scope="module")
def server(scale_socket, tmp_path_factory):
    d = tmp_path_factory.mktemp("webui")
    token = d / "webui.token"
    token.write_text(TOKEN + "\n")
    os.chmod(token, 0o600)
    with WebUIProcess({"h1": scale_socket}, str(token)) as ui:
        yield ui.base


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900},
            base_url=server)
        pg = ctx.new_page()
        try:
            pg.goto("/login")
            pg.fill("#token", TOKEN)
            pg.click("button[type=submit]")
            pg.wait_for_url(lambda url: not url.endswith("/login"))
            yield pg
        finally:
            ctx.close()


def shot(page, name):
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


GEOMETRY = """() => {
  const svg = document.querySelector("svg#servicemap");
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const labels = [...svg.querySelectorAll("g.node text.label")].map((t) => ({text: t.textContent, box: box(t)}));
  const edges = [...svg.querySelectorAll("g.edge path")].map((p) => {
    const m = p.getScreenCTM(), len = p.getTotalLength(), pts = [];
    for (let s = 0; s <= len; s += 1.5) {
      const q = new DOMPoint(p.getPointAtLength(s).x, p.getPointAtLength(s).y).matrixTransform(m);
      pts.push([q.x, q.y]);
    }
    return {title: p.parentNode.querySelector("title").textContent, box: box(p), pts};
  });
  return {labels, edges};
}"""


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_service_map_at_50_identities_keeps_labels_clear(page):
    page.goto("/map")
    geo = page.evaluate(GEOMETRY)
    labels, edges = geo["labels"], geo["edges"]
    assert len(labels) == N and len(edges) >= N // 2 * 3
    assert all(not lab["text"].endswith("…") for lab in labels)          # whole names
    assert min(lab["box"][3] - lab["box"][1] for lab in labels) >= 11     # px high: readable
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            assert not overlaps(a["box"], b["box"]), (a["text"], b["text"])
    for e in edges:
        for lab in labels:
            assert not overlaps(e["box"], lab["box"]), (e["title"], lab["text"])
            x0, y0, x1, y1 = lab["box"]
            assert not any(x0 <= x <= x1 and y0 <= y <= y1 for x, y in e["pts"]), (e["title"], lab["text"])
    shot(page, "service-map-50")


def test_matrix_and_endpoints_show_one_page_with_links(page):
    page.goto("/matrix")
    assert page.locator("table.matrix thead th.col").count() == 25
    assert page.locator("table.matrix tbody tr").count() == 25
    rows = page.locator('.pager[data-param="page"]')
    assert "1–25 of 52 sources" in rows.inner_text()                    # 50 + host + world
    shot(page, "matrix-50")
    page.locator('.pager[data-param="cpage"] a[rel=next]').click()
    assert page.locator("table.matrix thead th.col").count() == 25
    assert "cpage=2" in page.url
    page.fill("input[name=label]", "team=billing")
    page.click("form.filters button")
    assert page.locator("table.matrix thead th.col").count() == N // len(TEAMS)

    page.goto("/endpoints?per_page=20")
    assert page.locator("#endpoints tbody tr").count() == 20
    page.locator('.pager[data-param="page"] a', has_text="3").click()
    assert page.locator("#endpoints tbody tr").count() == N - 40
    assert "per_page=20" in page.url
    page.goto("/endpoints")
    shot(page, "endpoints-50")
    page.goto("/identities?q=tier%3Dback")
    assert page.locator("#identities tbody tr").count() == N // 2
