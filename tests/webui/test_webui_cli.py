"""`stockade webui`: options, the token file, and serving under waitress."""
from __future__ import annotations

import os

import click
import httpx
import pytest
from click.testing import CliRunner

from conftest import PROPOSED
from stockade.cli.main import cli
from stockade.cli.webui_cmd import split_bind
from webuiproc import WebUIProcess


@pytest.mark.parametrize("bind,want", [
    ("127.0.0.1:8470", ("127.0.0.1", 8470)),
    ("[::1]:9000", ("::1", 9000)),
    (":8080", ("127.0.0.1", 8080)),
], ids=["ipv4", "ipv6", "port-only"])
def test_split_bind(bind, want):
    assert split_bind(bind) == want


@pytest.mark.parametrize("bind", ["localhost", "1.2.3.4:http", "1.2.3.4:0", "1.2.3.4:70000"],
                         ids=["no-port", "named-port", "zero", "too-big"])
def test_split_bind_refuses(bind):
    with pytest.raises(click.BadParameter):
        split_bind(bind)


def test_init_token_creates_a_private_file_once(tmp_path):
    path = tmp_path / "etc" / "webui.token"
    r = CliRunner().invoke(cli, ["webui", "--init-token", "--token-file", str(path)])
    assert r.exit_code == 0 and r.output.strip() == str(path)
    first = path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600" and len(first.strip()) >= 32
    CliRunner().invoke(cli, ["webui", "--init-token", "--token-file", str(path)])
    assert path.read_text() == first


def test_missing_token_file_says_how_to_make_one(tmp_path):
    r = CliRunner().invoke(cli, ["webui", "--token-file", str(tmp_path / "none")])
    assert r.exit_code == 1 and "--init-token" in r.output


def test_help_has_examples():
    r = CliRunner().invoke(cli, ["webui", "--help"])
    assert "Examples:" in r.output and "--socket" in r.output and "127.0.0.1:8470" in r.output


def test_serves_under_waitress(agent_socket, tmp_path):
    token = tmp_path / "t"
    token.write_text("s3cret-token-for-the-cli-test\n")
    os.chmod(token, 0o600)
    with WebUIProcess({"h1": agent_socket}, str(token)) as ui:
        base, port = ui.base, ui.port
        r = httpx.get(f"{base}/login")
        assert r.status_code == 200 and r.headers["Server"] == "stockade-webui"
        auth = {"Authorization": "Bearer s3cret-token-for-the-cli-test"}
        assert httpx.get(f"{base}/api/v1/hosts", headers=auth).json()[0]["health"]["status"] == "ok"
        r = httpx.post(f"{base}/api/v1/review", headers=auth,
                       json={"files": [{"name": "db.yaml", "text": PROPOSED}]})
        assert r.status_code == 200 and r.json()["flows"][0]["count"] == 12
        # DNS rebinding: the same server under another name is refused
        assert httpx.get(f"{base}/login", headers={"Host": f"rebind.example:{port}"}).status_code == 400
    assert f"http://127.0.0.1:{port}/" in ui.output
