"""Discovery faults against a real libvirtd of the test's own (tests/vm.py
PrivateLibvirtd: unprivileged, serving libvirt's test driver, so no QEMU and nothing of
the host's libvirtd is touched). The daemon is SIGSTOPped (hung: the agent's connection
stays open and answers nothing), continued, then stopped and started again. The agent
shows each fault in ``stockade status`` (the source not connected, the error, the agent
degraded) and, once libvirtd answers again, reconnects and lists every domain again:
a domain that appeared meanwhile becomes an endpoint on its tap, one that went away is
removed.

The test driver reads its node file on every new connection, so "appeared meanwhile"
is a domain written into that file while the agent's connection is hung or down: only a
new listing on a new connection can find it. The domains' taps are real tap links made
here, with libvirt's host MAC (the guest MAC with fe: first), removed at the end.
"""
from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from agentproc import AgentProcess
from attached import attached
from traffic import eventually
from vm import PrivateLibvirtd, libvirt_available

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not libvirt_available(), reason="needs libvirt, python3-libvirt, qemu")]

TAG = f"{os.getpid() % 10000}"
KEEPALIVE_LIMIT = 40  # s: libvirt's keepalive (5 s x 3 unanswered) closes a hung connection


def domain(letter: str, n: int) -> tuple[str, str, str, str, dict[str, str], str]:
    return (f"sklvf{TAG}{letter}", str(uuid.uuid4()), f"52:54:00:5e:01:{n:02x}",
            f"sklvf{TAG}{letter}", {"app": f"vm{letter}"}, f"10.213.70.{n}")


def make_tap(name: str, guest_mac: str) -> None:
    subprocess.run(["ip", "tuntap", "add", name, "mode", "tap"], check=True)
    subprocess.run(["ip", "link", "set", name, "address", "fe:" + guest_mac.split(":", 1)[1], "up"],
                   check=True)


def source(agent) -> dict:
    [src] = agent.client.health()["sources"]
    return src


def enforced(agent, doms) -> bool:
    """Exactly these domains are endpoints, ready on their taps with their labels."""
    eps = {e["name"]: e for e in agent.client.endpoints()}
    return set(eps) == {d[0] for d in doms} and all(
        eps[name]["state"] == "ready" and eps[name]["source"] == "libvirt"
        and eps[name]["interface"] == tap and eps[name]["mac"] == mac
        and eps[name]["labels"] == {f"libvirt:{k}": v for k, v in labels.items()}
        and attached(tap) for name, _, mac, tap, labels, _ in doms)


def not_connected(agent) -> bool:
    src = source(agent)
    return not src["connected"] and agent.client.health()["status"] == "degraded"


def test_libvirt_source_through_a_hung_and_a_restarted_libvirtd():
    a, b, c = domain("a", 1), domain("b", 2), domain("c", 3)
    taps: list[str] = []
    figures: dict[str, float] = {}
    try:
        for d in (a, b, c):
            make_tap(d[3], d[2])
            taps.append(d[3])
        with PrivateLibvirtd("lvf") as lv:
            lv.write_domains([a])
            with AgentProcess(libvirt_uri=lv.uri) as agent:
                assert eventually(lambda: source(agent)["connected"], timeout=20), source(agent)
                assert eventually(lambda: enforced(agent, [a]), timeout=20), agent.client.endpoints()

                # Hung: SIGSTOP. Domain b appears meanwhile.
                lv.write_domains([a, b])
                lv.pause()
                t = time.monotonic()
                assert eventually(lambda: not_connected(agent), timeout=KEEPALIVE_LIMIT), source(agent)
                figures["hang_detected_s"] = time.monotonic() - t
                assert source(agent)["last_error"], source(agent)
                assert "NOT CONNECTED" in agent.cli("status", check=False).stdout
                assert enforced(agent, [a]), "a hung libvirtd removes nothing"
                lv.resume()
                t = time.monotonic()
                assert eventually(lambda: source(agent)["connected"] and enforced(agent, [a, b]),
                                  timeout=30), (source(agent), agent.client.endpoints())
                figures["relisted_after_sigcont_s"] = time.monotonic() - t

                # Stopped and started again: a goes away and c appears while it is down.
                errors = source(agent)["errors"]
                lv.stop()
                t = time.monotonic()
                assert eventually(lambda: not_connected(agent), timeout=20), source(agent)
                figures["stop_detected_s"] = time.monotonic() - t
                lv.write_domains([b, c])
                time.sleep(2)  # a few reconnection attempts fail
                down = source(agent)
                assert not down["connected"] and down["errors"] > errors + 1, down
                lv.start()
                t = time.monotonic()
                assert eventually(lambda: source(agent)["connected"] and enforced(agent, [b, c]),
                                  timeout=30), (source(agent), agent.client.endpoints())
                figures["relisted_after_start_s"] = time.monotonic() - t
                src = source(agent)
                assert src["last_sync"] and src["errors"] > errors
                assert agent.client.health()["status"] == "ok", agent.client.health()
    finally:
        for tap in taps:
            subprocess.run(["ip", "link", "del", tap], capture_output=True)
    print("\nlibvirt discovery faults figures: "
          + " ".join(f"{k}={v:.1f}" for k, v in figures.items()))
