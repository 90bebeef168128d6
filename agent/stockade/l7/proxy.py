"""The L7 manager: the agent's desired L7 state -> steering maps, host rules, the
proxy's maps; and the proxy process (HAProxy), started when the first L7 rule
appears, restarted when it dies.

The proxy runs as its own user (``l7_user``) with only CAP_NET_ADMIN and CAP_NET_RAW
(transparent sockets: IP_TRANSPARENT on the listener and on each upstream socket
that uses the client's address), through util-linux ``setpriv``.

Fail closed: the tc programs steer L7 ports as soon as the agent knows them, and the
host drops steered packets no proxy socket takes: a proxy that is down or still
starting closes the port; ``health()`` then says degraded, and the supervisor thread
restarts it.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import shutil
import subprocess
import threading
import time
from pathlib import Path

from ..datapath.maps import L7_CLIENT, L7_SERVER
from ..policy.mapstate import INGRESS
from .haproxy import ProxySettings, RuntimeAPI, RuntimeAPIError, map_text, render_config, write_atomic
from .host import HostError, HostSteering, ipv6_disabled, loosen_rp_filter
from .logs import LogReader
from .rules import FIELDS, RuleSets, rule_keys, sort_rules

log = logging.getLogger("stockade.l7")

RESTART_DELAY_S = 0.5
NO_UID = 0xFFFFFFFE     # no proxy user: owns no socket, so nft's "skuid" exception never matches
START_TIMEOUT_S = 10.0
DROPPED_EVERY_S = 2.0   # how often the proxy's count of dropped log lines is read
IPV6_EVERY_S = 2.0      # how often the delivery devices' disable_ipv6 is read between commits
NAMES_SHOWN = 5         # endpoints named in a problem, the rest counted


def _delivery(link, links: dict) -> tuple[int, bytes] | None:
    """Where a steered packet from ``link`` enters the host's IP stack: its bridge
    (ifindex, MAC), or the link itself when it is not enslaved."""
    if link is None:
        return None
    dev = link
    if link.master:
        dev = next((l for l in links.values() if l.name == link.master), None)
    if dev is None or not dev.mac:
        return None
    return dev.ifindex, bytes.fromhex(dev.mac.replace(":", ""))


def ipv6_off_message(dev: str, bridged: bool, eps: dict[str, set]) -> str:
    """What the operator is told about delivery device ``dev`` with its IPv6 off: which
    connections are dropped (``eps``: endpoint name -> its L7 roles) and the sysctl."""
    kinds = set().union(*eps.values())
    what = ("to and from HTTP ports of its endpoints" if kinds == {L7_SERVER, L7_CLIENT}
            else "to HTTP ports of its endpoints" if kinds == {L7_SERVER}
            else "from its endpoints to HTTP ports")
    names = sorted(eps)
    shown = ", ".join(names[:NAMES_SHOWN])
    if len(names) > NAMES_SHOWN:
        shown += f" and {len(names) - NAMES_SHOWN} more"
    key = dev.replace(".", "/")    # as sysctl names it
    return (f"{'bridge' if bridged else 'interface'} {dev} has IPv6 disabled "
            f"(net.ipv6.conf.{key}.disable_ipv6=1): IPv6 connections {what} are "
            f"dropped (endpoints: {shown})")


class L7Proxy:
    def __init__(self, agent):
        cfg = agent.config
        self.agent = agent
        self.user = cfg.l7_user
        try:
            pw = pwd.getpwnam(self.user)
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
            self.missing: str | None = None
        except KeyError:
            # No proxy can run; the agent still enforces L3/L4. Ports with HTTP rules are
            # steered all the same, where nothing takes them: dropped, never unfiltered.
            self.uid, self.gid = NO_UID, NO_UID
            self.missing = (f"user {self.user!r} does not exist: install haproxy (Debian "
                            "package haproxy) to enforce HTTP rules; until then traffic to "
                            "their ports is dropped")
        self.haproxy = cfg.l7_haproxy
        self.settings = ProxySettings(Path(cfg.l7_dir), port=cfg.l7_proxy_port,
                                      slots=cfg.l7_slots)
        self.match_limit = cfg.l7_match_limit
        self.host = HostSteering(cfg.l7_nft_table, cfg.l7_mark, cfg.l7_route_table,
                                 cfg.l7_rule_priority, cfg.l7_proxy_port, self.uid)
        self.api = RuntimeAPI(self.settings.admin_socket)
        self.proc: subprocess.Popen | None = None
        self.wanted = False            # some L7 rule exists: the proxy must run
        self.restarts = 0
        self.last_error: str | None = None
        self.rule_sets = RuleSets()    # the numbers in rulesets.map -> their policies
        self._maps: dict[str, dict[str, str]] = {}   # what the files (and proxy) hold
        self._pushed: dict[str, dict[str, str]] = {}  # what the running proxy holds
        self._host_installed = False
        self._targets: set = set()
        self._loose: set[str] = set()  # delivery devices whose rp_filter was checked
        # delivery device -> (a bridge?, {endpoint name: its L7 kinds}) of endpoints with an
        # IPv6 address and L7 ports; those of them whose IPv6 is off, -> their problems
        self._v6_wanted: dict[str, tuple[bool, dict[str, set[int]]]] = {}
        self._v6_off: dict[str, str] = {}
        self._v6_read = 0.0
        self.ipv6_conf = "/proc/sys/net/ipv6/conf"
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.log_reader = LogReader(self._records)
        self._dropped_before = 0       # DroppedLogs of the proxies that ran before this one
        self._dropped_now = 0          # of the running one, last read
        self._dropped_read = 0.0

    def _records(self, batch: list) -> None:
        fs = self.agent.flow_source
        if fs is not None:
            fs.add_l7(batch)

    # ------------------------------------------------------------------ desired state
    def desired(self) -> tuple[dict, dict, dict[str, dict[str, str]], dict]:
        """(steered ports, delivery MACs, map contents, IPv6 deliveries) from the agent's
        state. With no L7 rule anywhere, no map contents ({}): the proxy's ipcache map
        alone holds every prefix, not worth building on each commit for nothing. IPv6
        deliveries: delivery device name -> (a bridge?, {endpoint name: L7 kinds}) of the
        endpoints with an IPv6 address and L7 ports (their device needs IPv6 on)."""
        a = self.agent
        l7 = a.engine.l7
        ports: dict[tuple[str, int, int], int] = {}
        macs: dict[int, tuple[int, bytes]] = {}
        l7_locals: dict[int, set[tuple[int, int]]] = {}
        v6: dict[str, tuple[bool, dict[str, set[int]]]] = {}
        for k in l7:
            kind = L7_SERVER if k.direction == INGRESS else L7_CLIENT
            l7_locals.setdefault(k.local, set()).add((k.port, kind))
        for ep in a.state.endpoints.values():
            way = None
            if ep.ifindex is not None:
                way = _delivery(a.links.get(ep.ifindex), a.links)
                if way:
                    macs[ep.ifindex] = way
            mine = l7_locals.get(ep.identity, set()) if ep.identity is not None else set()
            for port, kind in mine:
                for ip in ep.ips:
                    ports[(str(ipaddress.ip_address(ip.split("/")[0])), port, kind)] = ep.identity
            dev = a.links.get(way[0]) if way else None
            if way and mine and dev is not None and any(":" in ip for ip in ep.ips):
                _, eps = v6.setdefault(dev.name, (way[0] != ep.ifindex, {}))
                eps.setdefault(ep.name, set()).update(kind for _, kind in mine)
        if not (ports or l7):
            return ports, macs, {}, v6
        written: set[int] = set()
        rulesets: dict[str, str] = {}
        slots: dict[str, dict[str, str]] = {n: {} for n in self.settings.slot_maps()}
        for k in sorted(l7):
            rules = l7[k]
            rs = self.rule_sets.number(rules, a.engine.l7_policies(k))
            if rs not in written:
                written.add(rs)
                for i, rule in enumerate(sort_rules(rules)):
                    for field, key in rule_keys(rs, rule, self.match_limit).items():
                        slots.setdefault(f"{field}{i}", {})[key] = "1"
            tag = "" if k.direction == INGRESS else "e:"
            rulesets[f"{tag}{k.local}:{k.port}:{k.peer}"] = str(rs)
        ipcache = {prefix: str(e.identity) for prefix, e in a.state.ipcache.items()}
        maps = {"ipcache": ipcache, "rulesets": rulesets, **slots}
        return ports, macs, maps, v6

    def _idle(self) -> bool:
        """No proxy, no files and nothing steered: with no L7 rule, nothing to do."""
        return not self.running and not self._maps and not self._targets

    def slots_needed(self, maps: dict) -> int:
        i = 0
        while any(f"{f}{i}" in maps and maps[f"{f}{i}"] for f in FIELDS):
            i += 1
        return i

    def sync_locked(self) -> None:
        """Make the datapath, the host and the proxy match the agent's state (called
        with the agent's lock, after each commit)."""
        with self._lock:
            ports, macs, maps, v6 = self.desired()
            self.wanted = bool(maps)
            self._v6_wanted = v6
            self._check_ipv6()
            if not self.wanted and self._idle():
                self.agent.dp.sync_l7(ports, macs)
                return
            try:
                if self.wanted and not self._host_installed:
                    self.settings.run_dir.mkdir(parents=True, exist_ok=True)
                    self.settings.steering_marker.touch()
                    self.host.install()
                    self._host_installed = True
                if self._host_installed:
                    targets = set(ports)
                    if targets != self._targets:
                        self.host.set_targets(
                            [(ip, p) for ip, p, kind in targets if kind == L7_SERVER],
                            [(ip, p) for ip, p, kind in targets if kind == L7_CLIENT])
                        self._targets = targets
                    self._loosen(macs)
            except HostError as exc:
                self.last_error = f"host steering: {exc}"
                self.agent.error(f"l7: {self.last_error}")
            need = self.slots_needed(maps)
            if need > self.settings.slots:
                self.settings = ProxySettings(self.settings.run_dir, port=self.settings.port,
                                              slots=max(need, 2 * self.settings.slots))
                for n in self.settings.slot_maps():
                    maps.setdefault(n, {})
                self._write_files(maps)
                self._stop_process()      # more slots need a new configuration
            else:
                self._write_files(maps)
            if self.wanted and self.running:
                self._push(maps)
            elif self.wanted:
                self._restart()
            self.agent.dp.sync_l7(ports, macs)

    def _loosen(self, macs: dict[int, tuple[int, bytes]]) -> None:
        names = {link.name for ifindex, _ in macs.values()
                 if (link := self.agent.links.get(ifindex)) is not None}
        for dev in loosen_rp_filter(sorted(names - self._loose)):
            log.warning("l7: reverse-path filtering on %s set to loose (rp_filter 2): strict "
                        "drops steered connections from other hosts", dev)
        self._loose = names

    def _check_ipv6(self) -> None:
        """A delivery device with its IPv6 off drops what the steering delivers into it
        over IPv6: fail closed, but silently; say so (health, the log). Only reads the
        sysctl: whether the device does IPv6 is the operator's choice."""
        self._v6_read = time.monotonic()
        off = {dev: ipv6_off_message(dev, *self._v6_wanted[dev])
               for dev in ipv6_disabled(self._v6_wanted, self.ipv6_conf)}
        for dev in sorted(off.keys() - self._v6_off.keys()):
            log.warning("l7: %s; enable it to enforce their HTTP rules over IPv6", off[dev])
        for dev in sorted(self._v6_off.keys() - off.keys()):
            log.info("l7: IPv6 steered into %s is no longer dropped by its sysctl", dev)
        self._v6_off = off

    def _write_files(self, maps: dict) -> None:
        """The configuration and map files a (re)started proxy reads. A failure goes to
        status; the running proxy still gets the maps over its runtime API."""
        d = self.settings.run_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
            if not self.missing:
                os.chown(d, self.uid, self.gid)
            os.chmod(d, 0o750)
            write_atomic(self.settings.config_path, render_config(self.settings))
            for name, entries in maps.items():
                if self._maps.get(name) != entries or not self.settings.map_path(name).exists():
                    write_atomic(self.settings.map_path(name), map_text(entries))
        except OSError as exc:
            self._maps = {}
            self.last_error = f"writing the proxy's files in {d}: {exc}"
            self.agent.error(f"l7: {self.last_error}")
            return
        self._maps = {k: dict(v) for k, v in maps.items()}

    def _push(self, maps: dict) -> None:
        for name, entries in maps.items():
            if self._pushed.get(name) == entries:
                continue
            try:
                self.api.replace_map(self.settings.map_path(name), entries)
                self._pushed[name] = dict(entries)
            except RuntimeAPIError as exc:
                self.last_error = f"runtime API: {exc}"
                log.error("l7: %s", self.last_error)
                self._stop_process()   # restarted with the files, which are current
                return

    # ------------------------------------------------------------------ process
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        caps = "+net_admin,+net_raw"
        return [shutil.which("setpriv") or "/usr/bin/setpriv",
                f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}",
                f"--bounding-set=-all,{caps}", "--",
                self.haproxy, "-db", "-f", str(self.settings.config_path)]

    def _start_process(self) -> None:
        if self.missing:
            if self.last_error != self.missing:
                self.last_error = self.missing
                self.agent.error(f"l7: {self.missing}")
            return
        try:
            logs = self.log_reader.ensure()
        except OSError as exc:  # the proxy still enforces; its requests go unrecorded
            self.last_error = f"request log pipe: {exc}"
            log.error("l7: %s", self.last_error)
            logs = subprocess.DEVNULL
        # stdout: the request log (a pipe to the agent); stderr: the proxy's own messages
        out = open(self.settings.run_dir / "haproxy.out", "ab")
        self._next_proxy_counts()
        try:
            self.proc = subprocess.Popen(self.command(), stdout=logs, stderr=out,
                                         stdin=subprocess.DEVNULL, cwd=str(self.settings.run_dir))
        except OSError as exc:
            self.last_error = f"cannot start {self.haproxy}: {exc}"
            log.error("l7: %s", self.last_error)
            return
        finally:
            out.close()
        self._pushed = {k: dict(v) for k, v in self._maps.items()}  # it read the files
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if "Name: HAProxy" in self.api.command("show info"):
                    log.info("l7: proxy started (pid %d)", self.proc.pid)
                    self.last_error = None
                    return
            except RuntimeAPIError:
                pass
            time.sleep(0.05)
        self.last_error = f"proxy did not start: {self._tail()}"
        log.error("l7: %s", self.last_error)

    def _tail(self) -> str:
        try:
            return (self.settings.run_dir / "haproxy.out").read_text()[-500:]
        except OSError:
            return ""

    def _stop_process(self) -> None:
        p, self.proc = self.proc, None
        self._pushed = {}
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="stockade-l7", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stop.wait(RESTART_DELAY_S):
            with self._lock:
                if self.wanted and not self.running:
                    self._restart()
                if (self._v6_wanted or self._v6_off) and \
                        time.monotonic() - self._v6_read >= IPV6_EVERY_S:
                    self._check_ipv6()     # an operator's sysctl change makes no commit
            self.read_dropped(DROPPED_EVERY_S)

    def _next_proxy_counts(self) -> None:
        """A new proxy counts its dropped lines from 0: keep its predecessors'."""
        self._dropped_before += self._dropped_now
        self._dropped_now = 0

    def read_dropped(self, every: float = 0.0) -> None:
        """The request log lines the running proxy dropped (its DroppedLogs: the pipe was
        full), into the log reader's ``dropped``: at most once per ``every`` seconds."""
        now, proc = time.monotonic(), self.proc
        if proc is None or proc.poll() is not None or now - self._dropped_read < every:
            return
        self._dropped_read = now
        try:
            info = self.api.command("show info")
        except RuntimeAPIError:
            return
        for line in info.splitlines():
            if line.startswith("DroppedLogs:"):
                try:
                    n = int(line.split(":", 1)[1])
                except ValueError:
                    return
                with self._lock:
                    if self.proc is proc:      # not a proxy restarted meanwhile
                        self._dropped_now = n
                        self.log_reader.dropped = self._dropped_before + n
                return

    def _restart(self) -> None:
        """Start the proxy; one that died is counted and logged first, whichever comes
        first after its death: this thread or a commit (any link event commits)."""
        if self.proc is not None:
            self.last_error = f"proxy exited with status {self.proc.returncode}"
            log.error("l7: %s; restarting", self.last_error)
            self.restarts += 1
            self.proc = None
        self._start_process()

    def stop(self, remove_host: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._stop_process()
            self.log_reader.stop()
            if remove_host and self._host_installed:
                self.host.remove()
                self._host_installed = False
                self.settings.steering_marker.unlink(missing_ok=True)

    # ------------------------------------------------------------------ status
    def health(self) -> dict:
        proc = self.proc
        running = proc is not None and proc.poll() is None   # once: "ok" and "running" agree
        v6_off = dict(self._v6_off)
        ok = (not self.wanted or running) and not v6_off
        return {"wanted": self.wanted, "running": running,
                "pid": proc.pid if running and proc is not None else None, "restarts": self.restarts,
                "ok": ok, "last_error": self.last_error,
                "ipv6_disabled": sorted(v6_off), "problems": [v6_off[d] for d in sorted(v6_off)],
                "l7_ports": len(self._targets), "request_log": self.log_reader.stats()}
