"""Discovery under faults, over a scripted Docker API (httpx.MockTransport): an inspect
that fails is tried again with backoff and the event counts as handled only once it
was; a container whose events are lost is found by the periodic listing; the runtime
source resubmits what the agent does not have and removes what no longer runs.
The same against a real Podman service that is stopped, SIGSTOPped and restarted:
tests/root/test_discovery_faults_podman.py."""
from __future__ import annotations

import json
import queue
import threading
import time

import httpx
import pytest

from stockade.discovery import DockerAPI, DockerWatcher, Workload, WorkloadEvent

pytestmark = pytest.mark.pure

CID = "c" * 64
IMAGE_ID = "sha256:" + "e" * 64
DOC = {"Id": CID, "Name": "/web", "Image": IMAGE_ID, "Config": {"Labels": {"app": "web"}},
       "State": {"Pid": 42, "Running": True}, "NetworkSettings": {"IPAddress": "10.88.0.5"}}


class Runtime:
    """A scripted runtime: ``events`` are sent on the stream (then it stays open),
    ``running`` is what it lists, inspects fail while ``failures`` > 0."""

    def __init__(self, events=(), running=(), failures=0):
        self.events, self.running, self.failures = list(events), list(running), failures
        self.inspects = 0
        self.done = threading.Event()

    def handler(self, req: httpx.Request) -> httpx.Response:
        path = req.url.path
        if path == "/v1.41/events":
            def body():
                for ev in self.events:
                    yield (json.dumps(ev) + "\n").encode()
                while not self.done.wait(0.05):
                    pass
            return httpx.Response(200, content=body())
        if path == "/v1.41/containers/json":
            return httpx.Response(200, json=[{"Id": c} for c in self.running])
        if path.startswith("/v1.41/containers/"):
            self.inspects += 1
            if self.failures > 0:
                self.failures -= 1
                return httpx.Response(500, json={"message": "timeout waiting for the container lock"})
            return httpx.Response(200, json=DOC)
        if path.startswith("/v1.41/images/"):
            return httpx.Response(200, json={"Config": {"Labels": {}}})
        if path == "/_ping":
            return httpx.Response(200, text="OK")
        return httpx.Response(404, json={"message": path})


def watch(runtime: Runtime, **kw):
    watcher = DockerWatcher("/nonexistent.sock", "podman", resolve_veth=False,
                            api=DockerAPI("/nonexistent.sock", transport=httpx.MockTransport(runtime.handler)),
                            **kw)
    got: queue.Queue = queue.Queue()
    stop = threading.Event()
    watcher.start(lambda ev: got.put((time.monotonic(), ev)), stop)
    return watcher, got, stop


def next_event(got: queue.Queue, kind: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while True:
        at, ev = got.get(timeout=max(0.01, deadline - time.monotonic()))
        if ev.kind == kind:
            return at, ev


START = {"Type": "container", "Action": "start", "Actor": {"ID": CID}, "timeNano": 10**18}


def test_a_failed_inspect_is_tried_again_until_the_container_is_handled():
    rt = Runtime(events=[START], failures=3)
    watcher, got, stop = watch(rt)
    try:
        t0 = time.monotonic()
        at, ev = next_event(got, "added")
        assert ev.workload.id == CID and rt.inspects == 4
        assert at - t0 >= 0.2 + 0.4 + 0.8 - 0.1          # backoff: 0.2 s, 0.4 s, 0.8 s
        h = watcher.health.to_dict()
        assert h["errors"] == 3 and h["retrying"] == 0 and h["connected"]
        assert "timeout waiting for the container lock" in h["last_error"]
    finally:
        stop.set()
        rt.done.set()


def test_a_copy_of_the_event_from_the_other_source_is_not_dropped_while_it_failed():
    """The position moves only once the container is handled: the second copy of the
    same event (events.log and the API both deliver it) is inspected again."""
    rt = Runtime(events=[START, dict(START, source="events-log")], failures=1)
    watcher, got, stop = watch(rt)
    try:
        _, ev = next_event(got, "added", timeout=0.15)   # before the first retry is due
        assert ev.workload.id == CID and rt.inspects == 2
    finally:
        stop.set()
        rt.done.set()


def test_a_container_whose_events_were_lost_is_found_by_the_next_listing():
    rt = Runtime()
    watcher, got, stop = watch(rt, relist_interval=0.3, sync_events=True)
    try:
        _, ev = next_event(got, "synced")
        assert ev.workloads == ()
        rt.running = [CID]                     # started, and its event never came
        _, ev = next_event(got, "added", timeout=3)
        assert ev.workload.id == CID
        _, ev = next_event(got, "synced")
        assert [w.id for w in ev.workloads] == [CID]
        assert watcher.health.to_dict()["last_sync"] is not None
    finally:
        stop.set()
        rt.done.set()


# ---------------------------------------------------------------- the runtime source


class _Watcher:
    def __init__(self):
        self.synced = threading.Event()

    def start(self, callback, stop_event):
        return None


def _workload(name: str, cid: str, ifname: str, ip: str) -> Workload:
    return Workload(runtime="podman", id=cid, name=name, image="bb", labels={"app": name},
                    image_labels={}, ips=(ip,), host_ifname=ifname, host_ifindex=None)


def test_each_listing_makes_the_endpoints_what_runs(tmp_path, monkeypatch):
    """Level-triggered: a container whose endpoint could not be written (a full disk)
    is submitted again at the next listing; an endpoint that no longer runs goes."""
    import errno
    import os

    from inprocess_agent import inprocess_agent
    from stockade.daemon.runtimes import RuntimeSource

    api = inprocess_agent(str(tmp_path / "state"))
    src = RuntimeSource(api.agent, "podman", None, None, threading.Event(), watcher=_Watcher())
    a, b = _workload("a", "1" * 64, "veth1", "10.88.0.2"), _workload("b", "2" * 64, "veth2", "10.88.0.3")
    src._on_event(WorkloadEvent("added", a))
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    src._on_event(WorkloadEvent("added", b))                 # fails: not written anywhere
    monkeypatch.setattr(os, "write", real)
    assert [e["name"] for e in api.list_endpoints()] == ["a"]
    assert any("No space left on device" in e for e in api.health()["errors"])
    src._on_event(WorkloadEvent("synced", None, (a, b)))
    assert [e["name"] for e in api.list_endpoints()] == ["a", "b"]
    src._on_event(WorkloadEvent("synced", None, (b,)))
    assert [e["name"] for e in api.list_endpoints()] == ["b"]
    api.agent.stop()
