"""Regenerate the measured tables in docs/performance.md (between BEGIN/END markers).

Each block ``<!-- BEGIN name --> ... <!-- END name -->`` is rewritten from the results
of one benchmark: ``name`` is a key of TARGETS (measure | value | target | met) or of
DETAILS (a function returning a Markdown table). Keys in TARGETS are dotted paths into
the benchmark's JSON. A benchmark that was skipped renders its reason.
"""
from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"

CONFIGS = ("nofilter", "stockade", "iptables", "nftables")

TARGETS = {
    "compiler": [
        ("full compile, 1,000 identities x 2,000 rules", "full_compile_s", "s", "< 2 s", lambda v: v < 2),
        ("incremental: add one identity (p50)", "incremental_add_identity_ms_p50", "ms", "< 20 ms", lambda v: v < 20),
        ("incremental: add one identity (max of 50)", "incremental_add_identity_ms_max", "ms", "< 20 ms", lambda v: v < 20),
        ("incremental: remove one identity (p50)", "incremental_remove_identity_ms_p50", "ms", "< 20 ms", lambda v: v < 20),
        ("incremental: replace one policy", "incremental_one_policy_ms", "ms", "-", None),
        ("incremental / full (add identity)", "incremental_vs_full_ratio", "", "-", None),
        ("map entries compiled", "entries", "", "-", None),
        ("peak RSS of the benchmark process", "peak_rss_mb", "MB", "< 200 MB", lambda v: v < 200),
    ],
    "datapath": [
        ("Stockade throughput / no filter, N = 10,000", "targets.throughput_ratio", "", ">= 0.90",
         lambda v: v >= 0.90),
        ("Stockade new-connection rate / no filter, N = 10,000", "targets.conn_rate_ratio", "",
         ">= 0.80", lambda v: v >= 0.80),
        ("Stockade request/response rate / no filter, N = 10,000", "targets.rr_ratio", "", "-", None),
        ("change of the throughput ratio, N = 10 -> 10,000", "targets.throughput_ratio_change", "",
         "within +-0.05", lambda v: abs(v) <= 0.05),
        ("change of the connection-rate ratio, N = 10 -> 10,000", "targets.conn_rate_ratio_change",
         "", "within +-0.05", lambda v: abs(v) <= 0.05),
        ("Stockade / nftables-with-sets new-connection rate, N = 10,000",
         "targets.conn_rate_vs_nftables", "", ">= 1.00", lambda v: v >= 1.0),
    ],
    "controlplane": [
        ("`stockade policy import`, 100,000 entries (command start to all written)",
         "apply.n.100000.stockade_import_s", "s", "< 1 s", lambda v: v < 1),
        ("same, over the API only (no CLI start), 100,000", "apply.n.100000.stockade_api_s", "s",
         "-", None),
        ("same documents from a JSON file, CLI, 100,000", "apply.n.100000.stockade_import_json_s",
         "s", "-", None),
        ("`stockade policy import`, 10,000 entries", "apply.n.10000.stockade_import_s", "s", "-",
         None),
        ("same, over the API only, 10,000", "apply.n.10000.stockade_api_s", "s", "-", None),
        ("`iptables-restore`, 10,000 rules", "apply.n.10000.iptables_restore_s", "s", "-", None),
        ("`nft -f`, 10,000 set elements", "apply.n.10000.nft_f_s", "s", "-", None),
        ("Stockade import (CLI) / iptables-restore at 10,000", "apply.import_vs_iptables_10000", "",
         "<= 2.00", lambda v: v <= 2),
        ("Stockade import (API only) / iptables-restore at 10,000", "apply.api_vs_iptables_10000",
         "", "<= 1.00", lambda v: v <= 1),
        ("CLI start-up: `stockade status` (median of 10)", "apply.cli_status_s", "s", "< 150 ms",
         lambda v: v < 0.15),
        ("one-rule change at 100,000: `stockade policy import` of one policy",
         "apply.one_rule_change_at_100000.stockade_import_s", "s", "-", None),
        ("one-rule change at 100,000 over the API (median of 11)",
         "apply.one_rule_change_at_100000.stockade_api_s", "s", "< 50 ms", lambda v: v < 0.05),
        ("one-rule change at 100,000: `iptables -R`",
         "apply.one_rule_change_at_100000.iptables_R_s", "s", "-", None),
        ("one-rule change at 100,000: `nft` element swap",
         "apply.one_rule_change_at_100000.nft_s", "s", "-", None),
        ("`podman start` called -> first allowed connection, OCI hook, p50 (50 starts)",
         "podman.start_to_enforced_ms_p50", "ms", "-", None),
        ("`podman start` called -> first allowed connection, OCI hook, p99 (50 starts)",
         "podman.start_to_enforced_ms_p99", "ms", "< 50 ms", lambda v: v < 50),
        ("the same with no agent and no hook (no filter), p99",
         "podman.no_agent_start_to_connected_ms_p99", "ms", "-", None),
        ("`podman start` duration with the agent and the hook, p50",
         "podman.podman_start_cmd_ms_p50", "ms", "-", None),
        ("`podman start` duration with no agent, p50",
         "podman.no_agent_podman_start_cmd_ms_p50", "ms", "-", None),
        ("packets dropped as from an unknown endpoint during the starts",
         "podman.unknown_endpoint_drops", "", "-", None),
        ("of those, after the container's endpoint was written",
         "podman.unknown_endpoint_drops_once_written", "", "0", lambda v: v == 0),
        ("conntrack cut of one address that gains an identity, 262,144 entries walked",
         "ctcut.one_address.ms", "ms", "-", None),
        ("agent RSS: 1,000 endpoints + 100,000 policy entries, no flow records",
         "rss.rss_full_mb", "MB", "< 100 MB", lambda v: v < 100),
        ("agent RSS with a full flow ring (estimate: the line above + the flow benchmark's "
         "full-ring memory)", "rss.rss_with_flows_estimate_mb", "MB", "< 200 MB", lambda v: v < 200),
    ],
    "fleet": [
        ("publish -> entry in each real agent's ipcache map, p50 (100 changes/s, 20,000 keys)",
         "publish_to_map_ms.p50", "ms", "-", None),
        ("publish -> entry in each real agent's ipcache map, p99", "publish_to_map_ms.p99", "ms",
         "< 500 ms", lambda v: v < 500),
        ("a local change -> its key in etcd, p50 (API call to key readable, 20 rounds)",
         "local_change_to_etcd_ms.p50", "ms", "< 100 ms", lambda v: v < 100),
        ("changes lost, an etcd member killed -9 during the churn", "changes_lost", "", "0",
         lambda v: v == 0),
        ("full re-list of 20,000 entries (listed, applied, persisted)", "relist_20000_s", "s", "-",
         None),
        ("full re-list of 100,000 entries", "relist_100000_s", "s", "< 5 s", lambda v: v < 5),
        ("agent RSS per 1,000 remote entries (at 20,000)", "rss_mb_per_1000", "MB", "< 2 MB",
         lambda v: v < 2),
        ("agent RSS per 1,000 remote entries (at 100,000)", "rss_mb_per_1000_at_100000", "MB",
         "< 2 MB", lambda v: v < 2),
    ],
    "attach": [
        ("tc mode, `tc filter del dev B egress` returned -> first dropped denied probe, p99 "
         "(20 trials)", "tc.filter.open_ms_p99", "ms", "< 1000 ms", lambda v: v < 1000),
        ("same, p50", "tc.filter.open_ms_p50", "ms", "-", None),
        ("denied probes that reached the receiver, per removal, p99 (from the command's start)",
         "tc.filter.leaked_probes_p99", "", "-", None),
        ("tc mode, `tc qdisc del dev B clsact` returned -> first dropped denied probe, p99",
         "tc.qdisc.open_ms_p99", "ms", "< 1000 ms", lambda v: v < 1000),
        ("same, p50", "tc.qdisc.open_ms_p50", "ms", "-", None),
        ("denied probes that reached the receiver, per removal, p99", "tc.qdisc.leaked_probes_p99",
         "", "-", None),
        ("longest gap between two probes around a removal (probe every 0.5 ms)",
         "tc.filter.probe_interval_ms_max", "ms", "-", None),
        ("tcx mode, same removals: denied probes that reached the receiver, total",
         "tcx_leaked_total", "", "0", lambda v: v == 0),
    ],
    "webui": [
        ("web UI, slowest page's median, 1,000 identities", "worst_median_ms", "ms", "< 500 ms",
         lambda v: v < 500),
        ("web UI, slowest page's p95", "worst_p95_ms", "ms", "-", None),
    ],
    "l7": [
        ("keep-alive request rate at saturation (64 connections), L7 / L4-only",
         "targets.keepalive_rate_ratio", "", ">= 0.50", lambda v: v >= 0.50),
        ("added p99 latency at 8 connections, keep-alive (L7 - L4-only, medians of 3 rounds' p99)",
         "targets.keepalive_p99_added_ms", "ms", "< 1 ms", lambda v: v < 1),
        ("added p99 latency at 8 connections, a new connection per request",
         "targets.close_p99_added_ms", "ms", "< 1 ms", lambda v: v < 1),
        ("new-connection-per-request rate at saturation, L7 / L4-only",
         "targets.close_rate_ratio", "", "-", None),
        ("added p50 latency at 8 connections, keep-alive", "targets.keepalive_p50_added_ms", "ms",
         "-", None),
        ("the proxy's own RSS with 1,000 L7 rules (largest of the two layouts below)",
         "targets.proxy_rss_mb_1000_rules", "MB", "< 60 MB", lambda v: v < 60),
    ],
    "loader": [
        ("100,000-entry file (10,000 documents): load as before (PyYAML CSafeLoader), CPU",
         "bench_file.before_cpu_s", "s", "-", None),
        ("same file, load now (safeload), CPU", "bench_file.after_cpu_s", "s", "-", None),
        ("now / before", "bench_file.after_vs_before", "", "<= 1.00", lambda v: v <= 1),
        ("fuzz inputs loaded (2 worker processes, stopped at 30 min)", "fuzz.inputs", "",
         ">= 1,000,000", lambda v: v >= 1_000_000),
        ("fuzz failures (an exception other than PolicyErrors, a crash, > 1 s CPU)",
         "fuzz.failures", "", "0", lambda v: v == 0),
        ("slowest fuzz input, CPU", "fuzz.slowest_cpu_s", "s", "< 1 s", lambda v: v < 1),
    ],
}


def get(data: dict, path: str):
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def table(name: str, data: dict) -> str:
    rows = ["| measure | value | target | met |", "|---|---|---|---|"]
    for label, key, unit, target, ok in TARGETS.get(name, []):
        v = get(data, key)
        if v is None:
            if ok is not None:
                rows.append(f"| {label} | not measured | {target} | - |")
            continue
        met = "-" if ok is None else ("yes" if ok(v) else "**no**")
        rows.append(f"| {label} | {v} {unit} | {target} | {met} |".replace("  |", " |"))
    return "\n".join(rows)


def datapath_detail(data: dict) -> str:
    rows = ["| N | config | throughput Gbit/s | ratio | req/resp per s | ratio | new conn/s | ratio "
            "| conn p50 us | conn p99 us |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, res in sorted(data.get("n", {}).items(), key=lambda kv: int(kv[0])):
        for c in CONFIGS:
            m, r = res["median"][c], res["ratios"].get(c, {})
            ratio = lambda k: f"{r[k]:.2f}" if k in r else "1"  # noqa: E731
            rows.append(f"| {int(n):,} | {c} | {m['throughput_gbps']:.2f} | {ratio('throughput_gbps')} "
                        f"| {m['rr_per_s']:.0f} | {ratio('rr_per_s')} | {m['conn_per_s']:.0f} "
                        f"| {ratio('conn_per_s')} | {m['conn_p50_us']:.0f} | {m['conn_p99_us']:.0f} |")
    return "\n".join(rows)


def controlplane_detail(data: dict) -> str:
    apply = data.get("apply", {}).get("n", {})
    rows = ["| N | `stockade policy import` s | the same from JSON s | API only s "
            "| `iptables-restore` s | `nft -f` s |",
            "|---|---|---|---|---|---|"]
    for n, r in sorted(apply.items(), key=lambda kv: int(kv[0])):
        rows.append(f"| {int(n):,} | {r['stockade_import_s']} | {r.get('stockade_import_json_s', '-')} "
                    f"| {r['stockade_api_s']} | {r['iptables_restore_s']} | {r['nft_f_s']} |")
    out = "\n".join(rows)
    for part in ("podman", "rss", "ctcut"):
        if part in data:
            out += f"\n\n{generic(data[part], f'{part}: ')}"
    return out


def generic(data: dict, prefix: str = "") -> str:
    """Any flat-ish JSON (e.g. the flows benchmark): one row per leaf key."""
    rows = ["| measure | value |", "|---|---|"]

    def walk(d, path):
        for k, v in d.items():
            if k in ("measured", "commit"):
                continue
            if isinstance(v, dict):
                walk(v, f"{path}{k}.")
            elif not isinstance(v, list):
                rows.append(f"| {prefix}{path}{k} | {v} |")
    walk(data, "")
    return "\n".join(rows)


def profile_detail(data: dict) -> str:
    out = []
    if "import_top_self" in data:
        out.append(f"py-spy, agent importing 10,000 entries over the API ({data['import_s']} s "
                   "while sampled):\n\n| function (self) | % of samples |\n|---|---|")
        out += [f"| `{f}` | {p} |" for f, p in data["import_top_self"]]
        out.append("\n| function (inclusive) | % of samples |\n|---|---|")
        out += [f"| `{f}` | {p} |" for f, p in data["import_top_inclusive"]]
    for cfg, r in data.get("datapath_rr", {}).items():
        out.append(f"\nperf, netbench processes, request/response through {cfg} "
                   f"({r['rr_per_s']:.0f}/s; BPF programs: {r.get('bpf_prog_pct', 0)} % of samples):"
                   "\n\n| symbol | % of samples |\n|---|---|")
        out += [f"| `{f}` | {p} |" for f, p in r["top"][:10]]
        for tag, st in r.get("bpf_programs", {}).items():
            out.append(f"\nBPF program {tag}: {st['run_cnt']} runs, {st['ns_per_packet']} ns per "
                       "packet (kernel.bpf_stats_enabled).")
    return "\n".join(out)


def loader_detail(data: dict) -> str:
    f = data.get("fuzz", {})
    b = data.get("bench_file", {})
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    rows = ["| measure | value |", "|---|---|",
            f"| 100,000-entry file | {b.get('bytes', 0):,} bytes, {b.get('documents', 0):,} documents |",
            f"| load as before, wall / CPU | {b.get('before_wall_s')} s / {b.get('before_cpu_s')} s |",
            f"| load now, wall / CPU | {b.get('after_wall_s')} s / {b.get('after_cpu_s')} s |",
            f"| fuzz inputs / wall time | {f.get('inputs', 0):,} in {f.get('wall_s')} s "
            f"({f.get('inputs_per_s')} per s){' (stopped by the cap)' if f.get('stopped_by_cap') else ''} |",
            f"| inputs per family | {cell(', '.join(f'{k} {v:,}' for k, v in sorted(f.get('families', {}).items())))} |",
            f"| slowest input | {f.get('slowest_cpu_s')} s CPU, {f.get('slowest_family')} "
            f"({f.get('slowest_name')}) |",
            f"| slowest input, its first 200 characters | `{cell(f.get('slowest_input', ''))}` |"]
    for ex in f.get("failure_examples", []):
        rows.append(f"| failure | {cell(ex)} |")
    return "\n".join(rows)


def bpfcost_detail(data: dict) -> str:
    rows = ["| N | traffic | program | before ns/run | after ns/run | after / before "
            "| rate before /s | rate after /s |", "|---|---|---|---|---|---|---|---|"]
    for n, res in sorted(data.get("n", {}).items(), key=lambda kv: int(kv[0])):
        for mode, label in (("rr", "request/response"), ("crr", "new connections")):
            b, a = res["before"][mode], res["after"][mode]
            for prog in ("to_endpoint", "from_endpoint"):
                ratio = res.get("after_over_before", {}).get(f"{mode}_{prog}")
                rows.append(f"| {int(n):,} | {label} | {prog} | {b[f'{prog}_ns']} "
                            f"| {a[f'{prog}_ns']} | {ratio} | {b['rate_per_s']:.0f} "
                            f"| {a['rate_per_s']:.0f} |")
    rows += ["", "BPF_PROG_TEST_RUN, one frame 200,000 times (warm caches, no traffic):", "",
             "| N | frame | before ns/run | after ns/run | after / before |", "|---|---|---|---|---|"]
    for n, res in sorted(data.get("n", {}).items(), key=lambda kv: int(kv[0])):
        for k, b in res["before"].get("test_run_ns", {}).items():
            a = res["after"]["test_run_ns"][k]
            ratio = res.get("after_over_before", {}).get(f"test_run_{k}")
            rows.append(f"| {int(n):,} | {k.replace('_', ' ')} | {b} | {a} | {ratio} |")
    base = data.get("baseline_commit", "")[:10]
    return "\n".join(rows) + (f"\n\nBefore: commit {base} (tests/oldbuild.py); "
                              f"median of {data.get('rounds')} interleaved rounds." if base else "")


def webui_detail(data: dict) -> str:
    rows = ["| page | median ms | p95 ms | bytes | < 500 ms |", "|---|---|---|---|---|"]
    for path, p in data.get("pages", {}).items():
        met = "yes" if p["median_ms"] < data.get("target_ms", 500) else "**no**"
        rows.append(f"| `{path}` | {p['median_ms']} | {p['p95_ms']} | {p['bytes']:,} | {met} |")
    return "\n".join(rows) + (f"\n\n{data.get('identities')} workload identities, "
                              f"{data.get('policies')} policies, {data.get('rounds')} timed requests a page.")


def l7_detail(data: dict) -> str:
    ms = lambda us: f"{us / 1000:.2f}"  # noqa: E731
    rows = ["| mode | policy | connections | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms "
            "| p99 ms of each round (its median) | req/s of each round | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, label in (("keepalive", "keep-alive"), ("close", "new per request")):
        for kind in ("saturation", "fixed"):
            for policy in ("l4", "l7"):
                r = data.get(policy, {}).get(mode, {}).get(kind)
                if not r:
                    continue
                conns = data.get("saturation_connections" if kind == "saturation" else "fixed_connections")
                rows.append(f"| {label} | {'L7 (HTTP rules)' if policy == 'l7' else 'L4-only'} "
                            f"| {conns} | {r['rate_per_s']:,.0f} | {ms(r['p50_us'])} | {ms(r['p90_us'])} "
                            f"| {ms(r['p99_us'])} | {ms(r['p999_us'])} "
                            f"| {', '.join(ms(x) for x in r.get('p99_us_of_rounds', []))} "
                            f"({ms(r['p99_us_median_of_rounds'])}) "
                            f"| {', '.join(f'{x:,.0f}' for x in r['rates_per_s'])} | {r['errors']} |")
    cpu = [(p, data[p]["keepalive"]["saturation"]) for p in ("l4", "l7")
           if "cpu_us_per_request" in data.get(p, {}).get("keepalive", {}).get("saturation", {})]
    if cpu:
        names = ["wrk", "server", "proxy", "agent"]
        rows += ["", "CPU per request, keep-alive at saturation (us; the machine's busy share beside):", "",
                 "| policy | " + " | ".join(names) + " | total | machine busy |",
                 "|---|" + "---|" * (len(names) + 2)]
        for p, r in cpu:
            c = r["cpu_us_per_request"]
            rows.append(f"| {'L7' if p == 'l7' else 'L4-only'} | "
                        + " | ".join(str(c.get(n, "-")) for n in names)
                        + f" | {round(sum(c.values()), 1)} | {r.get('machine_busy_pct', '-')} % |")
    rss = data.get("rss", {})
    if rss:
        rows += ["", "| proxy with 1,000 rules (rule sets x rules) | RSS at start | after a runtime update "
                 "| update time |", "|---|---|---|---|"]
        for r in rss.values():
            rows.append(f"| {r['rule_sets']:,} x {r['rules'] // r['rule_sets']} | {r['rss_mb_started']} MB "
                        f"| {r['rss_mb_after_runtime_update']} MB | {r['runtime_update_s']} s |")
    return "\n".join(rows)


DETAILS = {
    "l7-detail": ("l7", l7_detail),
    "webui-detail": ("webui", webui_detail),
    "loader-detail": ("loader", loader_detail),
    "profile": ("profile", profile_detail),
    "bpfcost": ("bpfcost", bpfcost_detail),
    "fuzz": ("fuzz", generic),
    "datapath-detail": ("datapath", datapath_detail),
    "controlplane-detail": ("controlplane", controlplane_detail),
    "flows": ("flows", generic),
    "vm": ("vm", generic),
    "services": ("services", generic),
    "fleet-detail": ("fleet", generic),
}


def _block(name: str, when: str, results: dict, body: str, commit: str | None = None) -> str:
    m = results["machine"]
    commit = commit or m.get("commit")
    commit = f", commit {commit}" if commit else ""
    return (f"<!-- BEGIN {name} -->\n_Measured {when} on {m['cpus']} CPUs, kernel {m['kernel']}"
            f"{commit}, by `make bench`._\n\n{body}\n<!-- END {name} -->")


def _derive(results: dict) -> None:
    """Figures that combine two benchmarks."""
    rss = get(results, "controlplane.rss.rss_full_mb")
    ring = get(results, "flows.ring_rss_mb")
    if rss is not None and ring is not None:
        results["controlplane"]["rss"]["rss_with_flows_estimate_mb"] = round(rss + ring, 1)


def update_performance_md(results: dict) -> None:
    _derive(results)
    text = DOC.read_text()
    blocks = {name: (name, lambda d, name=name: table(name, d)) for name in TARGETS}
    blocks.update(DETAILS)
    for name, (source, render) in blocks.items():
        data = results.get(source)
        if data is None:
            continue
        if "skipped" in data:
            body = f"Not measured: {data['skipped']}."
        elif "error" in data:
            body = f"Failed: {data['error']}"
        else:
            body = render(data)
        block = _block(name, data.get("measured", results["date"]), results, body,
                       data.get("commit"))
        text = re.sub(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->",
                      lambda _m: block, text, flags=re.S)
    DOC.write_text(text)
