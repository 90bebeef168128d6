"""Prometheus metrics of one agent, collected at scrape time.

Everything is read when scraped, from the agent's last committed snapshot and from the
maps (BPF counters, map fill, flow verdicts, events lost); the policy-apply histogram
is the agent's own (``Agent.policy_apply_seconds``). One registry per agent (``registry``)
holds this collector and prometheus_client's process, platform and GC collectors. No
``_created`` series: they are turned off for the whole process.
"""
from __future__ import annotations

import logging
import platform
import threading

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import __version__

disable_created_metrics()

DIRS = {0: "ingress", 1: "egress"}
log = logging.getLogger("stockade.metrics")

# map name -> setting of its capacity; ipcache4/6 share IPCACHE_MAX
MAPS = ("endpoints", "ipcache4", "ipcache6", "policy", "policy_flags", "conntrack")


def _map_fill(dp) -> dict[str, tuple[int, int]]:
    """map -> (entries, max_entries), read from the maps themselves."""
    return {name: (dp.count_entries(name), dp.max_entries(name)) for name in MAPS}


def _kvstore_metrics(st: dict):
    """The fleet store (daemon/fleet.py): its state and what it brought and refused."""
    g = GaugeMetricFamily("stockade_kvstore_connected", "1 when the fleet store is connected "
                          "(listed, watching, keepalives answered), else 0")
    g.add_metric([], 1 if st["state"] == "connected" else 0)
    yield g
    g = GaugeMetricFamily("stockade_kvstore_state", "The fleet store's state: 1 for the current one",
                          labels=["state"])
    for state in ("connected", "degraded", "disconnected"):
        g.add_metric([state], 1 if st["state"] == state else 0)
    yield g
    for name, doc, key in (
            ("stockade_kvstore_endpoints_reachable", "etcd endpoints that answer", "endpoints_reachable"),
            ("stockade_kvstore_remote_entries", "Other hosts' addresses from the fleet store",
             "remote_entries"),
            ("stockade_kvstore_refused_entries", "Published addresses refused now", "refused_entries"),
            ("stockade_kvstore_revision", "The fleet store revision last seen", "revision")):
        g = GaugeMetricFamily(name, doc)
        g.add_metric([], st[key])
        yield g
    for name, doc, key in (
            ("stockade_kvstore_refusals", "Refusals of published addresses", "refused_total"),
            ("stockade_kvstore_leases_lost", "Leases found expired and granted again", "leases_lost"),
            ("stockade_kvstore_listings", "Full listings of the fleet store", "listings")):
        c = CounterMetricFamily(name, doc)
        c.add_metric([], st[key])
        yield c


class AgentCollector(Collector):
    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        a = self.agent
        snap = a.snapshot()
        yield from self._health_metrics(a)
        gauges = {
            "stockade_endpoints": ("Endpoints known to the agent", len(snap.endpoints)),
            "stockade_identities": ("Identities known to the agent", len(snap.identities)),
            "stockade_policies": ("Policies in force", len(snap.policies)),
            "stockade_policy_revision": ("Policy revision", snap.revision),
            "stockade_ipcache_entries": ("ipcache entries", len(snap.ipcache)),
            "stockade_policy_map_entries": ("Entries in the policy map", snap.entries),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        yield _labels_dropped(dict(a.labels_dropped))
        if getattr(a, "fleet", None) is not None:
            yield from _kvstore_metrics(a.fleet.status())
        rep = CounterMetricFamily("stockade_attach_repairs",
                                  "Attachments found missing or overtaken and restored")
        rep.add_metric([], getattr(a, "attach_repairs", 0))
        yield rep
        if a.dp is None:
            return
        pk = CounterMetricFamily("stockade_packets", "Packets by direction, verdict and reason",
                                 labels=["direction", "verdict", "reason"])
        by = CounterMetricFamily("stockade_bytes", "Bytes by direction, verdict and reason",
                                 labels=["direction", "verdict", "reason"])
        for (d, v, r), (p, b) in sorted(a.dp.counters().items()):
            labels = [DIRS[d], v.name, r.name.lower()]
            pk.add_metric(labels, p)
            by.add_metric(labels, b)
        yield pk
        yield by
        yield from self._datapath_metrics(a)
        yield from self._flow_metrics(a)
        yield from _l7_metrics(a)
        hist = getattr(a, "policy_apply_seconds", None)
        if hist is not None:
            yield from hist.collect()

    def _health_metrics(self, a):
        info = GaugeMetricFamily("stockade_build_info", "The agent's build: always 1",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        from .api import AgentAPI
        health = AgentAPI(a).health()
        up = GaugeMetricFamily("stockade_healthy", "1 when the agent's status is ok, 0 when it is "
                               "degraded (errors, policy problems, binding mismatches, a source down)")
        up.add_metric([], 1 if health["status"] == "ok" else 0)
        yield up
        errors = CounterMetricFamily("stockade_errors", "Errors the agent reported (stockade status "
                                     "lists the last 20) since it started")
        errors.add_metric([], getattr(a, "error_count", len(health["errors"])))
        yield errors
        problems = GaugeMetricFamily("stockade_health_problems", "Current problems by kind",
                                     labels=["kind"])
        problems.add_metric(["policy"], len(health["policy_problems"]))
        problems.add_metric(["binding_mismatch"], len(health["binding_mismatches"]))
        problems.add_metric(["source_down"], sum(1 for s in health["sources"] if not s["connected"]))
        problems.add_metric(["attach_degraded"], len(health["attach"]["degraded"]))
        problems.add_metric(["l7_ipv6_disabled"], len((health["l7_proxy"] or {}).get("ipv6_disabled", ())))
        yield problems
        unprotected = GaugeMetricFamily(
            "stockade_unprotected_interfaces", "Managed interfaces that do not run the programs now "
            "(stockade status lists them)")
        unprotected.add_metric([], len(health["unprotected_interfaces"]))
        yield unprotected

    def _datapath_metrics(self, a):
        try:
            fill = _map_fill(a.dp)
        except Exception as exc:  # a scrape must not fail because one map read did
            log.warning("cannot read map sizes: %s", exc)
            return
        ratio = GaugeMetricFamily("stockade_map_fill_ratio", "Entries / max_entries of each BPF map",
                                  labels=["map"])
        entries = GaugeMetricFamily("stockade_map_entries", "Entries in each BPF map",
                                    labels=["map"])
        for name, (n, cap) in sorted(fill.items()):
            ratio.add_metric([name], n / cap if cap else 0.0)
            entries.add_metric([name], n)
        yield ratio
        yield entries
        ct = GaugeMetricFamily("stockade_conntrack_entries", "Conntrack entries (both hooks)")
        ct.add_metric([], fill["conntrack"][0])
        yield ct

    def _flow_metrics(self, a):
        fs = getattr(a, "flow_source", None)
        if fs is None:
            return
        verdicts = CounterMetricFamily(
            "stockade_flow_verdicts", "Flow events decoded, by verdict, direction and reason "
            "(new connections and drops; rate limited, see stockade_flow_events_lost)",
            labels=["verdict", "direction", "reason"])
        from ..datapath.maps import Reason, Verdict
        for (v, d, r), n in sorted(dict(fs.decoder.verdicts).items()):
            verdicts.add_metric([Verdict(v).name if v in Verdict._value2member_map_ else str(v),
                                 DIRS.get(d, str(d)),
                                 Reason(r).name.lower() if r in Reason._value2member_map_ else str(r)], n)
        yield verdicts
        lost = CounterMetricFamily("stockade_flow_events_lost",
                                   "Flow events the datapath did not deliver", labels=["cause"])
        for cause, n in sorted(fs.events_lost().items()):
            lost.add_metric([cause], n)
        yield lost
        from ..flows.decode import ENDPOINT_SERIES
        drops = CounterMetricFamily(
            "stockade_endpoint_drop_events", "Drop events by local endpoint and direction (rate "
            f"limited like every flow event; at most {ENDPOINT_SERIES} endpoints, the rest as "
            "endpoint=\"_other\"; \"_unidentified\": interfaces without an identified workload)",
            labels=["endpoint", "direction"])
        for (name, d), n in sorted(dict(fs.decoder.endpoint_drops).items()):
            drops.add_metric([name, DIRS.get(d, str(d))], n)
        yield drops
        buf = GaugeMetricFamily("stockade_flow_buffer_records", "Flow records in the ring")
        buf.add_metric([], len(fs.ring))
        yield buf
        cap = GaugeMetricFamily("stockade_flow_buffer_capacity", "Flow ring capacity (records)")
        cap.add_metric([], fs.ring.capacity)
        yield cap


def _l7_metrics(a):
    """HTTP requests through the L7 proxy, from its request log (l7/logs.py)."""
    reader = getattr(getattr(a, "l7", None), "log_reader", None)
    if reader is None:
        return
    from ..l7.logs import CODE_SERIES
    req = CounterMetricFamily(
        "stockade_l7_requests", "HTTP requests through the L7 proxy, by verdict (FORWARDED, or "
        f"DROPPED: refused with 403 or as a bad request) and status code (at most {CODE_SERIES} "
        "codes, the rest as code=\"other\")", labels=["verdict", "code"])
    for (verdict, code), n in sorted(dict(reader.requests).items()):
        req.add_metric([verdict, "other" if code == -1 else str(code)], n)
    yield req
    lines = CounterMetricFamily("stockade_l7_log_lines", "Request log lines from the L7 proxy, by "
                                "result (parsed; garbled: dropped unread; dropped: by the proxy, "
                                "its log pipe full, so requests without a flow record)",
                                labels=["result"])
    st = reader.stats()
    lines.add_metric(["parsed"], st["received"] - st["garbled"])
    lines.add_metric(["garbled"], st["garbled"])
    lines.add_metric(["dropped"], st["dropped"])
    yield lines


def _labels_dropped(counts: dict) -> CounterMetricFamily:
    """Every (source, cause) that can happen, from 0, so that increase() sees the first."""
    from .labelsources import POSSIBLE
    fam = CounterMetricFamily(
        "stockade_labels_dropped", "Labels of new or changed endpoints that were dropped, by "
        "endpoint source and cause (other-source, reserved, invalid, image)",
        labels=["source", "cause"])
    keys = {(s, c) for s, causes in POSSIBLE.items() for c in causes} | set(counts)
    for source, cause in sorted(keys):
        fam.add_metric([source, cause], counts.get((source, cause), 0))
    return fam


_registry_lock = threading.Lock()


def registry(agent) -> CollectorRegistry:
    """The agent's one registry: its collector and the default process collectors."""
    with _registry_lock:
        reg = getattr(agent, "_metrics_registry", None)
        if reg is None:
            reg = CollectorRegistry(auto_describe=False)
            reg.register(AgentCollector(agent))
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                reg.register(collector)
            agent._metrics_registry = reg
        return reg


def render(agent) -> str:
    return generate_latest(registry(agent)).decode()


DEFAULT_LISTEN = "127.0.0.1:9962"


def listen_address(listen: str) -> tuple[str, int]:
    """``host:port``, ``:port`` (127.0.0.1) or ``on``/``true`` (127.0.0.1:9962)."""
    if listen.strip().lower() in ("on", "true", "yes", "default"):
        listen = DEFAULT_LISTEN
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve_metrics(agent, listen: str):
    """Serve /metrics over TCP at ``host:port`` (default off) in a thread."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    host, port = listen_address(listen)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = render(agent).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True, name="stockade-metrics").start()
    return srv
