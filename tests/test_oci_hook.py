"""The OCI hook's parts without Podman: the program (stockade/hook.py) against the API
server, the create-event record it relies on, and the route's validation. Podman running
the hook for real: tests/root/test_oci_hook_podman.py."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fake_agent import FakeAgent
from stockade import hook
from stockade.daemon.apischema import ApiSchema
from stockade.daemon.runtimes import bundle_netns_path
from stockade.daemon.server import APIServer
from stockade.discovery.created import CreatedContainers
from stockade.discovery.podman_events import to_docker_event
from stockade.errors import InvalidRequest

HOOK = Path(hook.__file__)
CID = "ab" * 32


def create_record(cid=CID, status="create", labels=None):
    return {"ID": cid, "Image": "localhost/img:1", "Name": "web", "Status": status,
            "Time": "2026-12-02T19:23:53.264995719Z", "Type": "container",
            "Attributes": {"app": "web"} if labels is None else labels}


def run_hook(state, *args, timeout=10) -> tuple[subprocess.CompletedProcess, float]:
    """The hook as Podman runs it: a new process, -I -S (no site), state on stdin."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-I", "-S", str(HOOK), *args],
                          input=json.dumps(state).encode(), capture_output=True, timeout=timeout)
    return proc, time.monotonic() - t0


# ---------------------------------------------------------------- create events

def test_create_events_from_the_log_are_kept_until_removed():
    cc = CreatedContainers(limit=2)
    cc.note(to_docker_event(create_record()))
    got = cc.get(CID)
    assert (got.name, got.image, got.labels) == ("web", "localhost/img:1", {"app": "web"})
    cc.note(to_docker_event(create_record(status="remove")))
    assert cc.get(CID) is None


def test_create_events_from_the_api_stream_are_not_used():
    """There ``Attributes`` mixes name and image into the labels."""
    cc = CreatedContainers()
    event = to_docker_event(create_record())
    event["source"] = "api"
    cc.note(event)
    assert cc.get(CID) is None


def test_create_record_is_bounded_and_hostile_shapes_are_ignored():
    cc = CreatedContainers(limit=2)
    for i in range(5):
        cc.note(to_docker_event(create_record(cid=f"{i:064x}")))
    assert len(cc) == 2 and cc.get(f"{4:064x}") is not None and cc.get(f"{0:064x}") is None
    for bad in ({"source": "events-log", "Action": "create", "id": 5},
                {"source": "events-log", "Action": "create", "id": "x", "Actor": {"Attributes": [1]}}):
        cc.note(bad)
    assert cc.get("x").labels == {}


def test_a_listing_seeds_containers_created_before_the_log_was_read():
    cc = CreatedContainers()
    cc.note(to_docker_event(create_record()))
    cc.seed({"Id": CID, "Names": ["/other"], "Image": "x", "Labels": {"app": "stale"}})
    assert cc.get(CID).labels == {"app": "web"}          # the event's record stays
    old = "ef" * 32
    cc.seed({"Id": old, "Names": ["/db"], "Image": "localhost/db:1", "Labels": {"app": "db"}})
    assert (cc.get(old).name, cc.get(old).labels) == ("db", {"app": "db"})
    for bad in ({"Id": 3}, {"Id": "y", "Labels": ["x"]}, {}):
        cc.seed(bad)
    assert len(cc) == 2


def test_wait_returns_when_the_event_arrives_or_after_the_timeout():
    cc = CreatedContainers()
    t0 = time.monotonic()
    assert cc.wait(CID, 0.1) is None
    assert 0.1 <= time.monotonic() - t0 < 1
    threading.Timer(0.05, cc.note, [to_docker_event(create_record())]).start()
    t0 = time.monotonic()
    assert cc.wait(CID, 5).name == "web"
    assert time.monotonic() - t0 < 2


def test_events_log_tail_follows_podman_rotating_the_log(tmp_path):
    """Podman rotates events.log by renaming a new file over it; the tail must follow the
    new file (the OCI hook depends on its create events)."""
    from stockade.discovery.podman_events import PodmanEventsLog
    log = tmp_path / "events.log"
    log.write_text(json.dumps(create_record(cid="0" * 64)) + "\n")
    got, halt = [], threading.Event()
    t = threading.Thread(target=PodmanEventsLog(str(log)).follow, args=(halt, got.append), daemon=True)
    t.start()
    try:
        time.sleep(0.3)
        new = tmp_path / "events.log.tmp"
        new.write_text("")
        os.rename(new, log)
        time.sleep(0.6)
        with open(log, "a") as f:
            f.write(json.dumps(create_record()) + "\n")
        deadline = time.monotonic() + 5
        while not any(e["id"] == CID for e in got) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        halt.set()
        t.join(5)
    assert [e["id"] for e in got] == [CID]


def test_bundle_netns_path(tmp_path):
    cfg = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/n1"}]}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert bundle_netns_path(str(tmp_path)) == "/run/netns/n1"
    (tmp_path / "config.json").write_text("{not json")
    assert bundle_netns_path(str(tmp_path)) is None
    assert bundle_netns_path(str(tmp_path / "gone")) is None
    assert bundle_netns_path(None) is None


# ---------------------------------------------------------------- the program

def test_read_state_keeps_what_the_agent_needs():
    state = {"ociVersion": "1.0.2", "id": CID, "status": "created", "pid": 42,
             "bundle": "/b", "annotations": {"io.container.manager": "libpod"}}
    assert hook.read_state(io.BytesIO(json.dumps(state).encode())) == {
        "id": CID, "pid": 42, "bundle": "/b", "annotations": {"io.container.manager": "libpod"}}
    for bad in (b"", b"[]", b'{"id": "x"}', b'{"id": "x", "pid": true}',
                b" " * (hook.MAX_STATE + 1)):
        with pytest.raises(ValueError):
            hook.read_state(io.BytesIO(bad))


def test_hook_hands_the_state_to_the_agent(tmp_path):
    """Against the real API server and an agent that follows no Podman: it answers at
    once that it cannot enroll the container, and the hook exits 0."""
    agent = FakeAgent()
    with APIServer(agent, str(tmp_path / "agent.sock")) as server:
        proc, took = run_hook({"id": CID, "pid": os.getpid(), "bundle": str(tmp_path)},
                              "--socket", server.socket_path)
    assert proc.returncode == 0
    assert b"does not follow Podman" in proc.stderr
    assert took < 2


def test_agent_answer_for_a_container_it_cannot_enroll():
    agent = FakeAgent()
    got = agent.oci_hook({"id": CID, "pid": 1})
    assert got["enrolled"] is False and got["endpoint"] is None
    assert "does not follow Podman" in got["reason"]
    got = agent.oci_hook({"id": CID, "pid": 1, "annotations": {"io.container.manager": "cri-o"}})
    assert "not a Podman container" in got["reason"]


@pytest.mark.parametrize("body,field", [
    ({"pid": 1}, "id"),
    ({"id": CID}, "pid"),
    ({"id": CID, "pid": 0}, "pid"),
    ({"id": "../x", "pid": 1}, "id"),
    ({"id": CID, "pid": 1, "annotations": {"a": 1}}, "annotations.a"),
    ({"id": CID, "pid": 1, "extra": True}, "extra"),
])
def test_route_refuses_what_is_not_an_oci_state(body, field):
    op = ApiSchema().operation("POST", "/v1/hooks/oci")
    with pytest.raises(InvalidRequest) as err:
        op.check_body(body)
    assert err.value.field == field


def test_hook_without_an_agent_exits_0_within_its_timeout(tmp_path):
    proc, took = run_hook({"id": CID, "pid": 1}, "--socket", str(tmp_path / "none.sock"),
                          "--timeout", "0.5")
    assert proc.returncode == 0 and b"not handed to the agent" in proc.stderr
    assert 0.4 <= took < 2


def test_hook_with_an_agent_that_never_answers_exits_0_within_its_timeout(tmp_path):
    path = str(tmp_path / "hung.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)      # accepts (the kernel does), reads and answers nothing
    try:
        proc, took = run_hook({"id": CID, "pid": 1}, "--socket", path, "--timeout", "0.5")
    finally:
        listener.close()
    assert proc.returncode == 0 and b"did not answer in time" in proc.stderr
    assert 0.4 <= took < 2


def test_hook_waits_for_an_agent_that_comes_up(tmp_path):
    """A restarting agent: the socket appears within the timeout, the hook gets through."""
    path = str(tmp_path / "late.sock")
    agent = FakeAgent()
    server = APIServer(agent, path)
    timer = threading.Timer(0.3, server.start)
    timer.start()
    try:
        proc, took = run_hook({"id": CID, "pid": 1}, "--socket", path, "--timeout", "3")
    finally:
        timer.join()
        server.stop()
    assert proc.returncode == 0 and b"does not follow Podman" in proc.stderr
    assert took < 3


def test_hook_garbage_on_stdin_exits_0():
    proc = subprocess.run([sys.executable, "-I", "-S", str(HOOK), "--socket", "/nonexistent"],
                          input=b"\xff garbage", capture_output=True, timeout=10)
    assert proc.returncode == 0 and b"not a container's OCI state" in proc.stderr
