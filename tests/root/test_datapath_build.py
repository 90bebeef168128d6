"""The BPF build: compiled in a child process (bcc never loads into the loader's process),
pinned under the pin directory by the hash of its source, reused by a start with the same
source and settings, rebuilt when they change or when the pinned maps were replaced."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from stockade.datapath import Datapath, DatapathError, bpfsys

pytestmark = pytest.mark.root

PIN = f"/sys/fs/bpf/stockade-perf-build-{os.getpid()}"
SETTINGS = {"STOCKADE_PIN_DIR": PIN, "CT_MAX": 1024}


def prog_ids(dp: Datapath) -> tuple[int, int]:
    return bpfsys.prog_info(dp.from_endpoint_fd).id, bpfsys.prog_info(dp.to_endpoint_fd).id


@pytest.fixture
def clean():
    yield
    try:
        dp = Datapath(SETTINGS)
        dp.remove_pins()
        dp.close()
    except DatapathError:
        pass
    shutil.rmtree(PIN, ignore_errors=True)   # what a failed build left


def test_loader_process_never_maps_the_compiler(clean):
    code = textwrap.dedent(f"""
        import json, sys
        from stockade.datapath import Datapath
        dp = Datapath({SETTINGS!r})
        dp.set_ipcache("10.213.77.1", 4321)
        maps = open("/proc/self/maps").read()
        print(json.dumps({{"compiled": dp.compiled, "bcc": "bcc" in sys.modules,
                           "llvm": "libLLVM" in maps or "libclang" in maps or "libbcc" in maps}}))
        dp.close()
    """)
    out = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out.append(r.stdout.strip().splitlines()[-1])
    assert out[0] == '{"compiled": true, "bcc": false, "llvm": false}'
    assert out[1] == '{"compiled": false, "bcc": false, "llvm": false}'   # the cached build


def test_same_source_reuses_the_pinned_programs_and_a_change_rebuilds(clean):
    dp1 = Datapath(SETTINGS)
    try:
        dp1.set_ipcache("10.213.77.2", 4322)
        dp2 = Datapath(SETTINGS)
        assert not dp2.compiled and prog_ids(dp2) == prog_ids(dp1)
        assert dp2.ipcache_entries()["10.213.77.2/32"] == 4322
        dp2.close()
        dp3 = Datapath({**SETTINGS, "EVENTS_NEW_RATE": 777})      # another build
        assert dp3.compiled and not set(prog_ids(dp3)) & set(prog_ids(dp1))
        assert os.listdir(f"{PIN}/build") == [dp3.build_dir.name]  # the old build unpinned
        assert dp3.ipcache_entries()["10.213.77.2/32"] == 4322     # same maps
        dp3.close()
    finally:
        dp1.close()


def test_replaced_maps_rebuild_the_programs(clean):
    dp1 = Datapath(SETTINGS)
    old = prog_ids(dp1)
    dp1.close()
    os.unlink(f"{PIN}/config")          # a map pin removed by hand: its program is stale
    dp2 = Datapath(SETTINGS)
    try:
        assert dp2.compiled and not set(prog_ids(dp2)) & set(old)
        dp2.set_config()
    finally:
        dp2.close()


def test_compile_error_names_the_source(clean):
    with pytest.raises(DatapathError, match="cannot compile or load"):
        Datapath({**SETTINGS, "CT_TIMEOUT_SYN_S": "not a number"})


def test_a_changed_policy_or_ipcache_size_carries_the_entries_over(clean):
    dp1 = Datapath(SETTINGS)
    dp1.set_ipcache("10.213.77.3", 4323)
    dp1.set_ipcache("10.213.78.0/24", 4324)
    dp1.close()
    dp2 = Datapath({**SETTINGS, "IPCACHE_MAX": 32768, "POLICY_MAX": 32768})
    try:
        assert dp2.map_info("ipcache4").max_entries == 32768
        assert dp2.ipcache_entries() == {"10.213.77.3/32": 4323, "10.213.78.0/24": 4324}
        assert not [f for f in os.listdir(PIN) if f.endswith("_resize")]
    finally:
        dp2.close()


def test_many_policy_entries_are_written_in_one_batch_and_read_back(clean):
    from stockade.policy.mapstate import DirectionPolicy, Entry, Key, diff
    dp = Datapath(SETTINGS)
    try:
        want = {Key(7, 1000 + i, 0, 6, 9000 + i % 10, 16): Entry(i % 5 == 0, frozenset({"p"}))
                for i in range(300)}
        dp.apply_delta(diff({}, want, {}, {(7, 0): DirectionPolicy(True, True)}))
        assert dp.policy_entries() == want
    finally:
        dp.close()


def prog_tags(dp: Datapath) -> tuple[bytes, bytes]:
    return (bytes(bpfsys.prog_info(dp.from_endpoint_fd).tag),
            bytes(bpfsys.prog_info(dp.to_endpoint_fd).tag))


def test_a_start_without_pins_loads_the_kept_build_without_the_compiler(clean, tmp_path):
    """After a reboot (bpffs empty) the build kept in the state directory is loaded
    without bcc: the same instructions (the kernel's program tags), the maps made anew;
    a damaged record is compiled over and rewritten."""
    cache = tmp_path / "bpf"
    dp1 = Datapath(SETTINGS, cache_dir=cache)
    assert dp1.compiled and not dp1.from_cache
    tags = prog_tags(dp1)
    [record] = os.listdir(cache)
    assert record == f"{dp1.build_dir.name}.json"
    dp1.remove_pins()
    dp1.close()
    shutil.rmtree(PIN, ignore_errors=True)          # what a reboot leaves: no pins at all
    code = textwrap.dedent(f"""
        import json, sys
        from stockade.datapath import Datapath, bpfsys
        dp = Datapath({SETTINGS!r}, cache_dir={str(cache)!r})
        dp.set_ipcache("10.213.77.5", 4325)
        maps = open("/proc/self/maps").read()
        print(json.dumps({{"compiled": dp.compiled, "from_cache": dp.from_cache,
                           "bcc": "bcc" in sys.modules or "libbcc" in maps,
                           "tags": [bytes(bpfsys.prog_info(fd).tag).hex() for fd in
                                    (dp.from_endpoint_fd, dp.to_endpoint_fd)],
                           "ipcache": dp.ipcache_entries()}}))
        dp.close()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"compiled": False, "from_cache": True, "bcc": False,
                   "tags": [t.hex() for t in tags], "ipcache": {"10.213.77.5/32": 4325}}
    dp2 = Datapath(SETTINGS, cache_dir=cache)        # pins there now: reused, not loaded
    assert not dp2.compiled and not dp2.from_cache
    dp2.remove_pins()
    dp2.close()
    shutil.rmtree(PIN, ignore_errors=True)
    (cache / record).write_text('{"format": 1, "programs": {}, "maps": {}, "sha256": "x"}')
    dp3 = Datapath(SETTINGS, cache_dir=cache)
    try:
        assert dp3.compiled and not dp3.from_cache and prog_tags(dp3) == tags
        assert json.loads((cache / record).read_text())["sha256"] != "x"
    finally:
        dp3.close()
