"""The agent's state directory: generations of the state files, written atomically and
checked when read.

    state.json        the manifest: format, generation number, each file's SHA-256 and size
    identities.json … the state files (statefiles.py says what each holds and its schema)
    NAME.1 … NAME.3   the three versions of each file before its current one, and the
                      three manifests before the current one (state.json.N: generation N back)

A generation is what one committed change leaves: its manifest names every file's
content by hash. ``commit`` writes the files that change to temporary files in the
directory and fsyncs them; then each of them (and state.json) moves up one version
(NAME.2 -> NAME.3, NAME.1 -> NAME.2, a hard link NAME -> NAME.1), the new files are renamed
over theirs, state.json last, and the directory is fsynced. Only renames and links happen
after the data is on disk, so a full disk fails before anything moved; any failure undoes
the moves that were made, in reverse, and removes the temporary files: the previous
generation stays whole and current. Files a change does not touch are not rewritten;
generation N's version of a file is the one among NAME, NAME.1 … NAME.3 whose hash
state.json.N names (a file changes at most once a generation, so the last three
generations are always complete).

``load`` reads a generation and refuses it (StateError, naming the file and the
problem) when a file cannot be read, is not JSON, does not have its schema's shape, or
does not match its manifest (cut short, truncated, changed by hand). A commit that was
cut short by a crash before state.json moved left the committed version of a file it
was replacing at NAME.1: ``load`` takes it from there. A directory without state.json
is from before format 1: its files are checked by shape alone.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from ..errors import StateError
from .statefiles import EMPTY, FILES, FORMAT, MANIFEST, MANIFEST_SCHEMA, SCHEMAS, json_path

GENERATIONS = 3            # kept beside the current one
_NAMES = FILES + (MANIFEST,)
log = logging.getLogger("stockade.state")
_VALIDATORS = {name: Draft202012Validator(schema) for name, schema in
               {**SCHEMAS, MANIFEST: MANIFEST_SCHEMA}.items()}
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
MAX_MESSAGE = 300


@dataclass
class Generation:
    """One generation's files, read and checked. ``back``: 0 the current one, 1-3 the
    ones before; ``number``: its generation number (0: written before format 1, or none)."""

    back: int
    number: int
    data: dict[str, Any] = field(default_factory=dict)
    present: tuple[str, ...] = ()       # files that exist (others read as EMPTY)

    def __getitem__(self, name: str) -> Any:
        return self.data[name]


def _cut(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 1] + "…"


def _suffix(back: int) -> str:
    return f".{back}" if back else ""


def _encode(data) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


class StateStore:
    def __init__(self, state_dir: str | Path, *, create: bool = True):
        self.dir = Path(state_dir)
        self.number = 0            # the current generation's number, once read or written
        self._files: dict[str, dict] | None = None   # the current manifest's entries
        if create:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                os.chmod(self.dir, 0o750)
            except OSError as exc:
                raise StateError(self.dir, f"cannot create the state directory: {exc.strerror}") from exc
            self._remove_leftovers()

    def path(self, name: str) -> Path:
        return self.dir / name

    # ------------------------------------------------------------------ reading
    def load(self, back: int = 0) -> Generation:
        """Generation ``back`` (0: the current one), checked; raises StateError."""
        manifest = self._read_manifest(back)
        if manifest is None and back:
            raise StateError(self.path(f"{MANIFEST}.{back}"), "no such generation")
        number = manifest["generation"] if manifest else 0
        gen = Generation(back, number)
        present = []
        for name in FILES:
            if manifest is None:
                raw = self._read_bytes(self.path(name))
                if raw is None:
                    gen.data[name] = EMPTY[name]
                    continue
                gen.data[name] = self._parse(self.path(name), name, raw)
            else:
                entry = manifest["files"].get(name)
                if entry is None:
                    if back == 0 and os.path.lexists(self.path(name)):
                        log.warning("%s is not part of generation %d (a write cut short?); "
                                    "ignored", self.path(name), number)
                    gen.data[name] = EMPTY[name]
                    continue
                gen.data[name] = self._version(name, entry, back, number)
            present.append(name)
        gen.present = tuple(present)
        if back == 0:
            self.number = number
            self._files = dict(manifest["files"]) if manifest else None
        return gen

    def _version(self, name: str, entry: dict, back: int, number: int):
        """The version of ``name`` whose hash ``entry`` names: the current file, else
        (a commit cut short) NAME.1, or for an older generation any NAME.N kept."""
        where = f"{MANIFEST}{_suffix(back)} (generation {number})"
        for n in range(0, (back or 1) + 1):
            p = self.path(name + _suffix(n))
            raw = self._read_bytes(p)
            if raw is not None and hashlib.sha256(raw).hexdigest() == entry["sha256"]:
                if back == 0 and n:
                    log.warning("%s: a write was cut short; generation %d's version is %s",
                                self.path(name), number, p)
                return self._parse(p, name, raw)
        if back:
            raise StateError(self.path(name), f"the version {where} names is no longer kept")
        p = self.path(name)
        raw = self._read_bytes(p)
        if raw is None:
            raise StateError(p, f"missing, but {where} lists it")
        self._parse(p, name, raw)   # a problem of shape is the clearer message
        raise StateError(p, f"does not match {where}: {len(raw)} bytes where "
                            f"{entry.get('bytes', '?')} were written; cut short, truncated or "
                            "changed outside the agent")

    def _read_manifest(self, back: int) -> dict | None:
        p = self.path(MANIFEST + _suffix(back))
        raw = self._read_bytes(p)
        if raw is None:
            return None
        manifest = self._parse(p, MANIFEST, raw)
        if manifest["format"] > FORMAT:
            raise StateError(p, f"format {manifest['format']} was written by a newer version of "
                                f"Stockade; this one reads format {FORMAT}")
        return manifest

    @staticmethod
    def _read_bytes(p: Path) -> bytes | None:
        try:
            return p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(p, f"cannot read: {exc.strerror}") from exc

    @staticmethod
    def _parse(p: Path, name: str, raw: bytes):
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise StateError(p, f"not JSON: not UTF-8 at byte {exc.start}") from None
        except ValueError as exc:
            raise StateError(p, f"not JSON: {exc}") from None
        err = best_match(_VALIDATORS[name].iter_errors(value))
        if err is not None:
            raise StateError(p, _cut(f"{json_path(err.absolute_path)}: {err.message}"))
        return value

    def available(self) -> list[int]:
        """The generations back (1..3) that have a manifest."""
        return [n for n in range(1, GENERATIONS + 1) if self.path(f"{MANIFEST}.{n}").exists()]

    # ------------------------------------------------------------------ writing
    def commit(self, files: dict[str, Any]) -> int:
        """Write ``files`` (name -> data; None removes the file) as the next generation;
        the others carry over unchanged. Returns its number. Raises StateError (507 for a
        full disk) with the previous generation left whole and current."""
        files_now = self._current_files()
        encoded = {name: None if data is None else _encode(data) for name, data in files.items()}
        files = {name: data for name, data in files.items() if _entry(encoded[name]) != files_now.get(name)
                 or data is None and os.path.lexists(self.path(name))}
        if not files:
            return self.number        # nothing changes: no new generation
        number = self.number + 1
        temps: dict[str, str] = {}
        ops: list[tuple[str, str, str]] = []
        trash: list[str] = []
        try:
            for name in files:
                raw = encoded[name]
                if raw is None:
                    files_now.pop(name, None)
                    continue
                temps[name] = self._write_temp(name, raw)
                files_now[name] = _entry(raw)
            temps[MANIFEST] = self._write_temp(MANIFEST, _encode({
                "format": FORMAT, "generation": number, "files": files_now,
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
            for name in [*files, MANIFEST]:
                self._rotate(name, ops, trash)
            for name, data in files.items():
                if data is None and os.path.lexists(self.path(name)):
                    self._to_trash(name, str(self.path(name)), ops, trash)
            for name in [n for n in temps if n != MANIFEST] + [MANIFEST]:
                self._op("rename", temps[name], str(self.path(name)), ops)
            self._fsync_dir()
        except OSError as exc:
            self._undo(ops)
            for tmp in temps.values():
                _unlink(tmp)
            raise StateError(self.path(getattr(exc, "_state_name", MANIFEST)),
                             f"cannot write: {exc.strerror or exc}; the previous state is kept",
                             no_space=exc.errno in _NO_SPACE) from exc
        for t in trash:
            _unlink(t)
        self.number, self._files = number, files_now
        return number

    def _current_files(self) -> dict[str, dict]:
        """The current manifest's entries; before format 1, computed from the files."""
        if self._files is not None:
            return dict(self._files)
        try:
            manifest = self._read_manifest(0)
        except StateError:
            manifest = None
        if manifest is not None:
            self.number = manifest["generation"]
            return dict(manifest["files"])
        self.number = max([self.number] + [self._number_of(n) for n in self.available()])
        out: dict[str, dict] = {}
        for name in FILES:
            raw = self._read_bytes(self.path(name))
            if raw is not None:
                out[name] = _entry(raw)
        return out

    def _number_of(self, back: int) -> int:
        try:
            m = self._read_manifest(back)
        except StateError:
            return 0
        return m["generation"] if m else 0

    def _write_temp(self, name: str, raw: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.", suffix=".tmp")
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            _unlink(tmp)
            exc._state_name = name  # type: ignore[attr-defined]
            raise
        os.close(fd)
        return tmp

    def _rotate(self, name: str, ops: list, trash: list) -> None:
        p = lambda n: str(self.path(name + _suffix(n)))  # noqa: E731
        if os.path.lexists(p(GENERATIONS)):
            self._to_trash(name, p(GENERATIONS), ops, trash)
        for n in range(GENERATIONS - 1, 0, -1):
            if os.path.lexists(p(n)):
                self._op("rename", p(n), p(n + 1), ops)
        if os.path.lexists(p(0)):
            self._op("link", p(0), p(1), ops)

    def _to_trash(self, name: str, path: str, ops: list, trash: list) -> None:
        """Move ``path`` out of the way under a temporary name (deleted once committed)."""
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.old.", suffix=".tmp")
        os.close(fd)
        try:
            self._op("rename", path, tmp, ops)
        except OSError:
            _unlink(tmp)
            raise
        trash.append(tmp)

    @staticmethod
    def _op(kind: str, src: str, dst: str, ops: list) -> None:
        if kind == "rename":
            os.rename(src, dst)
        else:
            os.link(src, dst)
        ops.append((kind, src, dst))

    def _undo(self, ops: list) -> None:
        for kind, src, dst in reversed(ops):
            try:
                if kind == "rename" or not os.path.lexists(src):
                    os.rename(dst, src)   # a link whose source was replaced: the old file is back
                else:
                    os.unlink(dst)
            except OSError:
                pass
        try:
            self._fsync_dir()
        except OSError:
            pass

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _remove_leftovers(self) -> None:
        """Temporary files of a write that a crash interrupted."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for n in names:
            if n.startswith(".") and n.endswith(".tmp") and any(n.startswith(f".{f}.") for f in _NAMES):
                _unlink(str(self.dir / n))

    # ------------------------------------------------------------------ operators
    def restore(self, back: int) -> int:
        """Make generation ``back`` (1-3) current again, as a new generation (the one it
        replaces becomes generation 1). Raises StateError when it does not check out."""
        gen = self.load(back)
        self._files = None
        self._current_files()
        self.number = max(self.number, gen.number)
        return self.commit({name: gen.data[name] if name in gen.present else None
                            for name in FILES})


def _entry(raw: bytes | None) -> dict | None:
    return None if raw is None else {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
