"""The ctypes mirrors in stockade.datapath.maps match the C structs byte for byte."""
from __future__ import annotations

import ctypes as ct

import pytest

from stockade.datapath import maps
from stockade.datapath.loader import BPF_DIR

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def c_layouts():
    """bcc's view (from clang) of each struct in the header, via one array map each."""
    bcc = pytest.importorskip("bcc")
    header = (BPF_DIR / "include" / "stockade_maps.h").read_text()
    decls = "\n".join(f"BPF_ARRAY(layout_{name}, struct {name}, 1);" for name in maps.LAYOUTS)
    b = bcc.BPF(text=f"#include <uapi/linux/bpf.h>\n{header}\n{decls}\n".encode())
    try:
        yield {name: b[f"layout_{name}".encode()].Leaf for name in maps.LAYOUTS}
    finally:
        b.cleanup()


@pytest.mark.parametrize("name", sorted(maps.LAYOUTS), ids=sorted(maps.LAYOUTS))
def test_struct_matches_c(c_layouts, name):
    """Same size, same field names in the same order, same offsets and sizes."""
    py, c = maps.LAYOUTS[name], c_layouts[name]
    assert ct.sizeof(py) == ct.sizeof(c)
    py_fields = [f[0] for f in py._fields_]
    c_fields = [f[0] for f in c._fields_ if not f[0].startswith("__pad")]
    assert py_fields == c_fields
    for f in py_fields:
        assert (getattr(py, f).offset, getattr(py, f).size) == \
               (getattr(c, f).offset, getattr(c, f).size), f


def test_counter_index_matches_c_formula():
    """COUNTER_INDEX(dir, verdict, reason) in the header uses the same enum sizes."""
    header = (BPF_DIR / "include" / "stockade_maps.h").read_text()
    assert f"#define NUM_REASONS             {maps.NUM_REASONS}" in header
    assert f"#define NUM_VERDICTS      {maps.NUM_VERDICTS}" in header
    for r in maps.Reason:
        assert f"REASON_{r.name} " in header, r
    assert maps.counter_index(1, 2, maps.NUM_REASONS - 1) == maps.NUM_COUNTERS - 1
