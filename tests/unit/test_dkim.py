"""DKIM signing must produce signatures that a real verifier accepts, and only for our bytes."""

import dkim
import dkim.util
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from outgoing.dkim import (
    OVERSIGNED_HEADERS,
    DkimError,
    generate_key,
    relaxed_body,
    sign,
    split_message,
    txt_record,
    valid_selector,
)

MESSAGE = (
    b"From: Alice <alice@shop.example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: Your order\r\n"
    b"Date: Tue, 04 Mar 2025 09:15:00 +0000\r\n"
    b"Message-ID: <order-1@shop.example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Thank you for your order.\r\n"
)


def _needs_nacl(algorithm):
    if algorithm == "ed25519":
        pytest.importorskip("nacl", reason="dkimpy signs and verifies Ed25519 through PyNaCl")


def _signed(algorithm, message=MESSAGE):
    _needs_nacl(algorithm)
    key = generate_key(algorithm)
    name, value = txt_record("s2025", "shop.example.com", key)
    signed = sign(
        message,
        domain="shop.example.com",
        selector="s2025",
        private_pem=key.private_pem,
        algorithm=algorithm,
    )

    def dns(qname, timeout=5):
        """Answers only the record we published, as a resolver would."""
        return value.encode("ascii") if qname == f"{name}.".encode("ascii") else None

    return signed, dns


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_signed_message_verifies_against_published_txt_record(algorithm):
    signed, dns = _signed(algorithm)

    assert dkim.verify(signed, dnsfunc=dns)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_signature_header_is_prepended_and_message_bytes_kept(algorithm):
    signed, _ = _signed(algorithm)

    assert signed.startswith(b"DKIM-Signature: ")
    assert signed.endswith(MESSAGE)
    assert b"c=relaxed/relaxed" in signed
    header = signed[: len(signed) - len(MESSAGE)]
    assert b"\n" not in header.replace(b"\r\n", b"")


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_changed_body_fails_verification(algorithm):
    signed, dns = _signed(algorithm)

    tampered = signed.replace(b"Thank you for your order.", b"Pay to this account instead.")

    assert not dkim.verify(tampered, dnsfunc=dns)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_changed_subject_fails_verification(algorithm):
    signed, dns = _signed(algorithm)

    tampered = signed.replace(b"Subject: Your order", b"Subject: Urgent invoice")

    assert not dkim.verify(tampered, dnsfunc=dns)


def test_added_subject_above_the_signed_one_fails_verification():
    """Verifiers read the bottom-most Subject; signing it once more catches one added above."""
    signed, dns = _signed("rsa")

    tampered = signed.replace(b"Subject: Your order", b"Subject: Urgent\r\nSubject: Your order")

    assert not dkim.verify(tampered, dnsfunc=dns)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_a_space_before_a_colon_is_signed_and_the_message_relayed_as_it_came(algorithm):
    """``Subject : hi`` is RFC 5322's obsolete syntax, which dkimpy cannot parse; relaxed
    canonicalisation deletes that space, so the signature verifies on the message as sent.
    dkimpy cannot read the relayed message back either, so it verifies the same signature
    over the message with the space taken out, which relaxed canonicalisation makes equal."""
    spaced = MESSAGE.replace(b"Subject: Your order", b"Subject \t: Your order")
    signed, dns = _signed(algorithm, spaced)

    signature = signed[:len(signed) - len(spaced)]
    assert signed.endswith(spaced) and signature.startswith(b"DKIM-Signature: ")
    assert b"subject" in signature.lower()
    assert dkim.verify(signature + MESSAGE, dnsfunc=dns)
    assert not dkim.verify(signature + MESSAGE.replace(b"Your order", b"Urgent"), dnsfunc=dns)


def test_rsa_txt_record_names_selector_under_domainkey():
    key = generate_key("rsa")

    name, value = txt_record("s2025", "Shop.Example.com.", key)

    assert name == "s2025._domainkey.shop.example.com"
    assert value == f"v=DKIM1; k=rsa; p={key.public_b64}"


def test_ed25519_txt_record_carries_32_byte_public_key():
    key = generate_key("ed25519")

    _, value = txt_record("mail", "example.com", key)

    assert value.startswith("v=DKIM1; k=ed25519; p=")
    assert len(key.public_b64) == 44  # base64 of 32 bytes


def test_key_of_other_algorithm_is_refused_when_signing():
    key = generate_key("ed25519")

    with pytest.raises(DkimError):
        sign(MESSAGE, domain="example.com", selector="s", private_pem=key.private_pem,
             algorithm="rsa")


def test_message_without_from_cannot_be_signed():
    key = generate_key("rsa")

    with pytest.raises(DkimError):
        sign(b"To: bob@example.org\r\n\r\nhi\r\n", domain="example.com", selector="s",
             private_pem=key.private_pem, algorithm="rsa")


@pytest.mark.parametrize("selector", ["s1", "mail-2025", "a.b", "X9"])
def test_dns_label_selectors_are_valid(selector):
    assert valid_selector(selector)


@pytest.mark.parametrize(
    "selector", ["", "-s1", "s1-", "a..b", "s_1", "sel ector", "a" * 64, "s1.", "sél"]
)
def test_selectors_breaking_dns_label_rules_are_invalid(selector):
    assert not valid_selector(selector)


# -- the fast RSA path is dkimpy's, byte for byte ----------------------------------------------

_PIECES = st.sampled_from([b"a", b"word", b" ", b"  ", b"\t", b"\r\n", b"\r", b"\n", b".",
                           b"\r\n\r\n", b" \r\n", b"\t\r\n", b"=3D"])
_HEADER_LINES = st.lists(st.sampled_from([
    b"From: a@shop.example.com", b"To: b@example.org", b"Subject: hi  there ",
    b"Subject:\tfolded", b" continued", b"\tcontinued\t", b"X-Long: a  b\tc",
    b"Date: Tue, 04 Mar 2025 09:15:00 +0000", b"Cc: c@example.org"]), max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=40).map(b"".join))
def test_the_relaxed_body_is_dkimpys(body):
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


@settings(max_examples=300, deadline=None)
@given(_HEADER_LINES, st.sampled_from([b"\r\n", b"\n"]), st.lists(_PIECES, max_size=30))
def test_a_message_splits_as_dkimpy_splits_it(lines, end, body):
    message = b"".join(line + end for line in lines) + end + b"".join(body)
    try:
        expected = dkim.rfc822_parse(message)
    except Exception as exc:  # a bad header block fails alike (continuation first: IndexError)
        with pytest.raises(type(exc)):
            split_message(message)
        return
    assert split_message(message) == expected


@pytest.mark.parametrize("body", [
    b"Thank you for your order.\r\n",
    b"Trailing spaces  \r\nand\ttabs\t\r\n\r\n\r\n",
    b"",
    b"no line end at the end",
    b"QUJD" * 5000 + b"\r\n\r\n",
])
def test_the_rsa_signature_is_dkimpys_own(body):
    """The same key, headers and second: dkimpy's own signer (RSA in Python, deterministic
    PKCS#1 v1.5) gives the same header field, to the byte."""
    key = generate_key("rsa")
    message = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body
    headers = [h.encode() for h in ("from", "to", "subject", "date", "message-id",
                                    "mime-version", "content-type", *OVERSIGNED_HEADERS)]
    for _ in range(3):  # the two must fall in the same second (t=)
        ours = sign(message, domain="Shop.Example.com.", selector="s2025",
                    private_pem=key.private_pem, algorithm="rsa")
        theirs = dkim.DKIM(message, linesep=b"\r\n").sign(
            b"s2025", b"shop.example.com", key.private_pem.encode("ascii"),
            canonicalize=(b"relaxed", b"relaxed"), include_headers=headers) + message
        if _tag(ours, b"t") == _tag(theirs, b"t"):
            break
    assert ours == theirs


def _tag(signed: bytes, name: bytes) -> bytes:
    return dkim.util.parse_tag_value(signed.split(b"\r\n\r\n")[0].split(b":", 1)[1]
                                     .split(b"\r\nFrom:")[0])[name]
