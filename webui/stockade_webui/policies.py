"""Live policies in words (who may reach whom), and the identity matrix."""
from __future__ import annotations

from flask import Blueprint, render_template, request

from . import views
from .agents import host

bp = Blueprint("policies", __name__)


@bp.route("/policies")
def index():
    h = host(request.args.get("host"))
    return render_template("policies.html", data=views.policies(h), current=h)


@bp.route("/matrix")
def matrix():
    h = host(request.args.get("host"))
    return render_template("matrix.html", data=views.matrix(h, request.args.get("label", "").strip(),
                                                            request.args.get("port", "").strip()),
                           current=h)
