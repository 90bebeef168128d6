"""Server-side pages of the long lists: Endpoints, Identities, IP cache and the Matrix
(a square of rows and columns), with page links that keep the other parameters."""
from __future__ import annotations

import html as _html
import re

import pytest

from stockade_webui import paging


def links(resp, param: str) -> list[str]:
    html = resp.get_data(as_text=True)
    nav = re.search(rf'<div class="pager"[^>]*data-param="{param}">(.*?)</div>', html, re.S).group(1)
    return [_html.unescape(h) for h in re.findall(r'href="([^"]+)"', nav)]


def test_endpoints_come_a_page_at_a_time(logged_in):
    every = logged_in.get("/api/v1/endpoints").json
    assert every["paging"]["endpoints"] == {"page": 1, "per_page": 50, "total": 3, "pages": 1,
                                            "first": 1, "last": 3}
    one = logged_in.get("/api/v1/endpoints?per_page=1&page=2").json
    assert [e["name"] for e in one["endpoints"]] == [every["endpoints"][1]["name"]]
    assert one["paging"]["endpoints"]["pages"] == 3
    assert list(one["counters"]) in ([], [one["endpoints"][0]["name"]])   # only the page's rows
    past = logged_in.get("/api/v1/endpoints?per_page=2&page=9").json     # the last page
    assert past["paging"]["endpoints"]["page"] == 2 and len(past["endpoints"]) == 1


def test_page_links_keep_the_search_and_the_page_size(logged_in):
    r = logged_in.get("/endpoints?per_page=1&q=10.9.0&page=2")
    hrefs = links(r, "page")
    assert any("page=3" in h and "q=10.9.0" in h and "per_page=1" in h for h in hrefs), hrefs
    assert any("page=1" in h for h in hrefs)
    assert "2–2 of 3 endpoints" in r.get_data(as_text=True)


def test_identities_have_a_page_of_their_own(logged_in):
    r = logged_in.get("/identities?per_page=2")
    body = r.get_data(as_text=True)
    assert r.status_code == 200 and body.count('<tr><td class="mono">') == 2
    assert "ipage=2" in " ".join(links(r, "ipage"))
    assert "static:app=db" in logged_in.get("/identities?q=app%3Ddb").get_data(as_text=True)


@pytest.mark.parametrize("query,message", [
    ("page=0", "page must be a positive integer"),
    ("ipage=x", "ipage must be a positive integer"),
    ("per_page=-1", "per_page must be a positive integer"),
    ("per_page=501", "per_page is at most 500"),
], ids=["zero", "not-a-number", "negative", "too-large"])
def test_bad_page_numbers_are_a_clear_400(logged_in, query, message):
    r = logged_in.get(f"/api/v1/endpoints?{query}")
    assert r.status_code == 400 and r.json["error"]["message"] == message
    assert logged_in.get(f"/endpoints?{query}").status_code == 400


def test_matrix_is_a_square_of_rows_and_columns(logged_in, agent):
    full = logged_in.get("/api/v1/matrix").json
    n = full["total"]
    assert n >= 4 and len(full["rows"]) == len(full["columns"]) == n
    sq = logged_in.get("/api/v1/matrix?per_page=2&page=2&cpage=1").json
    assert [r["src"] for r in sq["rows"]] == [r["src"] for r in full["rows"][2:4]]
    assert [c["id"] for c in sq["columns"]] == [c["id"] for c in full["columns"][:2]]
    assert all(len(r["cells"]) == 2 for r in sq["rows"])
    asked = [c[1] for c in agent.calls if c[0] == "matrix"]
    assert {"offset": 2, "limit": 2, "dst_offset": 0, "dst_limit": 2}.items() <= asked[1].items()
    assert sq["paging"]["rows"]["page"] == 2 and sq["paging"]["columns"]["pages"] == -(-n // 2)
    r = logged_in.get("/matrix?per_page=2&cpage=2&label=")
    assert r.get_data(as_text=True).count('<th class="col"') == 2
    assert any("cpage=3" in h and "per_page=2" in h for h in links(r, "cpage"))
    assert logged_in.get("/api/v1/matrix?per_page=101").status_code == 400


def test_matrix_page_past_the_end_shows_the_last(logged_in):
    n = logged_in.get("/api/v1/matrix").json["total"]
    last = logged_in.get("/api/v1/matrix?per_page=3&page=99&cpage=99").json
    assert last["paging"]["rows"]["page"] == last["paging"]["columns"]["page"] == -(-n // 3)
    assert len(last["rows"]) == n - 3 * (last["paging"]["rows"]["page"] - 1)


@pytest.mark.parametrize("page,pages,want", [
    (1, 1, [1]), (1, 3, [1, 2, 3]), (5, 40, [1, None, 3, 4, 5, 6, 7, None, 40]),
    (40, 40, [1, None, 38, 39, 40]), (3, 6, [1, 2, 3, 4, 5, 6]),
], ids=["one", "few", "middle", "last", "no-gap"])
def test_page_window(page, pages, want):
    assert paging.window(paging.Page(page, 10, pages * 10)) == want


def test_policies_are_searchable_and_paged(own_agent, auth_for):
    agent, sock = own_agent
    agent.put_policies([{"name": "more.yaml", "text": "---\n".join(
        f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: extra{i}}}\nspec:\n"
        f"  endpointSelector: {{matchLabels: {{app: x{i}}}}}\n  ingress: [{{}}]\n" for i in range(4))}])
    c = auth_for(sock)
    data = c.get("/api/v1/policies?per_page=2&page=2").json
    assert len(data["policies"]) == 2 and data["paging"]["policies"]["total"] == 5
    assert [p["name"] for p in c.get("/api/v1/policies?q=x3").json["policies"]] == ["extra3"]
    body = c.get("/policies?q=nothing-like-this").get_data(as_text=True)
    assert "No policies match." in body
    assert "page=3" in " ".join(links(c.get("/policies?per_page=2"), "page"))
