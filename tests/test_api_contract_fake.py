"""The OpenAPI document holds for the server with the fake agent (schemathesis)."""
from __future__ import annotations

import pytest

pytest.importorskip("schemathesis")

from api_contract import run_schemathesis  # noqa: E402
from fake_agent import FakeAgent  # noqa: E402
from stockade.daemon.server import APIServer  # noqa: E402


@pytest.mark.timeout(180)
def test_openapi_contract_against_fake_agent(tmp_path):
    """Generated requests, valid and invalid, get documented answers and never a 5xx."""
    with APIServer(FakeAgent(), str(tmp_path / "agent.sock")) as server:
        sent = run_schemathesis(server.socket_path, max_examples=12)
    assert sent >= 50  # operations without inputs give one example each
