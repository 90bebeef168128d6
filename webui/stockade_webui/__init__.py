"""Stockade's web UI for policy review: a Flask app served by waitress.

    app = create_app({"TOKEN_FILE": "/etc/stockade/webui.token",
                      "AGENTS": ["/run/stockade/agent.sock"]})

Blueprints, one per area: ``auth`` (login, logout), ``overview``, ``endpoints``,
``policies`` (policies and matrix), ``review``, ``flows`` (flows and service map), and
``api`` (the same data as JSON under /api/v1). The UI only reads the agents: a review
is a dry run, and nothing here can change live policy.

Config (defaults in DEFAULTS): TOKEN or TOKEN_FILE (required), AGENTS (sockets, see
agents.py), TRUSTED_HOSTS, MAX_CONTENT_LENGTH (upload limit), SECRET_KEY (random per
process unless given: a restart logs everyone out), CLIENT_FACTORY (tests).
"""
from __future__ import annotations

import datetime as _dt
import secrets

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from . import agents, auth

DEFAULTS = {
    # Werkzeug cannot match IPv6 literals here: browse to localhost or 127.0.0.1
    "TRUSTED_HOSTS": ["127.0.0.1", "localhost"],
    "MAX_CONTENT_LENGTH": 1024 * 1024,          # uploads of proposed policy sets
    "MAX_FORM_MEMORY_SIZE": 1024 * 1024,        # a pasted policy counts here
    "MAX_FORM_PARTS": 200,
    "SESSION_COOKIE_NAME": "stockade_session",
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Strict",
    "SESSION_COOKIE_SECURE": False,              # plain http on loopback; True behind TLS
    "PERMANENT_SESSION_LIFETIME": _dt.timedelta(hours=12),
    "REVIEW_PATH_MAX_FILES": 200,
    "FLOWS_PAGE_LIMIT": 200,
    "PAGE_SIZE": 50,             # endpoints, identities, ipcache rows a page (?per_page=)
    "MATRIX_PAGE_SIZE": 25,      # matrix rows and columns a page (?per_page=)
}


def create_app(config: dict | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    if config:
        app.config.from_mapping(config)
    if not app.config.get("TOKEN"):
        if not app.config.get("TOKEN_FILE"):
            raise auth.TokenFileError("the web UI needs a token: set TOKEN_FILE (--token-file)")
        app.config["TOKEN"] = auth.read_token_file(app.config["TOKEN_FILE"])
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = secrets.token_bytes(32)

    agents.init_app(app)
    auth.init_app(app)

    from . import api, endpoints, flows, overview, policies, review
    for mod in (auth, overview, endpoints, policies, review, flows, api):
        app.register_blueprint(mod.bp)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"] // 1024
            message = f"The upload is larger than the limit of {limit} KiB."
        else:
            message = exc.description or exc.name
        if request.path.startswith("/api/"):
            resp = jsonify({"error": {"message": message, "status": exc.code}})
            resp.status_code = exc.code or 500
            return resp
        if exc.code == 400 and request.url_rule is None and not request.endpoint:
            # refused before routing (an untrusted Host header): no URLs to build
            return f"{exc.code} {exc.name}: {message}\n", exc.code, {"Content-Type": "text/plain"}
        return render_template("error.html", status=exc.code, title=exc.name,
                               message=message), exc.code

    @app.template_global("page_url")
    def _page_url(**changes):
        """This page's URL with some query parameters changed (the pager's links)."""
        from flask import url_for
        args: dict = {k: v for k, v in request.args.items() if k not in changes}
        return url_for(request.endpoint or "overview.index", **args, **changes)

    @app.template_global("page_window")
    def _page_window(p: dict):
        from .paging import Page, window
        return window(Page(p["page"], p["per_page"], p["total"]))

    @app.template_filter("short_labels")
    def _short_labels(labels):
        from .model import short_labels
        return short_labels(labels or [])

    return app
