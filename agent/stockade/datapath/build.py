"""Compile and load the BPF programs in a short-lived process, and pin what the agent needs.

    python -c "...build import main; sys.exit(main(sys.argv))" BUILD_DIR [RECORD] < source.c

bcc (and with it LLVM and clang, ~80 MB resident) lives only in this process. It
compiles the rendered source (stockade.datapath.loader.render_source), loads both
programs (creating or reusing the pinned maps the source declares), and pins the
programs and the maps that have no pin of their own into BUILD_DIR, written under a
temporary name and renamed into place, so a BUILD_DIR that exists is complete. With
RECORD, the build's record (progcache.py) is written there, for starts without pins.
Exit 0, or 1 with bcc's message on stderr.
"""
from __future__ import annotations

import os
import shutil
import sys

PROGRAMS = ("from_endpoint", "to_endpoint")
UNPINNED_MAPS = ("events", "event_buckets", "events_lost")
CFLAGS = ["-Wno-unused-function"]


def build(source: str, build_dir: str, record_path: str | None = None) -> None:
    from bcc import BPF

    from .bpfsys import lib

    tmp = f"{build_dir}-tmp-{os.getpid()}"   # bpffs names cannot hold a dot
    os.makedirs(tmp)
    try:
        b = BPF(text=source.encode(), cflags=CFLAGS)
        fds = {name: b.load_func(name.encode(), BPF.SCHED_CLS).fd for name in PROGRAMS}
        for name in PROGRAMS:        # a second load of each (attachments.py moves it in front)
            first = b.funcs.pop(name.encode())
            try:
                fds[f"{name}_copy"] = os.dup(b.load_func(name.encode(), BPF.SCHED_CLS).fd)
            finally:
                b.funcs[name.encode()] = first
        fds.update({name: b[name.encode()].map_fd for name in UNPINNED_MAPS})
        for name, fd in fds.items():
            if lib.bpf_obj_pin(fd, f"{tmp}/{name}".encode()) != 0:
                import ctypes as ct
                raise OSError(ct.get_errno(), f"cannot pin {name}: {os.strerror(ct.get_errno())}")
        if record_path:
            _write_record(b, record_path)
        os.rename(tmp, build_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_record(b, path: str) -> None:
    import json

    from . import progcache
    from .pins import PINNED_MAPS, fd_map_info
    fds = {name: b[name.encode()].map_fd for name in (*PINNED_MAPS, *UNPINNED_MAPS)}
    specs = {}
    for name, fd in fds.items():
        info = fd_map_info(fd, name)
        specs[name] = {"type": info.type, "key_size": info.key_size,
                       "value_size": info.value_size, "max_entries": info.max_entries,
                       "flags": info.map_flags}
    rec = progcache.record({name: b.dump_func(name.encode()) for name in PROGRAMS}, fds, specs)
    if rec is not None:
        with open(path, "w") as f:
            json.dump(rec, f)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m stockade.datapath.build BUILD_DIR [RECORD] < source.c",
              file=sys.stderr)
        return 2
    try:
        build(sys.stdin.read(), argv[1], argv[2] if len(argv) == 3 else None)
    except Exception as exc:  # bcc raises plain Exception on compile/load errors
        print(str(exc) or type(exc).__name__, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
