"""The state files: what each one holds, built from the model, and the shape it must have.

Format 1 (``FORMAT``; state.json says which format a directory holds):

    identities.json   {canonical label set: identity number}
    endpoints.json    [endpoint record]: what each endpoint is and what identifies its
                      interface (endpoints.Endpoint.to_record)
    ipcache.json      [{prefix, labels, host, node}]: other hosts' workloads
    policies.json     [{source, document}]: the live policy documents
    revision.json     the policy revision, an integer
    services.json     {name: definition}: inventory services (inventory.parse_services)

Every file is checked against its JSON schema (``SCHEMAS``) when it is loaded; what a
schema cannot say (a policy document, a label, a prefix, a service) is checked by the
code that reads the record (restore.py), and either failure names the file and the
path in it. A file that is missing is empty (a new host), never a reason to open.
"""
from __future__ import annotations

import json
from typing import Any, Callable

FORMAT = 1
MANIFEST = "state.json"

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

FILES = tuple(SCHEMAS)

MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["format", "generation", "files"],
    "properties": {
        "format": {"type": "integer", "minimum": 1},
        "generation": {"type": "integer", "minimum": 1},
        "written": _STR,
        "files": {"type": "object", "additionalProperties": False, "properties": {
            name: {"type": "object", "required": ["sha256"], "properties": {
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "bytes": {"type": "integer", "minimum": 0}}} for name in FILES}},
    },
}

# What a missing file means.
EMPTY: dict[str, Any] = {"identities.json": {}, "endpoints.json": [], "ipcache.json": [],
                         "policies.json": [], "revision.json": 0, "services.json": {},
                         "kvstore.json": []}

# A transaction's dirty names (txn.dirty) -> file, and how to build it from the agent.
class EncodedList:
    """A list whose items are JSON already (bytes): written as they are, so a builder can
    keep the encoding of items that did not change (10,000 policies: one is re-encoded)."""

    def __init__(self, items: list[bytes]):
        self.items = items


def encode_item(data) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def _policy_record(p) -> bytes:
    """A policy's record in policies.json, encoded once per Policy object."""
    raw = p.__dict__.get("_state_record")
    if raw is None:
        raw = p.__dict__["_state_record"] = encode_item({"source": p.source, "document": p.document})
    return raw


BUILDERS: dict[str, tuple[str, Callable]] = {
    "identities": ("identities.json", lambda a: a.alloc.numbers()),
    "endpoints": ("endpoints.json", lambda a: [e.to_record() for e in a.state.endpoints.values()]),
    "ipcache": ("ipcache.json", lambda a: [
        {"prefix": p, "labels": r.labels.to_dict(), "host": r.host, "node": r.node}
        for p, r in sorted(a.state.remote.items())]),
    "policies": ("policies.json", lambda a: EncodedList([_policy_record(p)
                                                          for p in a.engine.policies.values()])),
    "revision": ("revision.json", lambda a: a.state.revision),
    "services": ("services.json", lambda a: {k: v.raw for k, v in a.state.services.items()}),
    "kvstore": ("kvstore.json", lambda a: [
        {"prefix": p, "labels": r.labels.to_dict(), "host": r.host, "node": r.node}
        for p, r in sorted(a.state.kvstore.items())]),
}


def json_path(parts) -> str:
    """``$[0].document.spec`` from a jsonschema error's absolute path."""
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out
