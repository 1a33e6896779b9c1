"""Stopping the proxy (SIGTERM, as systemd and container runtimes do) against a real
``python -m proxy``: a message in flight is finished and answered, a session between
transactions gets 421, and no new connection is taken."""

from __future__ import annotations

import signal
import socket
import sys
import threading

import pytest

from tests.security.test_connection_hygiene import Conn, eventually
from tests.support import data
from tests.support.mail import client, message, send
from tests.support.services import (
    free_port,
    process_env,
    start_process,
    stop_process,
    wait_for_port,
)

PASSWORD = "Alice-pass-123"
SHUTTING_DOWN = b"421 4.3.2 Service shutting down\r\n"


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_finishes_the_message_in_flight_and_sends_idle_sessions_421(
        instance, sink, tmp_path, workers):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    port = free_port()
    env = process_env(SMTP_LISTEN=f"127.0.0.1:{port}", UPSTREAM_SMTP=f"127.0.0.1:{sink.port}",
                      METRICS_LISTEN="")
    proc = start_process([sys.executable, "-m", "proxy", "--workers", workers], env,
                         tmp_path / "proxy.log")
    try:
        wait_for_port(port, proc=proc)
        idle = Conn(port)
        assert idle.ask(b"EHLO idle.example")[0] == 250

        sink.handler.delay = 3  # the next hop takes its time over the final dot
        smtp = client(port)
        smtp.login("alice@example.com", PASSWORD)
        outcome: dict = {}

        def sender():
            try:
                outcome["reply"] = send(smtp, message())
            except Exception as exc:  # the connection dropped without a reply
                outcome["reply"] = exc

        thread = threading.Thread(target=sender)
        thread.start()
        assert sink.handler.data_started.wait(15)  # the relay is under way
        proc.send_signal(signal.SIGTERM)

        assert idle.reply() == (421, SHUTTING_DOWN)
        assert idle.closed_by_server()
        idle.close()
        assert eventually(lambda: refused(port))  # while the message is still in flight
        thread.join(30)
        code, reply = outcome["reply"]
        assert code == 250, reply
        assert len(sink.handler.messages) == 1
        assert smtp.getreply() == (421, SHUTTING_DOWN.strip()[4:])
        smtp.close()
        assert proc.wait(timeout=30) == 0
    finally:
        stop_process(proc)
