"""Connections survive what happens to the agent (issue 15, item 6).

50 long-lived TCP connections and 20 UDP flows run through allowed policy, each sending
every 5 ms, and a denied source probes throughout (tests/flowpump.py, its own process;
everything is counted at the receivers). Meanwhile the agent is

  (a) killed -9 and started again;
  (b) restarted into other builds whose BPF programs differ (their tags differ), as an
      upgrade does, and back: BUILDS;
  (c) made to import 10,000 policy entries, and to remove them again;
  (d) killed and started again while Podman starts 10 containers.

Asserted: no connection broken, no UDP flow stalled for more than 1 s, no denied packet
delivered, every container enforced at the end. The UDP flows arrive only as replies
(their receivers' ingress admits nothing from the senders): they prove that no restart
lost conntrack. The figures (restart and upgrade times, stall maxima) are printed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from agentproc import ROOT, AgentProcess
from attached import attached, program_tags
from netns import Topology
from podman import PrivatePodman, podman_available
from traffic import eventually, tcp_ok, udp_ok

sys.path.insert(0, str(ROOT))
from bench.common import stockade_policies  # noqa: E402

pytestmark = pytest.mark.root

NET4 = "10.213.60."
TCP_PORT, UDP_PORT, DENY_UDP, DENY_TCP = 8080, 6000, 7000, 7001
N_TCP, N_UDP = 50, 20
STALL_LIMIT = 1.0
RUN_BUILD = [sys.executable, "-c", "import sys; from stockade.cli.main import main; sys.exit(main())"]


def cnp(name: str, spec: str) -> dict:
    import textwrap
    return {"name": f"{name}.yaml", "text": (
        f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\n"
        f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")}


PORTS = (f'[{{port: "{TCP_PORT}", protocol: TCP}}, '
         f'{{port: "{UDP_PORT}", endPort: {UDP_PORT + N_UDP - 1}, protocol: UDP}}]')
POLICIES = [cnp("db", f"""
endpointSelector: {{matchLabels: {{app: db}}}}
ingress: [{{fromEndpoints: [{{matchLabels: {{app: web}}}}], toPorts: [{{ports: {PORTS}}}]}}]
"""), cnp("web", f"""
endpointSelector: {{matchLabels: {{app: web}}}}
egress: [{{toEndpoints: [{{matchLabels: {{app: db}}}}], toPorts: [{{ports: {PORTS}}}]}}]
ingress: [{{fromEndpoints: [{{matchLabels: {{app: nobody}}}}]}}]
""")]


# ---------------------------------------------------------------- builds
def build_with_other_programs(dest: Path, marker: int) -> list[str]:
    """This tree's agent/, bpf/ and docs/api/ in ``dest``, with one harmless store added
    to each entry program: the same maps, programs with other tags. Its command."""
    for part in ("agent", "bpf", "docs/api"):
        shutil.copytree(ROOT / part, dest / part, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    src = dest / "bpf" / "stockade.c"
    text = src.read_text()
    for direction in ("DIR_EGRESS", "DIR_INGRESS"):
        line = f"return handle(skb, {direction});"
        assert line in text, f"bpf/stockade.c has no {line!r} to mark"
        text = text.replace(line, f"{{ volatile __u32 build_marker = {marker}; (void)build_marker; }}\n\t{line}")
    src.write_text(text)
    return RUN_BUILD


@contextmanager
def builds():
    """The builds the agent runs: first the build before the pinned maps got layout
    versions (tests/oldbuild.py: the upgrade from it changes the layout of conntrack,
    endpoints and counters), then the ones it is upgraded through, in order, as (name,
    command, env); the test ends on this tree's own build."""
    from oldbuild import RUN_AGENT, old_build
    tmp = Path(tempfile.mkdtemp(prefix="stockade-builds-", dir="/run"))
    try:
        with old_build() as old:
            other = build_with_other_programs(tmp / "marked", 1)
            yield (RUN_AGENT, {"PYTHONPATH": str(old / "agent")}), [
                ("this-new-layout", None, None),
                ("marked", other, {"PYTHONPATH": str(tmp / "marked" / "agent")}),
                ("this", None, None)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- traffic
class FlowPump:
    def __init__(self, w):
        cfg = {"a": w["a"].ns, "b": w["b"].ns, "c": w["c"].ns, "a_ip": w["a"].ip4,
               "b_ip": w["b"].ip4, "tcp": N_TCP, "udp": N_UDP, "tcp_port": TCP_PORT,
               "udp_port": UDP_PORT, "deny_udp_port": DENY_UDP, "deny_tcp_port": DENY_TCP,
               "interval": 0.005}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "flowpump.py"), json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert json.loads(line or "{}").get("ready"), f"the pump did not start: {line!r}"

    def report(self) -> dict:
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)


# ---------------------------------------------------------------- the test
def endpoints(agent) -> dict[str, dict]:
    return {e["name"]: e for e in agent.client.endpoints()}


def test_connections_survive_restarts_upgrades_imports_and_churn():
    if not podman_available():
        pytest.fail("needs root, podman and /bin/busybox (busybox-static): make setup")
    figures: dict[str, dict] = {}
    with Topology("cs") as topo, PrivatePodman(subnet="10.213.61.0/24") as pp, \
            builds() as ((old_command, old_env), upgrades):
        w = {n: topo.add_workload(n, [f"{NET4}{i}/24"]) for i, n in enumerate("abc", start=1)}
        # the old build first: it knows none of this build's newer settings
        agent = AgentProcess(podman_socket=pp.socket, managed_bridges=[pp.bridge])
        agent.command, agent.env = old_command, old_env
        pump = None
        try:
            agent.start()
            for name, app in (("a", "web"), ("b", "db"), ("c", "other")):
                agent.client.add_endpoint(name=name, interface=w[name].host_if, ips=w[name].ips,
                                          labels={"app": app})
            # the probes would be delivered but for the policy
            assert udp_ok(w["c"], w["b"], w["b"].ip4, DENY_UDP) and udp_ok(w["c"], w["a"], w["a"].ip4, DENY_UDP)
            assert tcp_ok(w["c"], w["b"], w["b"].ip4, DENY_TCP)
            agent.client.put_policies(POLICIES)
            pump = FlowPump(w)
            time.sleep(1)
            figures["steady"] = pump.report()

            def phase(name: str, action) -> None:
                started = time.monotonic()
                extra = action() or {}
                time.sleep(1.5)          # traffic after the action is part of the phase
                figures[name] = {**pump.report(), "seconds": round(time.monotonic() - started, 1), **extra}

            def restart(command=None, env=None, sig=signal.SIGKILL) -> dict:
                agent.kill(sig)
                if command is not None:  # another build; else the same one again
                    agent.command, agent.env = command, env
                t = time.monotonic()
                agent.start()
                return {"restart_s": round(time.monotonic() - t, 2)}

            # (a) killed -9, started again
            phase("kill-9", restart)

            # (b) upgrades: builds whose programs differ, then back to this one
            from agentproc import STOCKADE
            for name, command, env in upgrades:
                before = program_tags(w["a"].host_if)

                def upgrade(command=command, env=env, before=before):
                    agent.settings.update(runtime_probe_interval=1.0, runtime_relist_interval=5.0)
                    out = restart(command or STOCKADE, env or {}, sig=signal.SIGTERM)
                    after = program_tags(w["a"].host_if)
                    assert after and after != before, f"program tags did not change: {before} {after}"
                    return {**out, "tags": after}
                phase(f"upgrade-to-{name}", upgrade)

            # (c) 10,000 policy entries in, then out
            peers = [(f"p{i}", list(range(10000 + 500 * i, 10500 + 500 * i))) for i in range(20)]
            for i, (label, _) in enumerate(peers):
                agent.client.add_ipcache(f"10.214.{i}.0/24", {"bench-peer": label}, "h2")
            big = {"name": "big.yaml", "text": stockade_policies(peers, "db")}

            def import_entries():
                t = time.monotonic()
                added = agent.client.put_policies([big])["diff"]["entries"]["added"]
                took = time.monotonic() - t
                assert added >= 10000, added
                t = time.monotonic()
                for label, _ in peers:
                    agent.client.delete_policy(f"allow-{label}")
                return {"entries": added, "import_s": round(took, 2),
                        "remove_s": round(time.monotonic() - t, 2)}
            phase("import-10000", import_entries)

            # (d) killed and started again while Podman starts 10 containers
            names = [f"skcs{os.getpid()}c{i}" for i in range(10)]

            def churn():
                threads = [threading.Thread(target=pp.run, args=(n, {"app": "box"})) for n in names]
                agent.kill()
                for t in threads:
                    t.start()
                t0 = time.monotonic()
                agent.start()
                up = time.monotonic() - t0
                for t in threads:
                    t.join(timeout=120)
                ok = eventually(lambda: all(
                    (endpoints(agent).get(n) or {}).get("state") == "ready" for n in names), timeout=60)
                assert ok, {n: (endpoints(agent).get(n) or {}).get("state") for n in names}
                return {"restart_s": round(up, 2), "containers_ready_s": round(time.monotonic() - t0, 2)}
            phase("restart-during-10-containers", churn)
            eps = endpoints(agent)
            assert all(eps[n]["labels"].get("container:app") == "box" and attached(eps[n]["interface"])
                       for n in names)
            assert {eps[n]["state"] for n in "abc"} == {"ready"}
        finally:
            if pump is not None:
                pump.close()
            agent.stop()

    print("\nconnections-survive figures:")
    for name, f in figures.items():
        print(f"  {name}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                          for k, v in f.items()}))
    final = figures[list(figures)[-1]]
    assert final["tcp_broken"] == {}, final["tcp_broken"]
    assert final["denied_delivered"] == {"udp_to_b": 0, "udp_to_a": 0, "tcp_to_b": 0}
    stalls = {name: f["udp_max_gap"] for name, f in figures.items()}
    assert max(stalls.values()) < STALL_LIMIT, stalls
    assert all(f["udp_received"] > 0 and f["tcp_received"] > 0 for f in figures.values())
    assert final["probes_sent"] > 1000
