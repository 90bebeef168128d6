"""Build and load the BPF program (bpf/stockade.c).

bcc compiles it in a short-lived child process (stockade.datapath.build), which pins the
programs under ``<pin dir>/build/<hash of the source>``; the agent opens the pins with the
bpf() syscall (stockade.datapath.bpfsys) and never maps LLVM. A start with the same
source and settings (same hash) reuses the pinned programs without compiling.

Build-time settings live in one dict, ``DEFAULT_SETTINGS``; ``render_source`` turns
it into ``#define`` lines in front of the C text. bcc rewrites map accesses only in
its main file, so the project's own ``#include "..."`` lines are inlined here (system
``<...>`` includes are left to clang).
"""
from __future__ import annotations

import ctypes as ct
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from . import bpfsys
from .build import CFLAGS, PROGRAMS, UNPINNED_MAPS
from .conntrack import ConntrackMaps
from .errors import DatapathError
from .l7maps import L7Maps
from .migrate import check_no_newer_pins, finish_legacy, migrate_legacy_pins
from .pins import PINNED_MAPS, fd_map_info, pin_name
from .writer import MapWriter

log = logging.getLogger("stockade.datapath")

# bpf/ of the checkout (a link here), or its copy inside an installed wheel
BPF_DIR = Path(__file__).resolve().parent / "bpf"
MAIN_SOURCE = "stockade.c"

DEFAULT_SETTINGS: dict[str, Any] = {
    "STOCKADE_PIN_DIR": "/sys/fs/bpf/stockade",
    "ENDPOINTS_MAX": 1024,
    "IPCACHE_MAX": 16384,
    "POLICY_MAX": 16384,
    "POLICY_FLAGS_MAX": 4096,
    "CT_MAX": 65536,
    # Conntrack entries one owner may hold (an endpoint for the flows it opens; an
    # endpoint and one peer identity for flows opened toward it: struct ct_owner);
    # None: CT_MAX / 8, at least 64. Enforced once the table is CT_PRESSURE_PCT full:
    # then new flows over it drop as ct_full; other owners' flows are unaffected.
    "CT_ENDPOINT_MAX": None,
    "CT_PRESSURE_PCT": 50,
    "CT_OWNERS_MAX": None,      # owners with a budget; None: CT_MAX / 4 + 2 * ENDPOINTS_MAX
    "FRAG_MAX": 8192,           # first fragments remembered (LRU)
    "CT_TIMEOUT_SYN_S": 60,
    "CT_TIMEOUT_TCP_S": 6 * 3600,
    "CT_TIMEOUT_CLOSE_S": 10,
    "CT_TIMEOUT_OTHER_S": 60,
    "EVENTS_PAGES": 16,
    # Flow event budgets, per CPU: events per second and burst size, one budget for
    # verdicts of new connections, one for drops. Counters are exact regardless.
    "EVENTS_NEW_RATE": 20000,
    "EVENTS_NEW_BURST": 2000,
    "EVENTS_DROP_RATE": 5000,
    "EVENTS_DROP_BURST": 1000,
    # L7 steering (bpf/lib/l7.h): L7-enforced ports, and the mark of steered packets
    # (the agent's l7 settings route it to the proxy).
    "L7_PORTS_MAX": 4096,
    "L7_MARK": 0x5D170000,
}


DERIVED_SETTINGS = {"CT_PRESSURE_ENTRIES"}   # computed by resolved_settings, not set


def resolved_settings(settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULT_SETTINGS updated with ``settings``, derived defaults filled in."""
    merged = {**DEFAULT_SETTINGS, **(settings or {})}
    unknown = set(merged) - set(DEFAULT_SETTINGS) - DERIVED_SETTINGS
    if unknown:
        raise DatapathError("settings", f"unknown keys {sorted(unknown)}")
    if merged["CT_ENDPOINT_MAX"] is None:
        merged["CT_ENDPOINT_MAX"] = max(64, merged["CT_MAX"] // 8)
    merged["CT_PRESSURE_ENTRIES"] = merged["CT_MAX"] * merged["CT_PRESSURE_PCT"] // 100
    if merged["CT_OWNERS_MAX"] is None:
        merged["CT_OWNERS_MAX"] = merged["CT_MAX"] // 4 + 2 * merged["ENDPOINTS_MAX"]
    return merged


_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.M)


def _define(name: str, value: Any) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"#define {name} {value}"


def render_source(settings: Mapping[str, Any] | None = None, bpf_dir: Path = BPF_DIR) -> str:
    """The complete C text bcc compiles: settings as #defines, then stockade.c with
    its quoted includes inlined (each file once)."""
    merged = resolved_settings(settings)
    seen: set[Path] = set()

    def inline(path: Path) -> str:
        if path in seen:
            return ""
        seen.add(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise DatapathError(str(path), f"cannot read BPF source: {exc.strerror}") from exc
        return _INCLUDE.sub(lambda m: f"/* >>> {m.group(1)} */\n"
                            + inline((bpf_dir / m.group(1)).resolve()), text)

    defines = "\n".join(_define(k, v) for k, v in merged.items())
    pins = "\n".join(f'#define PIN_{name} STOCKADE_PIN_DIR "/{pin_name(name)}"'
                     for name in PINNED_MAPS)
    return (f"/* settings */\n{defines}\n\n/* pins (layout versions) */\n{pins}\n\n"
            + inline((bpf_dir / MAIN_SOURCE).resolve()))


BUILD_FORMAT = 2      # raise when what a build directory holds changes
BUILD_TIMEOUT_S = 300
BUILD_MAIN = "import sys; from stockade.datapath.build import main; sys.exit(main(sys.argv))"


def build_hash(source: str) -> str:
    """What a build depends on: the rendered source (settings included), the compiler
    flags and the kernel it was loaded into."""
    h = hashlib.sha256()
    for part in (str(BUILD_FORMAT), " ".join(CFLAGS), os.uname().release, source):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def compile_in_child(source: str, build_dir: Path, record_path: Path | None = None) -> None:
    """Run stockade.datapath.build in a new process; DatapathError with its message."""
    agent_dir = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [agent_dir, *filter(None, [os.environ.get("PYTHONPATH")])])}
    extra = [str(record_path)] if record_path is not None else []
    try:
        r = subprocess.run([sys.executable, "-c", BUILD_MAIN, str(build_dir), *extra],
                           input=source, capture_output=True, text=True, env=env,
                           timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DatapathError("bpf/stockade.c", f"cannot run the compiler process: {exc}") from exc
    if r.returncode != 0 and not build_dir.is_dir():   # another process may have won the race
        lines = [ln for ln in r.stderr.splitlines() if "modprobe" not in ln]
        raise DatapathError("bpf/stockade.c", "cannot compile or load: "
                            + "\n".join(lines[-40:]).strip())


class Datapath(MapWriter, ConntrackMaps, L7Maps):
    """The compiled program plus its pinned maps.

    ``Datapath(settings)`` compiles once; a second instance with the same pin
    directory reuses the pinned maps (and their contents). Pins of an older layout
    version (a previous build's) are migrated into the new maps and unpinned
    (stockade.datapath.migrate); the old maps stay open until ``finish_upgrade()``.
    """

    def __init__(self, settings: Mapping[str, Any] | None = None, attach_mode: str = "auto",
                 switch_min: int | None = None, cache_dir: str | Path | None = None):
        self.settings = resolved_settings(settings)
        self.attach_mode = attach_mode
        if switch_min is not None:
            self.switch_min = switch_min
        self._attachments: Any = None
        self.pin_dir = Path(self.settings["STOCKADE_PIN_DIR"])
        self.source = render_source(self.settings)
        self._legacy: dict = {}
        self._tables: dict[str, bpfsys.MapHandle] = {}
        self._progs: dict[str, int] = {}
        self._ring: bpfsys.RingBuffer | None = None
        self.compiled = False      # True when this start ran the compiler
        self.from_cache = False    # True when it loaded the kept build (progcache.py)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        try:
            self.pin_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatapathError(str(self.pin_dir), f"cannot create pin directory: {exc}") from exc
        check_no_newer_pins(self.pin_dir)
        self.build_dir = self.pin_dir / "build" / build_hash(self.source)
        resized = self._set_aside_resized_pins()
        try:
            if not self._open_build():
                shutil.rmtree(self.build_dir, ignore_errors=True)
                self.build_dir.parent.mkdir(parents=True, exist_ok=True)
                self.from_cache = self._load_kept_build()
                if not self.from_cache:
                    self._compile()
                if not self._open_build():
                    raise DatapathError(str(self.build_dir), "the compiled programs do not use "
                                        "the pinned maps (changed while loading?)")
            self._forget_other_builds()
            self._copy_resized(resized)
            self._check_pinned_maps()
            self._legacy = migrate_legacy_pins(self)
        except DatapathError:
            self.close()
            raise

    def _load_kept_build(self) -> bool:
        """The build from the record a previous compile kept; False (nothing left
        behind but created map pins, which the compiler reuses) when there is none or
        it does not load."""
        from . import progcache
        if self.cache_dir is None:
            return False
        rec = progcache.read(self.cache_dir, self.build_dir.name)
        if rec is None:
            return False
        try:
            progcache.load(rec, self.build_dir, {n: self.pin_dir / pin_name(n) for n in PINNED_MAPS},
                           UNPINNED_MAPS, PROGRAMS)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("the kept build %s does not load (%s); compiling", self.build_dir.name, exc)
            shutil.rmtree(self.build_dir, ignore_errors=True)
            return False
        if self._open_build():
            return True
        shutil.rmtree(self.build_dir, ignore_errors=True)
        return False

    def _compile(self) -> None:
        from . import progcache
        record_path = None
        if self.cache_dir is not None:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                record_path = self.cache_dir / f"{self.build_dir.name}.new{os.getpid()}"
            except OSError as exc:
                log.warning("cannot keep the compiled programs in %s: %s", self.cache_dir, exc)
        compile_in_child(self.source, self.build_dir, record_path)
        self.compiled = True
        if record_path is not None:
            rec = progcache.read_file(record_path)
            record_path.unlink(missing_ok=True)
            if rec is not None and self.cache_dir is not None:
                progcache.save(self.cache_dir, self.build_dir.name, rec)

    # Maps whose size may change between builds (a changed setting or default): only the
    # agent writes them and they are not preallocated, so a new map of the new size is
    # made and the entries are copied over. Other maps refuse a size change (_check_pinned_maps).
    RESIZABLE = {"ipcache4": "IPCACHE_MAX", "ipcache6": "IPCACHE_MAX", "policy": "POLICY_MAX"}

    def _set_aside_resized_pins(self) -> dict[str, Path]:
        """Rename the pins of RESIZABLE maps whose size differs from the settings (the
        build then creates new ones); {name: the old pin's new path}."""
        out = {}
        for name, setting in self.RESIZABLE.items():
            path = self.pin_dir / pin_name(name)
            aside = self.pin_dir / f"{pin_name(name)}_resize"
            if aside.exists():           # a previous start stopped half-way: copy from it again
                if path.exists():
                    os.unlink(path)
                out[name] = aside
                continue
            try:
                fd = bpfsys.obj_get(str(path))
            except OSError:
                continue
            try:
                size = fd_map_info(fd, name).max_entries
            finally:
                os.close(fd)
            if size != self.settings[setting]:
                os.rename(path, aside)
                out[name] = aside
        return out

    def _copy_resized(self, resized: dict[str, Path]) -> None:
        from . import maps as m
        from .pins import fd_items
        types = {"ipcache4": (m.Ipcache4Key, m.IpcacheValue),
                 "ipcache6": (m.Ipcache6Key, m.IpcacheValue),
                 "policy": (m.PolicyKey, m.PolicyValue)}
        for name, aside in resized.items():
            fd = bpfsys.obj_get(str(aside))
            try:
                items = fd_items(fd, *types[name])
            finally:
                os.close(fd)
            if len(items) > self.settings[self.RESIZABLE[name]]:
                raise DatapathError(str(aside), f"{len(items)} entries do not fit the new size "
                                    f"{self.settings[self.RESIZABLE[name]]} of {name}")
            for k, v in items:
                self._update(name, k, v)
            os.unlink(aside)

    def _open_build(self) -> bool:
        """Open the programs and maps of ``build_dir`` and the pinned maps; False (all
        closed) when the build is missing or its programs use other maps than the pins."""
        self._close_fds()
        if not self.build_dir.is_dir():
            return False
        try:
            for name in PROGRAMS:
                self._progs[name] = bpfsys.obj_get(str(self.build_dir / name))
            for name in UNPINNED_MAPS:
                self._tables[name] = bpfsys.MapHandle(bpfsys.obj_get(str(self.build_dir / name)),
                                                      name)
            for name in PINNED_MAPS:
                path = self.pin_dir / pin_name(name)
                self._tables[name] = bpfsys.MapHandle(bpfsys.obj_get(str(path)), name)
            # Each program uses only these maps (it needs not use all: to_endpoint has no
            # L7 steering); a map made anew in place of a pin's shows as a foreign id.
            ours = {fd_map_info(t.map_fd, n).id for n, t in self._tables.items()}
            if all(bpfsys.prog_map_ids(fd) <= ours for fd in self._progs.values()):
                return True
        except OSError:
            pass
        self._close_fds()
        return False

    def _forget_other_builds(self) -> None:
        """Unpin the programs of other builds (interfaces still running one keep it)."""
        for d in self.build_dir.parent.iterdir():
            if d != self.build_dir:
                shutil.rmtree(d, ignore_errors=True)

    def finish_upgrade(self) -> dict[str, int]:
        """Call once every interface runs this build's programs: copies what the previous
        build's programs still wrote into the old maps after ``__init__`` migrated them
        (conntrack entries of flows opened meanwhile), then closes the old maps.
        Returns {map: entries copied}; {} when there was nothing to upgrade."""
        legacy, self._legacy = self._legacy, {}
        return finish_legacy(self, legacy)

    def _check_pinned_maps(self) -> None:
        """bcc silently reuses a pinned map even when this build declares another
        size; refuse to run on a pin whose geometry differs from the settings."""
        import ctypes as ct

        from . import maps as m
        expect = {
            "endpoints": (4, m.EndpointInfo, "ENDPOINTS_MAX"),
            "ipcache4": (ct.sizeof(m.Ipcache4Key), m.IpcacheValue, "IPCACHE_MAX"),
            "ipcache6": (ct.sizeof(m.Ipcache6Key), m.IpcacheValue, "IPCACHE_MAX"),
            "policy": (ct.sizeof(m.PolicyKey), m.PolicyValue, "POLICY_MAX"),
            "policy_flags": (ct.sizeof(m.PolicyFlagsKey), m.PolicyFlagsValue, "POLICY_FLAGS_MAX"),
            "conntrack": (ct.sizeof(m.CtKey), m.CtValue, "CT_MAX"),
            "ct_created": (ct.sizeof(m.CtOwner), m.CtCount, "CT_OWNERS_MAX"),
            "ct_released": (ct.sizeof(m.CtOwner), m.CtCount, "CT_OWNERS_MAX"),
            "frag": (ct.sizeof(m.FragKey), m.FragValue, "FRAG_MAX"),
            "counters": (4, m.CounterValue, None),
        }
        for name, (key_size, value_type, setting) in expect.items():
            info = self.map_info(name)
            want = (key_size, ct.sizeof(value_type),
                    self.settings[setting] if setting else m.NUM_COUNTERS)
            have = (info.key_size, info.value_size, info.max_entries)
            if have != want:
                raise DatapathError(
                    str(self.pin_dir / pin_name(name)),
                    f"pinned map has key/value/max_entries {have}, this build needs {want}; "
                    "remove the pin (stale layout or changed settings)")

    def map_info(self, name: str):
        """The kernel's view of map ``name`` (type, sizes, max_entries)."""
        return fd_map_info(self.table(name).map_fd, name)

    # -- program handles -------------------------------------------------------
    @property
    def from_endpoint_fd(self) -> int:
        return self._progs["from_endpoint"]

    @property
    def to_endpoint_fd(self) -> int:
        return self._progs["to_endpoint"]

    @property
    def attachments(self):
        """The interfaces' attachments in this datapath's mode (attachments.Attachments)."""
        if self._attachments is None:
            from .attachments import Attachments
            self._attachments = Attachments(
                self.pin_dir, self.attach_mode,
                {"ingress": self.from_endpoint_fd, "egress": self.to_endpoint_fd},
                {"ingress": "from_endpoint", "egress": "to_endpoint"}, self._load_copies)
        return self._attachments

    def _load_copies(self) -> dict[str, int]:
        """A second load of both programs (same code, same maps), for moving ours back
        in front of a foreign tcx program without a moment off (attachments.py): the
        build pins it beside the first (build.COPIES)."""
        try:
            return {hook: bpfsys.obj_get(str(self.build_dir / f"{name}_copy"))
                    for hook, name in (("ingress", "from_endpoint"), ("egress", "to_endpoint"))}
        except OSError as exc:
            raise DatapathError(str(self.build_dir), f"cannot open the programs' copies: {exc}") from exc

    def attach_interface(self, ifindex: int) -> None:
        """Run both programs on host interface ``ifindex``, first (replaces ours, if there)."""
        self.attachments.attach(ifindex)

    def detach_interface(self, ifindex: int) -> None:
        self.attachments.detach(ifindex)

    def check_interface(self, ifindex: int) -> list:
        """What is wrong with ``ifindex``'s attachment ([]: nothing): attachments.Problem."""
        return self.attachments.check(ifindex)

    def table(self, name: str) -> bpfsys.MapHandle:
        """The handle (``map_fd``) of map ``name`` (see PINNED_MAPS, plus "events")."""
        try:
            return self._tables[name]
        except KeyError as exc:
            raise DatapathError(name, "no such map") from exc

    def open_events(self, callback, raw: bool = False) -> None:
        """Call ``callback(FlowEvent)`` (a copy) for each event during ``poll_events``;
        with ``raw``, ``callback(bytes)`` with the event's bytes (for batch decoding)."""
        from .maps import FlowEvent
        size = ct.sizeof(FlowEvent)

        if raw:
            def _cb(data):
                callback(bytes(data[:size]))
        else:
            def _cb(data):
                callback(FlowEvent.from_buffer_copy(bytes(data[:size])))
        try:
            t = self.table("events")
            self._ring = bpfsys.RingBuffer(t.map_fd, fd_map_info(t.map_fd, "events").max_entries, _cb)
        except (OSError, ValueError) as exc:
            raise DatapathError("events", f"cannot open ring buffer: {exc}") from exc

    def poll_events(self, timeout_ms: int = 0) -> None:
        if self._ring is not None:
            self._ring.poll(timeout_ms)

    def count_entries(self, name: str) -> int:
        """Entries in map ``name``, walking its keys only (no value reads): cheap enough
        for a metrics scrape of a full conntrack map."""
        import ctypes as ct

        lib = bpfsys.lib
        fd = self.table(name).map_fd
        size = self.map_info(name).key_size
        keys = [(ct.c_uint8 * size)(), (ct.c_uint8 * size)()]
        prev, n = None, 0
        while lib.bpf_get_next_key(fd, prev, ct.byref(keys[n & 1])) == 0:
            prev = ct.byref(keys[n & 1])
            n += 1
        return n

    def events_lost(self) -> dict[str, int]:
        """Events not delivered, summed over CPUs: {"rate_limit_new", "rate_limit_drop",
        "ringbuf_full"} -> count."""
        from .maps import EVENTS_LOST
        t = self.table("events_lost")
        try:
            return {name: sum(v.value for v in t.percpu_get(ct.c_uint32(i), ct.c_uint64))
                    for i, name in enumerate(EVENTS_LOST)}
        except OSError as exc:
            raise DatapathError("events_lost", f"cannot read: {exc}") from exc

    def remove_pins(self) -> None:
        """Unlink this datapath's pinned maps and links, and the pin directory if empty
        (nothing is detached: ``cleanup`` does that first)."""
        self.attachments.remove_pins()
        _unlink_pins(self.pin_dir)

    def endpoint_ifindexes(self) -> list[int]:
        import ctypes as ct

        from . import maps
        return sorted(k.value for k, _ in self._items("endpoints", ct.c_uint32, maps.EndpointInfo))

    def cleanup(self, extra_ifindexes=()) -> None:
        """Detach our programs from every interface in the endpoints map (plus
        ``extra_ifindexes``), then remove the pins (``cleanup_pins``). Filters on
        interfaces this datapath never knew about are left alone (use attach.detach_all
        for that)."""
        for idx in sorted(set(extra_ifindexes)):
            self.attachments.detach(idx)
        cleanup_pins(self.pin_dir, self.attachments)

    def _close_fds(self) -> None:
        ring = getattr(self, "_ring", None)
        if ring is not None:
            ring.close()
            self._ring = None
        for t in getattr(self, "_tables", {}).values():
            t.close()
        for fd in getattr(self, "_progs", {}).values():
            os.close(fd)
        self._tables, self._progs = {}, {}

    def close(self) -> None:
        """Release the program and map fds (pins stay)."""
        for fd in getattr(self, "_legacy", {}).values():
            os.close(fd)
        self._legacy = {}
        att, self._attachments = getattr(self, "_attachments", None), None
        if att is not None:
            att.close()
        self._close_fds()


def cleanup_pins(pin_dir: Path, attachments=None) -> int:
    """Detach our programs from every interface that an endpoints map pinned in
    ``pin_dir`` names or that has a link pinned there, then remove the pins of
    ``pin_dir``: the maps of any layout version and any size (a build with other
    settings, an older or newer build, a start that stopped half way), the links and
    the builds. Nothing is compiled or loaded, and no other directory's pins are
    touched; files that are not ours stay (and so does the directory then). Returns
    how many interfaces were detached."""
    from .attachments import Attachments
    from .pins import fd_keys, parse_pin_name
    pin_dir = Path(pin_dir)
    try:
        names = sorted(os.listdir(pin_dir))
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise DatapathError(str(pin_dir), f"cannot list pins: {exc.strerror}") from exc
    ifindexes: set[int] = set()
    for fn in names:
        parsed = parse_pin_name(fn)
        if parsed is None or parsed[0] != "endpoints":
            continue
        try:
            fd = bpfsys.obj_get(str(pin_dir / fn))
        except OSError as exc:
            raise DatapathError(str(pin_dir / fn), f"cannot open pin: {exc.strerror}") from exc
        try:
            if fd_map_info(fd, fn).key_size == ct.sizeof(ct.c_uint32):   # keyed by ifindex
                ifindexes.update(k.value for k in fd_keys(fd, ct.c_uint32))
        finally:
            os.close(fd)
    # detaching takes links and tc filters off in either mode: "auto" only picks the mode
    att = attachments if attachments is not None else Attachments(pin_dir, "auto", {}, {})
    try:
        ifindexes.update(att.owned())
        for idx in sorted(ifindexes):
            att.detach(idx)
        att.remove_pins()
    finally:
        if attachments is None:
            att.close()
    _unlink_pins(pin_dir)
    return len(ifindexes)


def _unlink_pins(pin_dir: Path) -> None:
    """Unlink the map pins of ``pin_dir`` (any layout version, resize leftovers) and its
    builds, then the directory if nothing else is left in it."""
    from .pins import parse_pin_name
    try:
        names = os.listdir(pin_dir)
    except FileNotFoundError:
        return
    for fn in names:
        base = fn[:-len("_resize")] if fn.endswith("_resize") else fn
        if parse_pin_name(base) is not None:
            try:
                os.unlink(pin_dir / fn)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise DatapathError(str(pin_dir / fn), f"cannot unpin: {exc.strerror}") from exc
    shutil.rmtree(pin_dir / "build", ignore_errors=True)
    try:
        pin_dir.rmdir()
    except OSError:
        pass
