"""What the agent offers its API server: the methods and the shapes they return.

The HTTP server (daemon/server.py) is a thin translation of these methods to routes
under /v1; the real implementation is ``daemon.agent.Agent``. Every method is
thread-safe. Errors are StockadeError subclasses (errors.py), each with its HTTP status
as ``http_status``: InvalidRequest, PolicyErrors, SelectorError -> 400, PermissionDenied
-> 403, NotFound -> 404, Conflict -> 409, datapath CapacityError -> 507, any other
StockadeError -> 500. The server has validated every body and query against
docs/api/openapi.yaml before a method is called (types, required keys, no unknown keys);
meaning (an IP that is not one, a selector that does not parse) is the method's to check.

Read-only methods (members of the socket group may call them): health, the list_*
methods, metrics, flows, follow_flows, trace, matrix, review, and put_policies,
delete_policy and set_services with ``dry_run=True``. They must change nothing.

Shapes (JSON-ready dicts):

Endpoint   {"name": str, "id": int, "interface": str, "ifindex": int|None,
            "ips": [str], "labels": {"source:key": value}, "identity": int|None,
            "source": "static"|"podman"|"docker"|"libvirt", "audit": bool,
            "state": "ready"|"waiting-for-interface"|"unidentified",
            "enforcement": {"ingress": {"enforced": bool, "default_deny": bool},
                            "egress": {...}},
            "dropped_labels": [{"label": "key=value", "reason": str,
                                "cause": "other-source"|"reserved"|"invalid"|"image"}]
                              (labels its source gave that it does not get: labelsources.py)}
Identity   {"id": int, "labels": ["source:key=value", ...], "kind": "reserved"|"workload"|"cidr",
            "prefix": str (cidr only), "endpoints": [endpoint names], "local": bool}
IPCacheEntry {"prefix": "10.0.0.5/32", "identity": int, "labels": [...],
            "host": str|None, "source": "local"|"remote"|"cidr"}
PolicyInfo {"kind": str, "namespace": str|None, "name": str, "source": str,
            "document": {...raw document...}, "rules": int}
Health     {"status": "ok"|"degraded", "version": str, "uptime_s": float,
            "enforcement": "default"|"always"|"never", "audit": bool,
            "policy_revision": int, "endpoints": int, "identities": int,
            "policies": int, "ipcache": int, "errors": [str],
            "unprotected_interfaces": [str],
            "host": str|None, "policy_problems": [str], "binding_mismatches": [str],
            "sources": [{"name", "where", "connected": bool, "waiting", "since",
                         "last_event", "last_sync", "errors": int, "last_error", ...}],
            "attach": {"mode": "tcx"|"tc", "repairs": int,
                       "degraded": [{"interface": str, "what": str, "since": RFC 3339 UTC}]},
            "l7_proxy": null (no proxy configured) | {"wanted": bool, "running": bool,
                       "pid": int|None, "restarts": int, "ok": bool, "last_error": str|None,
                       "ipv6_disabled": [bridge], "problems": [str], "l7_ports": int,
                       "request_log": {"received", "garbled", "dropped", "sink_errors",
                                       "pipe_bytes"}},
            "kvstore": (with etcd only) {"state", "endpoints_reachable", "revision",
                       "last_event_age_s", "remote_entries", "refused_entries",
                       "refusals", "conflicts", "last_error", ...: fleet.py status)}
PolicyResult {"revision": int, "changed": bool, "dry_run": bool,
            "diff": {"added": [display names], "removed": [...], "changed": [...],
                     "rules": {"added": [str], "removed": [str]},
                     "entries": {"added": int, "removed": int,
                                 "sample": [{"op": "+"|"-", "local": int, "peer": int,
                                             "direction": "ingress"|"egress", "port": "80/tcp",
                                             "verdict": "allow"|"deny"}]}}}
Flow       {"time": RFC 3339 UTC, "verdict": "FORWARDED"|"DROPPED"|"AUDIT",
            "drop_reason": snake_case reason or null (forwarded), "reason": str,
            "direction": "ingress"|"egress" (relative to the endpoint of the hook),
            "ip_version": 4|6, "ip": {"source", "destination"},
            "l4": {"protocol", "source_port", "destination_port", "tcp_flags" (tcp),
                   "icmp_type", "icmp_code" (icmp)},
            "is_reply": bool, "interface": {"index": int, "name": str|None},
            "source"/"destination": {"identity": int, "labels": [str],
                                     "endpoint": {"name": str|None, "host": str}|None},
            "policy": [policy display names that allowed/denied, where known],
            "policy_match": "allow"|"deny"|"default-deny"|"default-allow"|"not-enforced"|None,
            "size": bytes, "connection": "tcp 10.0.0.1:40000 -> 10.0.0.2:5432"}
            A connection between two local endpoints gives two Flows (egress of the
            source, ingress of the destination) with the same "connection".
Trace      the shape of stockade.policy.trace.Tracer.trace (``policy trace -o json``):
           {"verdict": "allow"|"deny"|"partial", "src": {"selector", "identity"},
            "dst": {...}, "port": "80/tcp", "egress": TraceSide, "ingress": TraceSide,
            "parts": [...] (a CIDR side split by the policies' prefixes)}
            TraceSide {"verdict", "enforced": bool, "policies": [str], "rules": [...],
            "reason": str}
Matrix     {"rows": [{"src": MatrixPeer, "dst": MatrixPeer, "cell": Cell}], "total": int
            (pairs that match, before offset/limit), "offset": int, "limit": int}
            MatrixPeer {"id": int, "name": str, "labels": [str]}
            Cell {"state": "open"|"ports"|"any"|"closed"|"self", "allow": [port],
                  "deny": [port], "audit": bool, "remote": bool}
Review     {"revision": int, "diff": PolicyResult's diff,
            "pairs": [{"src", "dst": str, "src_id", "dst_id": int, "allowed": [port],
                       "denied": [port]}] (identity pairs whose verdict changes),
            "flows": [{"from", "to": str, "port": str, "change": "allow"|"block",
                       "audit": bool, "count": int, "text": str, ...}] (observed
                       connections whose verdict would change), "flows_checked": int}
FlowList   {"flows": [Flow, oldest first], "count": int, "connections": int (distinct
            "connection" values), "events_lost": {"rate_limit_new", "rate_limit_drop",
            "ringbuf_full": int}, "buffer": {"size": int, "capacity": int}}
"""
from __future__ import annotations

from typing import Protocol


class AgentService(Protocol):
    def health(self) -> dict: ...

    def list_endpoints(self) -> list[dict]: ...

    def add_endpoint(self, spec: dict) -> dict:
        """spec: {"name": str (required), "interface": str (required), "ips": [str]
        (required, at least one), "labels": {k: v} or "k=v,..." , "audit": bool}.
        Labels get source static; keys naming another source are dropped (dropped_labels),
        reserved: and invalid ones are InvalidRequest.
        Conflict if the name or interface is taken by another endpoint; the same spec
        again is accepted (idempotent)."""

    def remove_endpoint(self, name: str) -> None: ...

    def oci_hook(self, state: dict) -> dict:
        """state: a container's OCI state as Podman's OCI hook reads it ({"id", "pid",
        "bundle", "annotations"}; stockade/hook.py). Enrolls the container as an endpoint
        before its process runs, through the same path as a runtime event, and returns
        {"id", "enrolled": bool (its endpoint is ready), "endpoint": Endpoint|None,
        "reason": why not (str) or None, "seconds": float}. A container the agent cannot
        enroll now is not an error: the events path finds it."""

    def list_identities(self) -> list[dict]: ...

    def list_ipcache(self) -> list[dict]: ...

    def add_ipcache(self, entry: dict) -> dict:
        """entry: {"prefix": "10.1.2.3" or "10.1.2.0/24", "labels": {k: v}, "host": str}.
        Remote workloads of other hosts; labels give them an identity."""

    def add_ipcache_entries(self, body: dict) -> dict:
        """body: {"entries": [entry, ...]}, applied as one change; a bad entry refuses all."""

    def remove_ipcache(self, prefix: str) -> None: ...

    def list_policies(self) -> list[dict]: ...

    def put_policies(self, files: list[dict], *, replace_all: bool = False,
                     dry_run: bool = False) -> dict:
        """files: [{"name": "web.yaml", "text": "<yaml or json>"}]. Validated as one set
        (any error: nothing applied, PolicyErrors). Adds or replaces the given policies;
        with replace_all the live set becomes exactly these. Returns a PolicyResult."""

    def delete_policy(self, name: str, namespace: str | None = None,
                      kind: str | None = None, *, dry_run: bool = False) -> dict:
        """name "*" with no namespace removes every policy. Returns a PolicyResult."""

    def metrics(self) -> str:
        """Prometheus text exposition."""

    def flows(self, criteria: dict) -> dict:
        """criteria: stockade.flows.filters keys; list-valued keys OR their values, different
        keys AND (hubble observe semantics); "since" (RFC 3339 or a duration such as 5m),
        "last" (the N newest matches). Returns a FlowList; bad criteria: InvalidRequest."""

    def follow_flows(self, criteria: dict, stopping=None):
        """An iterator of Flows as they are decoded (after the ``last`` newest, if given),
        with None now and then as a heartbeat; ends when ``stopping`` is set or the agent
        stops. Bad criteria raise InvalidRequest before the iterator is returned."""

    def list_services(self) -> list[dict]:
        """The inventory's services with their members on this host (ServiceList)."""

    def service_conflicts(self) -> list[dict]:
        """Workloads that more than one service matches, and the service chosen."""

    def set_services(self, data: dict, *, dry_run: bool = False) -> dict:
        """Replace the service definitions; returns a ServiceResult."""

    def trace(self, src: str, dst: str, dport: str, http: dict | None = None) -> dict:
        """What the live policy does with one connection, and why (a Trace); with
        ``http`` ({"method", "path", "host", "headers": ["Name: value"]}, any part), also
        with one HTTP request on it, by the HTTP rules the proxy enforces. src and
        dst are SELs as the CLI's (``app=web,tier=x``, ``cidr:10.0.0.0/8``,
        ``entity:world``, ``endpoint:NAME``); dport is ``80/tcp``. The agent's own
        enforcement mode applies. Bad input: SelectorError or InvalidRequest."""

    def matrix(self, query: dict) -> dict:
        """Identity pairs and what each may do (a Matrix). query: GET /v1/matrix's
        parameters as the server validated them against docs/api/openapi.yaml, defaults
        filled in: "label" (k=v,k2=v2 on either side), "port" ("80/tcp"; absent: any
        port), "offset", "limit" (rows), "dst_offset", "dst_limit" (columns; absent:
        every identity), "cidrs"."""

    def review(self, files: list[dict], replace_all: bool = False) -> dict:
        """The plan of a proposed policy set, changing nothing (a Review): files as
        put_policies'. Invalid files: PolicyErrors, as put_policies."""
