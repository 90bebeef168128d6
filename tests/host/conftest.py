"""The real host test: a booted Debian 12 guest (systemd as PID 1) managed over SSH.

Run by `make test-host` (not by `.ci/run` yet: see the note there); `make test` leaves it out
(tests/conftest.py ignores this directory unless STOCKADE_TEST_HOST=1).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .guest import Guest

FIGURES: dict[str, float | str] = {}


@pytest.fixture(scope="session")
def figures() -> dict:
    return FIGURES


@pytest.fixture(scope="session")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="stockade-hosttest-"))
    yield d
    if os.environ.get("STOCKADE_HOST_KEEP") != "1":
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def guest(workdir, figures):
    if os.geteuid() != 0:
        pytest.fail("the host test needs root (tap, bridge, QEMU)")
    from . import image
    fresh = image.cached() is None
    meta = image.build()
    figures["image_build_s"] = meta["times"]["total_s"]
    figures["image_cached"] = "no (built now)" if fresh else "yes"
    figures["guest_kernel"] = meta["kernel"]
    with Guest(workdir / "vm") as g:
        try:
            figures["boot_to_ssh_s"] = g.wait_ssh()
            yield g
        finally:
            (workdir / "console.log").write_text(g.log_tail(200_000))


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.write_sep("-", "host test figures")
        for key, value in FIGURES.items():
            terminalreporter.write_line(f"{key}: {value}")
        out = os.environ.get("STOCKADE_HOST_FIGURES")
        if out:
            Path(out).write_text(json.dumps(FIGURES, indent=1) + "\n")
