"""Gunicorn settings read automatically by the Procfile's ``web`` process."""

import os

# Loopback by default; a platform that routes to $PORT from outside sets WEB_BIND=0.0.0.0:$PORT.
bind = os.environ.get("WEB_BIND") or f"127.0.0.1:{os.environ.get('PORT', '5000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads, not the sync worker: browsers open connections ahead of need (Chromium's
# preconnects) and keep them open idle; a sync worker blocks on such a connection until its
# 30 s timeout kills it, and the administrator's next click waits all that time. A gthread
# worker hands an idle connection back to its poller and serves the next request at once.
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", "4"))
accesslog = "-"
# Gunicorn's control socket lives in one fixed path per user, so a second instance on the
# same machine (tests, a staging copy) would fight over it; we do not use it.
control_socket_disable = True
