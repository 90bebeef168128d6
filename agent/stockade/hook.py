"""Podman's OCI hook: hand a container to the agent before its process runs.

Podman runs it at the createRuntime stage (hooks.d JSON; docs/agent.md "Containers
from their first packet"): the container's network namespace is set up, its host-side
veth exists, and its process has not started. It reads the container's OCI state on
standard input, sends it to the agent (POST /v1/hooks/oci on the agent's socket) and
returns when the agent has written the endpoint or said why not. So the container's
first packet finds it identified.

With the agent down, restarting or not answering, it tries for at most ``--timeout``
seconds (2) in all, then exits 0: the container starts, and its interface stays closed
until the agent identifies it (the fail-closed default). It always exits 0, since a
failing hook would stop the container from starting at all; what went wrong goes to
standard error.

Standard library only, and nothing else of the package is imported: it runs on every
container start.

    stockade-oci-hook [--socket PATH] [--timeout SECONDS]
    python3 -m stockade.hook ...
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

DEFAULT_SOCKET = "/run/stockade/agent.sock"
DEFAULT_TIMEOUT = 2.0
ROUTE = "/v1/hooks/oci"
MAX_STATE = 1 << 20      # bytes of OCI state read from stdin
MAX_ANSWER = 1 << 20     # bytes of the agent's answer read
RETRY = 0.05             # s between connection attempts while the socket is missing


def _say(msg: str) -> None:
    try:
        sys.stderr.write(f"stockade-oci-hook: {msg}\n")
        sys.stderr.flush()
    except OSError:
        pass


def _args(argv: list[str]) -> tuple[str, float]:
    sock, timeout = os.environ.get("STOCKADE_SOCKET") or DEFAULT_SOCKET, DEFAULT_TIMEOUT
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in ("--socket", "--timeout") and not eq:
            value = next(it, "")
        if name == "--socket" and value:
            sock = value
        elif name == "--timeout":
            try:
                timeout = min(max(float(value), 0.0), 30.0)
            except ValueError:
                _say(f"--timeout {value!r} is not a number; using {DEFAULT_TIMEOUT:g}")
        else:
            _say(f"ignoring argument {arg!r}")
    return sock, timeout


def read_state(stream) -> dict:
    """What the agent needs of the OCI state; ValueError when it is not one."""
    raw = stream.read(MAX_STATE + 1)
    if len(raw) > MAX_STATE:
        raise ValueError(f"the OCI state is larger than {MAX_STATE} bytes")
    state = json.loads(raw)
    if not isinstance(state, dict) or not isinstance(state.get("id"), str) or \
            not isinstance(state.get("pid"), int) or isinstance(state.get("pid"), bool):
        raise ValueError("the OCI state has no container id and pid")
    out = {"id": state["id"], "pid": state["pid"]}
    if isinstance(state.get("bundle"), str):
        out["bundle"] = state["bundle"]
    ann = state.get("annotations")
    if isinstance(ann, dict):
        out["annotations"] = {str(k): str(v) for k, v in ann.items()}
    return out


def _connect(path: str, deadline: float) -> socket.socket:
    """Connected to ``path``, trying again while it is missing or refuses (an agent
    restarting) until ``deadline``; TimeoutError after it."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        left = deadline - time.monotonic()
        if left <= 0:
            sock.close()
            raise TimeoutError(f"no agent on {path}")
        sock.settimeout(left)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if deadline - time.monotonic() <= RETRY:
                raise TimeoutError(f"no agent on {path}: {exc.strerror}") from None
            time.sleep(RETRY)
        except BaseException:
            sock.close()
            raise


def call(path: str, body: dict, deadline: float) -> tuple[int, dict]:
    """POST ``body`` to the agent; (status, JSON answer). OSError (timeouts included) or
    ValueError when it cannot be had by ``deadline``."""
    data = json.dumps(body).encode()
    head = (f"POST {ROUTE} HTTP/1.1\r\nHost: stockade\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    with _connect(path, deadline) as sock:
        sock.sendall(head + data)
        buf = b""
        need = None
        while need is None or len(buf) < need:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the agent did not answer in time")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("the agent did not answer in time") from None
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_ANSWER:
                raise ValueError("the agent's answer is too large")
            if need is None and b"\r\n\r\n" in buf:
                header, _, _ = buf.partition(b"\r\n\r\n")
                for line in header.split(b"\r\n")[1:]:
                    key, _, value = line.partition(b":")
                    if key.strip().lower() == b"content-length":
                        need = len(header) + 4 + int(value.strip())
    header, sep, payload = buf.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("the agent's answer was cut short")
    status = int(header.split(b" ", 2)[1])
    answer = json.loads(payload) if payload.strip() else {}
    return status, answer if isinstance(answer, dict) else {}


def main(argv: list[str] | None = None) -> int:
    path, timeout = _args(sys.argv[1:] if argv is None else argv)
    deadline = time.monotonic() + timeout
    try:
        state = read_state(sys.stdin.buffer)
    except (OSError, ValueError) as exc:
        _say(f"not a container's OCI state: {exc}")
        return 0
    try:
        status, answer = call(path, state, deadline)
    except (OSError, ValueError) as exc:
        _say(f"container {state['id'][:12]}: not handed to the agent ({exc}); its interface "
             "stays closed until the agent identifies it")
        return 0
    if status != 200:
        _say(f"container {state['id'][:12]}: the agent answered {status}: "
             f"{answer.get('error') or answer}")
    elif not answer.get("enrolled"):
        _say(f"container {state['id'][:12]}: not enrolled yet: {answer.get('reason')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
