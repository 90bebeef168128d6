"""Start Podman's Docker-compatible API service when nothing answers the socket.

    svc = ensure_podman_service("/run/podman/podman.sock", containers_conf=...)
    ...
    if svc: stop_podman_service(svc)

The service runs as `podman --runtime runc --cgroup-manager cgroupfs system
service -t 0 unix://PATH` (crun and the systemd cgroup manager do not work on
the project's hosts, see ENVIRONMENT.md) in its own session, so a terminal's
Ctrl-C aimed at the agent does not reach it. It is stopped by its PID only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field

import httpx

from .errors import ServiceStartError


@dataclass
class PodmanService:
    """A `podman system service` this process started."""

    pid: int
    socket_path: str
    process: subprocess.Popen | None = field(default=None, repr=False, compare=False)
    log_path: str | None = None


def socket_answers(socket_path: str, timeout: float = 1.0) -> bool:
    """True when GET /_ping on the unix socket returns 200."""
    if not os.path.exists(socket_path):
        return False
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), timeout=timeout) as c:
            return c.get("http://podman/_ping").status_code == 200
    except httpx.HTTPError:
        return False


def service_command(socket_path: str, podman: str = "podman", extra_args: tuple[str, ...] = ()) -> list[str]:
    return [
        podman, "--runtime", "runc", "--cgroup-manager", "cgroupfs", *extra_args,
        "system", "service", "-t", "0", f"unix://{socket_path}",
    ]


def start_podman_service(
    socket_path: str,
    *,
    containers_conf: str | None = None,
    storage_conf: str | None = None,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    log_path: str | None = None,
    timeout: float = 15.0,
    podman: str = "podman",
) -> PodmanService:
    """Start the service and wait until socket_path answers /_ping.

    containers_conf / storage_conf: set CONTAINERS_CONF / CONTAINERS_STORAGE_CONF
    for the service only. extra_args go before "system service" (e.g.
    ("--root", DIR, "--runroot", DIR)). env: extra environment variables.
    log_path: where the service's stdout/stderr go (default: discarded).
    Raises ServiceStartError if it exits or does not answer within timeout;
    in that case the process is killed.
    """
    run_dir = os.path.dirname(socket_path) or "."
    os.makedirs(run_dir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(socket_path).st_mode) and not socket_answers(socket_path):
            os.unlink(socket_path)  # stale socket left by a dead service
    child_env = dict(os.environ)
    child_env.update(env or {})
    if containers_conf:
        child_env["CONTAINERS_CONF"] = containers_conf
    if storage_conf:
        child_env["CONTAINERS_STORAGE_CONF"] = storage_conf
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            service_command(socket_path, podman, extra_args),
            env=child_env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise ServiceStartError(f"cannot run {podman}: {exc}") from exc
    finally:
        if not isinstance(out, int):
            out.close()
    service = PodmanService(pid=proc.pid, socket_path=socket_path, process=proc, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceStartError(
                f"podman system service exited with {proc.returncode}"
                + (f"; see {log_path}" if log_path else "")
            )
        if socket_answers(socket_path, timeout=0.5):
            return service
        time.sleep(0.05)
    stop_podman_service(service)
    raise ServiceStartError(f"{socket_path} did not answer /_ping within {timeout:.0f}s")


def ensure_podman_service(socket_path: str, **kwargs) -> PodmanService | None:
    """Start the service unless socket_path already answers; None means it did.

    kwargs are start_podman_service's.
    """
    if socket_answers(socket_path):
        return None
    return start_podman_service(socket_path, **kwargs)


def stop_podman_service(service: PodmanService | int, timeout: float = 5.0) -> None:
    """SIGTERM exactly that PID, then SIGKILL after timeout. Never matches by name."""
    proc = service.process if isinstance(service, PodmanService) else None
    pid = service.pid if isinstance(service, PodmanService) else int(service)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        _reap(proc)
        return
    if _wait_exit(pid, proc, timeout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_exit(pid, proc, timeout)


def _reap(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        with contextlib.suppress(Exception):
            proc.wait(timeout=0.1)


def _wait_exit(pid: int, proc: subprocess.Popen | None, timeout: float) -> bool:
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        time.sleep(0.05)
    return False
