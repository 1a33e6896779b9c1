"""STARTTLS through the event loop's own TLS layer (``loop.start_tls``), on both loops the
proxy runs on: uvloop's (where installed) and asyncio's. After the handshake the client gets
a new session (RFC 3207 4.2: nothing of the one before, its own TLS details), and its first
protected commands, pipelined right behind the handshake, are all read and answered. Real
sockets, a real TLS context; the handler records what the protocol gives it."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from proxy.protocol import protocol_factory
from proxy.server import new_event_loop
from proxy.tls import server_context

LOOPS = {"asyncio": asyncio.new_event_loop, "the proxy's (uvloop)": new_event_loop}


class Recorder:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((session.ssl, envelope.mail_from, envelope.content))
        return "250 OK"


async def _reply(reader) -> bytes:
    """One reply, all its lines; a command the server never read fails here, not hangs."""
    reply = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        reply += line
        if line[3:4] != b"-":
            return reply


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_starttls_gives_a_new_session_that_reads_pipelined_commands(tmp_path, loop_factory):
    async def scenario():
        handler = Recorder()
        context = server_context(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"),
                                 "proxy.test")
        factory = protocol_factory(handler, hostname="proxy.test", tls_context=context)
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert (await _reply(reader)).startswith(b"220 ")
            writer.write(b"EHLO client.example.com\r\n")
            assert b"STARTTLS" in await _reply(reader)
            writer.write(b"MAIL FROM:<before@example.com>\r\n")  # forgotten by TLS
            assert (await _reply(reader)).startswith(b"250 ")
            writer.write(b"STARTTLS\r\n")
            assert (await _reply(reader)).startswith(b"220 ")
            await writer.start_tls(_client_context())
            writer.write(b"RCPT TO:<rcpt@example.org>\r\n")
            assert (await _reply(reader)).startswith(b"503 ")  # EHLO first: a new session
            writer.write(b"EHLO client.example.com\r\nMAIL FROM:<after@example.com>\r\n"
                         b"RCPT TO:<rcpt@example.org>\r\nDATA\r\n")
            ehlo = await _reply(reader)
            assert ehlo.startswith(b"250-") and b"STARTTLS" not in ehlo
            assert [(await _reply(reader))[:4] for _ in range(3)] == [b"250 ", b"250 ",
                                                                       b"354 "]
            writer.write(b"Subject: hi\r\n\r\nover TLS\r\n.\r\nSTARTTLS\r\nQUIT\r\n")
            assert (await _reply(reader)).startswith(b"250 ")
            # STARTTLS again, inside TLS: refused, and the session goes on
            assert (await _reply(reader)).startswith(b"503 5.5.1 ")
            assert (await _reply(reader)).startswith(b"221 ")
            writer.close()
        finally:
            server.close()
        return handler.messages

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        messages = runner.run(scenario())
    [(tls, sender, content)] = messages
    assert sender == "after@example.com"
    assert content == b"Subject: hi\r\n\r\nover TLS\r\n"
    assert tls["cipher"] and tls["sslcontext"] is not None
    assert tls["ssl_object"].version() in ("TLSv1.2", "TLSv1.3")
