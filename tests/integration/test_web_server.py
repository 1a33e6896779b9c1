"""The panel's web server as the Procfile runs it (gunicorn with gunicorn.conf.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.services import (
    ROOT,
    free_port,
    process_env,
    start_process,
    stop_process,
    wait_for_port,
)

# Chromium opens at most this many connections to one host.
BROWSER_CONNECTIONS = 6


def test_idle_browser_connections_do_not_hold_up_the_next_page(instance, tmp_path):
    """A browser opens connections before it needs them and leaves them idle (Chromium's
    preconnects). With one worker process, as the browser tests run it, the login page
    must still come at once while six such connections sit open. A sync worker waited on
    the first of them for its 30 s timeout; a gthread worker with fewer threads than idle
    connections, for 5 s (each thread waits that long for a request)."""
    port = free_port()
    env = process_env(PORT=port, WEB_CONCURRENCY="1")
    web = start_process([str(Path(sys.executable).parent / "gunicorn"), "webapp:create_app()"],
                        env, tmp_path / "web.log")
    idle: list[socket.socket] = []
    url = f"http://127.0.0.1:{port}/login"
    try:
        wait_for_port(port, proc=web)
        with urllib.request.urlopen(url, timeout=60) as page:  # the worker has booted
            assert page.status == 200
        idle = [socket.create_connection(("127.0.0.1", port))
                for _ in range(BROWSER_CONNECTIONS)]
        # Not a speed target: the bound tells "at once" from "after the 5 s a held thread
        # waits" (or the sync worker's 30 s).
        with urllib.request.urlopen(url, timeout=4) as page:
            assert page.status == 200
            assert b"password" in page.read().lower()
    finally:
        for conn in idle:
            conn.close()
        stop_process(web)


@pytest.mark.parametrize("threads, said", [
    ("abc", "expected a whole number"),
    ("4\x01\r\n5", "expected a whole number"),
    ("9" * 5000, "expected a whole number"),  # past Python's digit limit for int()
    ("9" * 40, "expected 1 to 15"),
    ("0", "expected 1 to 15"),
    ("16", "expected 1 to 15"),  # more than the process's database connections
])
def test_a_bad_thread_count_stops_the_panel_with_a_clear_error(instance, threads, said):
    """WEB_THREADS out of bounds or not a number: gunicorn does not start, and says which
    setting and why, in one line rather than a traceback."""
    env = process_env(PORT=free_port(), WEB_THREADS=threads)
    result = subprocess.run([str(Path(sys.executable).parent / "gunicorn"),
                             "webapp:create_app()"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert f"WEB_THREADS: {said}" in result.stderr
    assert "Traceback" not in result.stderr
