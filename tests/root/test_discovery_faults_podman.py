"""Discovery faults against a real Podman API service of the test's own (tests/podman.py
PrivatePodman): while containers start and stop, the service is SIGSTOPped (hung: it
accepts connections and answers nothing), stopped, and started again. The agent sees
each fault in ``stockade status`` and, once Podman answers again, every running
container is an identified endpoint on its interface and every removed one is gone:
none is lost."""
from __future__ import annotations

import os
import threading
import time

import pytest

from agentproc import AgentProcess
from attached import attached
from podman import PrivatePodman, podman_available
from traffic import eventually

pytestmark = pytest.mark.root


def source(agent) -> dict:
    [src] = agent.client.health()["sources"]
    return src


def endpoints(agent) -> dict[str, dict]:
    return {e["name"]: e for e in agent.client.endpoints()}


def enforced(agent, running: dict[str, str]) -> bool:
    """Every running container (name -> app) ready with its own labels and its
    programs attached, and no other endpoint."""
    eps = endpoints(agent)
    return set(eps) == set(running) and all(
        eps[n]["state"] == "ready" and eps[n]["labels"].get("container:app") == app
        and attached(eps[n]["interface"]) for n, app in running.items())


def test_every_container_is_enforced_through_a_hung_a_stopped_and_a_restarted_podman():
    if not podman_available():
        pytest.fail("needs root, podman and /bin/busybox (busybox-static): make setup")
    with PrivatePodman(subnet="10.213.51.0/24") as pp, AgentProcess(
            podman_socket=pp.socket, managed_bridges=[pp.bridge],
            runtime_probe_interval=1.0, runtime_relist_interval=4.0) as agent:
        running: dict[str, str] = {}
        ids: dict[str, str] = {}

        def start(name, app):
            ids[name] = pp.run(name, {"app": app})
            running[name] = app

        def remove(name):
            pp.remove(ids[name])
            running.pop(name)

        assert eventually(lambda: source(agent)["connected"], timeout=10)
        for i in range(3):
            start(f"skf{i}", f"app{i}")
        assert eventually(lambda: enforced(agent, running), timeout=20), endpoints(agent)

        # Hung: SIGSTOP. Containers start meanwhile (the CLI needs no service).
        pp.pause()
        paused_at = time.monotonic()
        churn = threading.Thread(target=lambda: [start(f"skf{i}", f"app{i}") for i in (3, 4, 5)])
        churn.start()
        assert eventually(lambda: not source(agent)["connected"], timeout=15), source(agent)
        detected = time.monotonic() - paused_at
        assert "no answer to /_ping" in source(agent)["last_error"] or \
            "timed out" in source(agent)["last_error"], source(agent)
        assert agent.client.health()["status"] == "degraded"
        assert "NOT CONNECTED" in agent.cli("status", check=False).stdout
        time.sleep(1)
        pp.resume()
        resumed_at = time.monotonic()
        churn.join(timeout=120)
        assert eventually(lambda: enforced(agent, running), timeout=30), (running, endpoints(agent))
        after_resume = time.monotonic() - resumed_at
        assert source(agent)["connected"]

        # Stopped, containers start and one is removed while it is down, then started again.
        pp.stop_service()
        stopped_at = time.monotonic()
        assert eventually(lambda: not source(agent)["connected"], timeout=15)
        stop_detected = time.monotonic() - stopped_at
        for i in (6, 7):
            start(f"skf{i}", f"app{i}")
        remove("skf0")
        pp.start_service()
        started_at = time.monotonic()
        assert eventually(lambda: enforced(agent, running), timeout=30), (running, endpoints(agent))
        after_start = time.monotonic() - started_at

        # Restarted under churn: a container starts and one stops while it restarts.
        pp.stop_service()
        remove("skf1")
        pp.start_service()
        start("skf8", "app8")
        started_at = time.monotonic()
        assert eventually(lambda: enforced(agent, running), timeout=30), (running, endpoints(agent))
        after_restart = time.monotonic() - started_at
        src = source(agent)
        assert src["connected"] and src["errors"] >= 3 and src["last_sync"] and src["last_event"]
        print(f"\npodman discovery faults figures: hang_detected_s={detected:.1f} "
              f"enforced_after_sigcont_s={after_resume:.1f} stop_detected_s={stop_detected:.1f} "
              f"enforced_after_start_s={after_start:.1f} enforced_after_restart_s={after_restart:.1f}"
              f"\nsource health at the end: {src}")


def test_a_podman_that_starts_after_the_agent_is_followed_once_its_socket_appears():
    """At boot the agent starts before podman.socket: a configured socket that does not
    exist yet is waited for (status says so, without being degraded by it), and once
    Podman answers there its containers, one started meanwhile included, are enforced."""
    if not podman_available():
        pytest.fail("needs root, podman and /bin/busybox (busybox-static): make setup")
    with PrivatePodman(subnet="10.213.52.0/24") as pp:
        pp.stop_service()
        if os.path.exists(pp.socket):
            os.unlink(pp.socket)
        with AgentProcess(podman_socket=pp.socket, podman_events_log=pp.events_log,
                          managed_bridges=[pp.bridge]) as agent:
            src = source(agent)
            assert src["waiting"] and not src["connected"], src
            assert agent.client.health()["status"] == "ok", agent.client.health()
            assert "waiting: the socket does not exist" in agent.cli("status").stdout
            pp.run("skw0", {"app": "w0"})
            pp.start_service()
            assert eventually(lambda: enforced(agent, {"skw0": "w0"}), timeout=30), endpoints(agent)
            src = source(agent)
            assert src["connected"] and "waiting" not in src, src
            pp.run("skw1", {"app": "w1"})
            assert eventually(lambda: enforced(agent, {"skw0": "w0", "skw1": "w1"}), timeout=30)
