"""The agent's readiness message to systemd (Type=notify in the role's unit)."""
import socket

from stockade.daemon.sdnotify import notify


def test_notify_sends_ready_to_the_notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("READY=1")
        assert s.recv(64) == b"READY=1"


def test_notify_abstract_socket(monkeypatch):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0stockade-test-notify-%d" % id(s))
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + s.getsockname()[1:].decode())
        assert notify()
        assert s.recv(64) == b"READY=1"


def test_without_systemd_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify() is False

