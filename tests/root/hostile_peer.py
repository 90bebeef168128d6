"""A hostile member of the agent socket's group, for test_api_hostile.py.

Standard library only: the test runs it as a throwaway unprivileged user with
``/usr/bin/python3 -I -c <this file's text> SOCKET SECONDS CONNECTIONS``, so it needs no
access to the checkout or its virtualenv.

It keeps CONNECTIONS connections open for SECONDS. Each announces a large body and
sends it slowly (RATE bytes a second): half of them 8 MB bodies (a change: the agent
must refuse from the headers, 403; a dry run over a member's 4 MiB: 413), half just
under a member's limit to routes a member may use (the agent reads them until their
deadline: 408). Whenever the agent answers or closes, the connection is made again (50 ms later).
Prints a JSON summary: how many answers of each status, closes and connection errors.
"""
import json
import select
import socket
import sys
import threading
import time
from collections import Counter

MB8 = 8_000_000
NEAR_MEMBER_MAX = 4 * 1024 * 1024 - 4096
RATE = 128 * 1024
CHUNK = 16 * 1024
KINDS = [
    ("PUT", "/v1/policies", MB8),
    ("PUT", "/v1/policies?dry_run=true", MB8),
    ("POST", "/v1/review", NEAR_MEMBER_MAX),
    ("PUT", "/v1/policies?dry_run=true", NEAR_MEMBER_MAX),
]


def _answer(sock) -> str:
    try:
        data = sock.recv(4096)
    except ConnectionResetError:
        return "reset"
    except OSError as exc:
        return type(exc).__name__
    if not data:
        return "closed"
    parts = data.split(b" ", 2)
    return parts[1].decode() if len(parts) > 1 and data.startswith(b"HTTP/") else "garbage"


def one_connection(path: str, method: str, length: int, until: float, seen: Counter,
                   lock: threading.Lock) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sys.argv[1])
    except OSError as exc:
        with lock:
            seen["connect-" + type(exc).__name__] += 1
        sock.close()
        time.sleep(0.2)
        return
    outcome = "unfinished"
    try:
        head = (f"{method} {path} HTTP/1.1\r\nHost: stockade\r\n"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n")
        sock.sendall(head.encode())
        sock.setblocking(False)
        sent, chunk = 0, b" " * CHUNK
        while time.monotonic() < until:
            readable, _, _ = select.select([sock], [], [], CHUNK / RATE)
            if readable:
                outcome = _answer(sock)
                break
            if sent < length:
                try:
                    sent += sock.send(chunk[:length - sent])
                except BlockingIOError:
                    pass  # the agent is not reading (yet): that is the point
                except OSError:
                    outcome = _answer(sock)
                    break
    finally:
        sock.close()
    with lock:
        seen[outcome] += 1


def worker(i: int, until: float, seen: Counter, lock: threading.Lock) -> None:
    method, path, length = KINDS[i % len(KINDS)]
    while time.monotonic() < until:
        one_connection(path, method, length, until, seen, lock)
        time.sleep(0.05)  # again at once, but leave the shared CPU to the test's measurements


def main() -> None:
    seconds, connections = float(sys.argv[2]), int(sys.argv[3])
    until = time.monotonic() + seconds
    seen: Counter = Counter()
    lock = threading.Lock()
    threads = [threading.Thread(target=worker, args=(i, until, seen, lock))
               for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(dict(seen)))


main()
