"""Build and load the BPF program (bpf/stockade.c) with bcc.

Build-time settings live in one dict, ``DEFAULT_SETTINGS``; ``render_source`` turns
it into ``#define`` lines in front of the C text. bcc rewrites map accesses only in
its main file, so the project's own ``#include "..."`` lines are inlined here (system
``<...>`` includes are left to clang).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from .errors import DatapathError
from .writer import MapWriter

BPF_DIR = Path(__file__).resolve().parents[3] / "bpf"
MAIN_SOURCE = "stockade.c"

DEFAULT_SETTINGS: dict[str, Any] = {
    "STOCKADE_PIN_DIR": "/sys/fs/bpf/stockade",
    "ENDPOINTS_MAX": 1024,
    "IPCACHE_MAX": 16384,
    "POLICY_MAX": 16384,
    "POLICY_FLAGS_MAX": 4096,
    "CT_MAP_TYPE": "lru_hash",  # "hash" only for tests of ct_full
    "CT_MAX": 65536,
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
}

PINNED_MAPS = ("endpoints", "ipcache4", "ipcache6", "policy", "policy_flags",
               "conntrack", "counters", "config")

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
    merged = {**DEFAULT_SETTINGS, **(settings or {})}
    unknown = set(merged) - set(DEFAULT_SETTINGS)
    if unknown:
        raise DatapathError("settings", f"unknown keys {sorted(unknown)}")
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
    return f"/* settings */\n{defines}\n\n" + inline((bpf_dir / MAIN_SOURCE).resolve())


def _release_compiler_heap() -> None:
    """clang/LLVM free most of their heap after a compile, but glibc keeps it mapped:
    give it back (about 25 MB of the agent's RSS)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Datapath(MapWriter):
    """The compiled program plus its pinned maps.

    ``Datapath(settings)`` compiles once; a second instance with the same pin
    directory reuses the pinned maps (and their contents).
    """

    def __init__(self, settings: Mapping[str, Any] | None = None):
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.pin_dir = Path(self.settings["STOCKADE_PIN_DIR"])
        self.source = render_source(self.settings)
        try:
            self.pin_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatapathError(str(self.pin_dir), f"cannot create pin directory: {exc}") from exc
        try:
            from bcc import BPF  # imported here: only this package may use bcc
            self._BPF = BPF
            self.bpf = BPF(text=self.source.encode(), cflags=["-Wno-unused-function"])
            self.from_endpoint = self.bpf.load_func(b"from_endpoint", BPF.SCHED_CLS)
            self.to_endpoint = self.bpf.load_func(b"to_endpoint", BPF.SCHED_CLS)
        except DatapathError:
            raise
        except Exception as exc:  # bcc raises plain Exception on compile/load errors
            raise DatapathError("bpf/stockade.c", f"cannot compile or load: {exc}") from exc
        _release_compiler_heap()
        try:
            self._check_pinned_maps()
        except DatapathError:
            self.close()
            raise

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
        }
        for name, (key_size, value_type, setting) in expect.items():
            info = self.map_info(name)
            want = (key_size, ct.sizeof(value_type), self.settings[setting])
            have = (info.key_size, info.value_size, info.max_entries)
            if have != want:
                raise DatapathError(
                    str(self.pin_dir / name),
                    f"pinned map has key/value/max_entries {have}, this build needs {want}; "
                    "remove the pin (stale layout or changed settings)")

    def map_info(self, name: str):
        """The kernel's view of map ``name`` (type, sizes, max_entries)."""
        import ctypes as ct

        from bcc.libbcc import lib

        class BpfMapInfo(ct.Structure):
            _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                        ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                        ("map_flags", ct.c_uint32), ("name", ct.c_char * 16),
                        ("rest", ct.c_uint8 * 64)]
        info = BpfMapInfo()
        size = ct.c_uint32(ct.sizeof(info))
        fn = lib.bpf_obj_get_info
        fn.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        if fn(self.table(name).map_fd, ct.byref(info), ct.byref(size)) != 0:
            raise DatapathError(name, f"cannot read map info (errno {ct.get_errno()})")
        return info

    # -- program handles -------------------------------------------------------
    @property
    def from_endpoint_fd(self) -> int:
        return self.from_endpoint.fd

    @property
    def to_endpoint_fd(self) -> int:
        return self.to_endpoint.fd

    def attach_interface(self, ifindex: int) -> None:
        """Run both programs on host interface ``ifindex`` (replaces ours, if there)."""
        from .attach import attach
        attach(ifindex, self.from_endpoint_fd, self.to_endpoint_fd)

    def detach_interface(self, ifindex: int) -> None:
        from .attach import detach
        detach(ifindex)

    def table(self, name: str):
        """The bcc table object of map ``name`` (see PINNED_MAPS, plus "events")."""
        try:
            return self.bpf[name.encode()]
        except KeyError as exc:
            raise DatapathError(name, "no such map") from exc

    def open_events(self, callback, raw: bool = False) -> None:
        """Call ``callback(FlowEvent)`` (a copy) for each event during ``poll_events``;
        with ``raw``, ``callback(bytes)`` with the event's bytes (for batch decoding)."""
        import ctypes as ct

        from .maps import FlowEvent
        size = ct.sizeof(FlowEvent)

        if raw:
            def _cb(_ctx, data, _size):
                callback(ct.string_at(data, size))
        else:
            def _cb(_ctx, data, _size):
                callback(FlowEvent.from_buffer_copy(ct.string_at(data, size)))
        try:
            self.table("events").open_ring_buffer(_cb)
        except Exception as exc:
            raise DatapathError("events", f"cannot open ring buffer: {exc}") from exc

    def poll_events(self, timeout_ms: int = 0) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def count_entries(self, name: str) -> int:
        """Entries in map ``name``, walking its keys only (no value reads): cheap enough
        for a metrics scrape of a full conntrack map."""
        import ctypes as ct

        from bcc.libbcc import lib
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
            return {name: sum(int(v.value if hasattr(v, "value") else v)
                              for v in t.getvalue(t.Key(i)))
                    for i, name in enumerate(EVENTS_LOST)}
        except Exception as exc:
            raise DatapathError("events_lost", f"cannot read: {exc}") from exc

    def remove_pins(self) -> None:
        """Unlink this datapath's pinned maps and the pin directory if empty."""
        for name in PINNED_MAPS:
            try:
                os.unlink(self.pin_dir / name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise DatapathError(str(self.pin_dir / name), f"cannot unpin: {exc}") from exc
        try:
            self.pin_dir.rmdir()
        except OSError:
            pass

    def endpoint_ifindexes(self) -> list[int]:
        import ctypes as ct

        from . import maps
        return sorted(k.value for k, _ in self._items("endpoints", ct.c_uint32, maps.EndpointInfo))

    def cleanup(self, extra_ifindexes=()) -> None:
        """Detach our programs from every interface in the endpoints map (plus
        ``extra_ifindexes``), then remove the pins. Filters on interfaces this
        datapath never knew about are left alone (use attach.detach_all for that)."""
        from .attach import detach
        for idx in sorted(set(self.endpoint_ifindexes()) | set(extra_ifindexes)):
            detach(idx)
        self.remove_pins()

    def close(self) -> None:
        """Release the program and map fds (pins stay)."""
        bpf, self.bpf = getattr(self, "bpf", None), None
        if bpf is not None:
            bpf.cleanup()
