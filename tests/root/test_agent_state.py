"""State files under a real agent: a damaged state makes it refuse to start (exit 78,
the file and the problem named, no traceback, within 5 s) while the pinned datapath keeps
enforcing the last policy, checked with real traffic; --check-state and --restore-state
put a good generation back; a full filesystem during an import leaves the API's answer,
the real maps and the state files in agreement."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentproc import STOCKADE, AgentProcess
from netns import Topology, run
from pinned import dump_maps
from stockade.daemon.statefiles import policy_file
from traffic import tcp_ok, udp_ok

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import stockade_policies  # noqa: E402

pytestmark = pytest.mark.root

NET4 = "10.213.41."
ISOLATE_DB = {"name": "db.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]
"""}
EX_CONFIG = 78


@pytest.fixture
def topo():
    with Topology("st") as t:
        yield t, {n: t.add_workload(n, [f"{NET4}{i}/24"]) for i, n in enumerate("abc", start=1)}


def register(agent, w):
    for name, app in (("a", "web"), ("b", "db"), ("c", "other")):
        agent.client.add_endpoint(name=name, interface=w[name].host_if, ips=w[name].ips,
                                  labels={"app": app})


def enforcing(w) -> bool:
    """db takes web's connections and not other's (a denial costs a 1 s timeout: one)."""
    return tcp_ok(w["a"], w["b"], w["b"].ip4, 5432) and not udp_ok(w["c"], w["b"], w["b"].ip4, 5433)


def agent_cmd(agent, *args, timeout=30) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    r = subprocess.run([*STOCKADE, "agent", "--config", str(agent.config_path), *args],
                       capture_output=True, text=True, timeout=timeout, env=agent.environ())
    return r, time.monotonic() - t


def state_files(state_dir) -> dict[str, bytes]:
    """The state's files (not the kept build, bpf/, beside them)."""
    return {n: (state_dir / n).read_bytes() for n in os.listdir(state_dir)
            if (state_dir / n).is_file()}


# Every shape of damage is in tests/test_state_store.py; here a few, with real traffic.
# (how, file, content, message): "file" replaces the file (a disk, an editor or a script
# damaged it); "store" commits it as a generation (a version that wrote what this one
# cannot read: only the reading of its records can refuse it).
DB_FILE = policy_file({"kind": "CiliumNetworkPolicy", "metadata": {"name": "db"}})   # db's shard
DAMAGE = [
    ("file", DB_FILE, "{}", f"{DB_FILE}: $: {{}} is not of type 'array'"),
    ("file", DB_FILE, "[{}]", f"{DB_FILE}: $[0]: 'document' is a required property"),
    ("file", DB_FILE, "null", f"{DB_FILE}: $: None is not of type 'array'"),
    ("file", DB_FILE, None, f"{DB_FILE}: not JSON"),          # cut in half
    ("file", "revision.json", '"12"', "revision.json: $: '12' is not of type 'integer'"),
    ("file", "revision.json", "7", "revision.json: does not match state.json"),
    ("file", "state.json", "[]", "state.json: $: [] is not of type 'object'"),
    ("store", "policies.json", [{"document": {"kind": "CiliumNetworkPolicy"}}],
     f"{policy_file({'kind': 'CiliumNetworkPolicy'})}: document 0: stored policy cannot be read"),
    ("store", "endpoints.json", [{"name": "a", "id": 1, "interface": "x", "ips": ["nope"], "labels": {}}],
     "endpoints.json: [0] (a): 'nope' does not appear to be an IPv4 or IPv6 address"),
]


@pytest.mark.parametrize("how,name,content,message", DAMAGE,
                         ids=[f"{h}-{n}-{str(c)[:12] if c else 'cut'}" for h, n, c, _ in DAMAGE])
def test_a_damaged_state_refuses_to_start_and_the_datapath_keeps_enforcing(topo, how, name, content,
                                                                           message):
    t, w = topo
    agent = AgentProcess()
    try:
        agent.start()
        register(agent, w)
        agent.client.put_policies([ISOLATE_DB])
        assert enforcing(w)
        agent.kill()
        state = agent.run_dir / "state"
        if how == "store":
            from stockade.daemon.store import StateStore
            StateStore(state).commit({name: content})
        number = json.loads((state / "state.json").read_text())["generation"]
        if how == "file":
            path = state / name
            text = path.read_text()
            path.unlink()      # a new file: the generations kept beside it stay as they were
            path.write_text(content if content is not None else text[:len(text) // 2])
        maps = dump_maps(agent.settings["bpffs_dir"])

        r, took = agent_cmd(agent)
        assert r.returncode == EX_CONFIG, r.stderr
        assert took < 5, f"refused after {took:.1f}s"
        assert f"{state}/{message}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr + r.stdout
        assert "--restore-state" in r.stderr
        assert dump_maps(agent.settings["bpffs_dir"]) == maps        # nothing was written
        assert enforcing(w), "the datapath stopped enforcing while the agent refused to start"

        r, _ = agent_cmd(agent, "--check-state")
        assert r.returncode == EX_CONFIG
        current = "current" if name == "state.json" else f"current (#{number})"
        assert f"{current}: DAMAGED: {state}/{message}" in r.stdout, r.stdout
        good = 1 if how == "file" else 2     # a bad generation committed: the one before it
        assert f"generation {good} (#{number + 1 - good}): ok: 1 policies, revision 1, 3 endpoints" \
            in r.stdout, r.stdout

        r, _ = agent_cmd(agent, "--restore-state", str(good))
        assert r.returncode == 0, r.stderr
        assert f"generation {good} (#{number + 1 - good}) is current again, as #{number + 1}" in r.stdout
        assert agent_cmd(agent, "--check-state")[0].returncode == 0
        agent.start()
        assert [p["name"] for p in agent.client.policies()] == ["db"]
        assert {e["name"]: e["state"] for e in agent.client.endpoints()} == {
            "a": "ready", "b": "ready", "c": "ready"}
        assert enforcing(w)
    finally:
        agent.stop()


def test_restore_state_refuses_while_the_agent_runs(topo):
    t, w = topo
    with AgentProcess() as agent:
        register(agent, w)
        r, _ = agent_cmd(agent, "--restore-state", "1")
        assert r.returncode == 1 and "stop it first" in r.stderr


@pytest.fixture
def small_fs():
    path = Path(f"/run/stockade-test-fs-{os.getpid()}")
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=8m,mode=0750", "tmpfs", str(path))
    try:
        yield path
    finally:
        run("umount", str(path), check=False)
        path.rmdir()


def fill(fs: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free on ``fs``."""
    filler = fs / "filler"
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_filesystem_during_an_import_changes_nothing(topo, small_fs):
    """ENOSPC after the maps were written: the answer is 507, the maps are put back, the
    state files are the previous generation, and a restart enforces the same policy."""
    t, w = topo
    agent = AgentProcess(state_dir=str(small_fs / "state"))
    try:
        agent.start()
        register(agent, w)
        agent.client.put_policies([ISOLATE_DB])
        peers = [(f"p{i}", list(range(10000 + 500 * i, 10500 + 500 * i))) for i in range(20)]
        for i, (label, _) in enumerate(peers):
            agent.client.add_ipcache(f"10.214.{i}.0/24", {"bench-peer": label}, "h2")
        big = {"name": "big.yaml", "text": stockade_policies(peers, "db")}
        state_dir = small_fs / "state"
        files = state_files(state_dir)
        maps = dump_maps(agent.settings["bpffs_dir"])
        health = agent.client.health()
        filler = fill(small_fs, leave=64 * 1024)   # the policy shards of the import need ~1 MB

        from stockade.client import APIError
        with pytest.raises(APIError) as err:
            agent.client.put_policies([big])
        assert err.value.status == 507, err.value
        assert "No space left on device" in str(err.value)
        assert dump_maps(agent.settings["bpffs_dir"]) == maps
        assert state_files(state_dir) == files
        after = agent.client.health()
        assert (after["policy_revision"], after["policies"]) == (health["policy_revision"], 1)
        assert [p["name"] for p in agent.client.policies()] == ["db"]
        assert enforcing(w)

        agent.kill()                       # what a restart finds is what the answer said
        filler.unlink()
        agent.start()
        assert [p["name"] for p in agent.client.policies()] == ["db"]
        assert agent.client.health()["policy_revision"] == health["policy_revision"]
        assert dump_maps(agent.settings["bpffs_dir"]) == maps
        assert enforcing(w)
        result = agent.client.put_policies([big])          # with space, the import goes in
        assert result["diff"]["entries"]["added"] >= 10000
    finally:
        agent.stop()
