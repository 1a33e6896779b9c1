"""STARTTLS session resumption against the real proxy: a client that keeps its TLS session
(as Postfix's smtp_tls_session_cache does) resumes on its next connection, whichever of the
proxy's worker processes SO_REUSEPORT hands it to, and its mail flows as before. A session
the proxy cannot resume (another proxy's) costs a full handshake, not the message."""

from __future__ import annotations

import email
import ssl
import sys

import pytest

from tests.support import data
from tests.support.mail import message, send
from tests.support.services import (
    free_port,
    process_env,
    start_process,
    stop_process,
    wait_for_port,
)

PASSWORD = "Alice-pass-123"
CONNECTIONS = 12  # with per-process ticket keys all would resume only by a 1-in-2048 chance


class KeepsSession(ssl.SSLContext):
    """A client context that offers the session it was last given, as smtplib cannot."""

    session: ssl.SSLSession | None = None

    def wrap_socket(self, sock, **kwargs):
        return super().wrap_socket(sock, session=self.session, **kwargs)


def client_context(version: ssl.TLSVersion) -> KeepsSession:
    context = KeepsSession(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = version
    return context


def deliver(port: int, context: KeepsSession, subject: str) -> bool:
    """One connection: STARTTLS (offering the kept session), AUTH PLAIN, one message; keeps
    the new session and tells whether the handshake resumed."""
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=15) as smtp:
        smtp.ehlo("client.example.com")
        smtp.starttls(context=context)
        smtp.ehlo("client.example.com")  # reads the reply, and with it TLS 1.3's ticket
        reused = smtp.sock.session_reused
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message(subject=subject))[0] == 250
        context.session = smtp.sock.session
    return reused


def subjects(sink, count: int) -> list[str]:
    return [email.message_from_bytes(m.data)["Subject"] for m in sink.handler.wait_for(count)]


@pytest.fixture
def proxy_processes(instance, sink, tmp_path):
    """``python -m proxy --workers 2``: two processes on one port, as deployed."""
    port = free_port()
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    env = process_env(SMTP_LISTEN=f"127.0.0.1:{port}",
                      METRICS_LISTEN=f"127.0.0.1:{free_port()}",
                      UPSTREAM_SMTP=f"127.0.0.1:{sink.port}")
    proc = start_process([sys.executable, "-m", "proxy", "--workers", "2"], env,
                         tmp_path / "smtp.log")
    try:
        wait_for_port(port, proc=proc)
        yield port
    finally:
        stop_process(proc)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2],
                         ids=["tls1.3", "tls1.2"])
def test_a_client_that_keeps_its_session_resumes_on_any_worker(proxy_processes, sink,
                                                                version):
    port = proxy_processes
    context = client_context(version)
    reused = [deliver(port, context, f"resumed {n}") for n in range(CONNECTIONS)]
    assert reused == [False] + [True] * (CONNECTIONS - 1)
    assert sorted(subjects(sink, CONNECTIONS)) == sorted(
        f"resumed {n}" for n in range(CONNECTIONS))


def test_a_session_the_proxy_cannot_resume_costs_a_full_handshake_not_the_mail(
        proxy_processes, start_proxy, sink):
    other = start_proxy()  # another proxy (its own ticket keys), in this process
    context = client_context(ssl.TLSVersion.TLSv1_3)
    assert deliver(other.port, context, "from the other proxy") is False
    assert deliver(proxy_processes, context, "stale session") is False
    assert deliver(proxy_processes, context, "resumed") is True
    assert set(subjects(sink, 3)) == {"from the other proxy", "stale session",
                                                   "resumed"}
