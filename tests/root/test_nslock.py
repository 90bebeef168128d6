"""One agent per network namespace (issue 14.4): the lock is an abstract unix socket,
scoped to the namespace by the kernel. A second agent in the namespace refuses to start,
naming the holder's PID; --cleanup refuses while it runs; agents in two namespaces run
side by side. The agents run in namespaces of their own (``ip netns exec``), with pins
on a bpffs mounted under /run (``ip netns exec`` hides /sys/fs/bpf)."""
import os
import subprocess

import pytest

from agentproc import STOCKADE, AgentProcess
from netns import run

pytestmark = pytest.mark.root


@pytest.fixture
def spaces():
    tag = f"skl{os.getpid()}"
    names = [f"{tag}a", f"{tag}b"]
    bpf = f"/run/stockade-nslock-{os.getpid()}"
    os.makedirs(bpf, exist_ok=True)
    run("mount", "-t", "bpf", "bpf", bpf)
    try:
        for n in names:
            run("ip", "netns", "add", n)
            run("ip", "-n", n, "link", "set", "lo", "up")
        yield names, bpf
    finally:
        for n in names:
            run("ip", "netns", "del", n, check=False)
        run("umount", bpf, check=False)
        os.rmdir(bpf)


def agent_in(ns: str, bpf: str, name: str) -> AgentProcess:
    return AgentProcess(command=["ip", "netns", "exec", ns, *STOCKADE], shared_namespace=False,
                        bpffs_dir=f"{bpf}/{name}")


def test_second_agent_in_a_namespace_is_refused(spaces):
    (ns1, ns2), bpf = spaces
    first, second, other = agent_in(ns1, bpf, "first"), agent_in(ns1, bpf, "second"), \
        agent_in(ns2, bpf, "other")
    try:
        first.start()
        with pytest.raises(RuntimeError) as refused:
            second.start(timeout=30)
        assert "agent exited 1" in str(refused.value)
        assert f"PID {first.proc.pid}" in str(refused.value), str(refused.value)
        assert "one agent per namespace" in str(refused.value)
        # --cleanup takes the lock too: refused while the first one runs
        r = subprocess.run(["ip", "netns", "exec", ns1, *STOCKADE, "agent", "--config",
                            str(first.config_path), "--cleanup"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1 and f"PID {first.proc.pid}" in r.stderr, r.stderr
        assert first.client.health()["status"] == "ok"
        other.start()                               # another namespace: its own lock
        assert other.client.health()["status"] == "ok"
        assert first.client.health()["status"] == "ok"
        first.kill()                                # the lock goes with the process
        second.start()
        assert second.client.health()["status"] == "ok"
    finally:
        for a in (other, second, first):      # the holder last: the others clean up first
            a.stop()
