"""Review a proposed policy set (a path on this host, an upload, or pasted YAML)
against what is live. Only ever a dry run: nothing here changes live policy."""
from __future__ import annotations

from flask import Blueprint, current_app, render_template, request

from . import views
from .agents import host

bp = Blueprint("review", __name__)


def files_from_request() -> tuple[list[dict], frozenset]:
    """Uploaded files, then pasted text, then a path; raises ReviewInputError. Also the
    names of the files read on this host (their errors show no values)."""
    files = []
    for up in request.files.getlist("files"):
        if not up or not up.filename:
            continue
        try:
            files.append({"name": up.filename, "text": up.read().decode("utf-8")})
        except UnicodeDecodeError:
            raise views.ReviewInputError(f"{up.filename}: not UTF-8 text") from None
    text = request.form.get("text", "")
    if text.strip():
        files.append({"name": request.form.get("text_name", "").strip() or "pasted.yaml", "text": text})
    path = request.form.get("path", "").strip()
    local: list[dict] = []
    if path:
        local = views.files_from_path(path, current_app.config.get("POLICY_DIRS") or [],
                                      current_app.config["REVIEW_PATH_MAX_FILES"],
                                      current_app.config["MAX_CONTENT_LENGTH"])
    if not files and not local:
        raise views.ReviewInputError("choose policy files to upload, paste YAML, or give a path")
    return files + local, frozenset(f["name"] for f in local)


@bp.route("/review", methods=["GET", "POST"])
def index():
    h = host(request.values.get("host"))
    result, problem = None, None
    if request.method == "POST":
        try:
            files, hidden = files_from_request()
            result = views.review(h, files, replace_all=request.form.get("replace_all") == "on",
                                  hidden=hidden)
        except views.ReviewInputError as exc:
            problem = str(exc)
    status = 400 if problem or (result and not result["valid"]) else 200
    return render_template("review.html", result=result, problem=problem, current=h,
                           form=request.form, policy_dirs=current_app.config.get("POLICY_DIRS") or []), status
