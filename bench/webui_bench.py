"""Web UI page render time with 1,000 identities (issue 20 part 9; target < 500 ms a page).

A real agent process (tests/agentproc.py) with 1,000 static endpoints on veths of their
own, each with distinct labels (app=svcN, team, tier), and 1,000 policies (svcN takes
8080/tcp from svcN+1): 1,000 workload identities. `stockade webui` runs under waitress
as deployed (no --user: the bench runs as root; what is timed is the same), logged in
like a browser. Each page is fetched WARMUP times, then timed ROUNDS times from the
request to the last byte of the answer: median and p95 in ms, and the page's size.

The agent has no traffic: Flows and Service map render their empty state.

Prints one JSON line: {"identities", "endpoints", "policies", "rounds",
"pages": {path: {"median_ms", "p95_ms", "bytes"}}, "worst_median_ms", "target_ms", "ok"}.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import httpx

from bench.common import median, pct  # puts tests/ on sys.path

# isort: split
from agentproc import AgentProcess  # noqa: E402
from webuiproc import WebUIProcess  # noqa: E402

N = 1000
ROUNDS = 15
WARMUP = 2
TARGET_MS = 500
TEAMS = ("payments", "search", "identity", "billing", "catalog")
PAGES = ["/", "/endpoints", "/identities", "/policies", "/matrix", "/map", "/flows", "/review",
         # a search, and the last square of the matrix (the agent computes any page alike)
         "/endpoints?q=svc-0999", "/matrix?page=40&cpage=40"]


def policies(n: int) -> str:
    return "---\n".join(f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: svc-{i:04d}}}
spec:
  endpointSelector: {{matchLabels: {{app: svc-{i:04d}}}}}
  ingress: [{{fromEndpoints: [{{matchLabels: {{app: svc-{(i + 1) % n:04d}}}}}], toPorts: [{{ports: [{{port: "8080", protocol: TCP}}]}}]}}]
""" for i in range(n))


def login(base: str, token: str) -> httpx.Client:
    c = httpx.Client(base_url=base, timeout=30)
    html = c.get("/login").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]
    r = c.post("/login", data={"token": token, "csrf_token": csrf})
    if r.status_code != 302:
        raise RuntimeError(f"login failed: {r.status_code}")
    return c


def time_pages(c: httpx.Client) -> dict:
    out = {}
    for path in PAGES:
        for _ in range(WARMUP):
            c.get(path)
        times, size = [], 0
        for _ in range(ROUNDS):
            t = time.perf_counter()
            r = c.get(path)
            body = r.content
            times.append((time.perf_counter() - t) * 1000)
            if r.status_code != 200:
                raise RuntimeError(f"GET {path}: {r.status_code}")
            size = len(body)
        out[path] = {"median_ms": round(median(times), 1), "p95_ms": round(pct(times, 95), 1),
                     "bytes": size}
        print(f"{path}: {out[path]}", file=sys.stderr, flush=True)
    return out


def main(n: int = N) -> dict:
    prefix = f"sk{os.getpid()}"
    ns = f"{prefix}ui"
    links: list[str] = []
    tmp = tempfile.mkdtemp(prefix="stockade-webui-bench-", dir="/run")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    try:
        batch = []
        for i in range(n):
            links.append(f"{prefix}w{i}")
            batch += [f"link add {links[-1]} type veth peer name p{i} netns {ns}",
                      f"link set {links[-1]} up"]
        subprocess.run(["ip", "-batch", "-"], input="\n".join(batch), text=True, check=True,
                       capture_output=True)
        with AgentProcess(managed_bridges=[], managed_interfaces=[]) as agent:
            c = agent.client
            for i in range(n):
                c.add_endpoint(name=f"svc{i:04d}", interface=links[i],
                               ips=[f"10.216.{i // 250}.{i % 250 + 1}"],
                               labels={"app": f"svc-{i:04d}", "team": TEAMS[i % len(TEAMS)],
                                       "tier": "front" if i % 2 else "back"})
            c.put_policies([{"name": "svc.yaml", "text": policies(n)}])
            identities = sum(1 for i in c.identities() if i.get("kind") == "workload")
            token = os.path.join(tmp, "webui.token")
            with open(token, "w") as f:
                f.write("bench-token-" + os.urandom(12).hex() + "\n")
            os.chmod(token, 0o600)
            proc = WebUIProcess({"h1": agent.socket}, token, timeout=20).__enter__()
            base = proc.base
            with open(token) as f:
                ui = login(base, f.read().strip())
            try:
                pages = time_pages(ui)
            finally:
                ui.close()
            worst = max(p["median_ms"] for p in pages.values())
            return {"identities": identities, "endpoints": n, "policies": n, "rounds": ROUNDS,
                    "pages": pages, "worst_median_ms": worst,
                    "worst_p95_ms": max(p["p95_ms"] for p in pages.values()),
                    "target_ms": TARGET_MS, "ok": worst < TARGET_MS}
    finally:
        if proc is not None:
            proc.__exit__()
        for name in links:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["rm", "-rf", tmp], capture_output=True)


if __name__ == "__main__":
    # ``python -m bench.webui_bench 50``: a quick run with fewer identities
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else N)))
