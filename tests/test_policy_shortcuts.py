"""The import's shortcuts give what the full paths give: plain ports (validation._plain_port)
as _Sanitizer.port, packed policy keys and values (writer) as the ctypes structures, a
policy's state record from its document_json as encode_item of its document."""
from __future__ import annotations

import ctypes as ct

from hypothesis import given
from hypothesis import strategies as st

from stockade.daemon.statefiles import _policy_record, encode_item, policy_file
from stockade.datapath import maps as m
from stockade.datapath.writer import _KEY_STRUCT, _VALUE_STRUCT, _policy_key, _policy_key_fields
from stockade.policy.api.validation import _plain_port, _Sanitizer, sanitize_document
from stockade.policy.mapstate import ANY_PROTO, Key

ports = st.one_of(st.integers(-2, 70000), st.text("0123456789", max_size=7),
                  st.sampled_from(["80", "http", " 80", "８０", "", "0x50", True, None, 1.5]))
protocols = st.sampled_from(["TCP", "tcp", "Tcp", "UDP", "udp", "SCTP", "ANY", "any", "ICMP", "",
                             7, None])


@given(st.dictionaries(st.sampled_from(["port", "protocol", "endPort"]),
                       st.one_of(ports, protocols), max_size=3))
def test_a_plain_port_is_what_the_full_check_gives(raw):
    quick = _plain_port(raw)
    if quick is None:
        return
    s = _Sanitizer("")
    assert s.port(raw, "spec.ingress[0].toPorts[0].ports[0]") == quick
    assert not s.errors


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 1),
       st.sampled_from([ANY_PROTO, 6, 17, 132, 1, 58]), st.integers(0, 65535), st.integers(0, 16),
       st.integers(0, 1))
def test_packed_policy_keys_are_the_structures_bytes(local, peer, direction, proto, port, plen, gen):
    key = Key(local, peer, direction, proto, port, plen)
    assert _KEY_STRUCT.pack(*_policy_key_fields(key, gen)) == bytes(_policy_key(key, gen))


@given(st.integers(0, 1), st.integers(0, 2**32 - 1))
def test_packed_policy_values_are_the_structures_bytes(deny, policy_id):
    assert _VALUE_STRUCT.pack(deny, policy_id) == bytes(m.PolicyValue(deny=deny, policy_id=policy_id))
    assert ct.sizeof(m.PolicyValue) == _VALUE_STRUCT.size


def test_a_policy_record_is_encode_item_of_its_document():
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": "db", "namespace": "shop", "labels": {"z": "1", "a": "ü"}},
           "spec": {"endpointSelector": {"matchLabels": {"app": "db"}},
                    "ingress": [{"toPorts": [{"ports": [{"port": "5432", "protocol": "tcp"}]}]}]},
           "description": "x \"quoted\""}
    p = sanitize_document(doc, source="dir/ä.yaml")
    assert p.document == doc
    record, shard = _policy_record(p)
    assert record == encode_item({"source": "dir/ä.yaml", "document": doc})
    assert shard == policy_file(doc)
