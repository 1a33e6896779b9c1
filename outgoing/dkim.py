"""DKIM keys, DNS records and signing for outgoing mail.

Keys are generated with ``cryptography`` and stored as unencrypted PKCS#8 PEM; signing goes
through dkimpy so the signature is produced by the same library that verifies it in tests.
Ed25519 signing (RFC 8463) needs PyNaCl, which dkimpy pulls in with its ``ed25519`` extra.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from functools import lru_cache

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim import canonicalization

from scoring.address import a_label_domain
from scoring.message import crlf_lines, lines_end_in_crlf

ALGORITHMS = ("rsa", "ed25519")
RSA_KEY_BITS = 2048

# Headers signed when present, in the message's own order.
SIGNED_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post",
    "list-owner", "list-archive", "resent-date", "resent-from", "resent-sender",
    "resent-to", "resent-cc", "resent-message-id",
)
# Signed once more than they occur, so a relay adding another copy (a second From or
# Subject shown to the reader instead of ours) breaks the signature.
OVERSIGNED_HEADERS = ("from", "reply-to", "subject", "date", "to", "cc")

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$", re.IGNORECASE)
_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


class DkimError(Exception):
    """The message could not be signed (bad key, malformed message, missing PyNaCl)."""


@dataclass(frozen=True)
class DkimKeyPair:
    """A generated key: PEM for our storage, base64 public key for the DNS record."""

    private_pem: str
    public_b64: str
    algorithm: str


def generate_key(algorithm: str = "rsa") -> DkimKeyPair:
    """Make a new signing key: RSA 2048 (widely supported) or Ed25519 (short, RFC 8463)."""
    if algorithm == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        # DKIM's p= for RSA is the DER SubjectPublicKeyInfo (RFC 6376 3.6.1).
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
        # For Ed25519, p= is the raw 32-byte public key (RFC 8463 4.2).
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    else:
        raise ValueError(f"unknown DKIM algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return DkimKeyPair(
        private_pem=pem.decode("ascii"),
        public_b64=base64.b64encode(public).decode("ascii"),
        algorithm=algorithm,
    )


def valid_selector(s: str) -> bool:
    """A selector is one or more DNS labels (RFC 6376 3.1): letters, digits, inner hyphens."""
    if not isinstance(s, str) or not s or len(s) > 63 * 4:
        return False
    return all(_LABEL.match(label) for label in s.split("."))


def txt_record(selector: str, domain: str, key: DkimKeyPair) -> tuple[str, str]:
    """Return (record name, TXT value) to publish for ``key``.

    The value is one logical string; a 2048-bit RSA value is longer than 255 characters, so
    DNS software splits it into several quoted strings, which resolvers join again.
    """
    if not valid_selector(selector):
        raise ValueError(f"invalid DKIM selector {selector!r}")
    domain = _normalise_domain(domain)
    if key.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown DKIM algorithm {key.algorithm!r}")
    name = f"{selector.lower()}._domainkey.{domain}"
    return name, f"v=DKIM1; k={key.algorithm}; p={key.public_b64}"


def sign(
    message: bytes, *, domain: str, selector: str, private_pem: str, algorithm: str
) -> bytes:
    """Return ``message`` with a relaxed/relaxed DKIM-Signature header prepended.

    The message's own bytes (CRLF line endings) are kept unchanged after the new header;
    ``CrlfLines`` in, ``CrlfLines`` out.
    """
    if not valid_selector(selector):
        raise DkimError(f"invalid DKIM selector {selector!r}")
    privkey, signature_algorithm = _dkimpy_key(private_pem, algorithm)
    header_names = _header_names(message)
    include = [h for h in header_names if h in SIGNED_HEADERS]
    if "from" not in include:
        raise DkimError("message has no From header; DKIM requires signing From")
    include += list(OVERSIGNED_HEADERS)
    domain_bytes = _normalise_domain(domain, error=DkimError).encode("ascii")
    signed = _without_space_before_colons(message)
    try:
        if algorithm == "rsa":
            signer = _OpenSslRsaDKIM(signed, rsa_key=_private_key(private_pem),
                                     linesep=b"\r\n")
            signature = signer.sign_relaxed(selector.encode("ascii"), domain_bytes,
                                            [h.encode("ascii") for h in include])
        else:
            signature = dkimpy.DKIM(signed, signature_algorithm=signature_algorithm,
                                    linesep=b"\r\n").sign(
                selector.encode("ascii"), domain_bytes, privkey,
                signature_algorithm=signature_algorithm,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[h.encode("ascii") for h in include],
            )
    except (dkimpy.DKIMException, UnicodeError) as exc:
        raise DkimError(f"DKIM signing failed: {exc}") from exc
    return crlf_lines(signature, message)


_SPACE_BEFORE_COLON = re.compile(rb"(?m)^([!-9;-~]+)[ \t]+:")


def _without_space_before_colons(message: bytes) -> bytes:
    """The message with the obsolete white space between a field's name and its colon
    (RFC 5322 4.5.3, ``Subject : hi``) taken out of its header, which dkimpy cannot parse.
    Relaxed header canonicalisation (RFC 6376 3.4.2) deletes that white space, so the
    signature computed over this copy verifies on the message as it is relayed."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end + 2]
    if not _SPACE_BEFORE_COLON.search(head):
        return message
    return _SPACE_BEFORE_COLON.sub(rb"\1:", head) + message[len(head):]


@lru_cache(maxsize=256)
def _private_key(private_pem: str):
    """Loading validates an RSA key (tens of milliseconds); a proxy signs with few keys."""
    return serialization.load_pem_private_key(private_pem.encode("ascii"), password=None)


_RELAXED = dkimpy.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4's relaxed body, as dkimpy's ``Relaxed.canonicalize_body`` gives it,
    without its two regular expressions over the whole body (two thirds of a millisecond
    for 48 KB) when there is no whitespace for them to change: no tab, no two spaces in a
    row, no space before a line end, the usual case of text and base64."""
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        return _RELAXED.canonicalize_body(body)
    return canonicalization.correct_empty_body(canonicalization.strip_trailing_lines(body))


def split_message(message: bytes) -> tuple[list, bytes]:
    """(headers, body) as dkimpy's ``rfc822_parse`` gives them. dkimpy splits the whole
    message into lines with a regular expression and joins the body's lines again (a third
    of a millisecond for 48 KB); a message whose every line ends in CRLF (the proxy's) has
    its body after the first empty line as it is, and only the header block is parsed."""
    end = message.find(b"\r\n\r\n")
    if end < 0 or message.startswith(b"\r\n") or not lines_end_in_crlf(message):
        return dkimpy.rfc822_parse(message)
    return dkimpy.rfc822_parse(message[:end + 4])[0], message[end + 4:]


class _OpenSslRsaDKIM(dkimpy.DKIM):
    """dkimpy's signer with the RSA operation done by OpenSSL (``cryptography``).

    dkimpy computes RSA signatures with Python integers, about 30 ms for a 2048-bit key; the
    same PKCS#1 v1.5 signature from OpenSSL takes well under a millisecond. Header selection,
    canonicalisation, folding and the b= placement are dkimpy's own code path, copied from
    ``DKIM.sign`` and ``DKIM.gen_header`` (dkimpy 1.1) for the one form we sign
    (rsa-sha256, relaxed/relaxed, no l= or i=) without parsing the PEM key again per
    message, and with the message split and its body canonicalised by the bytes operations
    above; the tests compare the result byte for byte with dkimpy's own ``sign``.
    """

    def __init__(self, message: bytes, *, rsa_key: rsa.RSAPrivateKey, linesep: bytes):
        super().__init__(message, signature_algorithm=b"rsa-sha256", linesep=linesep)
        self._rsa_key = rsa_key

    def set_message(self, message: bytes) -> None:
        super().set_message(b"")  # dkimpy's state for a new message
        if message:
            self.headers, self.body = split_message(message)

    def sign_relaxed(self, selector: bytes, domain: bytes, include_headers: list[bytes],
                     now: float | None = None) -> bytes:
        """The DKIM-Signature header field (dkimpy's ``sign`` with relaxed/relaxed)."""
        include = tuple(x.lower() for x in include_headers)
        self.include_headers = include
        if b"from" not in include:
            raise dkimpy.ParameterError("The From header field MUST be signed")
        for name in set(include).intersection(self.should_not_sign):
            raise dkimpy.ParameterError(f"The {name} header field SHOULD NOT be signed")
        self.hasher = dkimpy.HASH_ALGORITHMS[self.signature_algorithm]
        bodyhash = base64.b64encode(self.hasher(relaxed_body(self.body)).digest())
        fields = [
            (b"v", b"1"), (b"a", self.signature_algorithm), (b"c", _RELAXED.to_c_value()),
            (b"d", domain), (b"i", b"@" + domain), (b"q", b"dns/txt"), (b"s", selector),
            (b"t", str(int(time.time() if now is None else now)).encode("ascii")),
            (b"h", b" : ".join(include)), (b"bh", bodyhash),
            (b"b", b"0" * 60),  # b= folds onto its own line, as dkimpy's
        ]
        header = self.gen_header(fields, include, _RELAXED, b"DKIM-Signature", None)
        self.domain, self.selector, self.signature_fields = domain, selector, dict(fields)
        return b"DKIM-Signature: " + header

    def gen_header(self, fields, include_headers, canon_policy, header_name, pk,
                   standardize=False):
        from cryptography.hazmat.primitives.asymmetric import padding, utils

        header_value = b"; ".join(b"=".join(x) for x in fields)
        header_value = dkimpy.fold(header_value, namelen=len(header_name), linesep=b"\r\n")
        header_value = dkimpy.RE_BTAG.sub(b"\\1", header_value)
        header = (header_name, b" " + header_value)
        h = dkimpy.HashThrough(self.hasher(), self.debug_content)
        headers = canon_policy.canonicalize_headers(self.headers)
        self.signed_headers = dkimpy.hash_headers(h, canon_policy, headers, include_headers,
                                                  header, dict(fields))
        signature = self._rsa_key.sign(h.digest(), padding.PKCS1v15(),
                                       utils.Prehashed(hashes.SHA256()))
        idx = [i for i in range(len(fields)) if fields[i][0] == b"b"][0]
        fields[idx] = (b"b", base64.b64encode(signature))
        header_value = b"; ".join(b"=".join(x) for x in fields) + self.linesep
        return dkimpy.fold(header_value, namelen=len(header_name), linesep=self.linesep)


def _normalise_domain(domain: str, error: type[Exception] = ValueError) -> str:
    """Lower-case ASCII (IDNA) form, without a trailing dot, as published in DNS."""
    try:
        name = domain.strip().rstrip(".")
        ascii_domain = (name if name.isascii() else a_label_domain(name)).lower()
    except UnicodeError as exc:
        raise error(f"invalid domain {domain!r}") from exc
    if not ascii_domain or not all(_LABEL.match(label) for label in ascii_domain.split(".")):
        raise error(f"invalid domain {domain!r}")
    return ascii_domain


def _dkimpy_key(private_pem: str, algorithm: str) -> tuple[bytes, bytes]:
    """Convert our PKCS#8 PEM into what dkimpy expects for the algorithm."""
    try:
        key = _private_key(private_pem)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise DkimError(f"unreadable DKIM private key: {exc}") from exc
    if algorithm == "rsa" and isinstance(key, rsa.RSAPrivateKey):
        return private_pem.encode("ascii"), b"rsa-sha256"
    if algorithm == "ed25519" and isinstance(key, ed25519.Ed25519PrivateKey):
        # dkimpy hands the key to PyNaCl, which wants the raw 32-byte seed in base64.
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(raw), b"ed25519-sha256"
    raise DkimError(f"private key does not match DKIM algorithm {algorithm!r}")


def _header_names(message: bytes) -> list[str]:
    """Lower-cased names of the header fields, in order, one entry per occurrence."""
    names = []
    for line in message.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            continue
        match = _HEADER_NAME.match(line)
        if match:
            names.append(match.group(1).decode("ascii").lower())
    return names


@dataclass(frozen=True)
class SigningKey:
    """What signing one domain's mail needs, loaded from the ``dkim_keys`` table."""

    domain: str
    selector: str
    algorithm: str
    private_pem: str


def load_signing_key(session, domain_id: int, selector: str,
                     default_selector: str = "") -> SigningKey | None:
    """The key of ``domain_id`` published under ``selector``; None when there is none.

    ``selector`` DKIM_DEFAULT means the provider's ``default_selector``, and only once its
    record was found published: a signature no receiver can verify helps nobody."""
    from sqlalchemy import func, select

    from outgoing.models import DKIM_DEFAULT, DkimKey, Domain

    query = (select(DkimKey.selector, DkimKey.algorithm, DkimKey.private_key_pem, Domain.name)
             .join(Domain, Domain.id == DkimKey.domain_id)
             .where(DkimKey.domain_id == domain_id))
    if selector == DKIM_DEFAULT:
        if not default_selector:
            return None
        query = query.where(DkimKey.selector == default_selector.lower(),
                            DkimKey.dns_published.is_(True))
    else:
        query = query.where(func.lower(DkimKey.selector) == selector.strip().lower())
    row = session.execute(query).first()
    if row is None:
        return None
    return SigningKey(domain=row.name, selector=row.selector, algorithm=row.algorithm,
                      private_pem=row.private_key_pem)


def sign_with(message: bytes, key: SigningKey) -> bytes:
    return sign(message, domain=key.domain, selector=key.selector,
                private_pem=key.private_pem, algorithm=key.algorithm)


def ensure_default_key(session, domain, selector: str) -> bool:
    """Give the domain a key for the provider's default selector on first use (RSA, which
    every receiver verifies). True when one was made now."""
    from sqlalchemy import select

    from outgoing.models import DkimKey

    if not selector or session.scalar(select(DkimKey.id).where(
            DkimKey.domain_id == domain.id, DkimKey.selector == selector.lower())):
        return False
    pair = generate_key("rsa")
    session.add(DkimKey(domain_id=domain.id, selector=selector.lower(),
                        algorithm=pair.algorithm, private_key_pem=pair.private_pem,
                        public_key_b64=pair.public_b64))
    session.flush()
    return True


@dataclass(frozen=True)
class DnsCheck:
    published: bool
    problem: str | None = None


def _tags(record: str) -> dict[str, str]:
    tags = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = "".join(value.split())
    return tags


def check_published(name: str, public_b64: str, *, nameservers: list[tuple[str, int]] = (),
                    timeout: float = 5.0) -> DnsCheck:
    """Is the TXT record at ``name`` this key? With the system's resolver (or
    ``nameservers``); every DNS failure is an answer for the page, never an exception."""
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=not nameservers)
    if nameservers:
        resolver.nameservers = [host for host, _ in nameservers]
        resolver.port = nameservers[0][1]
    resolver.lifetime = timeout
    try:
        answer = resolver.resolve(name, "TXT")
    except dns.resolver.NXDOMAIN:
        return DnsCheck(False, f"There is no {name} in DNS yet.")
    except dns.resolver.NoAnswer:
        return DnsCheck(False, f"{name} exists but has no TXT record.")
    except dns.exception.Timeout:
        return DnsCheck(False, "DNS did not answer in time; try again in a minute.")
    except dns.exception.DNSException as exc:
        return DnsCheck(False, f"DNS lookup failed: {exc}"[:300])
    records = [b"".join(r.strings).decode("ascii", "replace") for r in answer]
    keys = [_tags(r).get("p") for r in records if _tags(r).get("v", "DKIM1") == "DKIM1"]
    if "".join(public_b64.split()) in keys:
        return DnsCheck(True)
    if any(keys):
        return DnsCheck(False, f"{name} publishes another key; replace it with the value "
                               "shown here.")
    return DnsCheck(False, f"{name} has a TXT record, but not a DKIM key.")
