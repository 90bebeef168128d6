"""The state directory (daemon/store.py): generations written atomically, every kind of
damage refused with the file and the problem, a write that fails at any point leaving the
previous generation whole and no temporary file behind."""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest

from stockade.daemon.statefiles import POLICY_FILE, POLICY_SHARDS, PolicyShards, policy_file, split_policies
from stockade.daemon.store import StateStore
from stockade.errors import StateError

pytestmark = pytest.mark.pure

POLICY = {"source": "p.yaml", "document": {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                                           "metadata": {"name": "p"}, "spec": {"endpointSelector": {}}}}
CHANGED = {**POLICY, "document": {**POLICY["document"], "spec": {"endpointSelector": {"matchLabels": {"a": "b"}}}}}
SHARD = policy_file(POLICY["document"])      # the file that holds policy p


def files_of(d) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d)) if (d / n).is_file()}


def temps(d) -> list[str]:
    return [n for n in os.listdir(d) if n.endswith(".tmp")]


@pytest.fixture
def store(tmp_path):
    s = StateStore(tmp_path / "state")
    s.commit({"policies.json": [POLICY], "revision.json": 1, "identities.json": {"app=web": 256},
              "endpoints.json": [], "ipcache.json": [], "services.json": {}})
    s.commit({"revision.json": 2})
    return s


def test_an_empty_directory_is_an_empty_state(tmp_path):
    gen = StateStore(tmp_path / "new").load()
    assert gen.number == 0 and gen["policies.json"] == [] and gen["revision.json"] == 0


def test_generations_move_up_together(store):
    store.commit({"policies.json": [CHANGED], "revision.json": 3})
    store.commit({"revision.json": 4})
    d = store.dir
    assert {n for n in os.listdir(d) if n.startswith(("policies", "revision", "state"))} == {
        SHARD, f"{SHARD}.1", f"{SHARD}.2",
        *(f"{f}{s}" for f in ("revision.json", "state.json") for s in ("", ".1", ".2", ".3"))}
    got = [(store.load(n).number, store.load(n)["revision.json"], store.load(n)["policies.json"])
           for n in range(4)]
    # generation 1 is a copy of the working files; N of every file is from the same commit
    assert got == [(4, 4, [CHANGED]), (4, 4, [CHANGED]), (3, 3, [CHANGED]), (2, 2, [POLICY])]
    assert os.stat(d / SHARD).st_ino != os.stat(d / f"{SHARD}.1").st_ino


def test_a_change_that_changes_nothing_makes_no_generation(store):
    assert store.commit({"revision.json": 2, "policies.json": [POLICY]}) == 2
    assert not (store.dir / "state.json.3").exists()


def test_a_working_file_changed_in_place_leaves_its_copy_whole(store):
    store.commit({"revision.json": 3})
    (store.dir / SHARD).write_text("{}")      # as an editor writing in place does
    with pytest.raises(StateError, match=rf"{SHARD}: \$: \{{\}} is not of type 'array'"):
        StateStore(store.dir).load()
    gen = StateStore(store.dir).load(1)
    assert (gen.number, gen["policies.json"], gen["revision.json"]) == (3, [POLICY], 3)


PROBLEMS = [
    ("policies.json", b"{}", "$: {} is not of type 'array'"),
    ("policies.json", b"[{}]", "$[0]: 'document' is a required property"),
    ("policies.json", b"null", "$: None is not of type 'array'"),
    ("policies.json", b'[{"document": {"a": 1}, "sourc": "x"}]', "$[0]: Additional properties"),
    ("policies.json", b'[{"source": "p.yaml", "document": {"apiVers', "not JSON: Unterminated string"),
    ("policies.json", b"\xff\xfe[]", "not JSON: not UTF-8 at byte 0"),
    ("revision.json", b'"7"', "$: '7' is not of type 'integer'"),
    ("revision.json", b"1.5", "$: 1.5 is not of type 'integer'"),
    ("revision.json", b"-3", "$: -3 is less than the minimum of 0"),
    ("identities.json", b'{"app=web": "x"}', "$.app=web: 'x' is not of type 'integer'"),
    ("endpoints.json", b'[{"id": 1, "interface": "v", "ips": [], "labels": {}}]',
     "$[0]: 'name' is a required property"),
    ("endpoints.json", b'[{"name": "a", "id": 1, "interface": "v", "ips": [], "labels": {}, '
                       b'"mac": "zz"}]', "$[0].mac: 'zz' does not match"),
    ("ipcache.json", b'[{"prefix": 10, "labels": {}}]', "$[0].prefix: 10 is not of type 'string'"),
    ("services.json", b"[]", "$: [] is not of type 'object'"),
]


@pytest.mark.parametrize("legacy", [False, True], ids=["format-2", "before-format-1"])
@pytest.mark.parametrize("name,content,message", PROBLEMS, ids=[f"{n}:{c[:24]!r}" for n, c, _ in PROBLEMS])
def test_a_file_in_the_wrong_shape_is_refused_naming_it(store, legacy, name, content, message):
    if legacy:     # policies.json before format 2, beside the shards a later version left
        for n in os.listdir(store.dir):
            if n.startswith("state.json"):
                os.unlink(store.dir / n)
    elif name == "policies.json":
        name = SHARD
    (store.dir / name).write_bytes(content)
    with pytest.raises(StateError) as err:
        StateStore(store.dir).load()
    assert err.value.path == str(store.dir / name)
    assert message in err.value.problem, err.value.problem


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "revision.json").write_text("2\n"), None),   # same bytes: fine
    (lambda d: (d / "revision.json").write_text("5"), "does not match state.json (generation 2)"),
    (lambda d: (d / SHARD).write_bytes((d / SHARD).read_bytes()[:-1] + b" "),
     "does not match state.json"),
    (lambda d: (d / "revision.json").unlink(), "missing, but state.json (generation 2) lists it"),
    (lambda d: (d / "services.json").unlink() or (d / "x.json").write_text("{}"), "missing, but"),
    (lambda d: [(d / "revision.json").write_text("9"), (d / ".state.json.x1.tmp").write_text("{")],
     None),                                      # a commit cut short: the committed one is in .1
    (lambda d: (d / "revision.json").unlink() or (d / "revision.json").mkdir(), "cannot read"),
    (lambda d: (d / "state.json").write_text(json.dumps({"format": 3, "generation": 3, "files": {}})),
     "format 3 was written by a newer version"),
    (lambda d: (d / "state.json").write_text('{"format": 1}'), "'generation' is a required property"),
], ids=["unchanged", "changed", "truncated-same-shape", "missing", "unlisted", "cut-short",
        "unreadable", "newer-format", "manifest-shape"])
def test_a_file_that_does_not_match_its_generation_is_refused(store, damage, message):
    damage(store.dir)
    if message is None:
        gen = StateStore(store.dir).load()
        assert gen["revision.json"] == 2 and gen["services.json"] == {}
        return
    with pytest.raises(StateError, match=re.escape(message)):
        StateStore(store.dir).load()


class Fault:
    """Make the n-th call of ``os.<name>`` fail with ``err``."""

    def __init__(self, monkeypatch, name: str, n: int, err: int = errno.ENOSPC):
        self.calls, real = 0, getattr(os, name)

        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == n:
                raise OSError(err, os.strerror(err))
            return real(*args, **kwargs)
        monkeypatch.setattr(os, name, call)


# Every call a commit of two files makes (6 writes, 7 fsyncs, up to 14 renames, 3 links)
# and more: a fault past the last one never fails, and then the commit must be whole.
@pytest.mark.parametrize("name,n", [(name, n) for name, calls in (("write", 7), ("fsync", 8),
                                                                  ("rename", 15), ("link", 4))
                                    for n in range(1, calls + 1)])
def test_a_write_failing_at_any_point_keeps_the_previous_generation(store, monkeypatch, name, n):
    before = files_of(store.dir)
    Fault(monkeypatch, name, n)
    try:
        store.commit({"policies.json": [POLICY, POLICY], "revision.json": 3})
    except StateError as exc:
        assert "the previous state is kept" in str(exc)
        assert exc.http_status == 507
        monkeypatch.undo()
        assert files_of(store.dir) == before
        assert temps(store.dir) == []
        assert StateStore(store.dir).load()["revision.json"] == 2
        store.commit({"revision.json": 3})        # and the next write works
        assert StateStore(store.dir).load().number == 3
    else:   # the fault came after the commit point (or never): the new generation is whole
        monkeypatch.undo()
        gen = StateStore(store.dir).load()
        assert (gen.number, gen["revision.json"], len(gen["policies.json"])) == (3, 3, 2)
        assert temps(store.dir) == []


def test_other_write_errors_answer_500(store, monkeypatch):
    Fault(monkeypatch, "write", 1, errno.EIO)
    with pytest.raises(StateError) as err:
        store.commit({"revision.json": 3})
    assert err.value.http_status == 500


def test_restore_makes_a_generation_current_again(store):
    store.commit({"policies.json": [], "services.json": {"s": {"cidrs": ["192.0.2.0/24"]}}})
    assert store.load()["services.json"]
    number = StateStore(store.dir).restore(3)      # the first commit: one policy, revision 1
    gen = StateStore(store.dir).load()
    assert (number, gen["revision.json"], len(gen["policies.json"]), gen["services.json"]) == (4, 1, 1, {})
    assert StateStore(store.dir).load(2)["services.json"]          # what it replaced, kept


def test_restore_works_over_a_damaged_current_state(store):
    (store.dir / "state.json").write_text("{")
    (store.dir / "policies.json").write_text("{}")
    StateStore(store.dir).restore(1)
    gen = StateStore(store.dir).load()
    assert (gen.number, gen["revision.json"], gen["policies.json"]) == (3, 2, [POLICY])


def test_a_commit_cut_short_by_a_crash_is_rolled_back_at_load(store, monkeypatch):
    """A crash between the renames: its temporary manifest stays behind; the next start
    takes the committed generation from the versions kept and puts it back in place."""
    def crash(src, dst, real=os.rename):
        if dst.endswith("/revision.json"):
            raise SystemExit("power lost")
        real(src, dst)
    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(SystemExit):
        store.commit({"policies.json": [CHANGED], "revision.json": 3})
    monkeypatch.undo()
    assert json.loads((store.dir / SHARD).read_text()) == [CHANGED]    # moved before the crash
    assert StateStore(store.dir, create=False).load()["policies.json"] == [POLICY]
    assert json.loads((store.dir / SHARD).read_text()) == [CHANGED]    # a reader repairs nothing
    gen = StateStore(store.dir).load()
    assert (gen.number, gen["revision.json"], gen["policies.json"]) == (2, 2, [POLICY])
    assert StateStore(store.dir).load().number == 2 and temps(store.dir) == []


def test_leftover_temporary_files_are_removed(store):
    (store.dir / ".policies.json.abc123.tmp").write_text("half")
    (store.dir / ".unrelated.tmp").write_text("not ours")
    StateStore(store.dir)
    assert temps(store.dir) == [".unrelated.tmp"]


def policies(n: int) -> list[dict]:
    return [{"source": "m.yaml", "document": {**POLICY["document"], "metadata": {"name": f"m{i}"}}}
            for i in range(n)]


def names(gen) -> list[str]:
    return sorted(r["document"]["metadata"]["name"] for r in gen["policies.json"])


def test_a_change_of_one_policy_writes_its_shard_and_no_other(tmp_path):
    store = StateStore(tmp_path / "state")
    before = policies(200)
    store.commit({"policies.json": before, "revision.json": 1})
    d = store.dir
    assert len([n for n in os.listdir(d) if POLICY_FILE.match(n)]) == POLICY_SHARDS   # 200 fill every one
    inodes = {n: os.stat(d / n).st_ino for n in os.listdir(d)}
    changed = {**before[7], "document": {**before[7]["document"], "spec": CHANGED["document"]["spec"]}}
    store.commit({"policies.json": before[:7] + [changed] + before[8:], "revision.json": 2})
    shard = policy_file(changed["document"])
    # new files, or versions moved up a place; every other shard is the file it was
    assert {n for n in os.listdir(d) if os.stat(d / n).st_ino != inodes.get(n)} == {
        f"{f}{s}" for f in (shard, "revision.json", "state.json") for s in ("", ".1", ".2")}
    gen, older = StateStore(d).load(), StateStore(d).load(2)
    assert names(gen) == names(older) == sorted(f"m{i}" for i in range(200))
    assert changed in gen["policies.json"] and changed not in older["policies.json"]


def test_no_policies_leave_no_shard_and_the_generations_before_keep_theirs(store):
    store.commit({"policies.json": [], "revision.json": 3})
    assert not [n for n in os.listdir(store.dir) if POLICY_FILE.match(n)]
    assert [store.load(n)["policies.json"] for n in range(4)] == [[], [], [POLICY], [POLICY]]
    StateStore(store.dir).restore(3)
    assert StateStore(store.dir).load()["policies.json"] == [POLICY]


FORMAT_1 = Path(__file__).parent / "data" / "state-format-1"


@pytest.fixture
def format_1(tmp_path):
    """A state directory as format 1 wrote it (every policy in one policies.json):
    tests/test_agent_persist.py's agent at commit 0a00e6f after endpoints web and db
    (generations 1, 2), an ipcache entry (3), policies db (4) and web (5), a service (6)."""
    d = tmp_path / "state"
    shutil.copytree(FORMAT_1, d)
    return d


def test_a_directory_of_format_1_loads(format_1):
    store = StateStore(format_1, create=False)
    got = [(g.number, g.format, names(g), sorted(g["services.json"])) for g in map(store.load, range(4))]
    assert got == [(6, 1, ["db", "web"], ["bk"]), (6, 1, ["db", "web"], ["bk"]), (5, 1, ["db", "web"], []),
                   (4, 1, ["db"], [])]


def test_a_commit_over_format_1_writes_format_2(format_1):
    store = StateStore(format_1)
    records = store.load()["policies.json"]
    store.commit({"policies.json": records[:1], "revision.json": 3})
    manifest = json.loads((format_1 / "state.json").read_text())
    assert (manifest["format"], manifest["generation"]) == (2, 7)
    assert [n for n in manifest["files"] if n.startswith("policies")] == [policy_file(records[0]["document"])]
    assert not (format_1 / "policies.json").exists()      # format 1's file, kept for 6 and before
    assert [(g.number, names(g)) for g in map(StateStore(format_1).load, range(4))] == [
        (7, ["db"]), (7, ["db"]), (6, ["db", "web"]), (5, ["db", "web"])]
    StateStore(format_1).restore(2)                        # format 1's generation 6, as format 2
    gen = StateStore(format_1).load()
    assert (gen.number, gen.format, names(gen), gen["revision.json"]) == (8, 2, ["db", "web"], 2)


def test_a_shard_the_manifest_does_not_list_is_refused(store):
    other = next(n for n in (policy_file({"metadata": {"name": f"x{i}"}}) for i in range(99)) if n != SHARD)
    (store.dir / other).write_text("[]")
    with pytest.raises(StateError, match=re.escape(f"{other}: is not part of generation 2")):
        StateStore(store.dir).load()


class Policy:
    def __init__(self, name: str, version: int):
        self.source, self.document = "p.yaml", {**POLICY["document"], "metadata": {"name": name},
                                                "spec": {"endpointSelector": {"matchLabels": {"v": str(version)}}}}


def contents(files) -> dict:
    return {n: sorted(json.loads(f.raw()), key=json.dumps) for n, f in files.items() if f is not None}


def test_shards_built_from_what_changed_are_the_shards_of_every_policy():
    shards, live, rnd = PolicyShards(), {}, random.Random(19)
    for step in range(300):
        for _ in range(rnd.choice((1, 1, 1, 40))):
            name = f"p{rnd.randrange(120)}"
            if rnd.random() < 0.3:
                live.pop(name, None)
            else:
                live[name] = Policy(name, step)
        built = shards.files(dict(live))
        whole = split_policies({"source": p.source, "document": p.document} for p in live.values())
        assert contents(built) == contents(whole), step
        assert set(built) == set(whole)
