"""Discovery against real Podman containers, through Podman's Docker-compatible socket."""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from pyroute2 import IPRoute

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for podman.py

from podman import (  # noqa: E402  (fixtures are used by name)
    IMAGE_LABELS,
    bridge_name,
    labelled_image,
    leftover_containers,
    podman,
    podman_image,
    podman_service,
    run_container,
    unique_name,
)
from stockade.discovery import (  # noqa: E402
    DEFAULT_EVENTS_LOG,
    DockerAPI,
    DockerWatcher,
    RuntimeUnavailable,
    WorkloadEvent,
    start_podman_service,
    stop_podman_service,
    workload_from_inspect,
)

pytestmark = pytest.mark.root
__all__ = ["labelled_image", "podman_image", "podman_service", "run_container"]

ADD_DEADLINE = 1.0  # seconds from `podman run` returning to "added", API stream only
FAST_ADD_DEADLINE = 0.1  # the same with Podman's events.log followed by inotify


class Collector:
    """Runs a watcher's events() in a thread and hands events over a queue."""

    def __init__(self, watcher: DockerWatcher) -> None:
        self.watcher = watcher
        self.stop = threading.Event()
        self.q: queue.Queue[tuple[float, WorkloadEvent]] = queue.Queue()
        self.seen: list[tuple[str, str]] = []
        self.thread = watcher.start(lambda ev: self.q.put((time.monotonic(), ev)), self.stop)

    def wait_for(self, kind: str, cid: str, timeout: float) -> tuple[float, WorkloadEvent]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} event for {cid[:12]} within {timeout}s")
            try:
                at, ev = self.q.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append((ev.kind, ev.workload.id))
            if ev.kind == kind and ev.workload.id == cid:
                return at, ev

    def drain(self, quiet: float) -> None:
        """Record whatever else arrives within `quiet` seconds."""
        try:
            while True:
                _, ev = self.q.get(timeout=quiet)
                self.seen.append((ev.kind, ev.workload.id))
        except queue.Empty:
            pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "watcher thread did not stop"
        self.watcher.close()


@pytest.fixture
def collector(podman_service):
    """A watcher on Podman's API stream only."""
    c = Collector(DockerWatcher(podman_service.socket_path, "podman"))
    assert c.watcher.synced.wait(10), "watcher never connected"
    yield c
    c.close()


@pytest.fixture
def fast_collector(podman_service):
    """A watcher on the API stream plus Podman's events.log (inotify)."""
    c = Collector(DockerWatcher(podman_service.socket_path, "podman", events_log=DEFAULT_EVENTS_LOG))
    assert c.watcher.synced.wait(10), "watcher never connected"
    yield c
    c.close()


def _assert_host_veth(workload) -> None:
    """host_ifindex names a veth in this (root) netns, enslaved to Podman's bridge."""
    assert workload.host_ifindex and workload.host_ifname
    with IPRoute() as ipr:
        (link,) = ipr.get_links(workload.host_ifindex)
        (bridge,) = ipr.link_lookup(ifname=bridge_name())
    assert link.get_attr("IFLA_IFNAME") == workload.host_ifname
    assert link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "veth"
    assert link.get_attr("IFLA_MASTER") == bridge


def test_snapshot_lists_labelled_container(podman_service, run_container):
    """snapshot() returns the container with its labels, IP, PID and host veth."""
    labels = {"app": "web", "stockade.io/tier": "front"}
    c = run_container(unique_name("snap"), labels=labels)
    watcher = DockerWatcher(podman_service.socket_path, "podman")
    try:
        found = {w.id: w for w in watcher.snapshot()}
    finally:
        watcher.close()
    w = found[c.id]
    assert (w.runtime, w.name, w.pid) == ("podman", c.name, c.pid)
    assert w.image == "localhost/stockade-bb:latest"
    assert labels.items() <= w.labels.items()
    assert c.ip and c.ip in w.ips and w.ips[0].startswith("10.88.")
    assert w.mac
    _assert_host_veth(w)


def test_start_and_stop_events(collector, run_container):
    """'added' arrives within 1 s of `podman run` returning; 'removed' after stop."""
    delays = []
    for i in range(3):
        c = run_container(unique_name(f"ev{i}"), labels={"app": "ev"})
        returned = time.monotonic()
        at, ev = collector.wait_for("added", c.id, ADD_DEADLINE + 1)
        delays.append(at - returned)
        assert ev.workload.labels["app"] == "ev" and c.ip in ev.workload.ips
        _assert_host_veth(ev.workload)
        podman("stop", "-t", "0", c.id)
        _, gone = collector.wait_for("removed", c.id, 5)
        assert gone.workload.host_ifindex == ev.workload.host_ifindex
    print(f"podman run returned -> added: {', '.join(f'{d * 1000:.0f} ms' for d in delays)}")
    assert max(delays) < ADD_DEADLINE, delays


def test_events_log_path_is_fast_and_deduplicated(fast_collector, run_container):
    """With events.log followed, 'added' beats 100 ms; the API's later copies are dropped."""
    delays, ids = [], []
    for i in range(3):
        c = run_container(unique_name(f"fast{i}"), labels={"app": "fast"})
        returned = time.monotonic()
        at, ev = fast_collector.wait_for("added", c.id, 2)
        delays.append(at - returned)
        _assert_host_veth(ev.workload)
        podman("stop", "-t", "0", c.id)
        fast_collector.wait_for("removed", c.id, 5)
        ids.append(c.id)
    fast_collector.drain(0.6)  # the API stream lags up to 250 ms behind the log
    print(f"podman run returned -> added (events.log): "
          f"{', '.join(f'{d * 1000:.0f} ms' for d in delays)}")
    for cid in ids:
        mine = [kind for kind, wid in fast_collector.seen if wid == cid]
        assert mine == ["added", "removed"], mine
    assert max(delays) < FAST_ADD_DEADLINE, delays


def test_restart_is_added_again(collector, run_container):
    """A stopped container that starts again is re-added with its new veth."""
    c = run_container(unique_name("re"), labels={"app": "re"})
    collector.wait_for("added", c.id, 3)
    podman("stop", "-t", "0", c.id)
    collector.wait_for("removed", c.id, 5)
    podman("start", c.id)
    _, ev = collector.wait_for("added", c.id, 3)
    _assert_host_veth(ev.workload)


def test_docker_api_path_against_podman_compat(podman_service, run_container):
    """The Docker code path (DockerAPI, runtime "docker") works on Podman's compat socket."""
    c = run_container(unique_name("compat"), labels={"app": "compat"})
    with DockerAPI(podman_service.socket_path) as api:
        assert api.ping()
        assert c.id in {s["Id"] for s in api.list_containers()}
        data = api.inspect(c.id)
        assert api.inspect("no-such-container-stockade") is None
        image_labels = api.image_labels(data["Image"])
    w = workload_from_inspect("docker", data, image_labels=image_labels)
    assert (w.runtime, w.id, w.labels["app"]) == ("docker", c.id, "compat")
    assert w.image_labels == {}  # the imported busybox image has no LABELs
    _assert_host_veth(w)
    watcher = DockerWatcher(podman_service.socket_path, "docker")
    try:
        assert w in watcher.snapshot()
    finally:
        watcher.close()


def test_image_labels_through_podman_compat(podman_service, run_container, labelled_image):
    """GET /images/{id}/json gives the image's own labels; Podman merged them into the
    container's, which is why they are told apart."""
    c = run_container(unique_name("imglbl"), image=labelled_image, labels={"tier": "mine"})
    watcher = DockerWatcher(podman_service.socket_path, "podman")
    try:
        w = watcher.inspect(c.id)
    finally:
        watcher.close()
    assert {k: w.image_labels[k] for k in IMAGE_LABELS} == IMAGE_LABELS
    assert w.labels["app"] == "db" and w.labels["tier"] == "mine"


def test_docker_shaped_inspect_document():
    """A Docker Engine inspect document (IPv4 + IPv6, user network) maps to a Workload."""
    doc = {
        "Id": "f" * 64, "Name": "/db", "Image": "sha256:abc",
        "Config": {"Image": "postgres:16", "Labels": {"app": "db"}},
        "State": {"Running": True, "Pid": 0},
        "NetworkSettings": {
            "SandboxKey": "", "IPAddress": "", "MacAddress": "",
            "Networks": {"back": {"IPAddress": "172.18.0.2", "GlobalIPv6Address": "fd00::2",
                                  "MacAddress": "02:42:ac:12:00:02"}},
        },
    }

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/v1.41/containers/{'f' * 64}/json"
        return httpx.Response(200, json=doc)

    with DockerAPI("/nonexistent.sock", transport=httpx.MockTransport(handler)) as api:
        w = workload_from_inspect("docker", api.inspect("f" * 64))
    assert (w.name, w.image, w.ips, w.mac, w.pid) == (
        "db", "postgres:16", ("172.18.0.2", "fd00::2"), "02:42:ac:12:00:02", None)
    assert w.host_ifname is None


def test_missing_socket_is_runtime_unavailable(tmp_path):
    """A missing socket raises RuntimeUnavailable, and events() gives up when told to."""
    watcher = DockerWatcher(str(tmp_path / "none.sock"), "docker")
    with pytest.raises(RuntimeUnavailable, match="none.sock"):
        watcher.snapshot()
    with pytest.raises(RuntimeUnavailable):
        list(watcher.events(give_up_after=0.3))
    watcher.close()


def test_reconnects_after_service_restart(podman_image, run_container):
    """When the socket goes away and comes back, the watcher resyncs by itself."""
    sock = "/run/stockade-test/reconnect.sock"
    from podman import CONTAINERS_CONF

    svc = start_podman_service(sock, containers_conf=str(CONTAINERS_CONF))
    col = Collector(DockerWatcher(sock, "podman"))
    try:
        assert col.watcher.synced.wait(10)
        stop_podman_service(svc)
        c = run_container(unique_name("gap"), labels={"app": "gap"})  # while no service
        svc = start_podman_service(sock, containers_conf=str(CONTAINERS_CONF))
        _, ev = col.wait_for("added", c.id, 10)
        assert ev.workload.labels["app"] == "gap"
    finally:
        col.close()
        stop_podman_service(svc)


def test_no_leftover_containers():
    """Runs last: every container this session started has been removed."""
    assert leftover_containers() == []
