"""The fleet store as a source: this host's workloads published to etcd, every other
host's applied as remote ipcache entries (docs/agent.md, "The fleet store").

Keys under the prefix: ``nodes/<host>``, ``endpoints/<host>/<ip>`` (each host's own, under
its leases) and ``subnets/<host>`` (the controller's). Publishing: every commit of the
reconciler wakes ``_local_loop``, which turns the committed endpoints into the keys this
host wants and hands them to the kvstore Publisher. Watching: the kvstore Mirror's
listings and events are queued; ``_apply_loop`` takes all that is queued, updates the
view, works out the records (with the address-ownership checks) of the addresses that
changed, and submits one ``KvstoreSync`` change: the same single reconciler path as
every other source.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sys
import threading
import time
from collections import deque
from typing import Any

from ..errors import StockadeError
from ..kvstore import EtcdClient, KvstoreError, Mirror, Publisher
from ..policy.labels import LabelSet
from .changes import KvstorePersist, KvstoreSync
from .endpoints import parse_labels
from .state import RemoteRecord

log = logging.getLogger("stockade.fleet")
# kvstore.json (a cache of the view for a restart without etcd) is written by a change of
# its own once the store has been quiet this long, or this long after it first differed
PERSIST_QUIET, PERSIST_LATEST = 0.5, 10.0
MAX_REPORTED = 20
MAX_VALUE = 16384         # bytes of one published endpoint record
MAX_LABELS = 64
MAX_LABELSETS = 65536     # distinct label sets kept parsed (one object shared by their records)


def _net(text: str):
    return ipaddress.ip_network(text, strict=False)


def _address(text: str):
    """``text`` as an address, its canonical text and host prefix; ValueError if it is
    none. A re-list works this out for every key: inet_pton takes only the canonical
    dotted quad and is many times faster than ipaddress's parser."""
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text)), text, f"{text}/32"
    except OSError:
        addr = ipaddress.ip_address(text)
        canonical = str(addr)
        return addr, canonical, f"{canonical}/{addr.max_prefixlen}"


class _Published:
    """One other host's ``endpoints/<host>/<ip>``: its raw value and, once worked out,
    what it gives (record or refusal) and the ``epoch`` (subnets, host addresses) it was
    worked out under. A slotted object per key: the view holds one per remote address."""

    __slots__ = ("value", "epoch", "rec", "why")

    def __init__(self, value: bytes):
        self.value = value
        self.epoch: tuple | None = None
        self.rec: RemoteRecord | None = None
        self.why: str | None = None


class FleetSource:
    def __init__(self, agent):
        cfg, etcd = agent.config, agent.config.fleet_store
        self.agent, self.host, self.ttl = agent, cfg.host_name, etcd.lease_ttl
        self.prefix = etcd.prefix.rstrip("/") + "/"
        self.client = EtcdClient(etcd.endpoints, ca=etcd.ca, cert=etcd.cert, key=etcd.key,
                                 timeout=min(3.0, max(1.0, self.ttl / 3)))
        p = self.prefix.encode()
        self.publisher = Publisher(self.client, self.ttl, [
            p + f"endpoints/{self.host}/".encode(), p + f"nodes/{self.host}".encode()])
        self.mirror = Mirror(self.client, p, on_listing=self._on_listing,
                             on_events=self._on_events, check_interval=max(1.0, self.ttl / 3))
        # the view: raw values of other hosts' keys, and every host's subnets
        self.eps: dict[tuple[str, str], _Published] = {}   # (host, ip) -> value, parsed
        self.nodes: dict[str, list[str]] = {}               # host -> addresses
        self.subnets: dict[str, list | None] = {}           # host -> networks (None: invalid)
        self.ep_hosts: dict[str, tuple[str, ...]] = {}      # ip -> hosts publishing it
        self.addr_hosts: dict[str, tuple[str, ...]] = {}    # node address -> hosts
        self.records: dict[str, RemoteRecord] = {}          # prefix -> what was submitted
        self.refusals: dict[str, str] = {}                   # key (and address) -> why
        self.conflicts: dict[str, str] = {}                  # prefix -> between which hosts
        self.refused_total = 0
        self.last_listing: dict | None = None   # keys, list_s, total_s of the last listing
        self.last_change = 0.0
        self.reachable = 0
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._local = threading.Event()
        self._threads: list[threading.Thread] = []
        self._unsaved_since: float | None = None   # monotonic: kvstore.json behind since
        self._epoch = 0                                    # + 1 whenever subnets change
        self._epoch_key: tuple | None = None
        self._labelsets: dict[tuple, LabelSet] = {}        # labels' items -> the one LabelSet
        self._published_from: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.agent.commit_hooks.append(self._committed)
        self._local.set()
        self.publisher.start()
        self.mirror.start()
        for fn, name in ((self._apply_loop, "stockade-fleet-apply"),
                         (self._local_loop, "stockade-fleet-publish"),
                         (self._probe_loop, "stockade-fleet-probe")):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._local.set()
        with self._cv:
            self._cv.notify_all()
        self.mirror.stop()
        self.publisher.stop()
        for t in self._threads:
            t.join(timeout=5)
        self.client.close()

    # ------------------------------------------------------------------ publishing
    def _committed(self, dirty: set[str] | None) -> None:
        """Under the agent's lock: wake the publisher when local workloads may differ."""
        if dirty is None or dirty & {"endpoints", "services", "identities"}:
            self._local.set()

    def _local_loop(self) -> None:
        while not self._stop.is_set():
            self._local.wait(1.0)
            self._local.clear()
            if self._stop.is_set():
                return
            try:
                self.publisher.set_desired(self.desired())
            except Exception:
                log.exception("fleet: working out what to publish failed")

    def desired(self) -> dict[bytes, bytes]:
        """The keys this host wants: each identified endpoint's addresses, and the node."""
        snap = self.agent.snapshot()
        host, out = self.host, {}
        for ep in snap.endpoints:
            ident = snap.identities.get(ep.identity) if ep.identity is not None else None
            if ident is None:
                continue
            labels = {k: v for k, v in ident.labels.to_dict().items()
                      if not k.startswith("reserved:")}
            for ip in ep.ips:
                ip = str(ipaddress.ip_address(ip))
                out[f"{self.prefix}endpoints/{host}/{ip}".encode()] = json.dumps(
                    {"labels": labels, "name": ep.name, "source": ep.source, "host": host},
                    sort_keys=True).encode()
        mine = self.subnets.get(host) or []
        addrs = []
        for a in self.agent.state.meta.get("host_ips", ()):
            ip = ipaddress.ip_address(a)
            if ip.is_loopback or ip.is_link_local or any(ip in n for n in mine):
                continue
            addrs.append(str(ip))
        out[f"{self.prefix}nodes/{host}".encode()] = json.dumps(
            {"addresses": sorted(addrs)}).encode()
        return out

    # ------------------------------------------------------------------ watching
    def _on_listing(self, items, revision: int) -> None:
        with self._cv:
            self._queue.append(("listing", items))
            self._cv.notify()

    def _on_events(self, events) -> None:
        with self._cv:
            self._queue.append(("events", events))
            self._cv.notify()

    def _probe_loop(self) -> None:
        """``endpoints_reachable`` every TTL/3, on a thread of its own: a member that
        accepts connections but does not answer yet (starting, catching up) holds each
        probe up to a second, which must not hold up applying the store's changes."""
        while not self._stop.is_set():
            try:
                self.reachable = self.client.probe()
            except Exception:  # noqa: BLE001 - a probe that fails counts nothing reachable
                log.exception("fleet: probing the etcd endpoints failed")
                self.reachable = 0
            self._stop.wait(max(1.0, self.ttl / 3))

    def _apply_loop(self) -> None:
        """Until stopped, whatever one round raises: a dead thread would leave the
        mirror frozen with status still saying connected."""
        while not self._stop.is_set():
            try:
                self._apply_round()
            except Exception as exc:  # noqa: BLE001 - logged, shown in status, next round
                log.exception("fleet: applying the store's changes failed")
                self.agent.error(f"fleet store: applying its changes failed: {exc!r}; "
                                 "listing again")
                self.mirror.reconnect()    # what the failed round held comes back listed
                self._stop.wait(0.5)

    def _apply_round(self) -> None:
        with self._cv:
            if not self._queue:
                self._cv.wait(timeout=0.25)
            batch = list(self._queue)
            self._queue.clear()
        now = time.monotonic()
        if batch:
            self._apply(batch)
        since = self._unsaved_since
        if since is not None and (not batch and now - self.last_change >= PERSIST_QUIET or
                                  now - since >= PERSIST_LATEST):
            self._submit(KvstorePersist())

    def _key(self, key: bytes) -> tuple[str, ...] | None:
        """``endpoints/<host>/<ip>`` -> ("endpoints", host, ip), etc.; None: not ours."""
        try:
            rel = key.decode()[len(self.prefix):]
        except UnicodeDecodeError:
            return None
        parts = tuple(rel.split("/"))
        if parts[0] == "endpoints" and len(parts) == 3 or \
                parts[0] in ("nodes", "subnets") and len(parts) == 2:
            return parts
        return None

    def _apply(self, batch: list) -> None:
        full = False
        touched: set[str] = set()
        started, listed, keys = self.mirror.list_started, self.mirror.list_s, 0
        for kind, payload in batch:
            if kind == "listing":
                full, keys = True, len(payload)
                old_eps, self.eps = self.eps, {}
                self.refusals.clear()
                self.nodes.clear()
                old_subnets, self.subnets = self.subnets, {}
                self.ep_hosts.clear()
                self.addr_hosts.clear()
                for kv in payload:
                    self._update(kv.key, kv.value, touched, old_subnets, old_eps)
                del old_eps
                if set(old_subnets) != set(self.subnets):    # a host's subnets went
                    self._epoch += 1
            else:
                for ev in payload:
                    self._update(ev.key, ev.value if ev.kind == "put" else None, touched)
        if "*" in touched or full:
            touched = set(self.ep_hosts) | set(self.addr_hosts) | \
                {r.rsplit("/", 1)[0] for r in self.records}
            self.refusals = {k: v for k, v in self.refusals.items()
                             if not (k.startswith("endpoints/") or " " in k)}
            self.conflicts.clear()
        puts: dict[str, RemoteRecord] = {}
        deletes: list[str] = []
        self._epoch_key = None
        for ip in touched:
            if ip == "*":
                continue
            try:
                addr, canonical, prefix = _address(ip)
            except ValueError:
                for host in self.ep_hosts.get(ip, ()):
                    self._refuse(f"endpoints/{host}/{ip}", "not an IP address")
                continue
            rec = self._record(ip, addr, canonical, prefix)
            if rec is None:
                if prefix in self.records:
                    deletes.append(prefix)
            elif self.records.get(prefix) != rec:
                puts[prefix] = rec
        if full:
            want = {p: r for p, r in self.records.items() if p not in deletes}
            want.update(puts)
            self._submit(KvstoreSync(want, full=True, persist=False), want, [])
        elif puts or deletes:
            self._submit(KvstoreSync(puts, deletes, persist=False), puts, deletes)
        self.last_change = time.monotonic()
        if full:
            self.last_listing = {"keys": keys, "list_s": round(listed, 3),
                                 "total_s": round(self.last_change - started, 3)}
            self._local.set()   # our own subnets may have changed what the node record holds

    def _submit(self, change, puts=None, deletes=None) -> None:
        try:
            self.agent.submit(change)
        except StockadeError as exc:
            self.agent.error(f"fleet store: {exc}")
            return
        if isinstance(change, KvstorePersist):
            self._unsaved_since = None
            return
        if self._unsaved_since is None:
            self._unsaved_since = time.monotonic()
        if change.full:
            self.records = dict(puts)
        else:
            for p in deletes:
                self.records.pop(p, None)
            self.records.update(puts)

    def _update(self, key: bytes, value: bytes | None, touched: set[str],
                old_subnets: dict | None = None, old_eps: dict | None = None) -> None:
        parts = self._key(key)
        if parts is None:
            return
        kind, host = parts[0], sys.intern(parts[1])
        if kind == "subnets":
            old = self.subnets.pop(host, None) if old_subnets is None else old_subnets.get(host)
            self.refusals.pop(f"subnets/{host}", None)
            if value is not None:
                self.subnets[host] = self._parse_subnets(host, value)
            if self.subnets.get(host) != old:
                self._epoch += 1
            touched.add("*")
            if host == self.host:
                self._local.set()
            return
        if host == self.host:
            return
        if kind == "endpoints":
            ip = parts[2]
            if value is None:
                self.eps.pop((host, ip), None)
                self.refusals.pop(f"endpoints/{host}/{ip}", None)
                _drop(self.ep_hosts, ip, host)
            else:
                old = (old_eps if old_eps is not None else self.eps).get((host, ip))
                # an unchanged value keeps what was worked out (a re-list parses nothing new)
                self.eps[(host, ip)] = old if old is not None and old.value == value else \
                    _Published(value)
                _add(self.ep_hosts, ip, host)
            touched.add(ip)
            return
        for a in self.nodes.pop(host, []):   # nodes/<host>
            _drop(self.addr_hosts, a, host)
            self.refusals.pop(f"nodes/{host} {a}", None)
            touched.add(a)
        self.refusals.pop(f"nodes/{host}", None)
        if value is not None:
            addrs = self._parse_node(host, value)
            self.nodes[host] = addrs
            for a in addrs:
                _add(self.addr_hosts, a, host)
                touched.add(a)

    # ------------------------------------------------------------------ records
    def _refuse(self, what: str, why: str) -> None:
        if self.refusals.get(what) != why:
            self.refused_total += 1
            log.warning("fleet store: refused %s: %s", what, why)
        self.refusals[what] = why

    def _parse_subnets(self, host: str, value: bytes) -> list | None:
        try:
            doc = json.loads(value)
            return [_net(s) for s in doc["subnets"]]
        except (ValueError, TypeError, KeyError) as exc:
            self._refuse(f"subnets/{host}", f"not {{\"subnets\": [CIDR, ...]}}: {exc}")
            return None

    def _parse_node(self, host: str, value: bytes) -> list[str]:
        try:
            doc = json.loads(value)
            return sorted({str(ipaddress.ip_address(a)) for a in doc["addresses"]})
        except (ValueError, TypeError, KeyError) as exc:
            self._refuse(f"nodes/{host}", f"not {{\"addresses\": [IP, ...]}}: {exc}")
            return []

    def _own(self, ip, canonical: str | None = None) -> str | None:
        """Why ``ip`` cannot be another host's: it is this host's."""
        if (canonical or str(ip)) in self.agent.state.meta.get("host_ips", ()):
            return "an address of this host"
        if any(ip in n for n in self.subnets.get(self.host) or []):
            return f"inside this host's subnets ({self.host})"
        return None

    def _record(self, ip_text: str, ip, canonical: str, prefix: str) -> RemoteRecord | None:
        """What ``ip`` (published as ``ip_text``) is, from every host that publishes it;
        refusals and conflicts noted."""
        self.conflicts.pop(prefix, None)
        found: list[tuple[str, RemoteRecord]] = []
        for host in self.ep_hosts.get(ip_text, ()):      # sorted (_add)
            if self.refusals:
                self.refusals.pop(f"endpoints/{host}/{ip_text}", None)
            rec, why = self._endpoint_cached(host, ip, ip_text, canonical)
            if why:
                self._refuse(f"endpoints/{host}/{ip_text}", why)
            elif rec is not None:
                found.append((host, rec))
        for host in sorted(self.addr_hosts.get(ip_text, ())):
            what = f"nodes/{host} {ip_text}"
            self.refusals.pop(what, None)
            why = self._own(ip, canonical) or next((f"inside the subnets of {h}" for h, nets in
                                         self.subnets.items() if nets and any(ip in n for n in nets)), None)
            if why:
                self._refuse(what, why)
            else:
                found.append((host, RemoteRecord(LabelSet(), host, node=True)))
        if len(found) > 1:
            self.conflicts[prefix] = (f"published by {', '.join(h for h, _ in found)}; "
                                      f"{found[0][0]}'s is used")
        return found[0][1] if found else None

    def _endpoint_cached(self, host: str, ip, ip_text: str, canonical: str) -> tuple[RemoteRecord | None, str | None]:
        """``_endpoint``, parsed again only when the value, a host's subnets or this host's
        addresses changed (a re-list of an unchanged store parses nothing)."""
        pub = self.eps.get((host, ip_text))
        if pub is None:
            return None, None
        epoch = self._epoch_key
        if epoch is None or epoch[0] != self._epoch:
            # one tuple per round, shared by every entry worked out in it
            epoch = self._epoch_key = (self._epoch, self.agent.state.meta.get("host_ips", ()))
        if pub.epoch != epoch:
            pub.rec, pub.why = self._endpoint(host, ip, pub.value, canonical)
            pub.epoch = epoch
        return pub.rec, pub.why

    def _labels(self, labels: dict) -> LabelSet:
        """The LabelSet of published ``labels``: one shared object per distinct set."""
        if not all(type(v) is str for v in labels.values()):
            return parse_labels(labels, "unspec")
        key = tuple(labels.items())
        found = self._labelsets.get(key)
        if found is None:
            if len(self._labelsets) >= MAX_LABELSETS:
                self._labelsets.clear()
            found = self._labelsets[key] = parse_labels(labels, "unspec")
        return found

    def _endpoint(self, host: str, ip, value: bytes | None, canonical: str | None = None) -> tuple[RemoteRecord | None, str | None]:
        if value is None:
            return None, None
        nets = self.subnets.get(host)
        if not nets:
            return None, f"{host} has no valid subnets/{host}"
        if not any(ip in n for n in nets):
            return None, f"outside {host}'s subnets"
        own = self._own(ip, canonical)
        if own:
            return None, own
        if len(value) > MAX_VALUE:
            return None, f"larger than {MAX_VALUE} bytes"
        try:
            doc = json.loads(value)
            labels = doc["labels"]
            if not isinstance(labels, dict) or not labels:
                return None, "no labels"
            if len(labels) > MAX_LABELS:
                return None, f"more than {MAX_LABELS} labels"
            if any(str(k).startswith("reserved:") for k in labels):
                return None, "reserved labels are never published"
            if doc.get("host", host) != host:
                return None, f"its host field says {doc.get('host')!r}"
            return RemoteRecord(self._labels(labels), host), None
        except (ValueError, TypeError, KeyError, StockadeError) as exc:
            return None, f"not an endpoint record: {exc}"

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        snap = self.agent.snapshot()
        remote = sum(1 for r in snap.kvstore.values() if r.identity is not None)
        waiting = sorted(p for p, r in snap.kvstore.items() if r.identity is None)
        m, pub = self.mirror, self.publisher
        if m.watching and pub.connected:
            state = "connected"
        elif m.synced_once or snap.kvstore:
            state = "degraded"
        else:
            state = "disconnected"
        age = round(time.monotonic() - m.last_response, 1) if m.last_response else None
        conflicts = [{"prefix": p, "reason": "an API entry takes precedence"} for p in waiting]
        conflicts += [{"prefix": p, "reason": why} for p, why in sorted(self.conflicts.items())]
        return {"state": state, "endpoints_reachable": self.reachable, "revision": m.revision,
                "last_event_age_s": age, "remote_entries": remote,
                "refused_entries": len(self.refusals), "refused_total": self.refused_total,
                "host": self.host, "prefix": self.prefix.rstrip("/"),
                "endpoints": self.client.endpoints, "leases": len(pub.leases),
                "leases_lost": pub.leases_lost, "published": len(pub.published),
                "listings": m.listings, "last_listing": self.last_listing, "conflicts": conflicts[:MAX_REPORTED],
                "conflicts_total": len(conflicts),
                "refusals": [{"key": k, "reason": v} for k, v in
                             sorted(self.refusals.items())[:MAX_REPORTED]],
                "last_error": pub.last_error or (m.last_error if not m.watching else None)}


def _add(index: dict[str, tuple[str, ...]], ip: str, host: str) -> None:
    hosts = index.get(ip, ())
    if host not in hosts:
        index[ip] = tuple(sorted((*hosts, host)))


def _drop(index: dict[str, tuple[str, ...]], ip: str, host: str) -> None:
    hosts = tuple(h for h in index.get(ip, ()) if h != host)
    if hosts:
        index[ip] = hosts
    else:
        index.pop(ip, None)


def start_fleet(agent) -> FleetSource | None:
    if agent.config.fleet_store is None:
        return None
    try:
        fleet = FleetSource(agent)
    except KvstoreError as exc:
        agent.error(f"fleet store: {exc}")
        return None
    fleet.start()
    return fleet
