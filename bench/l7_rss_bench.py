"""The L7 proxy's own RSS with N HTTP rules (issue 18.6: < 60 MB with 1,000 rules).

Writes the configuration and maps the agent would (stockade.l7.haproxy / rules) for
N rules in rule sets of ``--per-set`` rules each, starts Debian's HAProxy on them (as the
agent does: user haproxy, CAP_NET_ADMIN/CAP_NET_RAW only), loads the maps again through
the runtime API as a policy change would, and reads VmRSS of the proxy process.

    python bench/l7_rss_bench.py --rules 1000
"""
from __future__ import annotations

import argparse
import json
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from stockade.l7.haproxy import ProxySettings, RuntimeAPI, map_text, render_config, write_atomic
from stockade.l7.rules import rule_keys
from stockade.policy.api.ports import HTTPRule


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--per-set", type=int, default=4)
    ap.add_argument("--port", type=int, default=15991)
    args = ap.parse_args()
    pw = pwd.getpwnam("haproxy")
    run = Path(tempfile.mkdtemp(prefix="stockade-l7-bench-", dir="/run"))
    shutil.chown(run, pw.pw_uid, pw.pw_gid)
    s = ProxySettings(run, port=args.port, slots=args.per_set)
    maps: dict[str, dict[str, str]] = {n: {} for n in ["ipcache", "rulesets"] + s.slot_maps()}
    sets = (args.rules + args.per_set - 1) // args.per_set
    for rs in range(1, sets + 1):
        maps["ipcache"][f"10.{rs // 250}.{rs % 250}.1/32"] = str(1000 + rs)
        maps["rulesets"][f"{1000 + rs}:8080:0"] = str(rs)
        for i in range(args.per_set):
            rule = HTTPRule("GET|POST", f"/api/v{i}/items/[0-9]+(\\?.*)?", f"svc{rs}\\.example",
                            (f"X-Token: t{rs}",))
            for field, key in rule_keys(rs, rule).items():
                maps[f"{field}{i}"][key] = "1"
    write_atomic(s.config_path, render_config(s))
    for name, entries in maps.items():
        write_atomic(s.map_path(name), map_text(entries))
    caps = "+net_admin,+net_raw"
    proc = subprocess.Popen(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                             "--clear-groups", f"--inh-caps=-all,{caps}",
                             f"--ambient-caps=-all,{caps}", f"--bounding-set=-all,{caps}", "--",
                             "haproxy", "-db", "-f", str(s.config_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = RuntimeAPI(s.admin_socket)
        for _ in range(200):
            try:
                if "Name: HAProxy" in api.command("show info"):
                    break
            except Exception:
                time.sleep(0.05)
        started = rss_kb(proc.pid)
        t0 = time.perf_counter()
        for name in s.slot_maps():
            api.replace_map(s.map_path(name), maps[name])
        replace_s = time.perf_counter() - t0
        held = sum(1 for line in api.command(f"show map {s.map_path('path0')}").splitlines()
                   if line.strip())
        time.sleep(0.5)
        print(json.dumps({"rules": sets * args.per_set, "rule_sets": sets,
                          "rss_mb_started": round(started / 1024, 1),
                          "rss_mb_after_runtime_update": round(rss_kb(proc.pid) / 1024, 1),
                          "runtime_update_s": round(replace_s, 2),
                          "path0_entries_after_update": held}))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
