"""A file the panel hands over as a download (a stored message, an incident pack)."""

from __future__ import annotations

from urllib.parse import quote

from flask import Response


def attachment(data: bytes, mimetype: str, filename: str) -> Response:
    """``filename`` may hold any letters (an identity's address is part of one). WSGI
    headers are Latin-1, so the name goes in RFC 6266's ``filename*`` as percent-encoded
    UTF-8 and ``filename`` keeps an ASCII fallback; anything but a letter, a digit or
    ``-_.`` (a slash, a quote) is ``_`` in both."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in filename)
    fallback = "".join(c if c.isascii() else "_" for c in name)
    return Response(data, mimetype=mimetype, headers={
        "Content-Disposition":
            f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}",
        "X-Content-Type-Options": "nosniff"})
