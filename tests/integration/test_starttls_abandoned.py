"""A client that says STARTTLS and then nothing: when the idle timeout closes the connection
in the middle of its TLS handshake, the session ends (its slot of the per-IP cap is given
back and the handler hears of it), instead of waiting for a next command forever. Real
sockets and a real TLS context; the handler records what the protocol tells it."""

from __future__ import annotations

import asyncio
import ssl

from proxy.connections import ConnectionCounts
from proxy.protocol import protocol_factory
from proxy.tls import server_context


class Recorder:
    def __init__(self):
        self.closed = 0

    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

    def session_closed(self, session):
        self.closed += 1


async def _lines(reader) -> bytes:
    """One reply, all its lines."""
    reply = b""
    while True:
        line = await reader.readline()
        reply += line
        if line[3:4] != b"-":
            return reply


def test_a_handshake_given_up_by_the_idle_timeout_ends_the_session(tmp_path):
    async def scenario():
        handler = Recorder()
        connections = ConnectionCounts(1)
        context = server_context(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"),
                                 "proxy.test")
        factory = protocol_factory(handler, hostname="proxy.test", tls_context=context,
                                   timeout=1, connections=connections,
                                   max_connections_per_ip=1)
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert (await _lines(reader)).startswith(b"220 ")
            writer.write(b"EHLO client.example.com\r\n")
            assert b"STARTTLS" in await _lines(reader)
            writer.write(b"STARTTLS\r\n")
            assert (await _lines(reader)).startswith(b"220 ")
            # no ClientHello: the idle timeout (1 s) gives the handshake up
            assert await asyncio.wait_for(reader.read(100), 10) == b""
            writer.close()
            for _ in range(100):
                if handler.closed:
                    break
                await asyncio.sleep(0.05)
            assert handler.closed == 1
            # the slot is free again: a second connection from the address is served
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            client = ssl.create_default_context()
            client.check_hostname = False
            client.verify_mode = ssl.CERT_NONE
            assert (await _lines(reader)).startswith(b"220 ")
            writer.write(b"EHLO client.example.com\r\n")
            await _lines(reader)
            writer.write(b"STARTTLS\r\n")
            assert (await _lines(reader)).startswith(b"220 ")
            await writer.start_tls(client)
            writer.write(b"EHLO client.example.com\r\n")
            assert (await _lines(reader)).startswith(b"250")
            writer.write(b"QUIT\r\n")
            assert (await _lines(reader)).startswith(b"221 ")
            writer.close()
        finally:
            server.close()

    asyncio.run(scenario())
