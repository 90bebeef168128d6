"""Review: a proposed set against the live one, as a dry run, with every kind of bad input."""
from __future__ import annotations

import io
import re

import pytest

from conftest import DB_POLICY, PROPOSED, TOKEN

BEARER = {"Authorization": f"Bearer {TOKEN}"}


def text(resp) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", resp.get_data(as_text=True)))


@pytest.fixture
def post(logged_in, auth):
    def send(**data):
        data.setdefault("csrf_token", auth.csrf("/review"))
        return logged_in.post("/review", data=data, content_type="multipart/form-data")
    return send


def assert_nothing_applied(agent):
    assert [c for c in agent.calls if c[0] == "review"]        # the agent's own plan
    assert not [c for c in agent.calls if c[0] == "put_policies" and not c[-1]]
    [live] = agent.list_policies()
    assert (live["name"], live["source"]) == ("db", "db.yaml")


def test_pasted_proposal_shows_diff_pairs_and_flows_it_would_change(post, agent):
    r = post(text=PROPOSED)
    assert r.status_code == 200
    body = text(r)
    assert "would block 12 connections seen in the last hour from app=web to app=db:5432" in body
    assert "would allow 1 connection seen in the last hour from app=api to app=db:5432" in body
    assert "~ db" in body                                   # the agent's dry-run diff
    pairs = body.split("Identity pairs newly allowed or denied")[1]
    assert "app=web app=db 5432/tcp" in pairs and "app=api app=db 5432/tcp" in pairs
    assert "endpoints {app=api} → {app=db} 5432/TCP" in body
    assert_nothing_applied(agent)


def test_uploaded_files_are_reviewed_together(post, agent):
    extra = PROPOSED.replace("name: db", "name: api").replace("app: db}", "app: api}") \
        .replace('"5432"', '"8080"')
    r = post(files=[(io.BytesIO(PROPOSED.encode()), "db.yaml"), (io.BytesIO(extra.encode()), "api.yaml")])
    assert r.status_code == 200, text(r)
    body = text(r)
    assert "+ api" in body and "~ db" in body and "Files: db.yaml, api.yaml" in body
    assert_nothing_applied(agent)


def test_a_path_on_the_host_file_or_directory(post, agent, tmp_path, app):
    d = tmp_path / "policies"
    d.mkdir()
    app.config["POLICY_DIRS"] = [str(d)]
    (d / "db.yaml").write_text(PROPOSED)
    (d / "notes.txt").write_text("ignored")
    for path in (str(d), str(d / "db.yaml")):
        r = post(path=path)
        assert r.status_code == 200, text(r)
        assert "would block 12 connections" in text(r)
    assert_nothing_applied(agent)


@pytest.mark.parametrize("path,needle", [
    ("relative/dir", "give an absolute path"),
    ("/nonexistent/stockade/policies", "is not inside the policy directories"),
    ("TMP/missing", "No such file or directory"),
    ("TMP", "holds no .yaml"),
], ids=["relative", "outside", "missing", "empty-dir"])
def test_bad_paths_are_explained(post, tmp_path, path, needle, app):
    app.config["POLICY_DIRS"] = [str(tmp_path)]
    path = path.replace("TMP", str(tmp_path))
    r = post(path=path)
    assert r.status_code == 400 and needle in text(r)


def test_nothing_given_is_400(post):
    r = post()
    assert r.status_code == 400 and "choose policy files" in text(r)


def test_unchanged_set_says_so(post):
    r = post(text=DB_POLICY, text_name="db.yaml")
    body = text(r)
    assert "no change: the live set already matches" in body
    assert "None of the 13 connections seen in the last hour would change verdict." in body


def test_replace_all_removes_what_is_not_in_the_set(post, agent):
    other = PROPOSED.replace("name: db", "name: other").replace("app: db}", "app: other}")
    r = post(text=other, replace_all="on")
    body = text(r)
    assert "− db" in body and "+ other" in body
    assert "would allow 1 connection" in body         # api -> db no longer restricted
    assert [c[2] for c in agent.calls if c[0] == "review"] == [True]  # replace_all sent


def test_invalid_yaml_names_file_and_line(post, agent):
    r = post(files=[(io.BytesIO(b"kind: [unclosed\n"), "broken.yaml")])
    assert r.status_code == 400
    body = text(r)
    assert "not valid" in body and "broken.yaml" in body and "cannot parse at line" in body
    assert not [c for c in agent.calls if c[0] == "put_policies"]


SCHEMA_ERROR = PROPOSED.replace('"5432"', '"http2"')
SECOND_DOC_ERROR = DB_POLICY + "---\n" + PROPOSED.replace("name: db", "name: two").replace(
    "endpointSelector:", "endpointSelectr:")


@pytest.mark.parametrize("doc,document,field,message", [
    (SCHEMA_ERROR, "0 (db)", "spec.ingress[0].toPorts[0].ports[0].port", "http2"),
    (SECOND_DOC_ERROR, "1 (two)", "spec.endpointSelectr", "unknown field"),
    ("- 1\n- 2\n", "0", "", "must be"),
], ids=["bad-port", "second-document", "not-a-mapping"])
def test_schema_errors_show_file_document_and_path(post, doc, document, field, message):
    r = post(files=[(io.BytesIO(doc.encode()), "proposed.yaml")])
    assert r.status_code == 400
    html = r.get_data(as_text=True)
    row = re.search(r'<table class="data errors">.*?</table>', html, re.S).group(0)
    cells = [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", c)).strip()
             for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    assert cells[0] == "proposed.yaml" and cells[1] == document
    assert cells[2] == (field or "—") and message in cells[3], cells


def test_the_same_policy_twice_in_one_set_is_an_error(post):
    r = post(files=[(io.BytesIO(PROPOSED.encode()), "a.yaml"), (io.BytesIO(PROPOSED.encode()), "b.yaml")])
    assert r.status_code == 400 and "also defined in a.yaml" in text(r)


def test_oversized_upload_is_413(post, agent):
    big = PROPOSED + "#" * (80 * 1024)
    r = post(files=[(io.BytesIO(big.encode()), "big.yaml")])
    assert r.status_code == 413 and "larger than the limit of 64 KiB" in text(r)
    assert not [c for c in agent.calls if c[0] == "put_policies"]


def test_oversized_paste_is_413(post):
    r = post(text=PROPOSED + "#" * (80 * 1024))
    assert r.status_code == 413


def test_non_utf8_upload_is_400(post):
    r = post(files=[(io.BytesIO(b"\xff\xfe\x00bad"), "bin.yaml")])
    assert r.status_code == 400 and "not UTF-8" in text(r)


# ---------------------------------------------------------------- API
def test_api_review_json(client, agent):
    r = client.post("/api/v1/review", headers=BEARER,
                    json={"files": [{"name": "db.yaml", "text": PROPOSED}]})
    assert r.status_code == 200
    d = r.json
    assert d["valid"] and d["agent"]["changed"] is True  # the agent's plan: a change
    flows = {(g["from"], g["to"], g["port"], g["change"]): g["count"] for g in d["flows"]}
    assert flows == {("app=web", "app=db", "5432/tcp", "block"): 12,
                     ("app=api", "app=db", "5432/tcp", "allow"): 1}
    assert_nothing_applied(agent)


def test_api_review_errors_carry_paths(client):
    r = client.post("/api/v1/review", headers=BEARER,
                    json={"files": [{"name": "p.yaml", "text": SCHEMA_ERROR}]})
    assert r.status_code == 400
    err = r.json["error"]["errors"][0]
    assert err["file"] == "p.yaml" and err["document"] == 0
    assert err["path"] == "spec.ingress[0].toPorts[0].ports[0].port"


@pytest.mark.parametrize("body", [{"files": "x"}, {"files": [{"name": 1}]}, ["x"], None],
                         ids=["files-not-list", "bad-file", "not-object", "no-json"])
def test_api_review_refuses_malformed_bodies(client, body):
    if body is None:
        r = client.post("/api/v1/review", headers=BEARER, data="{", content_type="application/json")
    else:
        r = client.post("/api/v1/review", headers=BEARER, json=body)
    assert r.status_code == 400 and "error" in r.json


def test_api_review_multipart_upload(client):
    r = client.post("/api/v1/review", headers=BEARER, content_type="multipart/form-data",
                    data={"files": [(io.BytesIO(PROPOSED.encode()), "db.yaml")]})
    assert r.status_code == 200 and r.json["valid"]


def test_api_oversized_is_413_json(client):
    r = client.post("/api/v1/review", headers=BEARER,
                    json={"files": [{"name": "x.yaml", "text": "#" * (100 * 1024)}]})
    assert r.status_code == 413 and r.json["error"]["status"] == 413


def test_review_page_has_one_form_and_a_plain_title(logged_in, post):
    for page in (logged_in.get("/review").get_data(as_text=True),
                 post(text="apiVersion: cilium.io/v2\nkind: Nope\n").get_data(as_text=True)):
        assert page.count('class="review-form"') == 1
        assert "<title>Review · Stockade</title>" in page


@pytest.mark.parametrize("pasted, needle", [
    ("[" * 30000, "nesting deeper than 64 levels"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"b{i}: &b{i} [{', '.join([f'*b{i - 1}' if i else '*a'] * 9)}]\n" for i in range(8)),
     "aliases expand to more than 100,000 nodes"),
], ids=["30000-brackets", "alias-bomb"])
def test_hostile_paste_is_an_error_row_not_a_crash(post, agent, pasted, needle):
    r = post(text=pasted)
    assert r.status_code == 400 and needle in text(r)
    assert not [c for c in agent.calls if c[0] == "put_policies"]
