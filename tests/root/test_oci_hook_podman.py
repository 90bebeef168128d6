"""Podman runs Stockade's OCI hook (installed with --hooks-dir): a container is an
identified endpoint before its process runs, so its very first connection to an allowed
peer goes through (no dropped ARP, no 1 s retry); with the agent stopped the hook gives
up within its 2 s and the container's traffic stays dropped until the agent is back."""
from __future__ import annotations

import json
import signal
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from agentproc import ROOT, AgentProcess, endpoint_written_at, unknown_endpoint_drops
from podman import IMAGE, SESSION_ID, SESSION_LABEL, PrivatePodman, podman_available, write_oci_hook
from traffic import eventually

sys.path.insert(0, str(ROOT))
from bench.common import build_netbench  # noqa: E402

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not podman_available(), reason="needs root, podman, busybox")]

POLICY = {"name": "oh.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: oh-srv}
spec:
  endpointSelector: {matchLabels: {app: oh-srv}}
  ingress: [{fromEndpoints: [{matchLabels: {app: oh-cli}}], toPorts: [{ports: [{port: "8080", protocol: TCP}]}]}]
"""}
# A lost first ARP costs 1 s (the kernel's retransmit time); the probe tries every ~6 ms.
FEW_TRIES = 30


def endpoint(agent, name):
    return next((e for e in agent.client.endpoints() if e["name"] == name), None)


@pytest.fixture
def setup(tmp_path):
    nb_dir = tmp_path / "nb"
    nb_dir.mkdir()
    build_netbench(str(nb_dir))
    hooks = tmp_path / "hooks"
    agent = AgentProcess()   # its socket path is known before it starts: the hook names it
    try:
        write_oci_hook(hooks, agent.socket)
        with PrivatePodman(subnet="10.213.62.0/24", hooks_dir=str(hooks)) as pp:
            agent.settings.update(podman_socket=pp.socket, podman_events_log=pp.events_log,
                                  managed_bridges=[pp.bridge],
                                  change_log_path=str(agent.run_dir / "changes.jsonl"))
            agent.start()
            agent.client.put_policies([POLICY])
            yield pp, agent, nb_dir
    finally:
        agent.stop()


def create(pp, name, app, cmd, nb_dir) -> str:
    cid = pp.podman("create", "--name", name, "--network", pp.network, "--label",
                    f"{SESSION_LABEL}={SESSION_ID}", "--label", f"app={app}",
                    "-v", f"{nb_dir}:/nb:ro", IMAGE, *cmd).stdout.strip().splitlines()[-1]
    pp.started.append(cid)
    return cid


def server(pp, agent, nb_dir) -> str:
    """A ready server container (app=oh-srv); its address."""
    name = f"skohsrv-{SESSION_ID}"
    cid = create(pp, name, "oh-srv", ["/nb/netbench", "server", "8080"], nb_dir)
    pp.podman("start", cid)
    assert eventually(lambda: (endpoint(agent, name) or {}).get("state") == "ready")
    return endpoint(agent, name)["ips"][0]


def probe_result(pp, cid, timeout=60) -> dict:
    pp.podman("wait", cid, timeout=timeout)
    return json.loads(pp.podman("logs", cid).stdout.strip().splitlines()[-1])


def test_hooked_container_is_identified_before_its_first_packet(setup):
    pp, agent, nb_dir = setup
    changes = agent.settings["change_log_path"]
    ip = server(pp, agent, nb_dir)
    for i in range(3):
        name = f"skohcli-{SESSION_ID}-{i}"
        cid = create(pp, name, "oh-cli", ["/nb/netbench", "probe", ip, "8080", "5"], nb_dir)
        t0 = time.monotonic_ns()
        pp.podman("start", cid)
        started = time.monotonic_ns()
        # the endpoint is there when podman start returns: the hook waited for it
        ep = endpoint(agent, name) or {}
        assert ep.get("state") == "ready", agent.log()
        res = probe_result(pp, cid)
        assert res["ok_ns"] is not None, "the allowed connection never succeeded"
        ok_at = datetime.now(timezone.utc) - timedelta(seconds=(time.monotonic_ns() - res["ok_ns"]) / 1e9)
        assert res["tries"] < FEW_TRIES, (f"{res['tries']} tries: the first packets were "
                                          "dropped (a lost ARP and its 1 s retry)")
        assert (res["ok_ns"] - t0) / 1e9 < (started - t0) / 1e9 + 0.5
        # Before the hook ran, netavark had brought the interface up: the container's
        # kernel (MLD, DAD) and the bridge (floods, IGMP queries) sent frames, dropped
        # while it was unidentified. Once written, nothing of it is dropped as unknown
        # (until the probe, done, exits and the endpoint goes).
        written = endpoint_written_at(changes, name)
        late = [t for t in unknown_endpoint_drops(agent, ep["interface"]) if written < t <= ok_at]
        assert late == [], f"dropped as unknown after the endpoint was written at {written}"
        pp.remove(cid)
        pp.started.remove(cid)
    assert agent.client.health()["errors"] == []


def test_hook_with_the_agent_stopped_gives_up_and_the_container_stays_closed(setup):
    pp, agent, nb_dir = setup
    ip = server(pp, agent, nb_dir)
    name = f"skohdown-{SESSION_ID}"
    cid = create(pp, name, "oh-cli", ["/nb/netbench", "probe", ip, "8080", "60"], nb_dir)
    agent.kill(signal.SIGTERM)          # the process only: pins, programs and nft table stay
    t0 = time.monotonic()
    pp.podman("start", cid)
    took = time.monotonic() - t0
    assert took < 2 + 3, f"podman start took {took:.1f}s with the hook waiting for no agent"
    assert took >= 1.5                  # the hook waited for an agent to come back
    time.sleep(1.5)
    running = pp.podman("container", "inspect", "--format", "{{.State.Running}}", cid).stdout
    assert running.strip() == "true", "the probe got through while no agent identified it"
    agent.start()
    res = probe_result(pp, cid, timeout=90)
    assert res["ok_ns"] is not None, "the container was never identified after the agent came back"
    assert endpoint_written_at(agent.settings["change_log_path"], name) is not None
