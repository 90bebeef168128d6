# -*- coding: utf-8 -*-
# Copyright: Stockade contributors; Apache-2.0
"""The fleet store's users, roles and subnets, made as root on one member with etcdctl.

    python3 stockade_etcd_rbac.py SPEC_JSON_BASE64

SPEC: {"etcdctl": PATH, "endpoints": "URL,URL", "cacert": F, "cert": F, "key": F,
       "probe_cert": F, "probe_key": F, "prefix": "/stockade/v1",
       "hosts": {HOST: [CIDR, ...]}, "check": bool}

cert/key are root's (CN root); probe_cert/key are a certificate whose CN is no etcd user
(a member's): with authentication on it may do nothing, so whether it may list roles
tells whether authentication is on.

Makes: role and user root; for each HOST a user HOST (no password: the client
certificate's CN) with exactly the role HOST, which has exactly
  readwrite  prefix PREFIX/endpoints/HOST/
  readwrite  key    PREFIX/nodes/HOST
  read       prefix PREFIX/
and PREFIX/subnets/HOST = {"subnets": [CIDR, ...]} (other subnets/ keys are deleted);
then authentication on. Prints {"changed": bool, "actions": [...]}.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys

READ, WRITE, READWRITE = 0, 1, 2
TYPES = {READ: "read", WRITE: "write", READWRITE: "readwrite"}


class EtcdctlError(Exception):
    pass


class Etcd:
    def __init__(self, spec, cert, key):
        self.base = [spec["etcdctl"], "--endpoints", spec["endpoints"], "--cacert", spec["cacert"],
                     "--cert", cert, "--key", key, "--command-timeout", "10s"]

    def run(self, *args, json_out=False):
        argv = self.base + (["-w", "json"] if json_out else []) + list(args)
        r = subprocess.run(argv, capture_output=True, text=True, check=False,
                           env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
        if r.returncode != 0:
            raise EtcdctlError("etcdctl %s: %s" % (" ".join(args), (r.stderr.strip().splitlines() or ["?"])[-1]))
        return json.loads(r.stdout) if json_out else r.stdout

    def ok(self, *args):
        try:
            self.run(*args)
            return True
        except EtcdctlError:
            return False


def prefix_end(key):
    b = bytearray(key.encode())
    while b and b[-1] == 0xFF:
        b.pop()
    b[-1] += 1
    return bytes(b).decode()


def b64(s):
    return base64.b64decode(s).decode() if s else ""


def wanted_perms(prefix, host):
    ep = "%s/endpoints/%s/" % (prefix, host)
    node = "%s/nodes/%s" % (prefix, host)
    return {(READWRITE, ep, prefix_end(ep)), (READWRITE, node, ""),
            (READ, prefix + "/", prefix_end(prefix + "/"))}


def sync(spec):
    root = Etcd(spec, spec["cert"], spec["key"])
    probe = Etcd(spec, spec["probe_cert"], spec["probe_key"])
    prefix, check, actions = spec["prefix"].rstrip("/"), spec.get("check", False), []

    def do(label, *args):
        actions.append(label)
        if not check:
            root.run(*args)

    roles = set(root.run("role", "list", json_out=True).get("roles", []))
    users = set(root.run("user", "list", json_out=True).get("users", []))
    if "root" not in roles:
        do("role root", "role", "add", "root")
    root_roles = set(root.run("user", "get", "root", json_out=True).get("roles", [])) if "root" in users else set()
    if "root" not in users:
        do("user root", "user", "add", "root", "--no-password")
    if "root" not in root_roles:
        do("user root: role root", "user", "grant-role", "root", "root")

    for host in sorted(spec["hosts"]):
        if host == "root":
            raise EtcdctlError("a host may not be called root: that is etcd's administrator")
        if host not in roles:
            do("role %s" % host, "role", "add", host)
            have = set()
        else:
            have = {(p.get("permType", READ), b64(p.get("key")), b64(p.get("range_end")))
                    for p in root.run("role", "get", host, json_out=True).get("perm", [])}
        want = wanted_perms(prefix, host)
        for ptype, key, end in sorted(have - want):
            do("role %s: revoke %s %s %s" % (host, TYPES.get(ptype, ptype), key, end),
               "role", "revoke-permission", host, key, *([end] if end else []))
        for ptype, key, end in sorted(want - have):
            do("role %s: %s %s %s" % (host, TYPES[ptype], key, end),
               "role", "grant-permission", host, TYPES[ptype], key, *([end] if end else []))
        user_roles = set()
        if host not in users:
            do("user %s" % host, "user", "add", host, "--no-password")
        else:
            user_roles = set(root.run("user", "get", host, json_out=True).get("roles", []))
        for other in sorted(user_roles - {host}):
            do("user %s: revoke role %s" % (host, other), "user", "revoke-role", host, other)
        if host not in user_roles:
            do("user %s: role %s" % (host, host), "user", "grant-role", host, host)

    sub = prefix + "/subnets/"
    have = {b64(kv["key"]): b64(kv.get("value"))
            for kv in root.run("get", "--prefix", sub, json_out=True).get("kvs", [])}
    want = {sub + h: json.dumps({"subnets": list(c)}, separators=(",", ":")) for h, c in spec["hosts"].items()}
    for key in sorted(set(have) - set(want)):
        do("delete %s" % key, "del", key)
    for key, value in sorted(want.items()):
        if have.get(key) != value:
            do("%s = %s" % (key, value), "put", key, value)

    if probe.ok("role", "list"):  # anyone may: authentication is off
        do("authentication on", "auth", "enable")
    return {"changed": bool(actions), "actions": actions}


def main(argv):
    spec = json.loads(base64.b64decode(argv[1]))
    try:
        out = sync(spec)
    except EtcdctlError as e:
        print(json.dumps({"failed": True, "msg": str(e)}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
