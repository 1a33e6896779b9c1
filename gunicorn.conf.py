"""Gunicorn settings read automatically by the Procfile's ``web`` process."""

import os

# Loopback by default; a platform that routes to $PORT from outside sets WEB_BIND=0.0.0.0:$PORT.
bind = os.environ.get("WEB_BIND") or f"127.0.0.1:{os.environ.get('PORT', '5000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads, not the sync worker: browsers open connections ahead of need (Chromium's
# preconnects, up to six to a host) and keep them open idle; a sync worker blocks on such a
# connection until its 30 s timeout kills it, and the administrator's next click waits all
# that time. A gthread worker gives a thread to each new connection, which waits up to 5 s
# for a request before handing an idle one back to its poller: with more threads than a
# browser's idle connections, a request always finds a free one. Each thread can hold one
# of the process's database connections (SQLAlchemy's pool: 5, and 10 more on demand), so
# keep WEB_THREADS at 15 or below.
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", "8"))
accesslog = "-"
# Gunicorn's control socket lives in one fixed path per user, so a second instance on the
# same machine (tests, a staging copy) would fight over it; we do not use it.
control_socket_disable = True
