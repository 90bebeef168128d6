"""The API socket against an unprivileged member of the ``stockade`` group, on a real
agent process: a hostile one cannot exhaust the agent or lock root out, and an honest
one (the web UI) can read, review and dry-run but not change anything.

The member is a throwaway system user made for this module and removed afterwards,
even on failure. Its programs (hostile_peer.py, member_calls.py) are standard library
only and run with /usr/bin/python3 as that user, so SO_PEERCRED is real.
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest

from agentproc import AgentProcess
from stockade.client import Client

pytestmark = pytest.mark.root

HERE = Path(__file__).resolve().parent
PYTHON = "/usr/bin/python3"
HOSTILE_SECONDS = 20.0
HOSTILE_CONNECTIONS = 40
MiB = 1024 * 1024

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: "5432", protocol: TCP}]}]}]
"""


@pytest.fixture(scope="module")
def member():
    """A system user in group stockade (the group too, if it was missing)."""
    made_group = False
    try:
        grp.getgrnam("stockade")
    except KeyError:
        subprocess.run(["groupadd", "--system", "stockade"], check=True)
        made_group = True
    name = f"stk-hostile-{os.getpid()}"
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", "--groups", "stockade", name],
                       check=True, capture_output=True)
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        if made_group:
            subprocess.run(["groupdel", "stockade"], capture_output=True)


@pytest.fixture(scope="module")
def agent(member):
    a = AgentProcess()
    os.chmod(a.run_dir, 0o711)  # the member reaches the socket; the socket's mode decides
    with a:
        yield a


def run_as(user: pwd.struct_passwd, script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-I", "-c", (HERE / script).read_text(), *args],
                            user=user.pw_uid, group=user.pw_gid,
                            extra_groups=[grp.getgrnam("stockade").gr_gid], cwd="/",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (bytes) and Threads of a process."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def status_latency(agent) -> float:
    """One root `stockade status` the way the CLI asks it: a new connection, GET health."""
    start = time.monotonic()
    with Client(agent.socket, timeout=10) as c:
        assert c.health()["status"] in ("ok", "degraded")
    return time.monotonic() - start


def cli_status(agent) -> float:
    start = time.monotonic()
    r = agent.cli("status", "-o", "json", check=False, timeout=30)
    elapsed = time.monotonic() - start
    assert json.loads(r.stdout)["status"] in ("ok", "degraded"), r.stderr
    return elapsed


def test_hostile_member_cannot_exhaust_the_agent_or_lock_root_out(agent, member):
    """40 connections of a group member, each sending an 8 MB body (or one just under a
    member's 4 MiB limit) slowly, for 20 s. Meanwhile root's `stockade status` answers
    within 1 s every time (the API call, and the whole CLI command with its Python
    start-up), and the agent's peak RSS grows by less than 64 MB."""
    pid = agent.proc.pid
    # warm the paths the test takes, so that first-use imports do not count as growth
    with Client(agent.socket) as c:
        c.put_policies([{"name": "warm.yaml", "text": POLICY + "#" * MiB}], dry_run=True)
    cli_baseline = min(cli_status(agent) for _ in range(3))
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = proc_status(pid)

    hostile = run_as(member, "hostile_peer.py", agent.socket, str(HOSTILE_SECONDS),
                     str(HOSTILE_CONNECTIONS))
    latencies, cli_times, threads = [], [], []
    try:
        end = time.monotonic() + HOSTILE_SECONDS - 1
        time.sleep(1.0)  # let the connections pile up
        while time.monotonic() < end:
            latencies.append(status_latency(agent))
            threads.append(proc_status(pid)["Threads"])
            if len(latencies) % 8 == 0:
                cli_times.append(cli_status(agent))
            time.sleep(0.25)
        out, err = hostile.communicate("", timeout=60)
    finally:
        if hostile.poll() is None:
            hostile.kill()
            hostile.wait()
    after = proc_status(pid)
    assert hostile.returncode == 0, err
    seen = json.loads(out)
    growth = after["VmHWM"] - before["VmRSS"]
    print(f"\nhostile figures: member {seen}; root status: {len(latencies)} calls, max "
          f"{max(latencies):.3f} s; CLI max {max(cli_times):.3f} s (alone {cli_baseline:.3f} s); "
          f"agent RSS {before['VmRSS'] / MiB:.1f} MiB before, peak {after['VmHWM'] / MiB:.1f} "
          f"MiB (+{growth / MiB:.1f}); threads {before['Threads']} before, max {max(threads)}")

    assert seen.get("403", 0) > 0 and seen.get("413", 0) > 0, seen
    assert seen.get("408", 0) > 0, f"slow bodies a member may send are cut off: {seen}"
    assert not any(k.startswith("2") for k in seen), f"a member changed something: {seen}"
    assert max(latencies) < 1.0, latencies
    assert max(cli_times) < 1.0, (cli_times, cli_baseline)
    assert growth < 64 * MiB
    assert max(threads) < before["Threads"] + 40, "a bounded pool, not a thread per connection"
    assert status_latency(agent) < 1.0
    assert agent.client.policies() == [], "nothing was applied"


def test_member_reads_reviews_and_dry_runs_but_cannot_change(agent, member):
    """What the web UI does as a group member: GET everything, a dry run with a 1 MB
    file, a review; every real change is 403 and changes nothing."""
    agent.client.delete_all_policies()
    big = POLICY + "# padding\n" * (MiB // 10)
    files = json.dumps({"files": [{"name": "db.yaml", "text": big}]})
    calls = [
        ["GET", "/v1/health", None],
        ["GET", "/v1/endpoints", None],
        ["GET", "/v1/identities", None],
        ["GET", "/v1/ipcache", None],
        ["GET", "/v1/policies", None],
        ["GET", "/v1/metrics", None],
        ["GET", "/v1/services", None],
        ["GET", "/v1/flows?last=5", None],
        ["PUT", "/v1/policies?dry_run=true", files],
        ["PUT", "/v1/services?dry_run=true", json.dumps({"services": {}})],
        ["DELETE", "/v1/policies?dry_run=true", None],
        # served by the reconciling agent; here: let through by the permission check
        ["GET", "/v1/trace?src=app%3Dweb&dst=app%3Ddb&dport=5432%2Ftcp", None],
        ["GET", "/v1/matrix?limit=10", None],
        ["POST", "/v1/review", files],
        # changes
        ["PUT", "/v1/policies", files],
        ["PUT", "/v1/policies?dry_run=false", files],
        ["POST", "/v1/endpoints", json.dumps({"name": "x", "interface": "x", "ips": ["10.9.9.9"]})],
        ["POST", "/v1/ipcache", json.dumps({"prefix": "10.9.0.0/16", "labels": {"a": "b"}})],
        ["PUT", "/v1/services", json.dumps({"services": {}})],
        ["DELETE", "/v1/policies", None],
        ["DELETE", "/v1/policies/db", None],
        ["DELETE", "/v1/endpoints/x", None],
        ["DELETE", "/v1/ipcache/10.9.0.0%2F16", None],
    ]
    p = run_as(member, "member_calls.py", agent.socket)
    out, err = p.communicate(json.dumps(calls), timeout=120)
    assert p.returncode == 0, err
    results = json.loads(out)
    got = {f"{m} {path}": r for (m, path, _), r in zip(calls, results, strict=False)}
    reads, pending, changes = calls[:11], calls[11:14], calls[14:]
    for m, path, _ in reads:
        assert got[f"{m} {path}"][0] == 200, (m, path, got[f"{m} {path}"])
    for m, path, _ in pending:
        assert got[f"{m} {path}"][0] != 403, (m, path, got[f"{m} {path}"])
    for m, path, _ in changes:
        status, message = got[f"{m} {path}"]
        assert status == 403 and "needs root" in message and f"uid {member.pw_uid}" in message
    assert agent.client.policies() == [] and agent.client.endpoints() == []
    assert not any(e["prefix"] == "10.9.0.0/16" for e in agent.client.ipcache())
