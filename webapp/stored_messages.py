"""Showing and downloading a stored message (quarantine or archive) safely.

The view renders headers and text only; HTML is never rendered live, and a strict
Content-Security-Policy is the second lock on that door.
"""

from __future__ import annotations

from flask import Response, abort, current_app, render_template

from outgoing.storage import StorageError, read_body
from scoring.message import readable
from webapp.downloads import attachment

VIEW_CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; " \
           "form-action 'self'; frame-ancestors 'none'"


def view_response(row, template: str, title: str) -> Response:
    try:
        shown = readable(read_body(current_app.config, row))
        problem = shown.error
    except StorageError as exc:
        current_app.logger.warning("%s", exc)
        shown, problem = None, "The stored message cannot be read."
    response = Response(render_template(template, row=row, shown=shown, problem=problem,
                                        title=title))
    response.headers["Content-Security-Policy"] = VIEW_CSP
    return response


def download_response(row, filename: str) -> Response:
    try:
        data = read_body(current_app.config, row)
    except StorageError:
        abort(404)
    return attachment(data, "message/rfc822", filename)
