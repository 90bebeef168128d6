"""The agent's state directory: generations of the state files, written atomically and
checked when read.

    state.json        the manifest: format, generation number, each file's SHA-256 and size
    identities.json … the state files (statefiles.py says what each holds and its schema;
                      the policies are in shards, policies-NN.json)
    NAME.1            a copy of NAME as it was last written (generation 1: the last good one)
    NAME.2, NAME.3    the two versions of NAME before it
    state.json.N      the manifest of generation N (1: a copy of the current one)

A generation is what one committed change leaves; its manifest names every file's
content by hash. ``commit`` writes each file that changes twice, to temporary files in
the directory (the new NAME and its copy NAME.1), and the new manifest the same way, and
fsyncs them. Then each of those names moves up one version (NAME.2 -> NAME.3,
NAME.1 -> NAME.2), the copies and the new files are renamed into place (the files they
replace held by a hard link until the end), state.json last, and the directory is
fsynced. Only renames and links happen after the data is on disk, so a full disk fails
before anything moved; any failure undoes the moves that were made, in reverse, and
removes the temporary files: the previous generation stays whole and current. Files that do not change are not rewritten: generation N's version of a file is
the one among NAME.1 … NAME.3 (or NAME itself) whose hash state.json.N names; a file
changes at most once a generation, so the last three generations are always complete,
and damage to a working file (an editor writing into it) never reaches its copies.

``load`` reads a generation and refuses it (StateError, naming the file and the
problem) when a file cannot be read, is not JSON, does not have its schema's shape, or
does not match its manifest (cut short, truncated, changed by hand). A commit that a
crash cut short leaves its temporary manifest behind; then, and only then, ``load``
takes each file of the committed generation from whichever version holds it and puts it
back in place. A directory without state.json is from before format 1: its files are
checked by shape alone.

A commit costs what it changes: a file whose content is the same is neither written nor
(for an EncodedList that was hashed before) hashed again, and the policies are sharded
(statefiles.py), so a one-rule change writes one shard, revision.json and the manifest.
Each is written twice on purpose: NAME.1 is its own copy, not a hard link, so that an
editor writing into NAME in place cannot damage generation 1 too.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from ..errors import StateError
from .atomicdir import DirMoves, fsync_dir, suffixed, unlink
from .statefiles import (
    EMPTY,
    FILES,
    FORMAT,
    MANIFEST,
    MANIFEST_SCHEMA,
    POLICIES,
    POLICY_FILE,
    POLICY_FILES,
    SCHEMAS,
    EncodedList,
    file_entry,
    json_path,
    schema_name,
    split_policies,
)

GENERATIONS = 3            # kept beside the working files
_NAMES = FILES + POLICY_FILES + (MANIFEST,)
_VALIDATORS = {name: Draft202012Validator(schema) for name, schema in
               {**SCHEMAS, MANIFEST: MANIFEST_SCHEMA}.items()}
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
MAX_MESSAGE = 300
log = logging.getLogger("stockade.state")


@dataclass
class Generation:
    """One generation's files, read and checked. ``back``: 0 the working files, 1-3 the
    generations kept; ``number``: its generation number (0: before format 1, or none)."""

    back: int
    number: int
    format: int = 0                     # 0: before format 1
    data: dict[str, Any] = field(default_factory=dict)
    present: tuple[str, ...] = ()       # files it has (the others read as EMPTY)
    # Where data["policies.json"] comes from: (file, its records), in order.
    policy_files: list[tuple[str, list]] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.data[name]


def _cut(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 1] + "…"


def _suffix(n: int) -> str:
    return f".{n}" if n else ""


def _encode(data) -> bytes:
    if isinstance(data, EncodedList):
        return data.raw()
    # No indent: json's C encoder (with indent it falls back to pure Python, ~10x slower
    # for a 100,000-entry policy file). One line per file; readers do not care.
    return (json.dumps(data, separators=(",", ":"), sort_keys=True) + "\n").encode()


_entry = file_entry


def _expand(files: dict[str, Any]) -> dict[str, Any]:
    """policies.json given as one list of records -> its shards (and policies.json, the
    file of format 1, removed); given as None (no policies) -> every shard removed."""
    if POLICIES not in files:
        return files
    out: dict[str, Any] = {}
    for name, data in files.items():      # in the same order: the shards where policies.json was
        if name == POLICIES:
            out.update(split_policies(data) if data is not None else dict.fromkeys((POLICIES, *POLICY_FILES)))
        else:
            out[name] = data
    return out


class StateStore:
    def __init__(self, state_dir: str | Path, *, create: bool = True):
        """``create``: make the directory and clean up after a crash; False only reads."""
        self.dir = Path(state_dir)
        self.number = 0            # the current generation's number, once read or written
        self._files: dict[str, dict] | None = None   # the current manifest's entries
        self.interrupted = False   # a commit was cut short (its manifest was never moved)
        self.read_only = not create
        if create:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                os.chmod(self.dir, 0o750)
            except OSError as exc:
                raise StateError(self.dir, f"cannot create the state directory: {exc.strerror}") from exc
        self._leftovers(remove=create)

    def path(self, name: str) -> Path:
        return self.dir / name

    # ------------------------------------------------------------------ reading
    def load(self, back: int = 0) -> Generation:
        """Generation ``back`` (0: the working files), checked; raises StateError."""
        manifest = self._read_manifest(back)
        if manifest is None and back:
            raise StateError(self.path(f"{MANIFEST}.{back}"), "no such generation")
        number = manifest["generation"] if manifest else 0
        gen = Generation(back, number, manifest["format"] if manifest else 0)
        present = []
        listed = manifest["files"] if manifest else {}
        names = FILES + tuple(sorted(n for n in listed if POLICY_FILE.match(n)))
        if back == 0:   # shards the manifest does not list: not committed (or, without one, read)
            names += self._shards(not_in=listed)
        for name in names:
            if manifest is None:
                raw = self._read_bytes(self.path(name))
                if raw is None:
                    continue
                value = self._parse(self.path(name), name, raw)
            else:
                entry = listed.get(name)
                if entry is None:
                    if back == 0 and os.path.lexists(self.path(name)):
                        self._not_committed(name, number)
                    continue
                value = self._version(name, entry, back, number)
            if schema_name(name) == POLICIES:
                gen.policy_files.append((name, value))
            else:
                gen.data[name] = value
            present.append(name)
        gen.data[POLICIES] = [rec for _, recs in gen.policy_files for rec in recs]
        for name in FILES:
            gen.data.setdefault(name, EMPTY[name])
        gen.present = tuple(dict.fromkeys(schema_name(n) for n in present))
        if back == 0:
            self.number = number
            self._files = dict(listed) if manifest else None
            self.interrupted = False
        return gen

    def _shards(self, not_in=()) -> tuple[str, ...]:
        """The working policy shards in the directory."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return ()
        except OSError as exc:
            raise StateError(self.dir, f"cannot read: {exc.strerror}") from exc
        return tuple(sorted(n for n in names if POLICY_FILE.match(n) and n not in not_in))

    def _version(self, name: str, entry: dict, back: int, number: int):
        """The version of ``name`` whose hash ``entry`` names: for the working generation
        the file itself (after a commit cut short, any version, put back in place); for
        generation N, whichever version kept holds it."""
        where = f"{MANIFEST}{_suffix(back)} (generation {number})"
        p = self.path(name)
        if back == 0 and not self.interrupted:
            raw = self._read_bytes(p)
            if raw is None:
                raise StateError(p, f"missing, but {where} lists it")
            value = self._parse(p, name, raw)     # a problem of shape is the clearer message
            if _entry(raw)["sha256"] != entry["sha256"]:
                raise StateError(p, f"does not match {where}: {len(raw)} bytes where "
                                    f"{entry.get('bytes', '?')} were written; cut short, "
                                    "truncated or changed outside the agent")
            return value
        for n in (0, *range(1, GENERATIONS + 1)) if back == 0 else (*range(1, GENERATIONS + 1), 0):
            q = self.path(name + _suffix(n))
            raw = self._read_bytes(q)
            if raw is not None and _entry(raw)["sha256"] == entry["sha256"]:
                if back == 0 and n:
                    log.warning("%s: a write was cut short; generation %d's version is back "
                                "from %s", p, number, q)
                    self._put_back(name, raw)
                return self._parse(q, name, raw)
        raise StateError(p, f"no version kept matches {where}")

    def _not_committed(self, name: str, number: int) -> None:
        if not self.interrupted:
            raise StateError(self.path(name), f"is not part of generation {number} "
                                              f"({MANIFEST} does not list it)")
        log.warning("%s: a write was cut short; it is not part of generation %d",
                    self.path(name), number)
        self._remove_uncommitted(name)

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
        err = best_match(_VALIDATORS[schema_name(name)].iter_errors(value))
        if err is not None:
            raise StateError(p, _cut(f"{json_path(err.absolute_path)}: {err.message}"))
        return value

    def available(self) -> list[int]:
        """The generations kept (1..3): those with a manifest."""
        return [n for n in range(1, GENERATIONS + 1) if self.path(f"{MANIFEST}.{n}").exists()]

    # ------------------------------------------------------------------ writing
    def commit(self, files: dict[str, Any], *, force: bool = False) -> int:
        """Write ``files`` (name -> data; None removes the file) as the next generation;
        the others carry over unchanged. Returns its number (the current one when nothing
        changes, unless ``force``). Raises StateError (507 for a full disk) with the
        previous generation left whole and current."""
        files = _expand(files)
        files_now = self._current_files()
        encoded: dict[str, bytes | None] = {}
        entries: dict[str, dict] = {}
        for name, data in files.items():
            if isinstance(data, EncodedList):
                entries[name] = data.entry      # hashed once; encoded below if it changed
            elif data is not None:
                raw = encoded[name] = _encode(data)
                entries[name] = _entry(raw)
        changed = [name for name, data in files.items()
                   if (data is None and (name in files_now or os.path.lexists(self.path(name)))) or
                   (data is not None and (force or entries[name] != files_now.get(name)))]
        if not changed:
            return self.number
        number = self.number + 1
        for name in changed:
            if files[name] is None:
                files_now.pop(name, None)
                encoded[name] = None
            else:
                files_now[name] = entries[name]
                if name not in encoded:
                    encoded[name] = _encode(files[name])
        encoded[MANIFEST] = _encode({"format": FORMAT, "generation": number, "files": files_now,
                                     "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        changed.append(MANIFEST)
        moves = DirMoves(self.dir)
        try:
            targets = []                          # (temporary file, the name it becomes)
            for name in changed:
                data = encoded[name]
                if data is not None:
                    targets.append((moves.write_temp(name, data), suffixed(name, 1)))
                    targets.append((moves.write_temp(name, data), name))
            for name in changed:
                moves.rotate(name, GENERATIONS)
                if encoded[name] is None and os.path.lexists(self.path(name)):
                    moves.to_trash(name, str(self.path(name)))
            for tmp, target in targets:           # the manifest was written last: moved last
                moves.replace(tmp, target)
            moves.fsync()
        except OSError as exc:
            moves.undo()
            raise StateError(self.path(getattr(exc, "state_name", MANIFEST)),
                             f"cannot write: {exc.strerror or exc}; the previous state is kept",
                             no_space=exc.errno in _NO_SPACE) from exc
        moves.done()
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
        self.number = max([self.number] + [self.number_of(n) for n in self.available()])
        out: dict[str, dict] = {}
        for name in FILES + self._shards():
            raw = self._read_bytes(self.path(name))
            if raw is not None:
                out[name] = _entry(raw)
        return out

    def number_of(self, back: int) -> int:
        """The number of generation ``back`` as its manifest says (0: unknown)."""
        try:
            m = self._read_manifest(back)
        except StateError:
            return 0
        return m["generation"] if m else 0

    def _put_back(self, name: str, raw: bytes) -> None:
        """``raw`` as the working file ``name`` again (after a commit cut short)."""
        if self.read_only:
            return
        moves = DirMoves(self.dir)
        try:
            moves.replace(moves.write_temp(name, raw), name)
            moves.fsync()
        except OSError as exc:
            moves.undo()
            raise StateError(self.path(name), f"cannot put the committed version back: "
                                              f"{exc.strerror or exc}") from exc
        moves.done()

    def _remove_uncommitted(self, name: str) -> None:
        if self.read_only:
            return
        try:
            os.unlink(self.path(name))
            fsync_dir(self.dir)
        except OSError as exc:
            raise StateError(self.path(name), f"cannot remove: {exc.strerror or exc}") from exc

    def _leftovers(self, remove: bool) -> None:
        """Temporary files of a commit that a crash cut short (a manifest among them
        says so: ``interrupted``); removed unless only reading."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for n in names:
            if n.startswith(".") and n.endswith(".tmp") and any(n.startswith(f".{f}.") for f in _NAMES):
                if n.startswith(f".{MANIFEST}.") and not n.startswith(f".{MANIFEST}.old."):
                    self.interrupted = True
                if remove:
                    unlink(str(self.dir / n))

    # ------------------------------------------------------------------ operators
    def restore(self, back: int) -> int:
        """Make generation ``back`` (1-3) current again, as a new generation (every
        working file written again). Raises StateError when it does not check out or
        cannot be written."""
        gen = self.load(back)
        self._files = None
        self._current_files()
        self.number = max(self.number, gen.number)
        return self.commit({name: gen.data[name] if name in gen.present else None
                            for name in FILES}, force=True)


