#!/usr/bin/env python3
"""The "no window" probe of the Molecule scenario (issue 15.5): while converge runs, a
denied peer sends a UDP datagram every 5 ms to the new workload, whose receiver logs the
time and source of every datagram it gets. verify.yml then checks that none arrived after
the agent registered the workload (the change log's first endpoint.upsert of it): from the
moment its interface is enforced, the policy that denies the peer is already in.

  probe.py recv LOG PORT            (in the workload's namespace)
  probe.py send ADDR PORT COUNT_FILE (in the denied peer's namespace)
  probe.py check LOG CHANGE_LOG ENDPOINT PEER_IP

recv and send stop by themselves after LIMIT seconds; the scenario stops them earlier
by their PID files."""
import datetime as dt
import json
import socket
import sys
import time

LIMIT = 1200.0
INTERVAL = 0.005


def recv(log, port):
    deadline = time.monotonic() + LIMIT
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, open(log, "a", buffering=1) as out:
        s.bind(("0.0.0.0", int(port)))
        s.settimeout(1.0)
        while time.monotonic() < deadline:
            try:
                _data, (src, _port) = s.recvfrom(64)
            except socket.timeout:
                continue
            out.write("%.6f %s\n" % (time.time(), src))


def send(addr, port, count_file):
    deadline = time.monotonic() + LIMIT
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        nxt = time.monotonic()
        while time.monotonic() < deadline:
            try:
                s.sendto(b"probe %d" % sent, (addr, int(port)))
                sent += 1
            except OSError:
                pass  # no route yet, or refused: keep probing
            if sent % 200 == 0:
                with open(count_file, "w") as f:
                    f.write("%d\n" % sent)
            nxt += INTERVAL
            time.sleep(max(0.0, nxt - time.monotonic()))


def check(log, change_log, endpoint, peer):
    registered = None
    with open(change_log) as f:
        for line in f:
            e = json.loads(line)
            if e.get("action") == "endpoint.upsert" and e.get("object") == endpoint:
                registered = dt.datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp()
                break
    got = []
    with open(log) as f:
        for line in f:
            t, src = line.split()
            if src == peer:
                got.append(float(t))
    late = [t for t in got if registered is not None and t >= registered]
    print(json.dumps({"registered": registered, "received_before": len(got) - len(late),
                      "received_after": len(late),
                      "first_after": min(late) - registered if late else None}))
    return 0 if registered is not None and got and not late else 1


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "recv":
        recv(*args)
    elif cmd == "send":
        send(*args)
    else:
        sys.exit(check(*args))
