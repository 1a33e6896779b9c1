"""Real peers for the content-stage tests: a next hop that can demand TLS or AUTH, refuse
recipients or die mid-transfer; a canned RDAP server; MIME messages with real attachments."""

from __future__ import annotations

import asyncio
import email.policy
import json
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult

from tests.support.services import Received, free_port

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "attachments"


def with_attachment(filename: str, payload: bytes | None = None, *,
                    sender="alice@example.com", to="bob@example.org", subject="The file",
                    maintype="application", subtype="octet-stream") -> bytes:
    """A real multipart message: a text part and one attachment (a fixture by default)."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Sun, 29 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<attachment@example.com>"
    msg.set_content("Please find the file attached.\n")
    data = payload if payload is not None else (FIXTURES / filename).read_bytes()
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes(policy=email.policy.SMTP)


@dataclass
class HopHandler:
    """A next hop that keeps what it accepted and can misbehave on purpose."""

    messages: list[Received] = field(default_factory=list)
    refuse_rcpt: dict[str, str] = field(default_factory=dict)  # address -> reply
    refuse_data: str | None = None
    abort_next_data: int = 0  # drop the connection instead of answering DATA, this often
    stall_data: float = 0.0  # seconds to hang at DATA before dropping the connection
    slow_data: float = 0.0  # seconds to think at DATA before answering it as usual
    data_started: int = 0  # messages whose data arrived (answered or not)
    open_connections: set = field(default_factory=set)  # sessions still connected
    ehlo_count: int = 0
    tls_transactions: list[bool] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    pipelining: bool = True  # advertise PIPELINING, as Postfix does (aiosmtpd does not)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.ehlo_count += 1
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse_rcpt:
            return self.refuse_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_started += 1
        if self.slow_data:
            await asyncio.sleep(self.slow_data)
        if self.stall_data:
            await asyncio.sleep(self.stall_data)
            server.transport.abort()
            return "421 4.3.0 gone"
        if self.abort_next_data > 0:
            self.abort_next_data -= 1
            server.transport.abort()  # the next hop dies before it answers
            return "421 4.3.0 gone"
        if self.refuse_data:
            return self.refuse_data
        self.tls_transactions.append(session.ssl is not None)
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content or b""))
        return "250 2.0.0 hop took it"

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages


class _CountedSMTP(SMTP):
    """aiosmtpd's server, keeping the handler's ``open_connections`` (a set: STARTTLS calls
    ``connection_made`` a second time for the same session)."""

    def connection_made(self, transport):
        self.event_handler.open_connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, error):
        self.event_handler.open_connections.discard(self)
        super().connection_lost(error)


class _Controller(Controller):
    def factory(self):
        return _CountedSMTP(self.handler, **self.SMTP_kwargs)


class NextHop:
    """An aiosmtpd next hop; ``tls`` demands STARTTLS, ``password`` demands AUTH."""

    def __init__(self, *, tls_context=None, username: str | None = None,
                 password: str | None = None, port: int | None = None,
                 pipelining: bool = True):
        self.port = port or free_port()
        self.handler = HopHandler(pipelining=pipelining)
        options = {}
        if tls_context is not None:
            options.update(tls_context=tls_context, require_starttls=True)
        if password is not None:
            options.update(authenticator=self._authenticate, auth_required=True,
                           auth_require_tls=tls_context is not None)
        self._credentials = (username, password)
        self.controller = _Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                      **options)

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = (auth_data.login.decode(), auth_data.password.decode()) == self._credentials
        if ok:
            self.handler.logins.append(auth_data.login.decode())
        return AuthResult(success=ok)

    def start(self) -> NextHop:
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller._thread is not None:
            self.controller.stop()


class RdapServer:
    """A loopback RDAP server with canned answers: ``domains`` maps a name to its
    registration time (POSIX), ``slow`` names answer after ``delay`` seconds, others 404."""

    def __init__(self, domains: dict[str, float] | None = None, slow: set[str] | None = None,
                 delay: float = 2.0):
        self.domains = dict(domains or {})
        self.slow = set(slow or ())
        self.delay = delay
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server.requests.append(self.path)
                name = self.path.rsplit("/", 1)[-1].lower()
                if name in server.slow:
                    time.sleep(server.delay)
                if name not in server.domains:
                    self.send_response(404)
                    self.end_headers()
                    return
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(server.domains[name]))
                body = json.dumps({"objectClassName": "domain", "ldhName": name,
                                   "events": [{"eventAction": "registration",
                                               "eventDate": when},
                                              {"eventAction": "last changed",
                                               "eventDate": when}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/rdap+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/rdap"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> RdapServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
