"""HAProxy's runtime API as the L7 manager uses it (stockade.l7.haproxy.RuntimeAPI),
against Debian's HAProxy: a map replaced at once, also one larger than the CLI's
buffer (1,000 rule sets of long patterns)."""
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from stockade.l7.haproxy import PAYLOAD_MAX, RuntimeAPI, _payloads
from traffic import eventually

pytestmark = pytest.mark.root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def haproxy():
    d = Path(tempfile.mkdtemp(prefix="stockade-l7-api-test-", dir="/run"))
    (d / "m.map").write_text("/old 1\n")
    (d / "haproxy.cfg").write_text(f"""global
    stats socket {d}/admin.sock mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 1s
    timeout server 1s
frontend f
    bind 127.0.0.1:{_free_port()}
    http-request set-var(txn.x) path,map_reg({d}/m.map)
    http-request return status 200
""")
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(d / "haproxy.cfg")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = RuntimeAPI(d / "admin.sock")

        def answers():
            try:
                return "Name: HAProxy" in api.command("show info")
            except Exception:
                return False
        assert eventually(answers, timeout=10, interval=0.05)
        yield api, d / "m.map"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def test_a_map_larger_than_the_cli_buffer_is_replaced_whole(haproxy):
    api, path = haproxy
    entries = {f"{rs}~/api/v0/items/[0-9]+(\\?.*)?/padding-to-make-it-long": "1"
               for rs in range(1, 1001)}
    assert sum(len(f"{k} {v}\n") for k, v in entries.items()) > 3 * 16384
    api.replace_map(path, entries)
    held = [line.split(" ", 1)[1] for line in api.command(f"show map {path}").splitlines() if line.strip()]
    assert len(held) == 1000 and "/old 1" not in held
    assert held[0] == "1~/api/v0/items/[0-9]+(\\?.*)?/padding-to-make-it-long 1"


def test_payloads_stay_under_the_limit():
    entries = {f"k{i}" * 50: "1" for i in range(500)}
    chunks = _payloads(entries)
    assert len(chunks) > 1 and all(len(c.encode()) <= PAYLOAD_MAX for c in chunks)
    assert "".join(chunks) == "".join(f"{k} 1\n" for k in entries)
