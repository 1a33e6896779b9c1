"""STARTTLS: the certificate (the operator's from instance/, or a self-signed one made once)
and the server context, with session tickets that every worker process of a proxy can resume.

A TLS 1.3 or 1.2 session ticket is encrypted with the SSL_CTX's ticket keys, which OpenSSL
draws at random when the context is made. Python's ``ssl`` gives no way to set them, so a
context made in each worker would only resume connections that SO_REUSEPORT happens to hand to
the worker that issued the ticket. Instead the bare context is made when this module is
imported, in the parent of ``python -m proxy --workers N`` before it forks: every worker (and
one restarted later) inherits the same keys and resumes any other worker's tickets. The keys
live as long as that parent process: a restart rotates them (clients then make one full
handshake), and another proxy host behind HAProxy has its own, so a client that HAProxy sends
to the other host makes a full handshake there.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def ensure_certificate(cert_path: str, key_path: str, hostname: str) -> None:
    """Make a self-signed pair once. Proxy processes start together, so creation holds an
    exclusive lock and the files appear by rename: nobody ever reads a key of another cert."""
    cert_file, key_file = Path(cert_path), Path(key_path)
    if cert_file.exists() and key_file.exists():
        return
    key_file.parent.mkdir(parents=True, exist_ok=True)
    with open(key_file.parent / ".tls.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cert_file.exists() and key_file.exists():
            return
        _write_self_signed(cert_file, key_file, hostname)


def _write_self_signed(cert_file: Path, key_file: Path, hostname: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname[:64])]), False)
        .sign(key, hashes.SHA256())
    )
    tmp_key = key_file.with_name(key_file.name + ".tmp")
    tmp_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    tmp_key.chmod(0o600)
    tmp_cert = cert_file.with_name(cert_file.name + ".tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_key, key_file)
    os.replace(tmp_cert, cert_file)


# Made before any fork (see the module's docstring): the first server context a process
# configures is this object, so its ticket keys are the parent's.
_inherited: ssl.SSLContext | None = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
# Contexts already configured, by certificate files: a parent that builds one before it forks
# hands that very context (and keys) to its workers, and a process never makes two for the
# same certificate.
_configured: dict[tuple, ssl.SSLContext] = {}
# One ticket per handshake: a sending MTA keeps one session per destination (Postfix's
# smtp_tls_session_cache), and each ticket costs the server an encryption and the bytes.
TICKETS_PER_HANDSHAKE = 1


def server_context(cert_path: str, key_path: str, hostname: str) -> ssl.SSLContext:
    """The context for every STARTTLS of this process (the server builds it once and shares it
    across connections): TLS 1.2 and 1.3, session tickets and the session cache on, the
    defaults of ``ssl.create_default_context`` otherwise (no client certificates asked)."""
    global _inherited
    ensure_certificate(cert_path, key_path, hostname)
    files = (cert_path, key_path, os.stat(cert_path).st_mtime_ns, os.stat(key_path).st_mtime_ns)
    context = _configured.get(files)
    if context is not None:
        return context
    context, _inherited = (_inherited or ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)), None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                        | ssl.OP_SINGLE_DH_USE | ssl.OP_SINGLE_ECDH_USE)
    context.options &= ~ssl.OP_NO_TICKET
    context.num_tickets = TICKETS_PER_HANDSHAKE
    context.load_cert_chain(cert_path, key_path)
    _configured[files] = context
    return context
