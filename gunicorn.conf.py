"""Gunicorn settings read automatically by the Procfile's ``web`` process."""

import os


def _whole_number(name: str, default: int, least: int, most: int | None = None) -> int:
    """A count from the environment (empty: ``default``), or a clear error naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}: expected a whole number, got {raw[:40]!r}") from None
    if value < least or (most is not None and value > most):
        bounds = f"{least} to {most}" if most is not None else f"at least {least}"
        raise SystemExit(f"{name}: expected {bounds}, got {value}")
    return value


# Loopback by default; a platform that routes to $PORT from outside sets WEB_BIND=0.0.0.0:$PORT.
bind = os.environ.get("WEB_BIND") or f"127.0.0.1:{os.environ.get('PORT', '5000')}"
workers = _whole_number("WEB_CONCURRENCY", 2, least=1)
# Threads, not the sync worker: browsers open connections ahead of need (Chromium's
# preconnects, up to six to a host) and keep them open idle; a sync worker blocks on such a
# connection until its 30 s timeout kills it, and the administrator's next click waits all
# that time. A gthread worker gives a thread to each new connection, which waits up to 5 s
# for a request before handing an idle one back to its poller: with more threads than a
# browser's idle connections, a request always finds a free one. Each thread can hold one
# of the process's database connections (SQLAlchemy's pool: 5, and 10 more on demand), so
# keep WEB_THREADS at 15 or below.
worker_class = "gthread"
threads = _whole_number("WEB_THREADS", 8, least=1, most=15)
accesslog = "-"
# Gunicorn's control socket lives in one fixed path per user, so a second instance on the
# same machine (tests, a staging copy) would fight over it; we do not use it.
control_socket_disable = True
