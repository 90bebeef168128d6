# -*- coding: utf-8 -*-
# Copyright: Stockade contributors
# SPDX-License-Identifier: Apache-2.0 OR GPL-3.0-or-later
# Apache License 2.0, or (at your option) the GNU General Public License v3.0+
# (see https://www.apache.org/licenses/LICENSE-2.0 and https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared code of Stockade's Ansible modules: a stdlib-only client of the agent's API.

Modules run under the managed host's Python, not the agent's virtualenv, so this file
imports nothing outside the standard library. It speaks HTTP/1.1 over the agent's unix
socket (see docs/api/openapi.yaml) with http.client.

    StockadeModuleError         every failure; ``msg`` is for people
     ├── AgentUnreachable       no socket, refused, timed out, reply not HTTP/JSON
     └── AgentRefused           the agent answered an error status (``status``,
                                ``field``, ``errors`` from its error body)
"""
from __future__ import annotations

import http.client
import json
import socket
from urllib.parse import quote, urlencode

DEFAULT_SOCKET = "/run/stockade/agent.sock"

# The argument every module takes; merged into each argument_spec.
SOCKET_ARG = dict(socket=dict(type="path", default=DEFAULT_SOCKET))


class StockadeModuleError(Exception):
    def __init__(self, msg, **details):
        super().__init__(msg)
        self.msg = msg
        self.details = details


class AgentUnreachable(StockadeModuleError):
    pass


class AgentRefused(StockadeModuleError):
    def __init__(self, status, msg, field=None, errors=None):
        super().__init__(msg, status=status, field=field, errors=errors or [])
        self.status, self.field, self.errors = status, field, errors or []


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("stockade", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def segment(value):
    return quote(value, safe="")


class AgentClient:
    """The few calls the modules need; every reply is decoded JSON (or text)."""

    def __init__(self, socket_path=DEFAULT_SOCKET, timeout=60.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method, path, params=None, body=None, raw=False):
        if params:
            params = {k: ("true" if v is True else "false" if v is False else v)
                      for k, v in params.items() if v is not None}
            if params:
                path = path + "?" + urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise AgentUnreachable(
                "cannot reach the Stockade agent at %s: %s; is the agent running "
                "(stockade status --socket %s) and is `socket` right?"
                % (self.socket_path, exc, self.socket_path))
        finally:
            conn.close()
        if resp.status >= 400:
            try:
                err = json.loads(payload)["error"]
                msg = err["message"]
            except (ValueError, KeyError, TypeError):
                raise AgentRefused(resp.status, "the agent answered HTTP %d to %s %s: %s"
                                   % (resp.status, method, path, payload[:200]))
            raise AgentRefused(resp.status, msg, err.get("field"), err.get("errors"))
        if raw:
            return payload.decode("utf-8", "replace")
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            raise AgentUnreachable("the agent at %s sent a reply that is not JSON for %s %s"
                                   % (self.socket_path, method, path))

    # the API -----------------------------------------------------------------
    def health(self):
        return self.request("GET", "/v1/health")

    def endpoints(self):
        return self.request("GET", "/v1/endpoints")

    def add_endpoint(self, spec):
        return self.request("POST", "/v1/endpoints", body=spec)

    def remove_endpoint(self, name):
        return self.request("DELETE", "/v1/endpoints/" + segment(name))

    def identities(self):
        return self.request("GET", "/v1/identities")

    def ipcache(self):
        return self.request("GET", "/v1/ipcache")

    def add_ipcache(self, entry):
        return self.request("POST", "/v1/ipcache", body=entry)

    def remove_ipcache(self, prefix):
        return self.request("DELETE", "/v1/ipcache/" + segment(prefix))

    def policies(self):
        return self.request("GET", "/v1/policies")

    def put_policies(self, files, replace_all=False, dry_run=False):
        return self.request("PUT", "/v1/policies", body={"files": files},
                            params={"replace_all": replace_all, "dry_run": dry_run})

    def delete_policy(self, name, namespace=None, kind=None, dry_run=False):
        return self.request("DELETE", "/v1/policies/" + segment(name),
                            params={"namespace": namespace, "kind": kind, "dry_run": dry_run})

    def services(self):
        return self.request("GET", "/v1/services")

    def put_services(self, services, dry_run=False):
        return self.request("PUT", "/v1/services", body={"services": services},
                            params={"dry_run": dry_run})

    def metrics(self):
        return self.request("GET", "/v1/metrics", raw=True)


def fail(module, exc, **extra):
    """fail_json from a StockadeModuleError, keeping the agent's details."""
    details = dict(exc.details)
    errors = details.get("errors") or []
    msg = exc.msg
    if errors:
        lines = []
        for e in errors:
            where = ": ".join(str(x) for x in (e.get("file"), e.get("field")) if x)
            lines.append("%s: %s" % (where, e.get("message")) if where else e.get("message"))
        msg = "%s\n%s" % (msg, "\n".join(lines))
    details.update(extra)
    module.fail_json(msg=msg, **details)


def with_source(labels, source):
    """{"app": "web"} -> {"SOURCE:app": "web"}; keys that carry a source keep it."""
    return dict(((k if ":" in k else "%s:%s" % (source, k)), "" if v is None else str(v))
                for k, v in (labels or {}).items())


def label_strings(labels, source):
    return sorted("%s=%s" % kv for kv in with_source(labels, source).items())


def parse_metrics(text):
    """Prometheus text -> [{"name", "labels", "value"}] for the stockade_* samples."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            head, value = line.rsplit(" ", 1)
            value = float(value)
        except ValueError:
            continue
        labels = {}
        name = head
        if "{" in head:
            name, _sep, rest = head.partition("{")
            for item in rest.rstrip("}").split(","):
                if "=" in item:
                    k, _sep, v = item.partition("=")
                    labels[k.strip()] = v.strip().strip('"')
        out.append({"name": name, "labels": labels, "value": value})
    return out
