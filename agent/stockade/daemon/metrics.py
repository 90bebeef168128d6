"""Prometheus metrics of one agent, collected at scrape time from the model and maps."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

DIRS = {0: "ingress", 1: "egress"}


class AgentCollector:
    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        a = self.agent
        with a._lock:
            gauges = {
                "stockade_endpoints": ("Endpoints known to the agent", len(a.endpoints)),
                "stockade_identities": ("Identities known to the agent", len(a.identities)),
                "stockade_policies": ("Policies in force", len(a.policies)),
                "stockade_policy_revision": ("Policy revision", a.revision),
                "stockade_ipcache_entries": ("ipcache entries", len(a.ipcache)),
                "stockade_policy_map_entries": ("Entries in the policy map", len(a.compiler.entries)),
            }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
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


def render(agent) -> str:
    reg = CollectorRegistry()
    reg.register(AgentCollector(agent))
    return generate_latest(reg).decode()


def serve_metrics(agent, listen: str):
    """Serve /metrics over TCP at ``host:port`` (default off) in a thread."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    host, _, port = listen.rpartition(":")

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

    srv = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True, name="stockade-metrics").start()
    return srv
