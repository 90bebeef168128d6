"""Moves in one directory that are undone together, for the state store's commits.

    moves = DirMoves(directory)
    try:
        tmp = moves.write_temp("revision.json", data)     # written and fsynced
        moves.rotate("revision.json", 3)                  # NAME.2 -> NAME.3, NAME.1 -> NAME.2
        moves.replace(tmp, "revision.json")               # the old file held by a link
        moves.fsync()
    except OSError:
        moves.undo()                                      # every move back, temps removed
        raise
    moves.done()                                          # what was moved aside goes

Only renames and links happen once the data is on disk. Temporary files are named
``.NAME.<random>.tmp``, files moved aside ``.NAME.old.<random>.tmp``: what a crash
leaves behind is recognisable (store.StateStore removes it at start).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def suffixed(name: str, n: int) -> str:
    return f"{name}.{n}" if n else name


class DirMoves:
    def __init__(self, directory: Path):
        self.dir = directory
        self.temps: list[str] = []
        self._ops: list[tuple[str, str, str]] = []    # (kind, src, dst) done, to undo
        self._trash: list[str] = []

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def write_temp(self, name: str, raw: bytes) -> str:
        """``raw`` in a new temporary file beside ``name``, fsynced. An OSError carries
        the name (``state_name``)."""
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.", suffix=".tmp")
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            unlink(tmp)
            exc.state_name = name  # type: ignore[attr-defined]
            raise
        os.close(fd)
        self.temps.append(tmp)
        return tmp

    def rotate(self, name: str, keep: int) -> None:
        """NAME.(keep-1) -> NAME.keep … NAME.1 -> NAME.2; the old NAME.keep goes."""
        if os.path.lexists(self.path(suffixed(name, keep))):
            self.to_trash(name, self.path(suffixed(name, keep)))
        for n in range(keep - 1, 0, -1):
            if os.path.lexists(self.path(suffixed(name, n))):
                self._rename(self.path(suffixed(name, n)), self.path(suffixed(name, n + 1)))

    def replace(self, tmp: str, name: str) -> None:
        """``tmp`` becomes ``name``; the file it replaces is held by a hard link until
        ``done``, so that ``undo`` can put it back."""
        target = self.path(name)
        if os.path.lexists(target):
            held = self.path(f".{name}.old.{os.urandom(6).hex()}.tmp")
            os.link(target, held)
            self._ops.append(("link", target, held))
            self._trash.append(held)
        self._rename(tmp, target)

    def to_trash(self, name: str, path: str) -> None:
        """Move ``path`` aside (deleted by ``done``)."""
        fd, aside = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.old.", suffix=".tmp")
        os.close(fd)
        try:
            self._rename(path, aside)
        except OSError:
            unlink(aside)
            raise
        self._trash.append(aside)

    def _rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)
        self._ops.append(("rename", src, dst))

    def fsync(self) -> None:
        fsync_dir(self.dir)

    def undo(self) -> None:
        """Every move back, last first; the temporary files removed. Never raises."""
        for kind, src, dst in reversed(self._ops):
            try:
                if kind == "rename":
                    os.rename(dst, src)
                elif os.path.lexists(src):
                    os.unlink(dst)        # the file it held was not replaced after all
                else:
                    os.rename(dst, src)   # the replaced file is back
            except OSError:
                pass
        self._ops.clear()
        for tmp in self.temps:
            unlink(tmp)
        try:
            self.fsync()
        except OSError:
            pass

    def done(self) -> None:
        for aside in self._trash:
            unlink(aside)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
