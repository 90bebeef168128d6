"""Run ``stockade webui`` (waitress) as a process for tests and benches, on a free
loopback port, until it answers /login.

    with WebUIProcess({"h1": socket_path}, token_file) as ui:
        httpx.get(f"{ui.base}/login")
    ui.output   # what it printed, once stopped

As deployed (root only to start it; it drops to the user and the stockade group):

    with ui_user() as user, WebUIProcess({...}, token_file, user=user.pw_name) as ui:
        ui.login(token)   # an httpx.Client with the session
"""
from __future__ import annotations

import contextlib
import os
import pwd
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

CHECKOUT = Path(__file__).resolve().parent.parent


class WebUIProcess:
    def __init__(self, sockets: dict[str, str], token_file: str, timeout: float = 15.0,
                 user: str | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "stockade.cli.main", "webui", "--bind",
                     f"127.0.0.1:{self.port}", "--token-file", str(token_file)]
        for name, path in sockets.items():
            self.argv += ["--socket", f"{name}={path}"]
        if user is not None:
            self.argv += ["--user", user]
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.output = ""

    def __enter__(self) -> "WebUIProcess":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     cwd="/")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                httpx.get(f"{self.base}/login")
                return self
            except httpx.TransportError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"the web UI did not start:\n{self.output}") from None
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.output = self.proc.communicate(timeout=10)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.output = self.proc.communicate(timeout=10)[0].decode(errors="replace")

    def login(self, token: str) -> httpx.Client:
        """A client holding a logged-in session (the login form's CSRF token posted back)."""
        c = httpx.Client(base_url=self.base, timeout=30)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text)
        assert csrf, "no CSRF token on the login page"
        r = c.post("/login", data={"token": token, "csrf_token": csrf.group(1)})
        assert r.status_code == 302, r.text
        return c


@contextlib.contextmanager
def checkout_reachable(path: Path = CHECKOUT) -> Iterator[list[Path]]:
    """The checkout and every directory above it may be entered by other users while
    the block runs; yields the ones that needed it. A UI that drops to an unprivileged user runs
    this checkout's venv and code: in a clone inside a 0700 directory (`mktemp -d`) it
    cannot import them. Only the missing o+x is added, and each mode is put back after."""
    changed = []
    try:
        for d in [*reversed(path.parents), path]:
            mode = d.stat().st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(d, stat.S_IMODE(mode) | stat.S_IXOTH)
                changed.append((d, stat.S_IMODE(mode)))
        yield [d for d, _ in changed]
    finally:
        for d, mode in reversed(changed):
            os.chmod(d, mode)


@contextlib.contextmanager
def ui_user() -> Iterator[pwd.struct_passwd]:
    """An unprivileged system user for the UI (the role's stockade-webui), removed after,
    with the checkout reachable for it while it exists.
    The stockade group (the agent socket's) is made by scripts/setup.sh and the role."""
    name = f"sk-webui-{os.getpid()}"
    subprocess.run(["groupadd", "--system", "-f", "stockade"], check=True)
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        with checkout_reachable():
            yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
