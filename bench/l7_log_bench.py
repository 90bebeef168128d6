"""The agent's CPU per request the L7 proxy logs (issue 18): log line -> LogRecord ->
request and response flows, without the proxy.

The real code path of ``stockade.l7.logs.LogReader`` after its ``read`` (``_add``: parse,
the metrics by verdict and code) and the flow source's ``add_l7`` (identities, labels,
policies, the ring and its L7 table) in batches of ``logs.BATCH``, over an in-process
agent (tests/inprocess_agent.py) with a client and a server endpoint and an L7 policy.
The lines are what HAProxy sends for wrk's requests through the L7 bench
(bench/l7_bench.py): one client address, its ports cycling, one server. Also the same
with the flow log on (every flow rendered and written as JSON), the reading and
splitting of the lines from a real pipe apart, and the reader as it runs (its thread on
the pipe, a sender in another process writing one line a write, as HAProxy does, at
``RATE`` lines a second: a wakeup per few lines, as under the proxy), whose CPU is the
process's (user and system).

    python -m bench.l7_log_bench [LINES]

Prints one JSON line: CPU microseconds (of the thread) per logged request, the best of
``REPEATS``.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from bench.common import rmtree  # puts tests/ on sys.path

from inprocess_agent import inprocess_agent  # noqa: E402

LINES = 20000
REPEATS = 5
CLIENT, SERVER, PORT = "10.213.118.1", "10.213.118.2", 8080
POLICY = ("{endpointSelector: {matchLabels: {app: bench-server}}, ingress: [{fromEndpoints: "
          "[{matchLabels: {app: bench-client}}], toPorts: [{ports: [{port: '8080', protocol: TCP}], "
          "rules: {http: [{method: GET, path: '/.*'}]}}]}]}")


def log_lines(n: int, sid: int, did: int, rs: str) -> list[bytes]:
    now_us = time.time_ns() // 1000
    out = []
    for i in range(n):
        us = now_us + i * 37
        ok, code = ("1", "200") if i % 50 else ("0", "403")
        f = ["stockade-l7", CLIENT, str(1024 + i % 64000), SERVER, str(PORT), str(sid), str(did),
             rs, ok, "GET", "\\/", "HTTP/1.1", code, "0", "0" if ok == "1" else "-1", "0",
             f"{SERVER}:{PORT}", "-", "----", str(us), str(us // 10**6), f"{us // 1000 % 1000:03d}",
             "-", "-"]
        out.append(("\t".join(f) + "\n").encode())
    return out


def setup(state: str, flow_log: str | None):
    from stockade.daemon.flowsource import FlowSource
    from stockade.l7.proxy import L7Proxy
    settings = {"l7_run_dir": f"{state}/l7"}
    if flow_log:
        settings["flow_log_path"] = flow_log
    api = inprocess_agent(f"{state}/agent", **settings)
    for name, ip, app in (("client", CLIENT, "bench-client"), ("server", SERVER, "bench-server")):
        api.add_endpoint({"name": name, "interface": f"v{name}", "ips": [ip], "labels": {"app": app}})
    api.put_policies([{"name": "bench.yaml", "text": "apiVersion: cilium.io/v2\nkind: "
                       "CiliumNetworkPolicy\nmetadata: {name: bench-l7}\nspec: " + POLICY}])
    api.agent.dp.policy_names = lambda *ids: ()   # the recording datapath has no table
    proxy = L7Proxy(api.agent)
    with api.agent.locked():
        rulesets = proxy.desired()[2]["rulesets"]
    api.agent.l7 = proxy          # after the commits: rule set numbers -> policy names
    fs = FlowSource(api.agent)
    fs.refresh(force=True)
    eps = {e["name"]: e["identity"] for e in api.list_endpoints()}
    rs = rulesets[f"{eps['server']}:{PORT}:{eps['client']}"]
    return api, proxy, fs, eps["client"], eps["server"], rs


def per_request_us(proxy, fs, lines: list[bytes]) -> float:
    from stockade.l7.logs import BATCH
    reader = proxy.log_reader
    add = reader._add
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.thread_time_ns()
        for i in range(0, len(lines), BATCH):
            batch: list = []
            for data in lines[i:i + BATCH]:
                add(batch, data)
            fs.add_l7(batch)
        best = min(best, (time.thread_time_ns() - t0) / len(lines) / 1000)
    assert reader.garbled == 0, reader.stats()
    return round(best, 2)


RATE = 20000           # lines a second the paced sender sends (about the L7 bench's rate)
SENDER = """
import os, sys, time
n, rate = int(sys.argv[1]), float(sys.argv[2])
lines = sys.stdin.buffer.read().split(b"\\0")
clock = time.perf_counter
start = clock()
for i in range(n):
    if rate:
        while clock() - start < i / rate:
            pass
    os.write(1, lines[i % len(lines)])    # stdout: the reader's pipe (blocks while full)
"""


def pipe_us(proxy, lines: list[bytes], rate: float) -> dict:
    """The reader as it runs: its thread on the pipe, a sender in another process
    ``rate`` lines a second (0: as fast as it can, blocking while the pipe is full), one
    write a line as HAProxy's. The CPU of this process (user and system) per line."""
    import subprocess
    reader = proxy.log_reader
    wfd = reader.ensure()
    before = reader.received
    n = len(lines)
    cpu0, t0 = os.times(), time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", SENDER, str(n), str(rate)],
                            stdin=subprocess.PIPE, stdout=wfd)
    proc.communicate(b"\0".join(lines), timeout=300)
    deadline = time.monotonic() + 30
    while reader.received - before < n and time.monotonic() < deadline:
        time.sleep(0.005)
    cpu1, wall = os.times(), time.perf_counter() - t0
    got = reader.received - before
    reader.stop()
    assert got == n and reader.garbled == 0, (got, reader.stats())
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return {"us_per_request": round((user + system) * 1e6 / n, 2),
            "user_us": round(user * 1e6 / n, 2), "system_us": round(system * 1e6 / n, 2),
            "lines_per_s": round(n / wall), "pipe_bytes": reader.size}


def read_us(lines: list[bytes]) -> float:
    """A pipe's read and the split into lines, per line: the reader's loop without the
    parsing (64 KB reads of lines written one a write)."""
    import fcntl

    from stockade.l7.logs import F_SETPIPE_SZ, READ_SIZE
    chunk = lines[:500]
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)      # room for the chunk: written, then read
        total = 0
        for _ in range(200):
            for d in chunk:
                os.write(w, d)
            t0 = time.thread_time_ns()
            left, rest = sum(map(len, chunk)), b""
            while left:
                data = os.read(r, READ_SIZE)
                left -= len(data)
                got = data.split(b"\n")
                got[0] = rest + got[0]
                rest = got.pop()
            total += time.thread_time_ns() - t0
    finally:
        os.close(r)
        os.close(w)
    return round(total / (200 * len(chunk)) / 1000, 2)


def main(n: int = LINES) -> dict:
    out: dict = {"bench": "l7_log", "lines": n, "repeats": REPEATS}
    for name, flow_log in (("us_per_request", False), ("us_per_request_flow_log", True)):
        state = tempfile.mkdtemp(prefix="stockade-l7log-")
        try:
            api, proxy, fs, sid, did, rs = setup(state, f"{state}/flows.log" if flow_log else None)
            try:
                lines = log_lines(n, sid, did, rs)
                out[name] = per_request_us(proxy, fs, lines)
                if not flow_log:
                    out["read_us_per_request"] = read_us(lines)
                    out["pipe_paced"] = pipe_us(proxy, lines, RATE)
                    out["flows"] = fs.ring.seq
            finally:
                if fs.flow_log is not None:
                    fs.flow_log.close()
                api.agent.l7 = None
                api.agent.stop()
        finally:
            rmtree(state)
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else LINES)))
