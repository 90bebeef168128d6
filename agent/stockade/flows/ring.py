"""A bounded ring of flow records in one preallocated bytearray.

Writers (the decoder, one thread) append batches under the ring's lock; readers take a
snapshot of the rows they want under the same lock, then filter and render outside
it. ``seq`` counts every record ever written, so a follower remembers the last seq it
saw and asks for what came after (records overwritten in between are reported as
skipped). Memory is ``capacity * RECORD_SIZE`` bytes plus the interned tables.
"""
from __future__ import annotations

import threading
from typing import Iterable, Iterator

from .l7 import L7Table
from .record import RECORD, RECORD_SIZE, Interner, to_dict


class FlowInfos(Interner):
    """The interned peers, and (for filters on the HTTP part) the ring's L7 table."""

    def __init__(self, l7: L7Table):
        super().__init__()
        self.l7 = l7


class FlowRing:
    def __init__(self, capacity: int = 65535):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.buf = bytearray(capacity * RECORD_SIZE)
        self.seq = 0                       # records written so far
        self.l7 = L7Table(capacity)        # HTTP parts of L7 rows (l7.py)
        self.infos = FlowInfos(self.l7)    # (identity, labels, endpoint name, host)
        self.policies = Interner(zero=())  # tuples of policy names
        self.ifnames: dict[int, str] = {}
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)

    def __len__(self) -> int:
        return min(self.seq, self.capacity)

    @property
    def nbytes(self) -> int:
        return len(self.buf)

    def append_rows(self, rows: Iterable[tuple]) -> int:
        """Append already-built row tuples (see record.RECORD). Returns how many."""
        pack = RECORD.pack_into
        buf, cap = self.buf, self.capacity
        n = 0
        with self.cond:
            seq = self.seq
            for row in rows:
                pack(buf, (seq % cap) * RECORD_SIZE, *row)
                seq += 1
                n += 1
            self.seq = seq
            if n:
                self.cond.notify_all()
        return n

    def rows_since(self, seq: int) -> tuple[list[tuple], int, int]:
        """Rows written after ``seq``: (rows oldest first, new seq, skipped)."""
        with self.lock:
            end = self.seq
            start = max(seq, end - self.capacity)
            data = self._slice_locked(start, end)
        return list(RECORD.iter_unpack(data)), end, start - seq

    def rows(self) -> list[tuple]:
        """Every row in the ring, oldest first."""
        return list(RECORD.iter_unpack(self.snapshot()))

    def snapshot(self) -> bytes:
        """A copy of every row's bytes, oldest first (unpack with RECORD.iter_unpack)."""
        with self.lock:
            return self._slice_locked(max(0, self.seq - self.capacity), self.seq)

    def iter_rows_newest_first(self) -> Iterator[tuple]:
        """Rows newest first, unpacked lazily from a copy taken under the lock."""
        with self.lock:
            data = self._slice_locked(max(0, self.seq - self.capacity), self.seq)
        unpack = RECORD.unpack_from
        for off in range(len(data) - RECORD_SIZE, -1, -RECORD_SIZE):
            yield unpack(data, off)

    def _slice_locked(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        cap, size = self.capacity, RECORD_SIZE
        a, b = start % cap, end % cap
        if b <= a:  # wraps (a == b: the ring is full)
            return bytes(self.buf[a * size:]) + bytes(self.buf[:b * size])
        return bytes(self.buf[a * size:b * size])

    def wait(self, seq: int, timeout: float) -> bool:
        """Block until a record after ``seq`` exists or ``timeout`` passes."""
        with self.cond:
            if self.seq > seq:
                return True
            return self.cond.wait_for(lambda: self.seq > seq, timeout)

    def to_dict(self, row: tuple) -> dict:
        return to_dict(row, self.infos, self.policies, self.ifnames, self.l7)
