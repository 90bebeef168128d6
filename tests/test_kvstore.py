"""stockade.kvstore against a real etcd process (Debian's etcd-server): paginated
listing, a watch that is compacted (re-listed, deletes included) or cut (resumed from its
revision on another member, nothing lost) or silently stalled (found by its progress
check), lease loss, endpoint failover, per-lease key limits, stale keys, RBAC by certificate CN."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from etcdcluster import EtcdCluster
from stockade.kvstore import Compacted, EtcdClient, LeaseNotFound, Mirror, PermissionDenied, Publisher, Unavailable

pytestmark = pytest.mark.pure


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def one():
    with EtcdCluster(1, name="kvone") as c:
        yield c


@pytest.fixture
def client(one):
    c = EtcdClient(one.endpoints, timeout=2)
    yield c
    c.delete_prefix(b"/t/")
    c.close()


class View:
    """What a Mirror's callbacks say, applied as a consumer would."""

    def __init__(self):
        self.items: dict[bytes, bytes] = {}
        self.listings = 0
        self.lock = threading.Lock()

    def on_listing(self, items, revision):
        with self.lock:
            self.items = {kv.key: kv.value for kv in items}
            self.listings += 1

    def on_events(self, events):
        with self.lock:
            for e in events:
                if e.kind == "put":
                    self.items[e.key] = e.value
                else:
                    self.items.pop(e.key, None)


def test_list_is_paginated_at_one_revision(client):
    client.write([(b"/t/k%05d" % i, b"v", 0) for i in range(2500)])
    client.put(b"/tx", b"outside")
    items, rev = client.list_prefix(b"/t/", page=1000)
    assert len(items) == 2500 and [kv.key for kv in items] == sorted(kv.key for kv in items)
    assert rev == client.put(b"/tx", b"2") - 1


def test_watch_from_a_compacted_revision_raises_compacted(client):
    r1 = client.put(b"/t/a", b"1")
    r2 = client.put(b"/t/a", b"2")
    client.compact(r2)
    w = client.watch(b"/t/", r1)
    try:
        with pytest.raises(Compacted):
            for _ in range(10):     # the answer that it was created, then the refusal
                w.next(0.5)
    finally:
        w.cancel()


def test_a_watch_from_an_old_revision_counts_only_what_it_delivered(client):
    """The answer that a watch was created carries the store's current revision while
    the events since start_revision are still to come: resuming from it would skip
    them. The watch's revision is what it delivered (or a progress answer's)."""
    r1 = client.put(b"/t/a", b"1")
    client.put(b"/t/a", b"2")
    r3 = client.put(b"/t/b", b"3")
    w = client.watch(b"/t/", r1)
    try:
        seen = []
        while len(seen) < 3:
            events = w.next(2)
            assert events is not None, "the watch went quiet"
            if not seen:
                assert w.revision in (r1 - 1, *(e.revision for e in events))
            seen += events
        assert [e.revision for e in seen] == [r1, r1 + 1, r3] and w.revision == r3
        w.request_progress()
        assert w.next(2) == [], "a progress answer"
        assert w.revision >= r3
    finally:
        w.cancel()


def test_mirror_lists_again_when_its_revision_was_compacted(client):
    """Between the listing and the watch the store moves on and is compacted: the watch
    is refused, the mirror lists again and the view is right, deletes included."""
    client.put(b"/t/gone", b"x")
    view = View()
    first = threading.Event()

    def on_listing(items, revision):
        view.on_listing(items, revision)
        if not first.is_set():
            first.set()
            client.delete(b"/t/gone")
            rev = client.put(b"/t/new", b"y")
            client.compact(rev)

    m = Mirror(client, b"/t/", on_listing=on_listing, on_events=view.on_events, check_interval=1)
    m.start()
    try:
        wait_for(lambda: view.listings >= 2 and m.watching, what="a second listing")
        assert view.items == {b"/t/new": b"y"}
        client.put(b"/t/later", b"z")
        wait_for(lambda: b"/t/later" in view.items, what="a watched put")
    finally:
        m.stop()


def test_lease_loss_regrants_and_puts_again(client):
    p = Publisher(client, 3, [b"/t/h1/"])
    p.set_desired({b"/t/h1/a": b"1", b"/t/h1/b": b"2"})
    p.start()
    try:
        wait_for(lambda: not p.pending(), what="published")
        lease = next(iter(p.leases))
        assert client.get(b"/t/h1/a").lease == lease
        client.revoke(lease)           # as if it expired while cut off: the keys go
        assert client.get(b"/t/h1/a") is None
        # the next keepalive (TTL/3 = 1 s) finds it gone: a new lease, the keys again
        kv = wait_for(lambda: client.get(b"/t/h1/a"), timeout=5, what="the key put again")
        assert kv.lease != lease and kv.lease in p.leases and p.leases_lost == 1
        with pytest.raises(LeaseNotFound):
            client.keepalive(lease)
    finally:
        p.stop(revoke=True)


def test_keys_spread_over_leases_and_stale_keys_deleted(client):
    client.put(b"/t/h2/stale", b"old")
    p = Publisher(client, 5, [b"/t/h2/"], per_lease=1000)
    desired = {b"/t/h2/k%04d" % i: b"v" for i in range(2500)}
    p.set_desired(desired)
    p.start()
    try:
        wait_for(lambda: not p.pending(), timeout=20, what="2500 keys published")
        assert client.get(b"/t/h2/stale") is None
        items, _ = client.list_prefix(b"/t/h2/")
        leases = {kv.lease for kv in items}
        assert len(items) == 2500 and len(leases) == 3
        assert all(len(keys) <= 1000 for keys in p.leases.values())
        # one change is written in milliseconds
        t0 = time.monotonic()
        p.set_desired({**desired, b"/t/h2/new": b"n"})
        wait_for(lambda: client.get(b"/t/h2/new"), what="a new key")
        assert time.monotonic() - t0 < 1.0
    finally:
        p.stop(revoke=True)


def test_failover_backoff_and_a_cut_stream():
    """Three members: the member the client uses is killed; calls go on through the
    others, the mirror's stream breaks, it watches again elsewhere and sees what changed
    meanwhile (deletes included). With every member down calls raise Unavailable; when
    members return the publisher writes again by itself."""
    with EtcdCluster(3, name="kvthree") as cluster:
        c = EtcdClient(cluster.endpoints, timeout=1)
        other = EtcdClient(cluster.endpoints[1:], timeout=2)
        try:
            c.put(b"/t/x", b"1")
            c.put(b"/t/y", b"1")
            view = View()
            m = Mirror(c, b"/t/", on_listing=view.on_listing, on_events=view.on_events,
                       check_interval=1)
            p = Publisher(c, 3, [b"/t/pub/"])
            p.set_desired({b"/t/pub/a": b"1"})
            m.start()
            p.start()
            try:
                wait_for(lambda: m.watching and not p.pending(), what="watching")
                assert c.current == 0
                cluster.kill(0)
                other.delete(b"/t/x")
                other.put(b"/t/z", b"2")
                wait_for(lambda: b"/t/z" in view.items and b"/t/x" not in view.items,
                         timeout=10, what="the view after failover")
                assert m.reconnects >= 1
                assert c.put(b"/t/w", b"3") and c.current != 0
                cluster.kill(1)
                cluster.kill(2)
                with pytest.raises(Unavailable):
                    c.put(b"/t/v", b"4")
                p.set_desired({b"/t/pub/a": b"1", b"/t/pub/b": b"2"})
                time.sleep(1.5)
                assert not p.connected
                for i in range(3):
                    cluster.start_member(i)
                cluster.wait_healthy()
                wait_for(lambda: not p.pending(), timeout=20, what="published after the outage")
                assert c.get(b"/t/pub/b").value == b"2"
                wait_for(lambda: m.watching, timeout=20, what="watching again")
            finally:
                m.stop()
                p.stop()
        finally:
            c.close()
            other.close()


def test_a_cut_stream_resumes_from_its_revision_without_listing_again():
    """The member the mirror watches on is killed -9 while keys are put and deleted: the
    mirror watches again on the next member from the last revision it saw + 1. It lists
    nothing again, and every change written meanwhile arrives exactly once."""
    with EtcdCluster(3, name="kvresume") as cluster:
        c = EtcdClient(cluster.endpoints, timeout=1)
        writer = EtcdClient(cluster.endpoints[1:], timeout=2)
        try:
            writer.put(b"/t/before", b"0")
            view, seen = View(), []

            def on_events(events):
                seen.extend(events)
                view.on_events(events)

            m = Mirror(c, b"/t/", on_listing=view.on_listing, on_events=on_events,
                       check_interval=1)
            m.start()
            stop, written = threading.Event(), []

            def write():
                i = 0
                while not stop.is_set():
                    k = b"/t/k%02d" % (i % 40)
                    try:
                        written.append(writer.delete(k) if i % 3 == 2 else writer.put(k, b"%d" % i))
                    except Unavailable:          # a leader being elected: once more
                        time.sleep(0.05)
                        continue
                    i += 1
                    time.sleep(0.005)

            try:
                wait_for(lambda: m.watching, what="watching")
                assert c.current == 0 and view.listings == 1
                t = threading.Thread(target=write)
                t.start()
                try:
                    time.sleep(0.5)
                    cluster.kill(0)
                    time.sleep(1.5)
                finally:
                    stop.set()
                    t.join()
                items, rev = writer.list_prefix(b"/t/")
                wait_for(lambda: m.revision >= rev, what="the mirror at etcd's revision")
                assert m.resumes >= 1 and view.listings == 1, "resumed, not listed again"
                revisions = [e.revision for e in seen]
                assert len(revisions) == len(set(revisions)), "an event arrived twice"
                assert set(written) <= set(revisions), "an event was lost"
                assert view.items == {kv.key: kv.value for kv in items}
            finally:
                m.stop()
        finally:
            c.close()
            writer.close()


def test_a_silently_stalled_stream_is_found_by_the_progress_check():
    """The member the mirror watches on is stopped (SIGSTOP): its connections stay open
    and nothing ends the stream, it only goes quiet. The progress request the mirror asks
    every check_interval gets no answer: it says it is not watching (degraded), watches
    again on the next member from its revision and sees what was written meanwhile,
    long before gRPC's keepalive (15 s + 5 s) would notice."""
    with EtcdCluster(3, name="kvstall") as cluster:
        c = EtcdClient(cluster.endpoints, timeout=1)
        writer = EtcdClient(cluster.endpoints[1:], timeout=2)
        proc = cluster.members[0]["proc"]
        stopped = False
        try:
            writer.put(b"/t/before", b"0")
            view, states = View(), []
            m = Mirror(c, b"/t/", on_listing=view.on_listing, on_events=view.on_events,
                       check_interval=1, on_state=lambda w, err: states.append((w, err)))
            m.start()
            try:
                wait_for(lambda: m.watching, what="watching")
                time.sleep(2.5)                # a quiet, live stream: progress answered
                assert c.current == 0 and states == [(True, None)]
                proc.send_signal(signal.SIGSTOP)
                stopped, t0 = True, time.monotonic()
                wait_for(lambda: not m.watching, timeout=5, what="the stall noticed")
                assert time.monotonic() - t0 < 3.5
                assert states[1][0] is False and "no answer to a progress request" in states[1][1]
                for _ in range(50):             # a leader being elected (if it was member 0)
                    try:
                        writer.put(b"/t/during", b"1")
                        break
                    except Unavailable:
                        time.sleep(0.1)
                wait_for(lambda: m.watching and view.items.get(b"/t/during") == b"1",
                         timeout=10, what="watching again, on another member")
                assert c.current != 0 and m.resumes >= 1 and view.listings == 1
                assert (True, None) in states[2:]
                proc.send_signal(signal.SIGCONT)
                stopped = False
                writer.put(b"/t/after", b"2")
                wait_for(lambda: b"/t/after" in view.items, what="a put after")
            finally:
                m.stop()
        finally:
            if stopped:
                proc.send_signal(signal.SIGCONT)
            c.close()
            writer.close()


def test_tls_and_rbac_by_certificate_cn():
    with EtcdCluster(1, tls=True, name="kvtls") as cluster:
        cluster.enable_rbac(["h1", "h2"])
        cert, key = cluster.ca.client("h1")
        c = EtcdClient(cluster.endpoints, ca=str(cluster.ca.ca_path), cert=cert, key=key)
        try:
            c.put(b"/stockade/v1/endpoints/h1/10.0.0.1", b"{}")
            c.put(b"/stockade/v1/nodes/h1", b"{}")
            lease = c.grant(5)
            c.put(b"/stockade/v1/endpoints/h1/10.0.0.2", b"{}", lease)
            assert c.keepalive(lease) > 0
            with pytest.raises(PermissionDenied):
                c.put(b"/stockade/v1/endpoints/h2/10.0.0.1", b"{}")
            with pytest.raises(PermissionDenied):
                c.put(b"/stockade/v1/subnets/h1", b"{}")
            with pytest.raises(PermissionDenied):
                c.put(b"/stockade/v1/nodes/h2", b"{}")
            items, _ = c.list_prefix(b"/stockade/v1/")
            assert {kv.key for kv in items} >= {b"/stockade/v1/nodes/h1"}
        finally:
            c.close()
        # no client certificate: refused at the TLS handshake
        anon = EtcdClient(cluster.endpoints, ca=str(cluster.ca.ca_path), timeout=1)
        try:
            with pytest.raises(Unavailable):
                anon.put(b"/stockade/v1/nodes/h1", b"{}")
        finally:
            anon.close()
