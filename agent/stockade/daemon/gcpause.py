"""The cyclic garbage collector paused while a large change builds its objects.

A 100,000-entry import allocates millions of objects that all live on (documents,
rules, keys, entries); the collector, run every few hundred allocations, would walk
the growing heap again and again (a third of the import's time). Policy objects hold
no reference cycles that must be freed during the change; what a paused collector
leaves is collected when it runs again, after the change.
"""
from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_holders = 0
_was_enabled = False


@contextmanager
def collector_paused(*, trim: bool = False) -> Iterator[None]:
    """No automatic collection while any thread is inside (nesting and threads allowed).
    ``trim``: afterwards, hand the C heap's free memory back to the system (a large
    import's text, body and raw documents are freed by then; malloc keeps the pages)."""
    global _holders, _was_enabled
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()
        if trim:
            release_free_memory()


def release_free_memory() -> None:
    """The C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass
