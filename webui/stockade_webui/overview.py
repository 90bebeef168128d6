"""Overview: every agent's health, modes, counts, policy revision and recent drops."""
from __future__ import annotations

from flask import Blueprint, render_template

from . import views
from .agents import hosts

bp = Blueprint("overview", __name__)


@bp.route("/")
def index():
    return render_template("overview.html", hosts=[views.overview(h) for h in hosts()])
