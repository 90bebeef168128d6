import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "root" not in item.keywords and "pure" not in item.keywords:
            item.add_marker(pytest.mark.pure)


def pytest_runtest_setup(item):
    if "root" in item.keywords and os.geteuid() != 0:
        pytest.fail("this test needs root (make test runs as root in CI)")


# The real host test (a booted Debian guest, ~10-25 min) runs in `make test-host` only.
collect_ignore = [] if os.environ.get("STOCKADE_TEST_HOST") == "1" else ["host"]
