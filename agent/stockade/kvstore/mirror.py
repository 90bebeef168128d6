"""A prefix of etcd mirrored locally: a paginated list, then a watch from its revision + 1.

The consumer gets ``on_listing(items, revision)`` with every key under the prefix (at
start and after every re-list: it applies the difference, deletes included) and
``on_events(events)`` for what the watch brought.

A stream that ends (a member gone, a member without a leader cancels it) or a live-watch
check that gets no answer (a progress request every ``check_interval``, answered within
``check_interval``) makes it watch again on the next endpoint from the last revision it
saw + 1: etcd replays every event since, so nothing is missed and nothing is listed
again. Only a compacted revision (those events are gone) or a ``reconnect()`` (the
consumer lost what it was given) makes it list again.

Retries: every 0.1 s (with jitter) for the first ``FAST_S`` seconds of a failure, the
time etcd takes to elect a leader after losing one (members without a leader refuse new
watches), then backing off from 0.2 s, doubling to 5 s.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable

from .backoff import Backoff
from .client import KV, PAGE, EtcdClient, Event
from .errors import Compacted, KvstoreError

log = logging.getLogger("stockade.kvstore")
FAST_S, FAST_RETRY = 2.0, 0.1


class _Relist(KvstoreError):
    """The consumer asked for a listing (``reconnect``)."""


class Mirror:
    def __init__(self, client: EtcdClient, prefix: bytes, *,
                 on_listing: Callable[[list[KV], int], None],
                 on_events: Callable[[list[Event]], None],
                 check_interval: float = 5.0, page: int = PAGE,
                 on_state: Callable[[bool, str | None], None] | None = None):
        self.client, self.prefix, self.page = client, prefix, page
        self.on_listing, self.on_events, self.on_state = on_listing, on_events, on_state
        self.check_interval = check_interval
        self.revision = 0
        self.watching = False
        self.synced_once = False
        self.last_response = 0.0          # monotonic time of the last watch answer
        self.listings = 0
        self.list_started = 0.0            # monotonic time the last listing began
        self.list_s = 0.0                  # how long its pages took
        self.last_error: str | None = None
        self.reconnects = 0
        self._answered = False             # the current watch got an answer
        self.resumes = 0                   # watches started again without a listing
        self._stop = threading.Event()
        self._reconnect = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stockade-etcd-mirror", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def reconnect(self) -> None:
        """List again and watch anew (the caller saw etcd fail elsewhere)."""
        self._reconnect.set()

    def _set(self, watching: bool, error: str | None) -> None:
        self.watching = watching
        if error:
            self.last_error = error
        if self.on_state is not None:
            self.on_state(watching, error)

    def _run(self) -> None:
        backoff = Backoff()
        listed = False
        failing_since: float | None = None
        while not self._stop.is_set():
            try:
                if not listed or self._reconnect.is_set():
                    self._reconnect.clear()
                    listed = False
                    self._list()
                    listed = True
                else:
                    self.resumes += 1
                self._watch(self.revision + 1, backoff)
            except (Compacted, _Relist) as exc:
                listed = False
                self._set(False, str(exc))
                log.warning("etcd: %s; listing again", exc)
            except KvstoreError as exc:
                self._set(False, str(exc))
                log.warning("etcd: %s; %s", exc, "watching again from revision "
                            f"{self.revision + 1}" if listed else "listing again")
            if self._stop.is_set():
                return
            self.reconnects += 1
            self.client.current = (self.client.current + 1) % len(self.client.endpoints)
            now = time.monotonic()
            if failing_since is None or self._answered:
                failing_since = now            # a new failure, not one more in a row
            self._answered = False
            fast = now - failing_since < FAST_S
            self._stop.wait(FAST_RETRY * random.uniform(0.5, 1.5) if fast else backoff.next())

    def _list(self) -> None:
        self.list_started = time.monotonic()
        items, revision = self.client.list_prefix(self.prefix, self.page)
        self.list_s = time.monotonic() - self.list_started
        self.revision = revision
        self.listings += 1
        self.on_listing(items, revision)
        self.synced_once = True

    def _watch(self, start: int, backoff: Backoff) -> None:
        w = self.client.watch(self.prefix, start)
        try:
            asked = None        # monotonic time of an unanswered progress request
            while not self._stop.is_set():
                if self._reconnect.is_set():
                    raise _Relist("a listing asked for")
                events = w.next(timeout=0.5)
                now = time.monotonic()
                if events is None:
                    if asked is not None and now - asked > self.check_interval:
                        raise KvstoreError(f"{w.endpoint}: watch: no answer to a progress "
                                           f"request within {self.check_interval:g} s")
                    if asked is None and now - self.last_response > self.check_interval:
                        w.request_progress()
                        asked = now
                    continue
                self.last_response, asked = now, None
                self._answered = True
                if not self.watching:
                    self._set(True, None)
                    backoff.reset()
                self.revision = max(self.revision, w.revision)
                if events:
                    self.on_events(events)
        finally:
            w.cancel()
