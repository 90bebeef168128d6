"""Run ``stockade webui`` (waitress) as a process for tests and benches, on a free
loopback port, until it answers /login.

    with WebUIProcess({"h1": socket_path}, token_file) as ui:
        httpx.get(f"{ui.base}/login")
    ui.output   # what it printed, once stopped
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx


class WebUIProcess:
    def __init__(self, sockets: dict[str, str], token_file: str, timeout: float = 15.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "stockade.cli.main", "webui", "--bind",
                     f"127.0.0.1:{self.port}", "--token-file", str(token_file)]
        for name, path in sockets.items():
            self.argv += ["--socket", f"{name}={path}"]
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.output = ""

    def __enter__(self) -> "WebUIProcess":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
