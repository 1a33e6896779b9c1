"""Gunicorn settings read automatically by the Procfile's ``web`` process."""

import os

# Loopback by default; a platform that routes to $PORT from outside sets WEB_BIND=0.0.0.0:$PORT.
bind = os.environ.get("WEB_BIND") or f"127.0.0.1:{os.environ.get('PORT', '5000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
accesslog = "-"
# Gunicorn's control socket lives in one fixed path per user, so a second instance on the
# same machine (tests, a staging copy) would fight over it; we do not use it.
control_socket_disable = True
