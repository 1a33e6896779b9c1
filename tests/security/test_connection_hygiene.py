"""Connection hygiene over real sockets (issue 10): at most SMTP_MAX_CONNECTIONS_PER_IP
concurrent connections per client IP, across all proxy processes, and at most
SMTP_MAX_JUNK_COMMANDS commands in a row that send no mail."""

from __future__ import annotations

import base64
import os
import resource
import select
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest

from tests.support import data
from tests.support.mail import message, read_reply
from tests.support.services import (
    free_port,
    process_env,
    start_process,
    stop_process,
    wait_for_port,
)

PASSWORD = "Alice-pass-123"
TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections from your address"
TOO_MANY_IN_ALL = b"421 4.7.0 Too many connections, try again later"
TOO_MANY_JUNK = b"421 4.7.0 Too many commands without sending mail"


@pytest.fixture
def alice(instance):
    return data.add_user("example.com", "user", "alice@example.com", PASSWORD)


class Conn:
    """One client connection, raw, with its greeting already read."""

    def __init__(self, port: int, source: str = "127.0.0.1"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> tuple[int, bytes]:
        return read_reply(self.file)

    def ask(self, line: bytes) -> tuple[int, bytes]:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def closed_by_server(self) -> bool:
        return self.reply()[0] == -1

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def eventually(fn, timeout: float = 15.0):
    """Poll ``fn`` until it is true (closing a socket frees the server's slot a moment
    later); its last value."""
    deadline = time.monotonic() + timeout
    while not (value := fn()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def fill(port: int, limit: int = 200) -> tuple[list[Conn], Conn]:
    """Open connections until one is refused: the accepted ones and the refused one."""
    accepted = []
    for _ in range(limit):
        conn = Conn(port)
        if conn.greeting[0] != 220:
            return accepted, conn
        accepted.append(conn)
    raise AssertionError(f"{limit} connections accepted, none refused")


def accepted_when_free(port: int, source: str = "127.0.0.1") -> Conn:
    """A connection that got its greeting, once the slots freed a moment ago are back (a
    probe of accepted_again also holds one until the proxy sees it close)."""
    def attempt():
        conn = Conn(port, source)
        if conn.greeting[0] == 220:
            return conn
        conn.close()
        return None

    conn = eventually(attempt)
    assert conn is not None, "no slot came free"
    return conn


def accepted_again(port: int) -> bool:
    conn = Conn(port)
    conn.close()
    return conn.greeting[0] == 220


# -- connections per client IP ----------------------------------------------------------------

def test_the_connection_over_the_cap_gets_421_and_is_closed(alice, start_proxy):
    proxy = start_proxy(SMTP_MAX_CONNECTIONS_PER_IP=3)
    accepted, refused = fill(proxy.port)
    assert len(accepted) == 3
    assert refused.greeting == (421, TOO_MANY_CONNECTIONS + b"\r\n")
    assert refused.closed_by_server()
    refused.close()
    other = Conn(proxy.port, source="127.0.0.2")  # another client address has its own count
    assert other.greeting[0] == 220
    other.close()
    accepted.pop().close()
    assert eventually(lambda: accepted_again(proxy.port))
    for conn in accepted:
        conn.close()


def test_every_way_a_connection_ends_gives_its_place_back(alice, start_proxy):
    proxy = start_proxy(SMTP_MAX_CONNECTIONS_PER_IP=2, SMTP_MAX_JUNK_COMMANDS=1)
    first, second = Conn(proxy.port), Conn(proxy.port)
    assert Conn(proxy.port).greeting[0] == 421
    assert first.ask(b"QUIT")[0] == 221  # QUIT
    assert first.closed_by_server()
    third = accepted_when_free(proxy.port)
    second.ask(b"NOOP")
    assert second.ask(b"NOOP") == (421, TOO_MANY_JUNK + b"\r\n")  # closed by the proxy
    assert second.closed_by_server()
    assert eventually(lambda: accepted_again(proxy.port))
    third.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    third.close()  # a reset, no QUIT
    fourth, fifth = accepted_when_free(proxy.port), accepted_when_free(proxy.port)
    assert Conn(proxy.port).greeting[0] == 421  # and the count is still right
    for conn in (first, second, fourth, fifth):
        conn.close()


def test_a_client_that_leaves_before_its_greeting_gives_its_place_back(alice, start_proxy):
    """Connect and close at once, many times (a port scanner, a health check, a client
    giving up): the proxy may see the end before it has even started serving the
    connection, and must still free the slot then, not at the five-minute idle timeout."""
    proxy = start_proxy(SMTP_MAX_CONNECTIONS_PER_IP=2)
    for _ in range(20):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    first, second = accepted_when_free(proxy.port), accepted_when_free(proxy.port)
    assert Conn(proxy.port).greeting[0] == 421
    first.close()
    second.close()


def test_starttls_does_not_count_a_connection_twice(alice, start_proxy):
    proxy = start_proxy(SMTP_MAX_CONNECTIONS_PER_IP=2)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = []
    for _ in range(2):
        conn = Conn(proxy.port)
        assert conn.ask(b"EHLO client.example")[0] == 250
        assert conn.ask(b"STARTTLS")[0] == 220
        conn.sock = context.wrap_socket(conn.sock)
        conn.file = conn.sock.makefile("rb")
        assert conn.ask(b"EHLO client.example")[0] == 250
        tls.append(conn)
    assert Conn(proxy.port).greeting[0] == 421
    assert tls[0].ask(b"QUIT")[0] == 221
    tls[0].close()
    assert eventually(lambda: accepted_again(proxy.port))
    assert tls[1].ask(b"NOOP")[0] == 250
    tls[1].close()


def _children(pid: int) -> list[int]:
    return [int(child) for child in
            Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_fifty_connections_per_ip_across_the_worker_processes(alice, sink, tmp_path):
    """The default cap, against ``python -m proxy --workers 2``: the kernel spreads the
    connections over both processes, and the 51st is refused wherever it lands."""
    port = free_port()
    env = process_env(SMTP_LISTEN=f"127.0.0.1:{port}", UPSTREAM_SMTP=f"127.0.0.1:{sink.port}")
    env.pop("SMTP_MAX_CONNECTIONS_PER_IP", None)
    proc = start_process([sys.executable, "-m", "proxy", "--workers", "2"], env,
                         tmp_path / "proxy.log")
    opened: list[Conn] = []
    try:
        wait_for_port(port, proc=proc)
        assert eventually(lambda: len(_children(proc.pid)) == 2)
        accepted, refused = fill(port)
        opened += accepted
        assert len(accepted) == 50
        assert refused.greeting == (421, TOO_MANY_CONNECTIONS + b"\r\n")
        assert refused.closed_by_server()
        refused.close()

        for conn in accepted[:5]:
            conn.close()
        more = [accepted_when_free(port) for _ in range(5)]
        opened += more
        refused = Conn(port)
        assert refused.greeting[0] == 421
        refused.close()

        # A worker killed with connections open: the parent forgets what it counted.
        first = _children(proc.pid)[0]
        os.kill(first, signal.SIGKILL)
        assert eventually(lambda: len(set(_children(proc.pid)) - {first}) == 2)
        alive = [conn for conn in accepted[5:] + more if not _dropped(conn)]
        assert 0 < len(alive) < 50
        again, refused = fill(port)
        opened += again
        assert len(again) == 50 - len(alive)
        refused.close()
    finally:
        for conn in opened:
            conn.close()
        stop_process(proc)
    assert proc.returncode == 0


def test_the_process_cap_keeps_descriptors_for_a_legitimate_client(alice, sink, tmp_path):
    """The review's attack: idle connections from many addresses, each under its own cap,
    until the proxy has no file descriptor left. With 256 descriptors (no higher hard limit
    to raise it to) a process serves 128 connections; the next gets 421 and the proxy still
    has descriptors to serve a client once one leaves."""
    port = free_port()
    env = process_env(SMTP_LISTEN=f"127.0.0.1:{port}", UPSTREAM_SMTP=f"127.0.0.1:{sink.port}",
                      METRICS_LISTEN="", SMTP_MAX_CONNECTIONS_PER_IP="20")
    env.pop("SMTP_MAX_CONNECTIONS", None)
    proc = start_process(["sh", "-c", 'ulimit -n 256 && exec "$0" -m proxy --workers 1',
                          sys.executable], env, tmp_path / "proxy.log")
    opened: list[Conn] = []
    try:
        wait_for_port(port, proc=proc)
        for number in range(128):
            conn = Conn(port, source=f"127.0.0.{number // 20 + 1}")
            opened.append(conn)
            assert conn.greeting[0] == 220, number
        refused = Conn(port, source="127.0.1.1")  # a new address, far under its own cap
        assert refused.greeting == (421, TOO_MANY_IN_ALL + b"\r\n")
        assert refused.closed_by_server()
        refused.close()
        opened.pop().close()
        legitimate = accepted_when_free(port, source="127.0.1.2")
        assert legitimate.ask(b"EHLO client.example")[0] == 250
        opened.append(legitimate)
    finally:
        for conn in opened:
            conn.close()
        stop_process(proc)


def test_the_proxy_raises_its_open_file_limit_to_the_hard_limit(alice, sink, tmp_path):
    port = free_port()
    env = process_env(SMTP_LISTEN=f"127.0.0.1:{port}", UPSTREAM_SMTP=f"127.0.0.1:{sink.port}",
                      METRICS_LISTEN="")
    proc = start_process(["sh", "-c", 'ulimit -Sn 256 && exec "$0" -m proxy --workers 1',
                          sys.executable], env, tmp_path / "proxy.log")
    try:
        wait_for_port(port, proc=proc)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)]
    finally:
        stop_process(proc)


def _dropped(conn: Conn) -> bool:
    """The server side of ``conn`` is gone (its process was killed)."""
    poller = select.poll()  # select() fails on descriptors above 1023 in a long test run
    poller.register(conn.sock, select.POLLIN)
    return bool(poller.poll(0)) and conn.sock.recv(1, socket.MSG_PEEK) == b""


# -- commands without progress ---------------------------------------------------------------

def plain(login: str, password: str) -> bytes:
    return base64.b64encode(f"\0{login}\0{password}".encode())


def test_twenty_junk_commands_then_421_and_closed(alice, start_proxy):
    proxy = start_proxy()
    conn = Conn(proxy.port)
    assert conn.ask(b"EHLO client.example")[0] == 250
    junk = [b"NOOP", b"RSET", b"VRFY bob@example.org", b"HELP", b"EXPN staff"]
    replies = [conn.ask(junk[n % len(junk)])[0] for n in range(20)]
    assert 421 not in replies
    assert conn.ask(b"NOOP") == (421, TOO_MANY_JUNK + b"\r\n")
    assert conn.closed_by_server()
    conn.close()


def test_refused_mail_commands_are_commands_without_mail(alice, start_proxy):
    """A client that never authenticates gets 530 for each MAIL: the 21st is followed by
    421 and the end of the connection, not a million more (each one a message-log record)."""
    proxy = start_proxy()
    conn = Conn(proxy.port, source="127.0.0.77")
    assert conn.ask(b"EHLO client.example")[0] == 250
    conn.sock.sendall(b"MAIL FROM:<x@evil.test>\r\n" * 20)
    assert [conn.reply()[0] for _ in range(20)] == [530] * 20
    assert conn.ask(b"MAIL FROM:<x@evil.test>")[0] == 530
    assert conn.reply() == (421, TOO_MANY_JUNK + b"\r\n")
    assert conn.closed_by_server()
    conn.close()


def test_a_finished_message_starts_the_count_afresh_and_aborted_transactions_do_not(
        alice, start_proxy, sink):
    proxy = start_proxy(SMTP_TRUSTED=True)
    conn = Conn(proxy.port)
    assert conn.ask(b"EHLO client.example")[0] == 250
    assert conn.ask(b"AUTH PLAIN " + plain("alice@example.com", PASSWORD))[0] == 235
    for _ in range(19):
        assert conn.ask(b"NOOP")[0] == 250
    for line in (b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.org>", b"DATA"):
        assert conn.ask(line)[0] in (250, 354)
    conn.sock.sendall(message() + b".\r\n")
    assert conn.reply()[0] == 250
    for _ in range(19):
        assert conn.ask(b"NOOP")[0] == 250
    # MAIL then RSET, again and again, is no progress: only a finished message is.
    assert conn.ask(b"MAIL FROM:<alice@example.com>")[0] == 250
    assert conn.ask(b"RSET")[0] == 250  # the 20th
    assert conn.ask(b"MAIL FROM:<alice@example.com>")[0] == 250
    assert conn.ask(b"RSET") == (421, TOO_MANY_JUNK + b"\r\n")
    assert conn.closed_by_server()
    conn.close()
    assert len(sink.handler.messages) == 1


# -- DATA bytes held by a process (SMTP_DATA_BUDGET) ------------------------------------------

NO_ROOM = (452, b"452 4.3.1 Insufficient system storage, try again later\r\n")
# A budget of 200 KB, and a largest message that fits it alone (as the configuration wants).
SMALL_BUDGET = dict(SMTP_DATA_BUDGET=200_000, MAX_MESSAGE_SIZE=195_000, SMTP_MAX_LINE_LENGTH=1000)


def sized(size: int) -> bytes:
    """A message of about ``size`` bytes on the wire (lines of 78 with their CRLF)."""
    return message(body=("a" * 76 + "\n") * (size // 78))


def logged_in(port: int) -> Conn:
    conn = Conn(port)
    assert conn.ask(b"EHLO client.example")[0] == 250
    assert conn.ask(b"AUTH PLAIN " + plain("alice@example.com", PASSWORD))[0] == 235
    return conn


def begin(conn: Conn) -> None:
    for line in (b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.org>", b"DATA"):
        assert conn.ask(line)[0] in (250, 354)


def send_message(conn: Conn, data: bytes) -> tuple[int, bytes]:
    begin(conn)
    conn.sock.sendall(data + b".\r\n")
    return conn.reply()


def test_the_message_that_passes_the_data_budget_gets_452_and_the_others_pass(
        alice, start_proxy, sink):
    """The review's attack, small: one client's messages in flight together must not make
    the process hold more than SMTP_DATA_BUDGET. The message that would pass it is read to
    its end and refused for now; the one held still goes, small messages still go, and once
    it is answered its bytes are free for the next."""
    proxy = start_proxy(SMTP_TRUSTED=True, **SMALL_BUDGET)
    first, second = logged_in(proxy.port), logged_in(proxy.port)
    begin(first)
    first.sock.sendall(sized(150_000))  # its end not sent yet: the proxy holds it
    replies = []  # 250 until the proxy has read the first's bytes (it reads as they come)
    assert eventually(lambda: replies.append(send_message(second, sized(150_000)))
                      or replies[-1] == NO_ROOM)
    assert {code for code, _ in replies[:-1]} <= {250}
    assert send_message(second, message())[0] == 250  # the same session, a small message
    first.sock.sendall(b".\r\n")
    assert first.reply()[0] == 250
    third = logged_in(proxy.port)
    assert send_message(third, sized(150_000))[0] == 250  # the first's bytes were given back
    assert len(sink.handler.messages) == len(replies) - 1 + 3
    for conn in (first, second, third):
        conn.close()


def test_a_client_that_hangs_up_during_data_gives_its_bytes_back(alice, start_proxy, sink):
    proxy = start_proxy(SMTP_TRUSTED=True, **SMALL_BUDGET)
    for _ in range(3):
        leaving = logged_in(proxy.port)
        begin(leaving)
        leaving.sock.sendall(sized(150_000))
        leaving.close()
    other = logged_in(proxy.port)
    # Each hang-up is seen a moment later; then a message that needs nearly the whole budget.
    assert eventually(lambda: send_message(other, sized(190_000))[0] == 250)
    other.close()
