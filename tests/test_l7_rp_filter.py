"""Which devices ``loosen_rp_filter`` changes: the kernel applies max(all, device)."""
from stockade.l7.host import loosen_rp_filter


def conf(tmp_path, every: int, **devs: int):
    for name, value in {"all": every, **devs}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "rp_filter").write_text(f"{value}\n")
    return str(tmp_path)


def value(tmp_path, dev) -> int:
    return int((tmp_path / dev / "rp_filter").read_text())


def test_only_strict_devices_become_loose(tmp_path):
    d = conf(tmp_path, 0, br0=1, br1=0, br2=2)
    assert loosen_rp_filter(["br0", "br1", "br2", "gone"], conf=d) == ["br0"]
    assert [value(tmp_path, x) for x in ("br0", "br1", "br2")] == [2, 0, 2]


def test_strict_for_all_is_loosened_on_the_device_only(tmp_path):
    d = conf(tmp_path, 1, br0=0)
    assert loosen_rp_filter(["br0"], conf=d) == ["br0"]
    assert (value(tmp_path, "all"), value(tmp_path, "br0")) == (1, 2)
    assert loosen_rp_filter(["br0"], conf=d) == []


def test_no_conf_changes_nothing(tmp_path):
    assert loosen_rp_filter(["br0"], conf=str(tmp_path / "none")) == []
