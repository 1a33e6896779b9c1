"""Stopping the proxy (SIGTERM, as systemd and container runtimes do) against a real
``python -m proxy``: a message in flight is finished and answered, a session between
transactions gets 421, and no new connection is taken."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import sys
import threading

import pytest

from proxy.connections import ConnectionCounts, OpenConnections
from proxy.protocol import protocol_factory
from proxy.tls import ensure_certificate, server_context
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


def sending(port: int) -> tuple:
    """alice sends a message on a thread of its own: her connection, the thread, and the
    outcome (the reply, or the error of a connection that dropped without one)."""
    smtp = client(port)
    smtp.login("alice@example.com", PASSWORD)
    outcome: dict = {}

    def sender():
        try:
            outcome["reply"] = send(smtp, message())
        except Exception as exc:
            outcome["reply"] = exc

    thread = threading.Thread(target=sender)
    thread.start()
    return smtp, thread, outcome


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
        smtp, thread, outcome = sending(port)
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


def test_a_message_whose_next_hop_answers_after_the_drain_still_gets_its_reply(
        instance, sink, tmp_path):
    """SMTP_DRAIN_SECONDS is over while the next hop, which has the message, thinks over
    its reply: the sender gets that reply (250), not 421 and a reason to send it again,
    while a session still in its transaction without a message gets 421 at the deadline."""
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    port = free_port()
    env = process_env(SMTP_LISTEN=f"127.0.0.1:{port}", UPSTREAM_SMTP=f"127.0.0.1:{sink.port}",
                      METRICS_LISTEN="", SMTP_DRAIN_SECONDS="1", UPSTREAM_TIMEOUT="10")
    proc = start_process([sys.executable, "-m", "proxy", "--workers", "1"], env,
                         tmp_path / "proxy.log")
    try:
        wait_for_port(port, proc=proc)
        slow = client(port)
        slow.login("alice@example.com", PASSWORD)
        assert slow.mail("alice@example.com")[0] == 250  # and nothing more for now
        sink.handler.delay = 3
        smtp, thread, outcome = sending(port)
        assert sink.handler.data_started.wait(15)
        proc.send_signal(signal.SIGTERM)
        assert slow.getreply() == (421, SHUTTING_DOWN.strip()[4:])
        thread.join(30)
        assert outcome["reply"][0] == 250, outcome["reply"]
        assert len(sink.handler.messages) == 1
        smtp.close()
        slow.close()
        assert proc.wait(timeout=30) == 0
    finally:
        stop_process(proc)


# -- sessions between two of their own steps when the drain starts (in-process proxy) --------

class HeldConnect:
    """A handler whose connect check (a Redis round trip in the proxy) waits for the test."""

    def __init__(self):
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_connect(self, session):
        self.entered.set()
        await self.release.wait()
        return None


async def _serve(handler, tls_context=None):
    open_connections = OpenConnections()
    factory = protocol_factory(handler, hostname="proxy.test", tls_context=tls_context,
                               connections=ConnectionCounts(1),
                               open_connections=open_connections)
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], open_connections


def test_a_session_still_in_its_connect_check_when_the_drain_starts_gets_421_not_220():
    async def scenario():
        handler = HeldConnect()
        server, port, open_connections = await _serve(handler)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await handler.entered.wait()
        server.close()
        drain = asyncio.create_task(open_connections.drain(30))
        await asyncio.sleep(0)  # the drain has passed this session by: it waits on no command
        handler.release.set()
        greeting = await asyncio.wait_for(reader.readline(), 10)
        await asyncio.wait_for(drain, 10)
        writer.close()
        return greeting

    assert asyncio.run(scenario()) == SHUTTING_DOWN


def test_a_session_in_its_tls_handshake_when_the_drain_starts_gets_421_after_it(tmp_path):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    ensure_certificate(cert, key, "proxy.test")
    client_context = ssl.create_default_context()
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE

    async def scenario():
        server, port, open_connections = await _serve(
            object(), tls_context=server_context(cert, key, "proxy.test"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()  # 220 greeting
        writer.write(b"EHLO client.test\r\n")
        while (await reader.readline())[3:4] == b"-":
            pass
        writer.write(b"STARTTLS\r\n")
        assert (await reader.readline()).startswith(b"220")
        server.close()
        drain = asyncio.create_task(open_connections.drain(30))
        await asyncio.sleep(0)  # the session waits for its handshake, not for a command
        await writer.start_tls(client_context)
        reply = await asyncio.wait_for(reader.readline(), 10)
        await asyncio.wait_for(drain, 10)
        writer.close()
        return reply

    assert asyncio.run(scenario()) == SHUTTING_DOWN
