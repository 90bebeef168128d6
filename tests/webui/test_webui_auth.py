"""Login, sessions, bearer tokens, CSRF, trusted hosts and the security headers."""
from __future__ import annotations

import os
import re

import pytest

from conftest import PROPOSED, TOKEN
from stockade_webui import create_app
from stockade_webui.auth import TokenFileError, read_token_file, write_token_file

PAGES = ["/", "/endpoints", "/policies", "/matrix", "/review", "/flows", "/flows/rows", "/map"]
API_GETS = ["/api/v1/hosts", "/api/v1/overview", "/api/v1/endpoints", "/api/v1/policies",
            "/api/v1/matrix", "/api/v1/flows", "/api/v1/map"]


@pytest.mark.parametrize("path", PAGES, ids=PAGES)
def test_logged_out_pages_redirect_to_login(client, path):
    r = client.get(path)
    assert r.status_code == 302
    assert r.headers["Location"].startswith("/login?next=")


@pytest.mark.parametrize("path", API_GETS + ["/api/v1/review"], ids=API_GETS + ["review"])
def test_logged_out_api_is_401_json(client, path):
    r = client.get(path) if path != "/api/v1/review" else client.post(path, json={"files": []})
    assert r.status_code == 401
    assert r.json["error"]["status"] == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_logged_out_post_to_a_page_is_refused(client, agent):
    r = client.post("/review", data={"text": PROPOSED})
    assert r.status_code == 401
    assert not [c for c in agent.calls if c[0] == "put_policies" and c[3]]


def test_wrong_token_is_refused_and_gives_no_session(client, auth):
    r = auth.login("not-the-token-at-all")
    assert r.status_code == 401
    assert "That token is not right." in r.get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_login_sets_a_strict_httponly_cookie_and_redirects_to_next(client, auth):
    tok = auth.csrf()
    r = client.post("/login", data={"token": TOKEN, "csrf_token": tok, "next": "/matrix"})
    assert r.status_code == 302 and r.headers["Location"] == "/matrix"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "stockade_session=" in cookie
    assert client.get("/matrix").status_code == 200


@pytest.mark.parametrize("nxt", ["//evil.example/x", "https://evil.example/", "/\\evil"],
                         ids=["scheme-relative", "absolute", "backslash"])
def test_login_never_redirects_off_site(client, auth, nxt):
    r = client.post("/login", data={"token": TOKEN, "csrf_token": auth.csrf(), "next": nxt})
    assert r.status_code == 302 and r.headers["Location"] == "/"


def test_logout_needs_csrf_and_ends_the_session(logged_in, auth):
    assert logged_in.post("/logout").status_code == 400
    assert logged_in.get("/").status_code == 200
    tok = auth.csrf("/")
    assert logged_in.post("/logout", data={"csrf_token": tok}).status_code == 302
    assert logged_in.get("/").status_code == 302


@pytest.mark.parametrize("path", API_GETS, ids=API_GETS)
def test_bearer_token_reads_the_api(client, path):
    r = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.json
    assert r.headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}x", "Bearer nope", f"Basic {TOKEN}"],
                         ids=["longer", "wrong", "basic-scheme"])
def test_wrong_bearer_is_401(client, header):
    assert client.get("/api/v1/hosts", headers={"Authorization": header}).status_code == 401


def test_bearer_does_not_open_pages(client):
    r = client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 302


# ---------------------------------------------------------------- CSRF
def test_login_without_csrf_is_400(client):
    client.get("/login")
    r = client.post("/login", data={"token": TOKEN})
    assert r.status_code == 400 and "security token" in r.get_data(as_text=True)
    assert client.get("/").status_code == 302


@pytest.mark.parametrize("csrf", [None, "", "forged-token"], ids=["missing", "empty", "wrong"])
def test_review_post_without_the_right_csrf_is_400(logged_in, agent, csrf):
    data = {"text": PROPOSED}
    if csrf is not None:
        data["csrf_token"] = csrf
    r = logged_in.post("/review", data=data)
    assert r.status_code == 400
    assert not [c for c in agent.calls if c[0] == "put_policies" and c[3]]


def test_api_post_with_session_needs_the_csrf_header(logged_in, auth):
    body = {"files": [{"name": "db.yaml", "text": PROPOSED}]}
    r = logged_in.post("/api/v1/review", json=body)
    assert r.status_code == 400 and "CSRF" in r.json["error"]["message"]
    r = logged_in.post("/api/v1/review", json=body, headers={"X-CSRF-Token": auth.csrf("/")})
    assert r.status_code == 200


def test_api_post_with_bearer_needs_no_csrf(client):
    r = client.post("/api/v1/review", json={"files": [{"name": "db.yaml", "text": PROPOSED}]},
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json["valid"]


# ---------------------------------------------------------------- hosts, headers
@pytest.mark.parametrize("host", ["evil.example", "attacker.localhost.example:8470"],
                         ids=["other-name", "lookalike"])
def test_untrusted_host_header_is_400(client, host):
    assert client.get("/login", headers={"Host": host}).status_code == 400


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:8470", "localhost:8470"],
                         ids=["localhost", "ipv4-port", "localhost-port"])
def test_trusted_host_header_is_served(client, host):
    assert client.get("/login", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("path", PAGES + ["/login"], ids=PAGES + ["/login"])
def test_pages_have_csp_and_no_inline_script_or_style_or_remote_assets(logged_in, path):
    r = logged_in.get(path)
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert re.search(r"script-src 'self' 'nonce-[\w-]+'", csp)
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Cache-Control"] == "no-store"
    html = r.get_data(as_text=True)
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert " style=" not in html and "<style" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html), "remote asset"


def test_static_assets_are_served_locally(client):
    for name in ("stockade.css", "app.js"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and len(r.data) > 500
        assert b"http://" not in r.data and b"https://" not in r.data


# ---------------------------------------------------------------- token file
def test_token_file_is_created_0600_and_kept(tmp_path):
    path = tmp_path / "etc" / "webui.token"
    tok = write_token_file(str(path))
    assert len(tok) >= 32 and oct(path.stat().st_mode & 0o777) == "0o600"
    assert write_token_file(str(path)) == tok
    assert read_token_file(str(path)) == tok


@pytest.mark.parametrize("content,mode,needle", [
    ("x" * 40, 0o644, "readable by everyone"),
    ("short", 0o600, "16 characters"),
    (None, None, "cannot read"),
], ids=["world-readable", "too-short", "missing"])
def test_bad_token_files_are_refused(tmp_path, content, mode, needle):
    path = tmp_path / "t"
    if content is not None:
        path.write_text(content)
        os.chmod(path, mode)
    with pytest.raises(TokenFileError, match=needle):
        read_token_file(str(path))


def test_app_needs_a_token():
    with pytest.raises(TokenFileError, match="needs a token"):
        create_app({"AGENTS": ["/nonexistent.sock"]})
