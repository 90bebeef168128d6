"""Podman helpers for Stockade's tests (real containers, needs root).

Use from a test module or a conftest:

    from podman import podman_image, podman_service, run_container  # fixtures

    def test_x(podman_service, run_container):
        c = run_container("web", labels={"app": "web"}, cmd=["httpd", "-f", "-p", "80"])
        # c.id, c.name, c.pid, c.ip; removed (podman rm -f ID) at teardown

* Every podman process started here gets CONTAINERS_CONF=tests/data/containers.conf
  (runc, cgroupfs, no ulimits, file events); the host's config is untouched.
* podman_image builds localhost/stockade-bb:latest from busybox-static
  (rootfs tarball -> podman import), once; skipped when it already exists.
* labelled_image builds, once per session, an image FROM it whose own LABELs are
  IMAGE_LABELS (podman build), and removes it by ID at the end.
* podman_service starts `podman system service` on a private socket under
  /run/stockade-test/ and stops it by its PID at the end of the session.
* Containers are labelled stockade.test.session=SESSION_ID, so
  leftover_containers() can prove that a test cleaned up after itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stockade.discovery import PodmanService, start_podman_service, stop_podman_service

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR.parent / "scripts"))
import bbimage  # noqa: E402  (the image builder shared with the demo)

CONTAINERS_CONF = TESTS_DIR / "data" / "containers.conf"
ARTIFACTS = TESTS_DIR / "artifacts"
IMAGE = "localhost/stockade-bb:latest"
NETWORK = "podman"
BUSYBOX = bbimage.BUSYBOX  # Debian's busybox-static: no shared libraries needed
SESSION_LABEL = "stockade.test.session"
SESSION_ID = uuid.uuid4().hex[:12]
GLOBAL_ARGS = ("--runtime", "runc", "--cgroup-manager", "cgroupfs")


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    return env


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `podman --runtime runc --cgroup-manager cgroupfs ARGS` with the test config."""
    cmd = ["podman", *GLOBAL_ARGS, *args]
    proc = subprocess.run(cmd, env=podman_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def podman_available() -> bool:
    return os.geteuid() == 0 and shutil.which("podman") is not None and os.path.exists(BUSYBOX)


# -- image -------------------------------------------------------------------

def ensure_image(image: str = IMAGE) -> str:
    """Build the busybox image unless it exists (scripts/bbimage.py). Idempotent."""
    bbimage.ensure_image(image, podman=podman)
    return image


IMAGE_LABELS = {"app": "db", "tier": "from-image"}


def build_labelled_image(tag: str, labels: dict[str, str], base: str = IMAGE) -> str:
    """`podman build` image ``tag`` FROM ``base`` with ``labels`` as LABELs; its ID."""
    with tempfile.TemporaryDirectory(prefix="stockade-img-") as ctx:
        text = f"FROM {base}\n" + "".join(f"LABEL {json.dumps(k)}={json.dumps(v)}\n"
                                          for k, v in labels.items())
        Path(ctx, "Containerfile").write_text(text)
        podman("build", "-q", "-t", tag, "-f", str(Path(ctx, "Containerfile")), ctx, timeout=120)
    return podman("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()


# -- containers --------------------------------------------------------------

@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    pid: int
    ip: str | None
    labels: dict[str, str] = field(default_factory=dict, hash=False)


def container_id(name_or_id: str) -> str | None:
    proc = podman("container", "inspect", "--format", "{{.Id}}", name_or_id, check=False)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def inspect_container(name_or_id: str) -> dict:
    return json.loads(podman("container", "inspect", name_or_id).stdout)[0]


def start_container(
    name: str,
    labels: dict[str, str] | None = None,
    cmd: list[str] | tuple[str, ...] = ("sleep", "3600"),
    *,
    network: str = NETWORK,
    image: str = IMAGE,
    extra_args: tuple[str, ...] = (),
) -> ContainerInfo:
    """`podman run -d` a container; the caller must remove_container(info.id).

    If the run fails after the container was created, it is removed here.
    """
    labels = dict(labels or {})
    args = ["run", "-d", "--name", name, "--network", network, "--label", f"{SESSION_LABEL}={SESSION_ID}"]
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    proc = podman(*args, *extra_args, image, *cmd, check=False)
    if proc.returncode != 0:
        cid = container_id(name)
        if cid:
            remove_container(cid)
        raise RuntimeError(f"podman run {name} failed: {proc.stderr.strip()}")
    cid = proc.stdout.strip().splitlines()[-1]
    try:
        data = inspect_container(cid)
    except Exception:
        remove_container(cid)
        raise
    return ContainerInfo(
        id=cid, name=name, pid=data["State"]["Pid"],
        ip=data["NetworkSettings"].get("IPAddress") or None, labels=labels,
    )


def remove_container(cid: str) -> None:
    """podman rm -f by ID (never by name pattern); no error if already gone."""
    podman("rm", "-f", "-t", "0", cid, check=False)


def leftover_containers(session: str = SESSION_ID) -> list[str]:
    """IDs of containers (any state) this test session created and did not remove."""
    proc = podman("ps", "-a", "-q", "--no-trunc", "--filter", f"label={SESSION_LABEL}={session}")
    return proc.stdout.split()


def bridge_name(network: str = NETWORK) -> str:
    """Host bridge of a Podman network (cni-podman0 with CNI, podman0 with netavark)."""
    data = json.loads(podman("network", "inspect", network).stdout)[0]
    return data["network_interface"]


def unique_name(prefix: str) -> str:
    return f"{prefix}-{SESSION_ID}-{uuid.uuid4().hex[:6]}"


# -- the OCI hook -------------------------------------------------------------

HOOK_PROGRAM = TESTS_DIR.parent / "agent" / "stockade" / "hook.py"


def write_oci_hook(hooks_dir: str | Path, agent_socket: str, timeout: float = 2.0) -> Path:
    """Stockade's OCI hook (stockade/hook.py) for ``podman --hooks-dir hooks_dir``, as the
    Ansible role installs it (python3 -I -S: no site-packages, it needs none), calling the
    agent on ``agent_socket``. Returns the hook file."""
    Path(hooks_dir).mkdir(parents=True, exist_ok=True)
    path = Path(hooks_dir) / "stockade.json"
    path.write_text(json.dumps({
        "version": "1.0.0",
        "hook": {"path": sys.executable,
                 "args": ["python3", "-I", "-S", str(HOOK_PROGRAM), "--socket", agent_socket,
                          "--timeout", str(timeout)],
                 "timeout": 10},
        "when": {"always": True},
        "stages": ["createRuntime"],
    }, indent=2))
    return path


# -- fixtures ----------------------------------------------------------------

@pytest.fixture(scope="session")
def podman_image() -> str:
    if not podman_available():
        pytest.skip("needs root, podman and /bin/busybox (busybox-static)")
    return ensure_image()


@pytest.fixture(scope="session")
def labelled_image(podman_image) -> str:
    """An image whose own labels are IMAGE_LABELS; removed (by ID) at session end."""
    tag = f"localhost/stockade-bb-labelled:{SESSION_ID}"
    image_id = build_labelled_image(tag, IMAGE_LABELS)
    yield tag
    podman("rmi", "-f", image_id, check=False)


@pytest.fixture(scope="session")
def podman_service(podman_image) -> PodmanService:
    """Podman's API service on a private socket; stopped by PID at session end."""
    ARTIFACTS.mkdir(exist_ok=True)
    socket_path = f"/run/stockade-test/podman-{os.getpid()}.sock"
    service = start_podman_service(
        socket_path,
        containers_conf=str(CONTAINERS_CONF),
        log_path=str(ARTIFACTS / "podman-service.log"),
    )
    yield service
    stop_podman_service(service)
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass


@pytest.fixture
def run_container(podman_image):
    """Factory: run_container(name, labels=..., cmd=[...]) -> ContainerInfo.

    Every container it starts is removed (podman rm -f ID) at teardown, even
    when the test fails.
    """
    started: list[str] = []

    def run(name: str, labels: dict[str, str] | None = None,
            cmd: list[str] | tuple[str, ...] = ("sleep", "3600"), **kwargs) -> ContainerInfo:
        info = start_container(name, labels, cmd, **kwargs)
        started.append(info.id)
        return info

    yield run
    for cid in reversed(started):
        remove_container(cid)


# -- a Podman of the test's own ----------------------------------------------

class PrivatePodman:
    """Podman with its own storage, state, events log and network (bridge), and its API
    service on its own socket: an agent pointed at it sees only this test's containers,
    and its managed bridge carries only them. For tests that stop, SIGSTOP and restart
    the service. Everything is removed on exit (containers by ID, the service by PID).

        with PrivatePodman(subnet="10.213.50.0/24") as pp:
            c = pp.run("web", {"app": "web"})
            pp.pause(); pp.resume(); pp.stop_service(); pp.start_service()
    """

    _count = 0

    def __init__(self, subnet: str, hooks_dir: str | None = None):
        """``hooks_dir``: every podman command here gets ``--hooks-dir hooks_dir`` (the
        OCI hooks of write_oci_hook); None: Podman's default directories."""
        PrivatePodman._count += 1
        tag = f"{os.getpid()}-{PrivatePodman._count}"
        self.base = Path(tempfile.mkdtemp(prefix=f"stockade-pp-{tag}-", dir="/var/tmp"))
        self.args = ("--root", str(self.base / "root"), "--runroot", str(self.base / "run"),
                     "--tmpdir", str(self.base / "tmp"), "--network-config-dir", str(self.base / "net"))
        if hooks_dir is not None:
            self.args += ("--hooks-dir", hooks_dir)
        # events_logger "file" (tests/data/containers.conf): <tmpdir>/events/events.log
        self.events_log = str(self.base / "tmp" / "events" / "events.log")
        self.socket = f"/run/stockade-test/pp-{tag}.sock"
        self.network = f"skpp{os.getpid()}x{PrivatePodman._count}"
        self.subnet = subnet
        self.bridge = ""
        self.service: PodmanService | None = None
        self.started: list[str] = []

    def podman(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return podman(*self.args, *args, check=check, timeout=timeout)

    def __enter__(self) -> "PrivatePodman":
        try:
            (self.base / "net").mkdir()
            bbimage.ensure_image(IMAGE, podman=self.podman)
            self.podman("network", "create", "--subnet", self.subnet, "--disable-dns", self.network)
            self.bridge = json.loads(self.podman("network", "inspect", self.network).stdout)[0][
                "network_interface"]
            self.start_service()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_service(self) -> None:
        self.service = start_podman_service(
            self.socket, containers_conf=str(CONTAINERS_CONF), extra_args=self.args,
            log_path=str(self.base / "service.log"))

    def stop_service(self) -> None:
        if self.service is not None:
            self.resume()
            stop_podman_service(self.service)
            self.service = None

    def pause(self) -> None:
        """SIGSTOP the service: it accepts connections and answers nothing (hung)."""
        os.kill(self.service.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.service is not None:
            os.kill(self.service.pid, signal.SIGCONT)

    def run(self, name: str, labels: dict[str, str], cmd=("sleep", "3600"), timeout: float = 120) -> str:
        """``podman run -d`` on the private network; returns the container ID."""
        args = ["run", "-d", "--name", name, "--network", self.network,
                "--label", f"{SESSION_LABEL}={SESSION_ID}"]
        for k, v in labels.items():
            args += ["--label", f"{k}={v}"]
        proc = self.podman(*args, IMAGE, *cmd, check=False, timeout=timeout)
        cid = container_id_in(self, name)
        if cid:
            self.started.append(cid)
        if proc.returncode != 0:
            raise RuntimeError(f"podman run {name} failed: {proc.stderr.strip()}")
        return cid

    def remove(self, cid: str) -> None:
        self.podman("rm", "-f", "-t", "0", cid, check=False)

    def close(self) -> None:
        self.resume()
        for cid in reversed(self.started):
            self.remove(cid)
        self.stop_service()
        if self.bridge:
            self.podman("network", "rm", "-f", self.network, check=False)
        self.podman("rmi", "-a", "-f", check=False)
        subprocess.run(["umount", "-R", str(self.base / "root" / "overlay")], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)


def container_id_in(pp: PrivatePodman, name: str) -> str | None:
    proc = pp.podman("container", "inspect", "--format", "{{.Id}}", name, check=False)
    return proc.stdout.strip() or None if proc.returncode == 0 else None
