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


ROOT_TESTS = ROOT / "tests" / "root"
_own_ns = None   # netns.OwnNamespace, made for the session's first tests/root test


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Every tests/root test (set-up, call and tear-down, module and session fixtures
    with them) runs in one network namespace of the session's own: its agents, their
    bridges, veths, taps and Podman's bridge are there, and a demo agent holding the
    namespace lock in the machine's root namespace is never in the way (issue 14.4).
    Other tests (tests/ansible, tests/host) stay where the session started."""
    global _own_ns
    if os.geteuid() != 0 or ROOT_TESTS not in item.path.parents:
        return (yield)
    from netns import OwnNamespace
    if _own_ns is None:
        _own_ns = OwnNamespace()
    _own_ns.enter()
    try:
        return (yield)
    finally:
        _own_ns.leave()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """The session's last tear-down (whatever test it follows) runs in that namespace
    too: it stops the session fixtures the root tests started there (Podman's service,
    containers on the bridge Podman made there)."""
    if nextitem is not None or _own_ns is None:
        return (yield)
    _own_ns.enter()
    try:
        return (yield)
    finally:
        if ROOT_TESTS not in item.path.parents:
            _own_ns.leave()


def pytest_runtest_setup(item):
    if "root" in item.keywords and os.geteuid() != 0:
        pytest.fail("this test needs root (make test runs as root in CI)")


# The real host test (a booted Debian guest, ~10-25 min) runs in `make test-host` only.
collect_ignore = [] if os.environ.get("STOCKADE_TEST_HOST") == "1" else ["host"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the log tail of each agent still running, so a
    CI failure such as "internal error in the agent; see its log" can be read there."""
    report = yield
    if report.failed:
        from agentproc import AgentProcess
        for agent in sorted(AgentProcess.running, key=lambda a: str(a.run_dir)):
            name = agent.settings.get("host_name") or agent.run_dir.name
            report.sections.append((f"agent log: {name}", agent.log()[-3000:]))
    return report


SHARED_RUN_DIRS = ("/run/stockade-test", "/run/stockade-test-vm")   # parents of tests' sockets


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session, exitstatus):
    """Fixtures still set up (a run stopped early: -x, ^C) are torn down in the session's
    namespace, which then goes. The shared parent directories go once empty (another
    session may still use them)."""
    global _own_ns
    if _own_ns is not None:
        _own_ns.enter()
    try:
        return (yield)
    finally:
        if _own_ns is not None:
            _own_ns.leave()
            _own_ns.close()
            _own_ns = None
        _remove_shared_run_dirs()


def _remove_shared_run_dirs() -> None:
    for d in SHARED_RUN_DIRS:
        try:
            os.rmdir(d)
        except OSError:
            pass
