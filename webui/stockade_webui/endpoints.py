"""Endpoints and identities of one agent, searchable (``?q=`` on the server, and
filtered as you type by static/app.js)."""
from __future__ import annotations

from flask import Blueprint, render_template, request

from . import views
from .agents import host

bp = Blueprint("endpoints", __name__)


@bp.route("/endpoints")
def index():
    h = host(request.args.get("host"))
    return render_template("endpoints.html", data=views.endpoints(h, request.args.get("q", "")),
                           current=h)
