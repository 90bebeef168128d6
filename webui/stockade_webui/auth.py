"""Login with the install token, the session, CSRF and the security headers.

- Pages need a session made by POST /login with the token; the session cookie is
  HttpOnly and SameSite=Strict and holds a fingerprint of the token, so replacing the
  token file and restarting ends every session.
- /api/v1 accepts ``Authorization: Bearer <token>`` (no cookie, no CSRF needed) or a
  logged-in session.
- Every POST made with a session carries the session's CSRF token, as the form field
  ``csrf_token`` or the header ``X-CSRF-Token``; a missing or wrong one is 400.
- Every response gets a Content-Security-Policy with a per-request nonce: scripts only
  from /static (or nonce'd), no inline styles, nothing from other origins.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from flask import Blueprint, abort, current_app, g, jsonify, redirect, render_template, request, session, url_for

bp = Blueprint("auth", __name__)

PUBLIC_ENDPOINTS = {"auth.login", "static"}
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class TokenFileError(Exception):
    pass


def read_token_file(path: str) -> str:
    """The token; refuses an empty file, and one that others may read."""
    p = Path(path)
    try:
        st = p.stat()
        token = p.read_text().strip()
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror}") from exc
    if st.st_mode & stat.S_IROTH:
        raise TokenFileError(f"token file {path} is readable by everyone; chmod o-r it")
    if len(token) < 16:
        raise TokenFileError(f"token file {path} holds no token of 16 characters or more")
    return token


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_token_file(path: str) -> str:
    """Create ``path`` with a random token, mode 0600 (root-only when run as root, as at
    install); an existing file is kept. Returns the token."""
    p = Path(path)
    if p.exists():
        return read_token_file(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    token = new_token()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _fingerprint(token: str) -> str:
    return hashlib.sha256(b"stockade-webui:" + token.encode()).hexdigest()[:32]


def check_token(given: str | None) -> bool:
    want = current_app.config["TOKEN"]
    return given is not None and bool(given) and hmac.compare_digest(given.strip().encode(), want.encode())


def logged_in() -> bool:
    return session.get("auth") == _fingerprint(current_app.config["TOKEN"])


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value if scheme.lower() == "bearer" and value else None


def _is_api() -> bool:
    return request.path.startswith("/api/")


def _api_error(status: int, message: str):
    resp = jsonify({"error": {"message": message, "status": status}})
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="stockade-webui"'
    return resp


def guard():
    """before_request: authentication, then CSRF for unsafe methods."""
    g.csp_nonce = secrets.token_urlsafe(16)
    g.via_bearer = False
    if request.endpoint == "static" or request.routing_exception is not None:
        return None     # 404/405 (or an untrusted Host): Flask answers with the error
    if _is_api():
        token = _bearer()
        if token is not None:
            if not check_token(token):
                return _api_error(401, "wrong token")
            g.via_bearer = True
            return None
        if not logged_in():
            return _api_error(401, "log in, or send Authorization: Bearer <token>")
    elif request.endpoint not in PUBLIC_ENDPOINTS and not logged_in():
        if request.method in UNSAFE_METHODS:
            abort(401)
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    if request.method in UNSAFE_METHODS:
        sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token")
        want = session.get("csrf")
        if not sent or not want or not hmac.compare_digest(sent.encode(), want.encode()):
            if _is_api():
                return _api_error(400, "CSRF token missing or wrong (send X-CSRF-Token)")
            return render_template("error.html", status=400, title="Form expired",
                                   message="The form's security token is missing or wrong. "
                                           "Reload the page and try again."), 400
    return None


def security_headers(resp):
    nonce = g.get("csp_nonce", "")
    resp.headers["Content-Security-Policy"] = (
        "default-src 'none'; "
        f"script-src 'self' 'nonce-{nonce}'; "
        "style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    resp.headers["Cross-Origin-Resource-Policy"] = "same-origin"
    if request.endpoint != "static":
        resp.headers["Cache-Control"] = "no-store"
    return resp


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("overview.index")


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        if check_token(request.form.get("token")):
            keep_next = request.form.get("next")
            session.clear()                   # a new session: no fixation
            session["auth"] = _fingerprint(current_app.config["TOKEN"])
            session.permanent = True
            csrf_token()
            return redirect(_safe_next(keep_next))
        error = "That token is not right."
        current_app.logger.warning("failed login from %s", request.remote_addr)
    return render_template("login.html", error=error, next=request.values.get("next", "")), \
        (401 if error else 200)


@bp.route("/logout", methods=["POST"])
def logout():
    session.clear()
    return redirect(url_for("auth.login"))


def init_app(app) -> None:
    app.before_request(guard)
    app.after_request(security_headers)

    @app.context_processor
    def _inject():
        return {"csrf_token": csrf_token, "csp_nonce": lambda: g.get("csp_nonce", ""),
                "logged_in": logged_in}
