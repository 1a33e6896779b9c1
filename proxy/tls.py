"""The STARTTLS certificate: the operator's from instance/, or a self-signed one made once."""

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


def server_context(cert_path: str, key_path: str, hostname: str) -> ssl.SSLContext:
    ensure_certificate(cert_path, key_path, hostname)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context
