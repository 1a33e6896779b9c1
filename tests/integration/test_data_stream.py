"""The bulk DATA reader against aiosmtpd's own, over real sockets: the same random streams,
split at random points across TCP writes, give the same messages and the same replies."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.data_stream import DataState, check, end_of_data, unstuff
from proxy.protocol import LimitedSMTP, protocol_factory
from proxy.server import new_event_loop
from tests.support.mail import read_reply

SIZE_LIMIT = 400
LINE_LIMIT = 40  # the line as the stream reader sees it: text plus CRLF


class Capture:
    """The handler: keeps what DATA delivered."""

    def __init__(self):
        self.messages: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope.original_content)
        return "250 2.0.0 taken"


class Server:
    def __init__(self, bulk: bool):
        self.capture = Capture()
        self.loop = new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            factory = protocol_factory(self.capture, hostname="test", ident="t",
                                       data_size_limit=SIZE_LIMIT,
                                       line_length_limit=LINE_LIMIT, timeout=30)

            def make():
                smtp = factory()
                smtp.bulk_data = bulk
                return smtp

            self.server = self.loop.run_until_complete(
                self.loop.create_server(make, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def servers():
    both = Server(bulk=True), Server(bulk=False)
    yield both
    for server in both:
        server.close()


def transaction(port: int, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    """One transaction with the data sent in ``chunks`` (each its own write, a moment
    apart), then NOOP pipelined behind the end; every reply from 354 on."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        file = sock.makefile("rb")
        read_reply(file)
        for line in (b"EHLO client.test", b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@y.test>"):
            sock.sendall(line + b"\r\n")
            assert read_reply(file)[0] == 250
        sock.sendall(b"DATA\r\n")
        replies = [read_reply(file)]
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(0.0005)
        sock.sendall(b"NOOP\r\n")
        replies += [read_reply(file), read_reply(file)]
        file.close()
        return replies




def no_early_end(data: bytes) -> bytes:
    """A line of just "." is sent stuffed, as a client would (".."): it would end the data."""
    return b"\r\n".join(b".." if line == b"." else line for line in data.split(b"\r\n"))


# Lines with dots, bare CRs and LFs and long runs.
LINE = st.lists(st.sampled_from([b"a", b"b", b".", b"\r", b"\n", b"x" * 17, b" "]),
                max_size=12).map(b"".join)
STREAM = st.lists(LINE, max_size=25).map(
    lambda lines: no_early_end(b"".join(x + b"\r\n" for x in lines)))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=STREAM, cuts=st.lists(st.integers(0, 1000), max_size=6))
def test_bulk_reader_and_aiosmtpd_give_the_same_message_and_replies(servers, data, cuts):
    stream = data + b".\r\n"
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]
    bulk, plain = servers
    before = len(bulk.capture.messages), len(plain.capture.messages)
    got = transaction(bulk.port, chunks)
    want = transaction(plain.port, chunks)
    assert got == want
    assert bulk.capture.messages[before[0]:] == plain.capture.messages[before[1]:]


def test_a_message_over_the_size_limit_is_drained_and_refused_then_the_next_one_flows(
        servers):
    bulk, _ = servers
    big = (b"y" * 30 + b"\r\n") * 200  # 6,400 bytes against a limit of 400
    replies = transaction(bulk.port, [big[:3000], big[3000:] + b".\r\n"])
    assert replies[1] == (552, b"552 Error: Too much mail data\r\n")
    assert replies[2][0] == 250  # the NOOP behind it: the stream is in step again
    assert transaction(bulk.port, [b"small\r\n.\r\n"])[1][0] == 250


def test_the_pure_parts():
    assert end_of_data(b".\r\nQUIT\r\n") == (0, 3)
    assert end_of_data(b"a\r\n.\r\nQUIT\r\n") == (3, 6)
    assert end_of_data(b"a\r\n.\r") is None
    assert end_of_data(b"a\r\n..\r\n.\r\n") == (7, 10)
    assert unstuff(b"..a\r\n..\r\n.b\r\n") == b".a\r\n.\r\nb\r\n"
    assert check(b"x" * 38 + b"\r\n", 400, 40) is DataState.NOMINAL
    assert check(b"x" * 39 + b"\r\n", 400, 40) is DataState.TOO_LONG
    assert check(b"x\r\n" * 200, 400, 40) is DataState.TOO_MUCH
    assert check(b"x" * 39 + b"\r\n" + b"x\r\n" * 200, 400, 40) is DataState.TOO_LONG
    assert LimitedSMTP.bulk_data is True  # the bulk reader is what runs on this Python
