"""The state files: what each one holds, built from the model, and the shape it must have.

Format 2 (``FORMAT``; state.json says which format a directory holds):

    identities.json   {canonical label set: identity number}
    endpoints.json    [endpoint record]: what each endpoint is and what identifies its
                      interface (endpoints.Endpoint.to_record)
    ipcache.json      [{prefix, labels, host, node}]: other hosts' workloads
    policies-NN.json  [{source, document}]: the live policy documents, in POLICY_SHARDS
                      shards (NN: two hex digits) by each policy's kind, namespace and
                      name (``policy_file``): a change of one policy rewrites one shard,
                      not every policy. A shard with no policy has no file.
    revision.json     the policy revision, an integer
    services.json     {name: definition}: inventory services (inventory.parse_services)

Format 1 kept every policy in one policies.json, rewritten whole (5.5 MB at 10,000
policies) by every change. It still loads: the policies of a generation are those of
policies.json, if its manifest lists it, then those of its shards. The agent's first
commit after reading it writes the shards and removes policies.json (restore.py);
older generations keep their policies.json versions.

"policies.json" is also the policies' name as one list, in ``StateStore.commit`` and
``Generation``: the store splits a list given under it into the shards.

Every file is checked against its JSON schema (``SCHEMAS``; a shard has policies.json's)
when it is loaded; what a schema cannot say (a policy document, a label, a prefix, a
service) is checked by the code that reads the record (restore.py), and either failure
names the file and the path in it. A file that is missing is empty (a new host), never a
reason to open.
"""
from __future__ import annotations

import hashlib
import json
import re
import zlib
from typing import Any, Callable, Iterable, Mapping

from ..policy.countindex import changed_refs

FORMAT = 2
MANIFEST = "state.json"
POLICIES = "policies.json"
POLICY_SHARDS = 32          # 10,000 policies: ~190 kB a shard, a full import 64 files
POLICY_FILES = tuple(f"policies-{n:02x}.json" for n in range(POLICY_SHARDS))
POLICY_FILE = re.compile(r"^policies-[0-9a-f]{2}\.json$")

_STR = {"type": "string"}
_STR_OR_NULL = {"type": ["string", "null"]}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_MAC = {"type": ["string", "null"], "pattern": "^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$"}

ENDPOINT_RECORD = {
    "type": "object",
    "required": ["name", "id", "interface", "ips", "labels"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 63},
        "id": {"type": "integer", "minimum": 1, "maximum": 0xFFFFFFFF},
        "interface": {"type": "string", "maxLength": 15},
        "ips": {"type": "array", "items": _STR, "maxItems": 8},
        "labels": _LABELS,
        "source": {"enum": ["static", "podman", "docker", "libvirt"]},
        "audit": {"type": "boolean"},
        "runtime_id": _STR_OR_NULL,
        "mac": _MAC,
        "extra": {"type": "object"},
        "dropped_labels": {"type": "array", "items": {
            "type": "object", "required": ["label", "reason", "cause"],
            "properties": {"label": _STR, "reason": _STR, "cause": _STR}}},
        "by_mac": {"type": "boolean"},
        # What identifies the interface it was bound to (endpoints.py, "Rebinding").
        "link_mac": _MAC,
        "netns": {"type": ["object", "null"], "required": ["inode"], "additionalProperties": False,
                  "properties": {"inode": {"type": "integer", "minimum": 1},
                                 "path": _STR_OR_NULL}},
    },
}

SCHEMAS: dict[str, dict] = {
    "identities.json": {"type": "object", "additionalProperties": {
        "type": "integer", "minimum": 1, "maximum": 0xFFFFFFFF}},
    "endpoints.json": {"type": "array", "items": ENDPOINT_RECORD},
    "ipcache.json": {"type": "array", "items": {
        "type": "object", "required": ["prefix", "labels"], "additionalProperties": False,
        "properties": {"prefix": _STR, "labels": _LABELS, "host": _STR_OR_NULL,
                       "node": {"type": "boolean"}}}},
    "policies.json": {"type": "array", "items": {
        "type": "object", "required": ["document"], "additionalProperties": False,
        "properties": {"source": _STR, "document": {"type": "object"}}}},
    "revision.json": {"type": "integer", "minimum": 0},
    "services.json": {"type": "object", "additionalProperties": {"type": "object"}},
    # Other hosts' workloads from the fleet store (daemon/fleet.py); written only with etcd.
    "kvstore.json": {"type": "array", "items": {
        "type": "object", "required": ["prefix", "labels", "host"], "additionalProperties": False,
        "properties": {"prefix": _STR, "labels": _LABELS, "host": _STR,
                       "node": {"type": "boolean"}}}},
}

FILES = tuple(SCHEMAS)      # the state's parts by name; policies.json: its shards


def schema_name(name: str) -> str:
    """The name in SCHEMAS of file ``name`` (a shard: policies.json)."""
    return POLICIES if POLICY_FILE.match(name) else name


def policy_file(document) -> str:
    """The shard that holds policy ``document``: by what identifies a policy (its kind,
    namespace and name), so that a new version of it goes to the same shard."""
    doc = document if isinstance(document, dict) else {}
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    return _shard(doc.get("kind"), meta.get("namespace"), meta.get("name"))


def _shard(kind, namespace, name) -> str:
    key = "\0".join(str(v or "") for v in (kind, namespace, name))
    return POLICY_FILES[zlib.crc32(key.encode()) % POLICY_SHARDS]

_FILE_ENTRY = {"type": "object", "required": ["sha256"], "properties": {
    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "bytes": {"type": "integer", "minimum": 0}}}

MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["format", "generation", "files"],
    "properties": {
        "format": {"type": "integer", "minimum": 1},
        "generation": {"type": "integer", "minimum": 1},
        "written": _STR,
        "files": {"type": "object", "additionalProperties": False,
                  "properties": {name: _FILE_ENTRY for name in FILES},
                  "patternProperties": {POLICY_FILE.pattern: _FILE_ENTRY}},
    },
}

# What a missing file means.
EMPTY: dict[str, Any] = {"identities.json": {}, "endpoints.json": [], "ipcache.json": [],
                         "policies.json": [], "revision.json": 0, "services.json": {},
                         "kvstore.json": []}

def file_entry(raw: bytes) -> dict:
    """A file's entry in the manifest."""
    return {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}


class EncodedList:
    """A list whose items are JSON already (bytes): written as they are, so a builder can
    keep the encoding of items that did not change (10,000 policies: one is re-encoded).
    Its manifest entry is computed once: a shard built again from the same records is
    not hashed again."""

    def __init__(self, items: list[bytes]):
        self.items = items
        self._entry: dict | None = None

    def raw(self) -> bytes:
        return b"[" + b",".join(self.items) + b"]\n"

    @property
    def entry(self) -> dict:
        if self._entry is None:
            self._entry = file_entry(self.raw())
        return self._entry


def encode_item(data) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def split_policies(records: Iterable) -> dict[str, Any]:
    """A list of policy records as the shard files (None: a shard with none) and
    policies.json removed."""
    shards: dict[str, list[bytes]] = {}
    for rec in records:
        doc = rec.get("document") if isinstance(rec, dict) else None
        shards.setdefault(policy_file(doc), []).append(encode_item(rec))
    return {POLICIES: None, **{n: EncodedList(shards[n]) if n in shards else None for n in POLICY_FILES}}


class PolicyShards:
    """The shard files of the engine's policies, for a commit, built at the cost of what
    changed since the last build: the policies that are not the same objects as then
    (and those gone) are found with one pass of identity checks, and only their shards
    are encoded and hashed again. Every other shard is the EncodedList it was, whose
    hash the store finds unchanged, so it neither hashes nor writes it. Each policy's
    record is encoded once (cached on the Policy object)."""

    def __init__(self) -> None:
        self._seen: dict = {}                # ref -> the Policy the shards were built from
        self._where: dict = {}               # ref -> its shard
        self._members: dict[str, dict] = {n: {} for n in POLICY_FILES}   # shard -> refs, in order
        self._built: dict[str, EncodedList] = {}

    def files(self, policies: Mapping) -> dict[str, Any]:
        shards = set()
        for ref in changed_refs(self._seen, policies):
            old = self._where.pop(ref, None)
            if old is not None:
                del self._members[old][ref]
                shards.add(old)
            p = policies.get(ref)
            if p is not None:
                new = self._where[ref] = _policy_record(p)[1]
                self._members[new][ref] = None
                shards.add(new)
        for name in shards:
            refs = self._members[name]
            if refs:
                self._built[name] = EncodedList([_policy_record(policies[r])[0] for r in refs])
            else:
                self._built.pop(name, None)
        self._seen = dict(policies)
        return {POLICIES: None, **{n: self._built.get(n) for n in POLICY_FILES}}


def _policy_record(p) -> tuple[bytes, str]:
    """A policy's record in its shard, and the shard: computed once per Policy object."""
    got = p.__dict__.get("_state_record")
    if got is None:
        doc = getattr(p, "document_json", None)
        if doc is None:
            record = encode_item({"source": p.source, "document": p.document})
            shard = policy_file(p.document)
        else:   # encode_item's bytes, from the policy's own encoding of its document
            record = b'{"document":' + doc + b',"source":' + encode_item(p.source) + b"}"
            shard = _shard(p.ref.kind, p.ref.namespace, p.ref.name)   # what its document names
        got = p.__dict__["_state_record"] = (record, shard)
    return got


def _remote(records) -> list:
    return [{"prefix": p, "labels": r.labels.to_dict(), "host": r.host, "node": r.node}
            for p, r in sorted(records.items())]


# A transaction's dirty names (txn.dirty) -> the files they are, built from the agent.
BUILDERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "identities": lambda a: {"identities.json": a.alloc.numbers()},
    "endpoints": lambda a: {"endpoints.json": [e.to_record() for e in a.state.endpoints.values()]},
    "ipcache": lambda a: {"ipcache.json": _remote(a.state.remote)},
    "policies": lambda a: a.policy_shards.files(a.engine.policies),
    "revision": lambda a: {"revision.json": a.state.revision},
    "services": lambda a: {"services.json": {k: v.raw for k, v in a.state.services.items()}},
    "kvstore": lambda a: {"kvstore.json": _remote(a.state.kvstore)},
}


def json_path(parts) -> str:
    """``$[0].document.spec`` from a jsonschema error's absolute path."""
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out
