"""Property-based API contract check: docs/api/openapi.yaml against a live agent socket.

``run_schemathesis(socket_path)`` generates requests for every operation of the OpenAPI
document with schemathesis (pinned in pyproject's dev extra), sends them over the unix
socket with a requests session whose adapter dials AF_UNIX, and checks each answer:
no 5xx, the status is documented, the content type and body match the document, and
(in negative mode) input the document forbids is refused with a 4xx. It raises
AssertionError listing every operation that failed, with the first failing example.

Against the real agent, run it as root (changes need uid 0) on a throwaway agent:
mutating operations are included unless ``mutating=False``.

    from api_contract import run_schemathesis
    run_schemathesis("/run/stockade/agent.sock", mutating=False, max_examples=10)
"""
from __future__ import annotations

import socket
from pathlib import Path

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from requests.adapters import HTTPAdapter
from schemathesis.generation import GenerationMode
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "api" / "openapi.yaml"
BASE_URL = "http://stockade"

CHECK_NAMES = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
               "response_schema_conformance", "response_headers_conformance")


class _UnixConnection(HTTPConnection):
    socket_path = ""

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else 30)
        sock.connect(self.socket_path)
        return sock


class _UnixPool(HTTPConnectionPool):
    def __init__(self, socket_path: str, **kw):
        super().__init__("stockade", **kw)
        self.socket_path = socket_path

    def _new_conn(self) -> HTTPConnection:
        conn = _UnixConnection(host="stockade", timeout=self.timeout.connect_timeout)
        conn.socket_path = self.socket_path
        return conn


class UnixAdapter(HTTPAdapter):
    """requests adapter that sends every request to one unix socket."""

    def __init__(self, socket_path: str):
        super().__init__()
        self._pool = _UnixPool(socket_path, maxsize=4)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self._pool

    def get_connection(self, url, proxies=None):  # requests < 2.32
        return self._pool

    def close(self):
        self._pool.close()
        super().close()


def unix_session(socket_path: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.mount(BASE_URL + "/", UnixAdapter(str(socket_path)))
    return session


def run_schemathesis(socket_path: str, *, max_examples: int = 15, mutating: bool = True,
                     negative: bool = True, openapi: Path = OPENAPI) -> int:
    """Check every operation; returns how many requests were sent."""
    schema = schemathesis.openapi.from_path(str(openapi))
    from schemathesis.checks import load_all_checks
    load_all_checks()
    checks = [getattr(schemathesis.checks, n) for n in CHECK_NAMES]
    negative_checks = checks + [schemathesis.checks.negative_data_rejection]
    session = unix_session(socket_path)
    failures: list[str] = []
    sent = 0
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if negative else [])
    try:
        for result in schema.get_all_operations():
            op = result.ok()
            if not mutating and op.method.upper() != "GET":
                continue
            # negative data needs something the document constrains besides the path
            # (an empty path segment cannot be sent); else hypothesis finds nothing
            has_input = bool(op.body) or bool(list(op.query))
            for mode in modes if has_input else modes[:1]:
                mode_checks = negative_checks if mode == GenerationMode.NEGATIVE else checks

                def call(case, _checks=mode_checks):
                    nonlocal sent
                    sent += 1
                    case.call_and_validate(base_url=BASE_URL, session=session, checks=_checks)

                check = settings(max_examples=max_examples, deadline=None, database=None,
                                 derandomize=True, phases=[Phase.explicit, Phase.generate],
                                 suppress_health_check=list(HealthCheck))(
                    given(case=op.as_strategy(generation_mode=mode))(
                        lambda case: call(case)))

                try:
                    check()
                except Unsatisfiable:
                    pass  # nothing in this operation can be made invalid
                except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collect all
                    failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {exc}")
    finally:
        session.close()
    if failures:
        raise AssertionError(f"{len(failures)} operation(s) break the API contract:\n\n"
                             + "\n\n".join(failures))
    return sent
