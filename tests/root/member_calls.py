"""Calls of a socket-group member, for test_api_hostile.py (standard library only; run
as a throwaway unprivileged user with ``/usr/bin/python3 -I -c <this file's text>
SOCKET`` with the requests on its standard input: a JSON list of [method, path, body
text or null]). Prints a JSON list of [status, error message or null], one per request,
each on a connection of its own."""
import http.client
import json
import socket
import sys


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("stockade", timeout=60)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def call(method: str, path: str, body):
    conn = UnixConnection(sys.argv[1])
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            conn.request(method, path, body=None if body is None else body.encode(),
                         headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused from the headers, body unread: the answer is waiting (as httpx does)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        message = json.loads(data)["error"]["message"] if resp.status >= 400 else None
    except (ValueError, KeyError, TypeError):
        message = data[:200].decode("utf-8", "replace")
    return [resp.status, message]


print(json.dumps([call(m, p, b) for m, p, b in json.load(sys.stdin)]))
