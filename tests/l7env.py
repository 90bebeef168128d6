"""Shared by the L7 tests and the L7 benchmark (bench/l7_bench.py): agent settings that
keep a test agent's proxy, steering and run directory apart from any other agent's,
policies written as CNP text, the routed set-up the proxy needs, and waiting for it."""
from __future__ import annotations

import os
import textwrap

from traffic import eventually

TAG = os.getpid() % 1000


def l7_settings(run_dir_tag: str) -> dict:
    return {"l7_run_dir": f"/run/stockade-l7-test-{os.getpid()}-{run_dir_tag}",
            "l7_proxy_port": 15100 + TAG, "l7_nft_table": f"stockade_l7_t{os.getpid()}",
            "l7_route_table": 23000 + TAG, "l7_rule_priority": 23000 + TAG,
            "l7_mark": 0x5E000000 + (TAG << 16)}


def cnp(name: str, spec: str) -> dict:
    return {"name": f"{name}.yaml", "text": (
        f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\n"
        f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")}


def route_via_host(topo, host4: str, workloads) -> None:
    """The host gets ``host4`` (with its prefix length) on the topology's bridge and
    each workload a default route to it: the proxy on the host reaches the workloads,
    and they reach the host."""
    from netns import run
    run("ip", "addr", "add", host4, "dev", topo.bridge)
    for w in workloads:
        w.exec("ip", "route", "add", "default", "via", host4.split("/")[0])


def wait_proxy(agent, timeout: float = 15) -> None:
    """Until the agent's proxy runs and steers at least one port."""
    def up():
        l7 = agent.client.health().get("l7_proxy") or {}
        return l7.get("running") and l7.get("l7_ports")
    assert eventually(up, timeout=timeout), agent.client.health()
