"""Follow Podman's file event log directly, with inotify.

Podman's API service serves /events by polling its event log every 250 ms,
which alone adds 0-250 ms between `podman start` and the event. Reading the
same file on inotify wakeups cuts that to about a millisecond. The records
are turned into the Docker-API event shape, so DockerWatcher handles both
sources with one code path and drops whichever copy of an event comes second
(same container ID and timestamp).

Only for Podman with events_logger = "file" (the log is
<tmp_dir>/events/events.log, /run/libpod/events/events.log for root).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import struct
import threading
from collections.abc import Callable
from datetime import datetime

log = logging.getLogger(__name__)

DEFAULT_EVENTS_LOG = "/run/libpod/events/events.log"

_IN_MODIFY, _IN_ATTRIB, _IN_MOVE_SELF, _IN_DELETE_SELF = 0x2, 0x4, 0x800, 0x400
_IN_CLOEXEC, _IN_NONBLOCK = 0o2000000, 0o4000
_libc = ctypes.CDLL(None, use_errno=True)


def parse_time_ns(text: str) -> int | None:
    """RFC 3339 with up to nanoseconds (Go's RFC3339Nano) -> UNIX ns."""
    try:
        head, _, rest = text.partition(".")
        if not rest:  # no fraction
            return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()) * 10**9
        digits = "".join(ch for ch in rest[:9] if ch.isdigit())
        zone = rest[len(digits):]
        zone = "+00:00" if zone in ("Z", "") else zone
        secs = int(datetime.fromisoformat(head + zone).timestamp())
        return secs * 10**9 + int(digits.ljust(9, "0"))
    except ValueError:
        return None


def to_docker_event(record: dict) -> dict | None:
    """A libpod event-log record as a Docker /events object (containers only)."""
    if record.get("Type") != "container" or not record.get("ID"):
        return None
    status = record.get("Status", "")
    action = "die" if status == "died" else status
    event = {
        "Type": "container", "Action": action, "status": action, "id": record["ID"],
        "Actor": {"ID": record["ID"], "Attributes": record.get("Attributes") or {}},
        "source": "events-log",
        # not in Docker's shape: the create record's name and image (created.py)
        "Name": record.get("Name") or "", "Image": record.get("Image") or "",
    }
    ns = parse_time_ns(record.get("Time", ""))
    if ns is not None:
        event["timeNano"] = ns
    return event


class PodmanEventsLog:
    """Tail one events.log from its current end; see follow()."""

    def __init__(self, path: str = DEFAULT_EVENTS_LOG) -> None:
        self.path = path

    def follow(self, halt: threading.Event, emit: Callable[[dict], None]) -> None:
        """Call emit(docker_event) for each new container record until halt is set.

        Waits (re-checking every 0.5 s) while the file does not exist, and
        reopens it when it is replaced or truncated. Never raises for I/O
        problems: the API stream remains the source of truth.
        """
        ifd = _libc.inotify_init1(_IN_CLOEXEC | _IN_NONBLOCK)
        if ifd < 0:
            log.warning("inotify_init1 failed (errno %d): not following %s", ctypes.get_errno(), self.path)
            return
        try:
            first = True
            while not halt.is_set():
                try:
                    f = open(self.path, "rb")
                except OSError:
                    halt.wait(0.5)
                    first = False
                    continue
                with f:
                    if first:
                        f.seek(0, os.SEEK_END)  # history is the API snapshot's job
                    first = False
                    self._follow_open(ifd, f, halt, emit)
        finally:
            os.close(ifd)

    def _follow_open(self, ifd: int, f, halt: threading.Event, emit) -> None:
        wd = _libc.inotify_add_watch(ifd, os.fsencode(self.path),
                                     _IN_MODIFY | _IN_ATTRIB | _IN_MOVE_SELF | _IN_DELETE_SELF)
        if wd < 0:
            halt.wait(0.5)
            return
        buf = b""
        try:
            while not halt.is_set():
                chunk = f.read()
                if chunk:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        self._emit_line(line, emit)
                elif f.tell() > os.fstat(f.fileno()).st_size:
                    return  # truncated: reopen from the start
                elif _replaced(self.path, f):
                    # Podman rotates the log by renaming a new file over it: the open
                    # one gets no MOVE_SELF/DELETE_SELF (it is still open, here)
                    for line in (buf + f.read()).split(b"\n"):
                        self._emit_line(line, emit)
                    return
                ready, _, _ = select.select([ifd], [], [], 0.25)
                if not ready:
                    continue
                data = os.read(ifd, 4096)
                masks = [struct.unpack_from("iIII", data, off)[1] for off in _offsets(data)]
                if any(m & (_IN_MOVE_SELF | _IN_DELETE_SELF) for m in masks):
                    for line in (buf + f.read()).split(b"\n"):
                        self._emit_line(line, emit)
                    return
        finally:
            _libc.inotify_rm_watch(ifd, wd)

    @staticmethod
    def _emit_line(line: bytes, emit) -> None:
        if not line.strip():
            return
        try:
            event = to_docker_event(json.loads(line))
        except ValueError:
            return
        if event is not None:
            emit(event)


def _replaced(path: str, f) -> bool:
    """Whether ``path`` now names another file than the open ``f`` (or none)."""
    try:
        st = os.stat(path)
    except OSError:
        return True
    mine = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)


def _offsets(data: bytes):
    off = 0
    while off + 16 <= len(data):
        yield off
        off += 16 + struct.unpack_from("iIII", data, off)[3]
