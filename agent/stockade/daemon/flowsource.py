"""The agent's flow source: a thread polls the datapath's event ring buffer, decodes
batches into the flow ring (stockade.flows), writes the optional flow log, and
answers flow queries and follows for the API.

The decoder resolves endpoints and labels from a ``Resolver`` built from the agent's
last committed snapshot (a new one when the agent commits, or every
``SNAPSHOT_MAX_AGE_S``), and policy names from the policy_ids the events carry (the
datapath's table: what decided a flow when it happened). An L7 flow's come the same way
from the rule set number the proxy logs (l7.rules.RuleSets).
"""
from __future__ import annotations

import functools
import ipaddress
import json
import logging
import threading
import time
from typing import Iterator

from ..datapath.maps import MATCH_ALLOW, MATCH_DEFAULT_DENY, MATCH_NONE, Reason, Verdict
from ..flows import Decoder, FlowFilter, FlowLog, FlowRing, Resolver, connection_key
from ..flows.l7 import L7Info
from ..policy.mapstate import EGRESS, INGRESS

log = logging.getLogger("stockade.flows")

POLL_MS = 100
WORLD = 2
SNAPSHOT_MAX_AGE_S = 1.0
# (address, identity the proxy logged) -> an L7 row's side of it, per resolver: most
# requests come from a few clients to a few servers. Bounded (least recently used out),
# and cleared with a new resolver (what it holds comes from the agent's snapshot).
L7_PEER_CACHE_MAX = 4096
FOLLOW_HEARTBEAT_S = 15.0


def _padded(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed.ljust(16, b"\0")


class FlowSource:
    def __init__(self, agent):
        cfg = agent.config
        self.agent = agent
        self.ring = FlowRing(cfg.flow_buffer_size)
        self.decoder = Decoder(self.ring)
        self.flow_log = (FlowLog(cfg.flow_log_path, cfg.flow_log_max_bytes, cfg.flow_log_backups)
                         if getattr(cfg, "flow_log_path", None) else None)
        self._pending: list[bytes] = []
        self._fingerprint = None
        self._snapshot_at = 0.0
        self._thread: threading.Thread | None = None
        self.errors = 0
        self._ids_by_addr: dict[bytes, int] = {}
        # _l7_side cached: a pure function of its arguments for one snapshot (see add_l7)
        self._l7_peer = functools.lru_cache(maxsize=L7_PEER_CACHE_MAX)(self._l7_side)
        self._l7_policies: dict[int | None, int] = {}
        self._l7_epoch: tuple = (None, None)   # (resolver, rule sets) the two above come from

    # ------------------------------------------------------------------ snapshot
    def refresh(self, force: bool = False) -> None:
        """A new resolver when the agent has committed a new version (or it is old)."""
        a = self.agent
        if not force and a.version == self._fingerprint and \
                time.monotonic() - self._snapshot_at < SNAPSHOT_MAX_AGE_S:
            return
        snap = a.snapshot()
        host = a.config.host_name
        by_addr: dict[bytes, tuple] = {}
        ids: dict[bytes, int] = {}
        for prefix, e in snap.ipcache.items():
            net = ipaddress.ip_network(prefix)
            if net.prefixlen == net.max_prefixlen:
                ids[net.network_address.packed.ljust(16, b"\0")] = e.identity
                if e.host:
                    by_addr[net.network_address.packed.ljust(16, b"\0")] = (None, e.host)
        self._ids_by_addr = ids
        for ep in snap.endpoints:
            for ip in ep.ips:
                by_addr[_padded(ip)] = (ep.name, host)
        labels = {i: tuple(ident.labels.to_strings()) for i, ident in snap.identities.items()}
        ifnames = {i: l.name for i, l in snap.links.items()}
        for ep in snap.endpoints:
            if ep.ifindex is not None:
                ifnames[ep.ifindex] = ep.interface
        self.decoder.set_resolver(Resolver(dict(snap.by_ifindex), by_addr, labels,
                                           a.dp.policy_names, ifnames, host))
        self._fingerprint = snap.version
        self._snapshot_at = time.monotonic()

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        self.refresh(force=True)
        self.agent.dp.open_events(self._pending.append, raw=True)
        self._thread = threading.Thread(target=self._run, name="stockade-flows", daemon=True)
        self._thread.start()
        self.agent.add_thread(self._thread)

    def _run(self) -> None:
        stop = self.agent.stopping
        while not stop.is_set():
            try:
                self.agent.dp.poll_events(POLL_MS)
                if self._pending:
                    # the ring buffer callback holds this list's append: empty it in place
                    batch = self._pending[:]
                    del self._pending[:len(batch)]
                    self.process(batch)
            except Exception:  # keep observing; the datapath keeps enforcing regardless
                self.errors += 1
                log.exception("decoding flow events failed")
                stop.wait(0.5)
        if self.flow_log:
            self.flow_log.close()

    def process(self, batch: list[bytes]) -> int:
        self.refresh()
        rows = self.decoder.rows(batch)
        self.ring.append_rows(rows)
        if self.flow_log is not None:
            self.flow_log.write(self.ring.to_dict(r) for r in rows)
        return len(rows)

    # ------------------------------------------------------------------ L7
    def add_l7(self, records: list) -> int:
        """The proxy's request records (l7.logs.LogRecord) -> two rows per direction, a REQUEST and
        a RESPONSE (source and destination swapped, as Hubble shows a response), into the
        ring and the flow log. Called from the proxy's log thread."""
        self.refresh()
        l7 = self.agent.l7
        epoch = (self.decoder.resolver, l7.rule_sets if l7 is not None else None)
        if self._l7_epoch[0] is not epoch[0] or self._l7_epoch[1] is not epoch[1]:
            self._l7_epoch = epoch
            self._l7_peer.cache_clear()
            self._l7_policies = {}
        rows = []
        for rec in records:
            rows.extend(self._l7_rows(rec))
        self.ring.append_rows(rows)
        if self.flow_log is not None:
            self.flow_log.write(self.ring.to_dict(r) for r in rows)
        return len(rows)

    def _l7_side(self, addr: str, identity: int | None) -> tuple[bytes, int, int]:
        """(padded address, identity, interned peer info) of one side of an L7 row: the
        identity the proxy logged, or the ipcache's (a bad request has none). Called
        through its cache, ``_l7_peer``."""
        padded = _padded(addr)
        ident = identity if identity is not None else self._ids_by_addr.get(padded, WORLD)
        info = self.decoder._info(ident, *self.decoder.resolver.endpoints_by_addr.get(
            padded, (None, None)))
        return padded, ident, info

    def _l7_rows(self, rec) -> list[tuple]:
        """A request's rows per direction whose rules it met, as Cilium's two proxy
        passes show them: the client's egress first; the server's ingress when egress
        let it through (or had no rules). A request no rule set applied to (a bad one):
        ingress."""
        saddr, sid, src_info = self._l7_peer(rec.client, rec.src_identity)
        daddr, did, dst_info = self._l7_peer(rec.server, rec.dst_identity)
        ipv = 6 if ":" in rec.client else 4
        host, ua = rec.host, rec.user_agent
        headers: tuple[tuple[str, str], ...] = (
            (("host", host), ("user-agent", ua)) if host and ua else
            (("host", host),) if host else (("user-agent", ua),) if ua else ())
        req = L7Info("REQUEST", 0, rec.method, rec.path, host, rec.protocol, 0, headers)
        resp = L7Info("RESPONSE", rec.latency_ns, rec.method, rec.path, host, rec.protocol,
                      rec.status, headers)
        passes: list[tuple[int, int | None, bool | None]] = []
        if rec.egress_rule_set is not None:
            passes.append((EGRESS, rec.egress_rule_set,
                           rec.egress_allowed if rec.allowed is not None else None))
        if rec.rule_set is not None or not passes:
            if not passes or rec.egress_allowed:
                passes.append((INGRESS, rec.rule_set, rec.allowed))
        l7_add = self.ring.l7.add
        request_ns, log_ns = rec.request_ns, rec.log_ns
        cport, sport = rec.client_port, rec.server_port
        rows = []
        for direction, rule_set, allowed in passes:
            pol = self._l7_policy(rule_set)
            if allowed:
                verdict, reason, pmatch = Verdict.FORWARDED, Reason.NONE, MATCH_ALLOW
            elif allowed is None:
                verdict, reason, pmatch = Verdict.DROPPED, Reason.INVALID, MATCH_NONE
            else:
                verdict, reason, pmatch = Verdict.DROPPED, Reason.POLICY_DENIED, MATCH_DEFAULT_DENY
            rows += [
                (request_ns, 0, sid, did, src_info, dst_info, pol, 0, saddr, daddr,
                 cport, sport, verdict, reason, direction, ipv, 6, 0, 0, 0,
                 pmatch, 0, l7_add(req)),
                (log_ns, 0, did, sid, dst_info, src_info, pol, 0, daddr, saddr,
                 sport, cport, verdict, reason, direction, ipv, 6, 0, 0, 1,
                 pmatch, 0, l7_add(resp)),
            ]
        return rows

    def _l7_policy(self, rule_set: int | None) -> int:
        """Index of the names of the policies behind the rule set the proxy applied (the
        number its log line carries): those that decided the request when it came.
        Numbers are never reused by one RuleSets (l7.rules): one found is kept until
        the next resolver (or rule sets)."""
        idx = self._l7_policies.get(rule_set)
        if idx is None:
            l7 = self.agent.l7
            names = l7.rule_sets.policies(rule_set) if l7 is not None else ()
            idx = self.ring.policies.add(names)
            if names and len(self._l7_policies) < L7_PEER_CACHE_MAX:
                self._l7_policies[rule_set] = idx
        return idx

    # ------------------------------------------------------------------ queries
    def events_lost(self) -> dict:
        try:
            return self.agent.dp.events_lost()
        except Exception:
            return {}

    def query(self, criteria: dict) -> dict:
        f = FlowFilter.parse(criteria)
        rows = f.select(self.ring)
        return {"flows": [self.ring.to_dict(r) for r in rows],
                "count": len(rows),
                "connections": len({connection_key(r) for r in rows}),
                "events_lost": self.events_lost(),
                "buffer": {"size": len(self.ring), "capacity": self.ring.capacity}}

    def follow(self, criteria: dict, stopping: threading.Event | None = None) -> Iterator[dict | None]:
        """Matching flows as they come (after the ``last`` newest, or those since ``since``,
        if given). Yields
        None now and then without a flow, so the caller can check for shutdown or a
        peer that went away."""
        f = FlowFilter.parse(criteria)
        seq = self.ring.seq
        if f.last is not None or f.since_ns is not None:
            for r in f.select(self.ring):
                yield self.ring.to_dict(r)
        f.last = None
        stop = self.agent.stopping
        quiet_since = time.monotonic()
        while not stop.is_set() and not (stopping is not None and stopping.is_set()):
            if not self.ring.wait(seq, 0.5):
                if time.monotonic() - quiet_since > FOLLOW_HEARTBEAT_S:
                    quiet_since = time.monotonic()
                    yield None
                continue
            rows, seq, _skipped = self.ring.rows_since(seq)
            infos = self.ring.infos
            for r in rows:
                if f.match(r, infos):
                    yield self.ring.to_dict(r)
            quiet_since = time.monotonic()


def start_flows(agent) -> FlowSource:
    """Create and start the agent's flow source (called from Agent.start)."""
    fs = FlowSource(agent)
    fs.start()
    return fs


def json_lines(flows: Iterator[dict | None]) -> Iterator[bytes]:
    """Chunks for a streaming response: one JSON line per flow, a bare newline as a
    heartbeat."""
    for f in flows:
        yield b"\n" if f is None else json.dumps(f, separators=(",", ":")).encode() + b"\n"
