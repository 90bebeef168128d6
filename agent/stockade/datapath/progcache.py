"""Compiled programs kept on disk, so a start whose pins are gone (after a reboot: bpffs
is empty) loads them without the compiler.

The compiler process (build.py) writes a record of its build: each program's
instructions, where they reference a map, and each map's shape. ``load`` recreates
the build directory from it: it opens the pinned maps (making and pinning the ones
that are missing), makes the unpinned ones, puts their fds into the instructions and
loads each program twice, as the compiler does; the kernel's verifier checks them as
it checks the compiler's.

A record is a JSON file named by the build hash (which covers the source, settings,
flags and kernel release) under the agent's state directory, with a checksum. A record
that is missing, damaged or refused by the kernel is not an error: the agent compiles,
as it would without it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from . import bpfsys

log = logging.getLogger("stockade.datapath")

FORMAT = 1
LD_IMM64 = 0x18
PSEUDO_MAP_FD, PSEUDO_MAP_VALUE = 1, 2


def record(programs: dict[str, bytes], map_fds: dict[str, int], map_specs: dict[str, dict]
           ) -> dict | None:
    """The record of a build: ``programs`` (name -> instructions as loaded, map fds in
    them), ``map_fds`` (name -> the fd the instructions use), ``map_specs`` (name ->
    type, key_size, value_size, max_entries, flags). None when an instruction refers to
    something this cannot rebuild (an unknown fd, a BTF id)."""
    by_fd = {fd: name for name, fd in map_fds.items()}
    progs = {}
    for name, insns in programs.items():
        relocs = []
        i = 0
        while i + 8 <= len(insns):
            if insns[i] == LD_IMM64:
                src = insns[i + 1] >> 4
                if src in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
                    fd = int.from_bytes(insns[i + 4:i + 8], "little", signed=True)
                    if fd not in by_fd:
                        return None
                    relocs.append([i // 8, by_fd[fd]])
                elif src != 0:
                    return None
                i += 16
                continue
            i += 8
        progs[name] = {"insns": base64.b64encode(insns).decode(), "maps": relocs}
    body = {"format": FORMAT, "programs": progs, "maps": map_specs}
    return {**body, "sha256": _digest(body)}


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def path_for(cache_dir: Path, build_hash: str) -> Path:
    return cache_dir / f"{build_hash}.json"


def save(cache_dir: Path, build_hash: str, rec: dict) -> None:
    """Write the record (atomically) and remove the records of other builds."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = path_for(cache_dir, build_hash)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(rec, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        for other in cache_dir.glob("*.json"):
            if other != path:
                other.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot keep the compiled programs in %s: %s", cache_dir, exc)


def read(cache_dir: Path, build_hash: str) -> dict | None:
    """The record, or None when it is missing or damaged (logged)."""
    return read_file(path_for(cache_dir, build_hash))


def read_file(path: Path) -> dict | None:
    try:
        with open(path) as f:
            rec = json.loads(f.read(64 << 20))
        body = {k: v for k, v in rec.items() if k != "sha256"}
        if rec.get("format") != FORMAT or rec.get("sha256") != _digest(body):
            raise ValueError("format or checksum does not match")
        return rec
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("%s: %s; compiling instead", path, exc)
        return None


def load(rec: dict, build_dir: Path, pinned: dict[str, Path], unpinned: tuple[str, ...],
         programs: tuple[str, ...]) -> None:
    """Recreate ``build_dir`` from the record (see the module doc). ``pinned``: map name
    -> its pin (made when missing). OSError/ValueError/KeyError when it cannot."""
    fds: dict[str, int] = {}
    tmp = Path(f"{build_dir}-tmp-{os.getpid()}")      # bpffs names cannot hold a dot
    os.makedirs(tmp)
    try:
        for name, spec in rec["maps"].items():
            pin = pinned.get(name)
            if pin is not None and pin.exists():
                fds[name] = bpfsys.obj_get(str(pin))
                continue
            fds[name] = bpfsys.map_create(spec["type"], spec["key_size"], spec["value_size"],
                                          spec["max_entries"], spec["flags"], name)
            if pin is not None:
                _pin(fds[name], pin)
            elif name in unpinned:
                _pin(fds[name], tmp / name)
        for name in programs:
            prog = rec["programs"][name]
            insns = bytearray(base64.b64decode(prog["insns"]))
            for index, map_name in prog["maps"]:
                insns[index * 8 + 4:index * 8 + 8] = fds[map_name].to_bytes(4, "little")
            for pin_as in (name, f"{name}_copy"):
                fd = bpfsys.prog_load(bytes(insns), name)
                try:
                    _pin(fd, tmp / pin_as)
                finally:
                    os.close(fd)
        os.rename(tmp, build_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)


def _pin(fd: int, path: Path) -> None:
    if bpfsys.lib.bpf_obj_pin(fd, str(path).encode()) != 0:
        import ctypes as ct
        err = ct.get_errno()
        raise OSError(err, f"cannot pin {path}: {os.strerror(err)}")
