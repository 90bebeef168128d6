"""Run a real ``stockade agent`` process for tests, with its own socket, pins and state.

    with AgentProcess(managed_bridges=[topo.bridge]) as agent:
        agent.client.add_endpoint(name="a", interface=..., ips=[...], labels={...})

The process is stopped by its PID (SIGTERM, then SIGKILL) and ``--cleanup`` detaches
its programs and removes its pins, even when the test fails.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STOCKADE = [str(Path(sys.executable).parent / "stockade")]


class AgentProcess:
    _count = 0
    running: "set[AgentProcess]" = set()   # for the failure report (tests/conftest.py)

    def __init__(self, command: list[str] | None = None, env: dict | None = None,
                 shared_namespace: bool = True, **settings):
        """``command`` (default: this checkout's ``stockade``) runs another build, with
        ``env`` added to the environment (e.g. its PYTHONPATH)."""
        AgentProcess._count += 1
        self.command = command or STOCKADE
        self.shared_namespace = shared_namespace
        self.env = env
        tag = f"{os.getpid()}-{AgentProcess._count}"
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"stockade-test-{tag}-", dir="/run"))
        self.settings = {
            "socket": str(self.run_dir / "agent.sock"),
            "bpffs_dir": f"/sys/fs/bpf/stockade-test-{tag}",
            "state_dir": str(self.run_dir / "state"),
            "podman_socket": None, "docker_socket": None, "podman_events_log": None,
            "managed_bridges": [], "managed_interfaces": [],
            # by name, on any bridge: other tests' bridges are not this agent's to close
            "kernel_default_bridge_ports": [],
            "ct_gc_interval": 5.0, "log_level": "info",
            **settings,
        }
        self.config_path = self.run_dir / "agent.yaml"
        self.log_path = self.run_dir / "agent.log"
        self.proc: subprocess.Popen | None = None
        self._client = None

    @property
    def socket(self) -> str:
        return self.settings["socket"]

    @property
    def client(self):
        from stockade.client import Client
        if self._client is None:
            self._client = Client(self.socket, timeout=30)
        return self._client

    def cli(self, *args, check=True, timeout=60) -> subprocess.CompletedProcess:
        r = subprocess.run([*STOCKADE, *args], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "STOCKADE_SOCKET": self.socket})
        if check and r.returncode != 0:
            raise AssertionError(f"stockade {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def start(self, timeout: float = 60) -> "AgentProcess":
        self.config_path.write_text(yaml.safe_dump(self.settings))
        AgentProcess.running.add(self)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.command, "agent", "--config", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=self.environ())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket):
                try:
                    self.client.health()
                    return self
                except Exception:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"agent did not answer within {timeout}s:\n{self.log()}")

    def environ(self) -> dict:
        """Test agents share the root network namespace with each other (and with a
        demo agent): they skip the one-agent-per-namespace lock (daemon/nslock.py), each
        owning interfaces of its own. ``shared_namespace=False`` takes it."""
        env = {**os.environ, **(self.env or {})}
        if self.shared_namespace:
            env["STOCKADE_SHARED_NAMESPACE"] = "1"
        return env

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-6000:]
        except OSError:
            return ""

    def kill(self, sig=signal.SIGKILL) -> None:
        """Stop the process only (pins and filters stay), as a crash would."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def stop(self) -> None:
        AgentProcess.running.discard(self)
        self.kill(signal.SIGTERM)
        subprocess.run([*self.command, "agent", "--config", str(self.config_path), "--cleanup"],
                       capture_output=True, timeout=60, env=self.environ())
        # an older build's --cleanup (``command``) refuses pins of other sizes or layouts:
        # the test's own pin directory goes regardless
        shutil.rmtree(self.settings["bpffs_dir"], ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "AgentProcess":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


# -- what a container's start cost it ------------------------------------------

def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def endpoint_written_at(change_log: str | Path, name: str) -> datetime | None:
    """When the agent (with ``change_log_path`` set) first recorded endpoint ``name`` as
    written (its first endpoint.upsert in the change log)."""
    for line in Path(change_log).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("action") == "endpoint.upsert" and rec.get("object") == name:
            return _when(rec["time"])
    return None


def unknown_endpoint_drops(agent: AgentProcess, interface: str) -> list[datetime]:
    """When the agent's programs dropped a packet on ``interface`` as from or to an
    unknown (unidentified) endpoint, from its flow events."""
    flows = agent.client.flows(drop_reason="unknown_endpoint")["flows"]
    return [_when(f["time"]) for f in flows if (f.get("interface") or {}).get("name") == interface]
