"""Live policies in words (who may reach whom), and the identity matrix."""
from __future__ import annotations

from flask import Blueprint, current_app, render_template, request

from . import paging, views
from .agents import host

bp = Blueprint("policies", __name__)


@bp.route("/policies")
def index():
    h = host(request.args.get("host"))
    return render_template("policies.html", data=views.policies(h), current=h)


MATRIX_MAX_PER_PAGE = 100


def matrix_data() -> dict:
    """The matrix square of ``?host=`` asked by label, port, page (rows), cpage
    (columns) and per_page (rows and columns, at most MATRIX_MAX_PER_PAGE)."""
    args = request.args
    return views.matrix(host(args.get("host")), args.get("label", "").strip(),
                        args.get("port", "").strip(), paging.number(args, "page", 1),
                        paging.number(args, "cpage", 1),
                        paging.number(args, "per_page", current_app.config["MATRIX_PAGE_SIZE"],
                                      MATRIX_MAX_PER_PAGE),
                        cidrs=args.get("cidrs"))


@bp.route("/matrix")
def matrix():
    return render_template("matrix.html", data=matrix_data(), current=host(request.args.get("host")))
