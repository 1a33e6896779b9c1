"""STARTTLS through the event loop's own TLS layer (``loop.start_tls``), on both loops the
proxy runs on: uvloop's (where installed) and asyncio's. After the handshake the client gets
a new session (RFC 3207 4.2: nothing of the one before, its own TLS details), and its first
protected commands, pipelined right behind the handshake, are all read and answered; a
handshake that fails or is given up ends the session once. Real sockets, a real TLS
context; the handler records what the protocol gives it."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from proxy.connections import ConnectionCounts, OpenConnections
from proxy.protocol import protocol_factory
from proxy.server import new_event_loop
from proxy.tls import server_context

LOOPS = {"asyncio": asyncio.new_event_loop, "the proxy's (uvloop)": new_event_loop}


class Recorder:
    def __init__(self):
        self.messages = []
        self.closed = 0

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((session.ssl, envelope.mail_from, envelope.content))
        return "250 OK"

    def session_closed(self, session):
        self.closed += 1


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


def _serve(tmp_path, scenario, loop_factory, tls: bool = True, **options):
    """Run ``scenario(port, handler, open_connections)`` against a served LimitedSMTP (with
    no TLS context when ``tls`` is false)."""
    async def served():
        handler, open_connections = Recorder(), OpenConnections()
        context = server_context(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"),
                                 "proxy.test") if tls else None
        factory = protocol_factory(handler, hostname="proxy.test", tls_context=context,
                                   open_connections=open_connections, **options)
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        try:
            return await scenario(server.sockets[0].getsockname()[1], handler,
                                  open_connections)
        finally:
            server.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(served())


async def _up_to_starttls(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await _reply(reader)).startswith(b"220 ")
    writer.write(b"EHLO client.example.com\r\nSTARTTLS\r\n")
    assert b"STARTTLS" in await _reply(reader)
    assert (await _reply(reader)).startswith(b"220 ")
    return reader, writer


async def _ended(handler, open_connections) -> int:
    for _ in range(100):
        if handler.closed and not len(open_connections):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)  # a second report would come now
    return handler.closed


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_starttls_gives_a_new_session_that_reads_pipelined_commands(tmp_path, loop_factory):
    async def scenario(port, handler, open_connections):
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
        return handler.messages

    [(tls, sender, content)] = _serve(tmp_path, scenario, loop_factory)
    assert sender == "after@example.com"
    assert content == b"Subject: hi\r\n\r\nover TLS\r\n"
    assert tls["cipher"] and tls["sslcontext"] is not None
    assert tls["ssl_object"].version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_without_a_certificate_starttls_is_refused_and_the_session_goes_on(tmp_path,
                                                                           loop_factory):
    """No TLS context: STARTTLS is not offered, and asked for anyway it gets 454 (it went
    into start_tls with no context, and the connection died)."""
    async def scenario(port, handler, open_connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _reply(reader)).startswith(b"220 ")
        writer.write(b"EHLO client.example.com\r\nSTARTTLS\r\nNOOP\r\nQUIT\r\n")
        replies = [await _reply(reader) for _ in range(4)]
        writer.close()
        return replies

    ehlo, starttls, noop, quit_reply = _serve(tmp_path, scenario, loop_factory, tls=False)
    assert b"STARTTLS" not in ehlo
    assert starttls.startswith(b"454 ")
    assert noop.startswith(b"250 ") and quit_reply.startswith(b"221 ")


@pytest.mark.parametrize("argument", [b"now", b"\x00", b"x" * 400])
def test_starttls_with_an_argument_gets_501_and_the_session_stays_plain(tmp_path, argument):
    async def scenario(port, handler, open_connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _reply(reader)).startswith(b"220 ")
        writer.write(b"EHLO client.example.com\r\nSTARTTLS " + argument
                     + b"\r\nNOOP\r\nQUIT\r\n")
        replies = [(await _reply(reader))[:4] for _ in range(4)]
        writer.close()
        return replies

    assert _serve(tmp_path, scenario, new_event_loop) == [b"250-", b"501 ", b"250 ", b"221 "]


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_a_handshake_given_up_by_the_idle_timeout_ends_the_session(tmp_path, loop_factory):
    """A client that says STARTTLS and then nothing: when the idle timeout closes the
    connection in the middle of its TLS handshake, the session ends (its slot of the per-IP
    cap is given back and the handler hears of it), instead of waiting for a next command
    forever."""
    async def scenario(port, handler, open_connections):
        reader, writer = await _up_to_starttls(port)
        # no ClientHello: the idle timeout (1 s) gives the handshake up
        assert await asyncio.wait_for(reader.read(100), 10) == b""
        writer.close()
        closed = await _ended(handler, open_connections)
        # the slot is free again: a second connection from the address is served
        reader, writer = await _up_to_starttls(port)
        await writer.start_tls(_client_context())
        writer.write(b"EHLO client.example.com\r\nQUIT\r\n")
        replies = [(await _reply(reader))[:3] for _ in range(2)]
        writer.close()
        return closed, replies

    assert _serve(tmp_path, scenario, loop_factory, timeout=1,
                  connections=ConnectionCounts(1), max_connections_per_ip=1) == \
        (1, [b"250", b"221"])


# -- the edges of the handshake, with a client TLS layer driven by hand --------------------

class HandDrivenTLS:
    """A client's TLS over memory buffers, so that a test chooses what each write holds
    (its Finished and its first commands in one segment, or half a ClientHello)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = _client_context().wrap_bio(self.incoming, self.outgoing, server_side=False)
        self.pending = b""

    def client_hello(self) -> bytes:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    async def handshake(self, behind_finished: bytes = b"") -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    self.writer.write(self.outgoing.read())
                data = await asyncio.wait_for(self.reader.read(65536), 10)
                assert data, "the server closed the connection in the handshake"
                self.incoming.write(data)
        if behind_finished:
            self.tls.write(behind_finished)
        self.writer.write(self.outgoing.read())  # the Finished and the commands: one write

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.writer.write(self.outgoing.read())

    async def reply(self) -> bytes:
        reply = b""
        while True:
            while b"\n" not in self.pending:
                try:
                    self.pending += self.tls.read(65536)
                    continue
                except ssl.SSLWantReadError:
                    pass
                data = await asyncio.wait_for(self.reader.read(65536), 10)
                assert data, "the connection ended"
                self.incoming.write(data)
            line, _, self.pending = self.pending.partition(b"\n")
            reply += line + b"\n"
            if line[3:4] != b"-":
                return reply


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_more_commands_behind_the_finished_than_the_reader_holds_do_not_stall_it(
        tmp_path, loop_factory):
    """asyncio's TLS layer hands the reader what came with the client's Finished before
    start_tls returns; past twice the line limit the reader paused the plain transport, and
    nothing after those commands was ever read again (not even the client's QUIT)."""
    async def scenario(port, handler, open_connections):
        reader, writer = await _up_to_starttls(port)
        client = HandDrivenTLS(reader, writer)
        await client.handshake(behind_finished=b"EHLO client.example.com\r\n"
                               + b"NOOP\r\n" * 400)  # 2,408 bytes, the reader holds 2,002
        replies = [(await client.reply())[:3] for _ in range(401)]
        client.send(b"QUIT\r\n")
        quit_reply = await client.reply()
        writer.close()
        return replies, quit_reply, await _ended(handler, open_connections)

    replies, quit_reply, closed = _serve(tmp_path, scenario, loop_factory)
    assert replies == [b"250"] * 401
    assert quit_reply.startswith(b"221 ")
    assert closed == 1


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_a_failed_handshake_ends_the_session_once_and_logs_no_trace(tmp_path, loop_factory,
                                                                    caplog):
    """Garbage instead of a ClientHello: the connection ends, the handler hears of it once
    (the TLS layer and aiosmtpd both reported it), and the log has one line, not an error
    with a traceback that any client could fill the log with."""
    async def scenario(port, handler, open_connections):
        reader, writer = await _up_to_starttls(port)
        writer.write(b"\x16\x03\x01\x00\x05hello" + b"x" * 100)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        return await _ended(handler, open_connections)

    with caplog.at_level("INFO"):
        assert _serve(tmp_path, scenario, loop_factory) == 1
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert any("handshake failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_a_drain_that_ends_a_session_in_its_handshake_writes_no_plaintext_into_it(
        tmp_path, loop_factory):
    async def scenario(port, handler, open_connections):
        reader, writer = await _up_to_starttls(port)
        client = HandDrivenTLS(reader, writer)
        writer.write(client.client_hello()[:30])  # half a ClientHello, and then nothing
        await asyncio.sleep(0.1)
        await open_connections.drain(0.3)
        return await asyncio.wait_for(reader.read(), 10)

    assert _serve(tmp_path, scenario, loop_factory) == b""


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_a_client_that_never_answers_close_notify_does_not_hold_its_connection(
        tmp_path, loop_factory):
    """After QUIT over TLS the server sends close_notify and waits for the client's; one
    that never answers held its connection, and its slot of the per-IP cap, 30 s (the
    loops' default). The proxy waits ``tls_shutdown_timeout`` (5 s; here 0.5 s)."""
    async def scenario(port, handler, open_connections):
        reader, writer = await _up_to_starttls(port)
        client = HandDrivenTLS(reader, writer)
        await client.handshake()
        client.send(b"QUIT\r\n")
        assert (await client.reply()).startswith(b"221 ")  # and then the client is silent
        ended = await asyncio.wait_for(reader.read(), 10) == b""  # the server closed TCP
        writer.close()
        return ended, await _ended(handler, open_connections)

    assert _serve(tmp_path, scenario, loop_factory, tls_shutdown_timeout=0.5) == (True, 1)
