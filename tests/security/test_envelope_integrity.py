"""Envelope integrity over real sockets (issue 10): a MAIL or RCPT path with a control
character, or without its closing ">", is refused at that command; every path the proxy
accepts reaches the next hop byte for byte as the client sent it.

The next hop here records the raw command lines it receives: aiosmtpd (the usual test sink)
would parse and normalise the path, hiding exactly the re-writing these tests look for.
"""

from __future__ import annotations

import base64
import re
import socket
import socketserver
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import data
from tests.support.mail import message, read_reply
from tests.support.web import csrf_token, log_in

PASSWORD = "Alice-pass-123"
CONTROLS = [chr(c) for c in range(32)] + ["\x7f"]


class RawSink:
    """A next hop on loopback that answers like a plain ESMTP server (8BITMIME, SMTPUTF8, no
    STARTTLS) and keeps every command line exactly as it arrived."""

    def __init__(self):
        self.lines: list[bytes] = []
        sink = self

        class Session(socketserver.StreamRequestHandler):
            def handle(self):
                self.wfile.write(b"220 raw-sink ESMTP\r\n")
                while line := self.rfile.readline():
                    sink.lines.append(line)
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO"):
                        self.wfile.write(b"250-raw-sink\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                                         b"250 SIZE 50000000\r\n")
                    elif verb == b"DATA":
                        self.wfile.write(b"354 go on\r\n")
                        while self.rfile.readline() not in (b".\r\n", b""):
                            pass
                        self.wfile.write(b"250 2.0.0 raw sink took it\r\n")
                    elif verb == b"QUIT":
                        self.wfile.write(b"221 bye\r\n")
                        return
                    else:
                        self.wfile.write(b"250 ok\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Session)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def commands(self, verb: bytes) -> list[bytes]:
        return [line for line in list(self.lines) if line[:len(verb)].upper() == verb]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Client:
    """A customer's server that writes exactly the bytes it is given (smtplib would refuse a
    CR or LF in an address), on a listener trusted for AUTH without STARTTLS."""

    def __init__(self, port: int, login: str | None = "alice@a.test"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.file = self.sock.makefile("rb")
        self.expect(220)
        self.command(b"EHLO client.example")
        self.expect(250)
        if login:
            secret = base64.b64encode(f"\0{login}\0{PASSWORD}".encode())
            self.command(b"AUTH PLAIN " + secret)
            self.expect(235)

    def command(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def reply(self) -> tuple[int, bytes]:
        return read_reply(self.file)

    def expect(self, code: int) -> bytes:
        got, text = self.reply()
        assert got == code, text
        return text

    def ask(self, line: bytes) -> tuple[int, bytes]:
        self.command(line)
        return self.reply()

    def send_message(self, mail_from: bytes, rcpt: bytes) -> tuple[int, bytes]:
        for line in (b"MAIL FROM:" + mail_from, b"RCPT TO:" + rcpt, b"DATA"):
            code, text = self.ask(line)
            if code not in (250, 354):
                return code, text
        self.sock.sendall(message(sender="alice@a.test") + b".\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_sink():
    sink = RawSink()
    yield sink
    sink.stop()


@pytest.fixture
def alice(instance):
    return data.add_user("a.test", "user", "alice@a.test", PASSWORD)


@pytest.fixture
def proxy(alice, start_proxy, raw_sink):
    return start_proxy(SMTP_TRUSTED=True, UPSTREAM_SMTP=f"127.0.0.1:{raw_sink.port}")


@pytest.fixture
def locked_identity(alice, app):
    """``locked@a.test``, an identity of alice's locked from the control panel."""
    identity = data.add_identity(alice, "locked@a.test")
    web = app.test_client()
    data.add_admin("root@example.net", "Root-pass-123")
    log_in(web, "root@example.net", "Root-pass-123")
    response = web.post(f"/outgoing/identities/{identity}/lock",
                        data={"csrf_token": csrf_token(web, "/outgoing/users"),
                              "reason": "phishing"})
    assert response.status_code in (200, 302)
    return identity


def test_cr_in_a_quoted_local_part_cannot_smuggle_a_locked_identity(locked_identity, proxy,
                                                                     raw_sink):
    smtp = Client(proxy.port)
    # The locked identity itself is refused (after DATA, where identities are checked)...
    assert smtp.send_message(b"<locked@a.test>", b"<bob@b.test>")[0] == 550
    # ...and dressed up as another address with a CR in it, it is refused at MAIL: the
    # lenient parser used to answer 250 and relay "MAIL FROM:<locked@a.test>".
    code, text = smtp.ask(b'MAIL FROM:<"x\rMAIL FROM:<locked@a.test>"@a.test>')
    assert code == 501 and text.startswith(b"501 5.1.7 ")
    assert smtp.ask(b"RCPT TO:<bob@b.test>")[0] == 503  # no transaction was started
    smtp.close()
    assert raw_sink.commands(b"MAIL") == []


@pytest.mark.parametrize("mail_from", [
    b'<"locked"@a.test>', b'<"lock\\ed"@a.test>', b'<"\\l\\o\\c\\k\\e\\d"@a.test>',
    b'<"Locked"@A.test>',
])
def test_quoting_cannot_smuggle_a_locked_identity(locked_identity, proxy, raw_sink, mail_from):
    """The next hop reads a quoted dot-string as the plain address (RFC 5321 4.1.2), so the
    lock applies to it; a quoted local part that is no dot-string is another mailbox, and
    is relayed as the client wrote it."""
    smtp = Client(proxy.port)
    code, text = smtp.send_message(mail_from, b"<bob@b.test>")
    assert code == 550 and b"locked@a.test" in text, text
    assert smtp.send_message(b'<"locked x"@a.test>', b"<bob@b.test>")[0] == 250
    smtp.close()
    relayed = raw_sink.commands(b"MAIL")
    assert len(relayed) == 1 and relayed[0].startswith(b'MAIL FROM:<"locked x"@a.test> ')


@pytest.mark.parametrize(("locked", "mail_from"), [
    ("locked@a.test", "<locked@\uff41.test> SMTPUTF8"),  # a full-width a
    ("locked@xn--bcher-kva.test", "<locked@b\u00fccher.test> SMTPUTF8"),
    ("locked@xn--bcher-kva.test", "<locked@B\u00dcCHER.test> SMTPUTF8"),
    ("locked@xn--bcher-kva.test", "<locked@xn--bcher-kva.test>"),
    ("locked@xn--bcher-kva.test", "<locked@XN--BCHER-KVA.test>"),
])
def test_spelling_the_domain_another_way_cannot_dodge_a_locked_identity(alice, app, proxy,
                                                                      raw_sink, locked,
                                                                      mail_from):
    """Reported: with spammer@b\u00fccher.test locked, MAIL FROM:<spammer@xn--bcher-kva.test>
    was relayed, as was a full-width letter in an ASCII domain under SMTPUTF8: each spelling
    was another identity. The domain is now compared in its A-label form."""
    identity = data.add_identity(alice, locked)
    web = app.test_client()
    data.add_admin("root@example.net", "Root-pass-123")
    log_in(web, "root@example.net", "Root-pass-123")
    web.post(f"/outgoing/identities/{identity}/lock",
             data={"csrf_token": csrf_token(web, "/outgoing/users"), "reason": "phishing"})
    smtp = Client(proxy.port)
    code, text = smtp.send_message(mail_from.encode(), b"<bob@b.test>")
    assert code == 550 and locked.encode() in text, text
    smtp.close()
    assert raw_sink.commands(b"MAIL") == []


@pytest.mark.parametrize(("mail_from", "rcpt", "status"), [
    (b"<a\x00b@a.test>", b"<bob@b.test>", b"501 5.1.7 "),  # NUL: was 250, then 451 at DATA
    (b"<alice\r@a.test>", b"<bob@b.test>", b"501 5.1.7 "),  # bare CR: was relayed without it
    (b'<"al\rice"@a.test>', b"<bob@b.test>", b"501 5.1.7 "),
    (b"<alice@a.test>", b"<b\x00ob@b.test>", b"501 5.1.3 "),
    (b"<alice@a.test>", b"<bob\r@b.test>", b"501 5.1.3 "),
    (b"<alice@a.test>", b'<"b\rob"@b.test>', b"501 5.1.3 "),
    (b"<alice@a.test>", b"<bob@b.test\x7f>", b"501 5.1.3 "),
    (b"<alice@a.test>", b"<bob@b.test> X=\x1b", b"501 5.1.3 "),  # anywhere in the argument
])
def test_control_characters_are_refused_at_that_command(proxy, raw_sink, mail_from, rcpt,
                                                        status):
    smtp = Client(proxy.port)
    code, text = smtp.send_message(mail_from, rcpt)
    assert code == 501 and text.startswith(status), text
    assert smtp.ask(b"DATA")[0] == 503  # nothing to send
    smtp.close()
    assert raw_sink.commands(b"MAIL") == [] and raw_sink.commands(b"RCPT") == []


@pytest.mark.parametrize(("line", "status"), [
    (b"MAIL FROM:<a", b"501 5.1.7 "),  # unterminated: was 250
    (b"MAIL FROM:<alice@a.test", b"501 5.1.7 "),
    (b"MAIL FROM:<", b"501 5.1.7 "),
    (b'MAIL FROM:<"a>"@a.test', b"501 5.1.7 "),  # a ">" in quotes closes nothing
])
def test_an_unterminated_sender_path_gets_501(proxy, raw_sink, line, status):
    smtp = Client(proxy.port)
    code, text = smtp.ask(line)
    assert code == 501 and text.startswith(status), text
    assert smtp.ask(b"MAIL FROM:<alice@a.test>")[0] == 250  # the session goes on
    code, text = smtp.ask(b"RCPT TO:<b@x")
    assert code == 501 and text.startswith(b"501 5.1.3 "), text
    smtp.close()


def test_a_bare_lf_cannot_split_a_path_into_a_second_command(proxy, raw_sink):
    smtp = Client(proxy.port)
    # aiosmtpd reads lines up to LF: the first line is "MAIL FROM:<a", unterminated.
    smtp.sock.sendall(b"MAIL FROM:<a\nMAIL FROM:<alice@a.test>\r\n")
    code, text = smtp.reply()
    assert code == 501 and text.startswith(b"501 5.1.7 "), text
    assert smtp.reply()[0] == 250  # the second line is a command of its own, checked itself
    code, text = smtp.ask(b"RCPT TO:<bob\n@b.test>")
    assert code == 501 and text.startswith(b"501 5.1.3 "), text
    assert smtp.reply()[0] == 500  # "@B.TEST>" is no command
    smtp.close()
    assert raw_sink.commands(b"MAIL") == []


def test_malformed_paths_without_control_characters_keep_553(proxy):
    smtp = Client(proxy.port)
    for line in (b"MAIL FROM:<a..b@a.test>", b"MAIL FROM:<alice@a.test>>",
                 b"MAIL FROM:<alice@a.test>SIZE=1", b"MAIL FROM:<alice@[300.0.0.1]>"):
        code, text = smtp.ask(line)
        assert code == 553 and text.startswith(b"553 5.1.3 "), (line, text)
    assert smtp.ask(b"MAIL FROM:<alice@a.test>")[0] == 250
    assert smtp.ask(b"RCPT TO:<>")[0] == 553  # the null path is only for the sender
    smtp.close()


@pytest.mark.parametrize(("mail_from", "rcpt", "relayed_from", "relayed_rcpt"), [
    (b"<alice@a.test>", b"<bob@b.test>", b"<alice@a.test>", b"<bob@b.test>"),
    (b'<"alice smith"@a.test>', b'<"b\\"o\\\\b"@b.test>', b'<"alice smith"@a.test>',
     b'<"b\\"o\\\\b"@b.test>'),
    (b'<"\\a\\l"@a.test>', b"<bob@[192.0.2.1]>", b'<"\\a\\l"@a.test>', b"<bob@[192.0.2.1]>"),
    (b"<>", b"<bob@[IPv6:2001:db8::1]>", b"<>", b"<bob@[IPv6:2001:db8::1]>"),
    (b"<@relay.a.test:alice@a.test>", b"bob@b.test", b"<alice@a.test>", b"<bob@b.test>"),
    ("<ålice@a.test>".encode(), "<bøb@bücher.test>".encode(), "<ålice@a.test>".encode(),
     "<bøb@bücher.test>".encode()),
])
def test_legitimate_paths_are_relayed_exactly(proxy, raw_sink, mail_from, rcpt, relayed_from,
                                              relayed_rcpt):
    smtp = Client(proxy.port)
    code, text = smtp.send_message(mail_from, rcpt)
    assert code == 250, text
    smtp.close()
    assert _raw(raw_sink.commands(b"MAIL")[-1], b"MAIL FROM:" + relayed_from)
    assert _raw(raw_sink.commands(b"RCPT")[-1], b"RCPT TO:" + relayed_rcpt)


def test_a_client_asking_for_smtputf8_with_ascii_paths_gets_it_passed_on(proxy, raw_sink):
    """RFC 6531: SMTPUTF8 at MAIL says the header fields may be UTF-8 (a From: with a
    non-ASCII local part), whatever the paths are; a next hop told nothing would relay the
    message to servers that cannot take it. A client that does not ask gets none added."""
    smtp = Client(proxy.port)
    for mail_from, asked in ((b"<alice@a.test> SMTPUTF8", True), (b"<alice@a.test>", False)):
        code, text = smtp.send_message(mail_from, b"<bob@b.test>")
        assert code == 250, text
        relayed = raw_sink.commands(b"MAIL")[-1].upper().split()
        assert (b"SMTPUTF8" in relayed) is asked, relayed
    smtp.close()


def test_the_worker_relays_the_paths_it_was_given_exactly(raw_sink):
    """Retries and quarantine release (relay_sync) and the delivery report to the sender
    (mail.send) go through smtplib, whose mail()/rcpt() would re-parse each address."""
    from worker import mail
    from worker.quarantine_jobs import relay_sync

    config = {"UPSTREAM_SMTP": f"127.0.0.1:{raw_sink.port}", "UPSTREAM_TIMEOUT": 10,
              "SMTP_HOSTNAME": "proxy.test"}
    sender, rcpt = '"al\\ice"@a.test', '"b\\"o b"@[IPv6:2001:db8::1]'
    assert relay_sync(config, mail_from=sender, rcpt_tos=[rcpt], data=message()) == {}
    mail.send(config, message(), sender="", to=[sender])
    assert [re.sub(rb" size=[0-9]+$", b"", line.rstrip(b"\r\n")) for line in raw_sink.lines
            if line[:4] in (b"mail", b"rcpt")] == [
        b"mail FROM:<" + sender.encode() + b">", b"rcpt TO:<" + rcpt.encode() + b">",
        b"mail FROM:<>", b"rcpt TO:<" + sender.encode() + b">"]


# -- the property: accepted means relayed unchanged, a control character means refused ------

ATEXT = "abcXYZ0189!#$%&'*+/=?^_`{|}~-"
_atom = st.text(alphabet=ATEXT, min_size=1, max_size=6) | st.sampled_from(["ü", "ß", "名"])
_dot_string = st.lists(_atom, min_size=1, max_size=3).map(".".join)
_qtext = st.sampled_from([chr(c) for c in range(32, 127) if c not in (34, 92)] + ["é"])
_quoted_pair = st.sampled_from([chr(c) for c in range(32, 127)]).map(lambda c: "\\" + c)
_quoted = st.lists(_qtext | _quoted_pair | st.sampled_from([" ", '\\"', "\\\\"]),
                   max_size=8).map(lambda parts: '"' + "".join(parts) + '"')
_label = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,5}[a-zA-Z0-9])?", fullmatch=True)
_domain = (st.lists(_label, min_size=1, max_size=3).map(".".join)
           | st.ip_addresses(v=4).map(lambda a: f"[{a}]")
           | st.ip_addresses(v=6).flatmap(lambda a: st.sampled_from(
               [f"[IPv6:{a.compressed}]", f"[IPv6:{a.exploded}]"])))
MAILBOXES = st.builds(lambda local, domain: f"{local}@{domain}", _dot_string | _quoted,
                      _domain)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sender=MAILBOXES, recipient=MAILBOXES)
def test_every_accepted_path_reaches_the_next_hop_byte_for_byte(proxy, raw_sink, sender,
                                                                recipient):
    smtp = Client(proxy.port)
    sent_from, sent_to = f"<{sender}>".encode(), f"<{recipient}>".encode()
    code, text = smtp.send_message(sent_from, sent_to)
    smtp.close()
    assert code == 250, text
    assert _raw(raw_sink.commands(b"MAIL")[-1], b"MAIL FROM:" + sent_from)
    assert _raw(raw_sink.commands(b"RCPT")[-1], b"RCPT TO:" + sent_to)


def _raw(line: bytes, expected: bytes) -> bool:
    """``line`` is ``expected`` then the end of the line or the ESMTP parameters."""
    return line.startswith(expected) and line[len(expected):][:1] in (b"\r", b" ")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mailbox=MAILBOXES, control=st.sampled_from(CONTROLS), where=st.integers(0, 1000),
       at_rcpt=st.booleans())
def test_every_path_with_a_control_character_is_refused_before_data(proxy, raw_sink, mailbox,
                                                                    control, where, at_rcpt):
    position = where % (len(mailbox) + 1)
    hostile = ("<" + mailbox[:position] + control + mailbox[position:] + ">").encode()
    smtp = Client(proxy.port)
    if at_rcpt:
        assert smtp.ask(b"MAIL FROM:<alice@a.test>")[0] == 250
        code, text = smtp.ask(b"RCPT TO:" + hostile)
        status = b"501 5.1.3 "
    else:
        code, text = smtp.ask(b"MAIL FROM:" + hostile)
        status = b"501 5.1.7 "
    smtp.close()
    assert code == 501 and text.startswith(status), (hostile, text)
    assert raw_sink.commands(b"MAIL") == [] and raw_sink.commands(b"RCPT") == []
