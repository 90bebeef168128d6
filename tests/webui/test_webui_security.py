"""Web UI security findings, each reproduced: the Review page's file read (policy
directories only, no symlinks, regular files only, a byte cap, no values echoed), the
open redirect after login, logout ending the session on the server, and login rate
limiting."""
from __future__ import annotations

import os
import re

import pytest

from conftest import PROPOSED, TOKEN
from stockade_webui import create_app

SECRET = "aws_secret_access_key-AKIAEXAMPLE1234"


def text(resp) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", resp.get_data(as_text=True)))


@pytest.fixture
def policy_dir(tmp_path, app):
    d = tmp_path / "policies"
    d.mkdir()
    app.config["POLICY_DIRS"] = [str(d)]
    return d


@pytest.fixture
def post(logged_in, auth):
    def send(**data):
        data.setdefault("csrf_token", auth.csrf("/review"))
        return logged_in.post("/review", data=data, content_type="multipart/form-data")
    return send


# ---------------------------------------------------------------- the Review page's file read

def test_path_review_is_off_without_policy_dirs(post, logged_in, tmp_path):
    (tmp_path / "db.yaml").write_text(PROPOSED)
    r = post(path=str(tmp_path / "db.yaml"))
    assert r.status_code == 400 and "started without --policy-dir" in text(r)
    assert 'name="path"' not in logged_in.get("/review").get_data(as_text=True)


@pytest.mark.parametrize("path", ["/etc/passwd", "/proc/kallsyms", "/usr", "POLICIES/../outside.yaml",
                                  "POLICIESX/db.yaml"],
                         ids=["etc-passwd", "proc", "usr", "dot-dot", "prefix-sibling"])
def test_only_paths_inside_the_policy_directories(post, policy_dir, tmp_path, path):
    (tmp_path / "outside.yaml").write_text(PROPOSED)
    (tmp_path / "policiesX").mkdir()
    r = post(path=path.replace("POLICIES", str(policy_dir)))
    assert r.status_code == 400 and "is not inside the policy directories" in text(r)


def test_symlinks_are_not_followed(post, policy_dir, tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text(f"metadata: {{name: {SECRET}}}\n")
    (policy_dir / "link.yaml").symlink_to(secret)
    (policy_dir / "sub").symlink_to(tmp_path)
    r = post(path=str(policy_dir / "link.yaml"))
    assert r.status_code == 400 and "is a symbolic link (not followed)" in text(r)
    r = post(path=str(policy_dir / "sub" / "secret.yaml"))
    assert r.status_code == 400 and "symbolic link" in text(r) and SECRET not in text(r)
    (policy_dir / "db.yaml").write_text(PROPOSED)
    r = post(path=str(policy_dir))                  # the walk skips both links
    assert r.status_code == 200, text(r)
    assert "Files: " + str(policy_dir / "db.yaml") in text(r)


def test_only_regular_files(post, policy_dir):
    os.mkfifo(policy_dir / "pipe.yaml")
    r = post(path=str(policy_dir / "pipe.yaml"))     # would block a worker if opened blocking
    assert r.status_code == 400 and "not a regular file" in text(r)
    (policy_dir / "db.yaml").write_text(PROPOSED)
    r = post(path=str(policy_dir))
    assert r.status_code == 200 and "pipe.yaml" not in text(r)


def test_bytes_read_are_capped(post, policy_dir, app):
    app.config["MAX_CONTENT_LENGTH"] = 4096
    (policy_dir / "big.yaml").write_text(PROPOSED + "#" * 8192 + "\n")
    r = post(path=str(policy_dir / "big.yaml"))
    assert r.status_code == 400 and "larger than 4 KiB" in text(r)


def test_file_count_is_capped(post, policy_dir, app):
    app.config["REVIEW_PATH_MAX_FILES"] = 3
    for i in range(5):
        (policy_dir / f"p{i}.yaml").write_text(PROPOSED)
    r = post(path=str(policy_dir))
    assert r.status_code == 400 and "the limit is 3" in text(r)


@pytest.mark.parametrize("content", [
    f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {SECRET.lower()}}}\n"
    f"spec:\n  endpointSelector: {{matchLabels: {{app: \"{SECRET}\"}}}}\n",
    f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: x}}\n"
    f"spec: {{endpointSelector: {{}}, ingress: [{{toPorts: [{{ports: [{{port: \"{SECRET}\"}}]}}]}}]}}\n",
    f"key: [unclosed\n{SECRET}: 1\n",
], ids=["label-value", "port", "yaml-syntax"])
def test_errors_of_files_read_here_echo_no_values(post, policy_dir, content):
    (policy_dir / "bad.yaml").write_text(content)
    r = post(path=str(policy_dir / "bad.yaml"))
    body = r.get_data(as_text=True)
    assert r.status_code == 400 and str(policy_dir / "bad.yaml") in body
    assert SECRET not in body and SECRET.lower() not in body and "the value is not shown" in body


def test_errors_of_pasted_text_still_show_the_value(post):
    r = post(text=PROPOSED.replace('"5432"', '"http2"'))
    assert r.status_code == 400 and "http2" in text(r)


# ---------------------------------------------------------------- open redirect

@pytest.mark.parametrize("nxt", ["/\t/evil.example", "/%09/evil.example", "/\n/evil.example",
                                 "/\r\nSet-Cookie: x=1", "/ /evil.example", "https:/evil.example",
                                 "/\\\\evil.example", "//evil.example"],
                         ids=["tab", "encoded-tab", "newline", "crlf", "space", "scheme", "backslashes",
                              "scheme-relative"])
def test_next_is_same_origin_only(client, auth, nxt):
    from urllib.parse import unquote
    r = client.post("/login", data={"token": TOKEN, "csrf_token": auth.csrf(), "next": unquote(nxt)})
    assert r.status_code == 302 and r.headers["Location"] == "/"


def test_next_from_the_query_string(client, auth):
    r = client.get("/login?next=/%09/evil.example")
    assert r.status_code == 200
    r = client.post("/login?next=/%09/evil.example", data={"token": TOKEN, "csrf_token": auth.csrf()})
    assert r.status_code == 302 and r.headers["Location"] == "/"
    r = client.post("/login", data={"token": TOKEN, "csrf_token": auth.csrf(), "next": "/flows?verdict=DROPPED"})
    assert r.headers["Location"] == "/flows?verdict=DROPPED"


# ---------------------------------------------------------------- logout

def test_logout_invalidates_the_session_on_the_server(app, logged_in, auth):
    cookie = logged_in.get_cookie("stockade_session").value
    assert logged_in.get("/").status_code == 200
    assert logged_in.post("/logout", data={"csrf_token": auth.csrf("/")}).status_code == 302
    replay = app.test_client()
    replay.set_cookie("stockade_session", cookie)   # the cookie as it was before logout
    r = replay.get("/")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert replay.get("/api/v1/hosts").status_code == 401


def test_another_session_survives_a_logout(app, auth, logged_in):
    other = app.test_client()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', other.get("/login").get_data(as_text=True)).group(1)
    assert other.post("/login", data={"token": TOKEN, "csrf_token": csrf}).status_code == 302
    logged_in.post("/logout", data={"csrf_token": auth.csrf("/")})
    assert other.get("/").status_code == 200


def test_a_restart_ends_sessions(agent_socket, logged_in):
    cookie = logged_in.get_cookie("stockade_session").value
    fresh = create_app({"TOKEN": TOKEN, "AGENTS": [f"h1={agent_socket}"], "TESTING": True,
                        "SECRET_KEY": logged_in.application.config["SECRET_KEY"]})
    c = fresh.test_client()
    c.set_cookie("stockade_session", cookie)
    assert c.get("/").status_code == 302


# ---------------------------------------------------------------- login rate limit

def test_five_wrong_tokens_a_minute_then_429(app, auth, client, monkeypatch):
    import stockade_webui.auth as webauth
    now = [1000.0]
    monkeypatch.setattr(webauth.time, "monotonic", lambda: now[0])
    for _ in range(5):
        assert auth.login("wrong-token-0123456789").status_code == 401
    r = auth.login()                                   # even the right token, until the minute is over
    assert r.status_code == 429 and int(r.headers["Retry-After"]) == 60
    assert "Too many wrong tokens" in text(r)
    now[0] += 30
    r = auth.login("wrong-token-0123456789")
    assert r.status_code == 429 and int(r.headers["Retry-After"]) == 30
    other = app.test_client()                          # another client address is not limited
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', other.get("/login").get_data(as_text=True)).group(1)
    assert other.post("/login", data={"token": TOKEN, "csrf_token": csrf},
                      environ_base={"REMOTE_ADDR": "192.0.2.9"}).status_code == 302
    now[0] += 31                                       # the minute is over
    assert auth.login().status_code == 302


def test_fewer_than_five_failures_do_not_block(auth, monkeypatch):
    import stockade_webui.auth as webauth
    now = [5000.0]
    monkeypatch.setattr(webauth.time, "monotonic", lambda: now[0])
    for _ in range(4):
        assert auth.login("wrong-token-0123456789").status_code == 401
    now[0] += 61                                       # a new minute: the count starts again
    for _ in range(4):
        assert auth.login("wrong-token-0123456789").status_code == 401
    assert auth.login().status_code == 302
