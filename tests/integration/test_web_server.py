"""The panel's web server as the Procfile runs it (gunicorn with gunicorn.conf.py)."""

from __future__ import annotations

import socket
import sys
import urllib.request
from pathlib import Path

from tests.support.services import (
    free_port,
    process_env,
    start_process,
    stop_process,
    wait_for_port,
)


def test_idle_browser_connections_do_not_hold_up_the_next_page(instance, tmp_path):
    """A browser opens connections before it needs them and leaves them idle (Chromium's
    preconnects). With one worker process, as the browser tests run it, the login page
    must still come while three such connections sit open; a sync worker waited on the
    first of them for its 30 s timeout."""
    port = free_port()
    env = process_env(PORT=port, WEB_CONCURRENCY="1")
    web = start_process([str(Path(sys.executable).parent / "gunicorn"), "webapp:create_app()"],
                        env, tmp_path / "web.log")
    idle: list[socket.socket] = []
    try:
        wait_for_port(port, proc=web)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=15) as page:
            assert page.status == 200
            assert b"password" in page.read().lower()
    finally:
        for conn in idle:
            conn.close()
        stop_process(web)
