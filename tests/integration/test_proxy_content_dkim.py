"""DKIM signing of relayed mail with the user's selector and the domain's key."""

from __future__ import annotations

import email

import dkim
import pytest
from sqlalchemy import select

from outgoing.dkim import generate_key, txt_record
from outgoing.models import DkimKey, Domain
from tests.support import data
from tests.support.mail import client, message, send

PASSWORD = "Alice-pass-123"


def publish_key(domain: str, selector: str, algorithm: str):
    key = generate_key(algorithm)

    def add(session):
        domain_id = session.scalar(select(Domain.id).where(Domain.name == domain))
        session.add(DkimKey(domain_id=domain_id, selector=selector, algorithm=algorithm,
                            private_key_pem=key.private_pem, public_key_b64=key.public_b64))

    data.query(add)
    name, value = txt_record(selector, domain, key)
    records = {name: value}

    def dns(qname, timeout=5):
        text = qname.decode() if isinstance(qname, bytes) else qname
        return records.get(text.rstrip("."), "").encode()

    return dns


def relay_one(start_proxy, sink, body=b"", **headers) -> bytes:
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, reply = send(smtp, message(**headers) + body)
    assert code == 250, reply
    return sink.handler.wait_for(1)[0].data


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_relayed_message_carries_a_signature_that_verifies_against_the_txt_record(
        instance, start_proxy, sink, algorithm):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD, dkim_selector="og1")
    dns = publish_key("example.com", "og1", algorithm)
    relayed = relay_one(start_proxy, sink)
    assert relayed.startswith(b"DKIM-Signature:")
    assert b"d=example.com" in relayed and b"s=og1" in relayed
    assert b"c=relaxed/relaxed" in relayed
    assert dkim.verify(relayed, dnsfunc=dns)


def test_a_message_with_long_lines_is_relayed_compliant_and_verifies(instance, start_proxy,
                                                                     sink):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD, dkim_selector="og1")
    dns = publish_key("example.com", "og1", "rsa")
    long_body = "Lorem ipsum dolor sit amet, " * 200 + "\n"
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        raw = message(body=long_body).replace(b"=\r\n", b"")
        assert max(len(line) for line in raw.split(b"\r\n")) > 998
        assert send(smtp, raw)[0] == 250
    relayed = sink.handler.wait_for(1)[0].data
    assert max(len(line) for line in relayed.split(b"\r\n")) <= 998
    assert dkim.verify(relayed, dnsfunc=dns)


def test_a_long_8bit_line_in_an_idna_charset_is_relayed_reencoded_and_verifies(
        instance, start_proxy, sink):
    """Python's idna codec refuses the "replace" error handler: decoding the part with its
    declared charset raised, and the message got 451 on every try, for ever."""
    data.add_user("example.com", "user", "alice@example.com", PASSWORD, dkim_selector="og1",
                  block_macro_attachments=True, block_unwanted_attachments=True)
    dns = publish_key("example.com", "og1", "rsa")
    text = "Déjà vu, ".encode("latin-1") * 200
    raw = (b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: idna\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain; charset=idna\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text + b"\r\n"
           b"--b\r\nContent-Type: text/csv; charset*=us-ascii''undefined\r\n"
           b"Content-Disposition: attachment; filename=a.csv\r\n\r\n" + text + b"\r\n"
           b"--b--\r\n")
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, reply = send(smtp, raw)
    assert code == 250, reply
    relayed = sink.handler.wait_for(1)[0].data
    assert max(len(line) for line in relayed.split(b"\r\n")) <= 998
    assert dkim.verify(relayed, dnsfunc=dns)
    parts = [part for part in email.message_from_bytes(relayed).walk()
             if not part.is_multipart()]
    assert [part["Content-Transfer-Encoding"] for part in parts] == ["quoted-printable"] * 2
    assert [part.get_payload(decode=True).rstrip(b"\r\n") for part in parts] == [text] * 2


def test_tampering_with_a_signed_message_breaks_the_signature(instance, start_proxy, sink):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD, dkim_selector="og1")
    dns = publish_key("example.com", "og1", "rsa")
    relayed = relay_one(start_proxy, sink)
    assert dkim.verify(relayed, dnsfunc=dns)
    assert not dkim.verify(relayed.replace(b"Just saying hello.", b"Just saying goodbye"),
                           dnsfunc=dns)
    assert not dkim.verify(relayed.replace(b"Subject: Hello", b"Subject: Invoice"),
                           dnsfunc=dns)


def test_identity_header_is_removed_before_signing(instance, start_proxy, sink):
    from outgoing.models import IdentificationHeader, OutgoingUser

    user_id = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                            dkim_selector="og1", identification_method="header")
    data.query(lambda s: s.add(IdentificationHeader(user_id=user_id, position=0,
                                                    header_name="X-Sender-Id",
                                                    remove_header=True)))
    assert data.query(lambda s: s.get(OutgoingUser, user_id).identification_method) == "header"
    dns = publish_key("example.com", "og1", "rsa")
    relayed = relay_one(start_proxy, sink, X_Sender_Id="customer-42")
    assert b"X-Sender-Id" not in relayed and b"customer-42" not in relayed
    assert dkim.verify(relayed, dnsfunc=dns)


def test_a_header_line_that_is_no_field_is_refused_not_relayed_unsigned(instance, start_proxy,
                                                                        sink):
    """dkimpy cannot sign such a message and Postfix would end the header at that line; the
    message used to go out unsigned, for DMARC to reject. Obsolete spacing before a colon
    is a field, and is signed."""
    data.add_user("example.com", "user", "alice@example.com", PASSWORD, dkim_selector="og1")
    dns = publish_key("example.com", "og1", "rsa")
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        for bad in (b"no colon here", b"Subj\xc3\xa9ct: hi"):
            code, reply = send(smtp, message().replace(b"Subject: Hello", bad))
            assert (code, reply[:6]) == (550, b"5.6.0 "), reply
            assert bad[:4] in reply
        code, reply = send(smtp, message().replace(b"Subject: Hello", b"Subject : Hello"))
        assert code == 250, reply
    relayed = sink.handler.wait_for(1)[0].data
    assert b"\r\nSubject : Hello\r\n" in relayed
    assert dkim.verify(relayed.replace(b"Subject : Hello", b"Subject: Hello"), dnsfunc=dns)
    assert len(sink.handler.messages) == 1


def test_selector_without_a_key_relays_unsigned(instance, start_proxy, sink):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD, dkim_selector="nokey")
    relayed = relay_one(start_proxy, sink)
    assert b"DKIM-Signature" not in relayed


def test_user_without_selector_relays_unsigned(instance, start_proxy, sink):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    publish_key("example.com", "og1", "rsa")
    relayed = relay_one(start_proxy, sink)
    assert b"DKIM-Signature" not in relayed


def test_a_long_preamble_line_is_cut_and_a_long_part_header_refused(instance, start_proxy,
                                                                    sink):
    """The text before a multipart's first part had its long lines relayed as they were
    (the next hop would cut them, and the signature with them); a part's header line that
    long cannot be cut without changing it, so it gets 550 5.6.0 like a message's own."""
    data.add_user("example.com", "user", "alice@example.com", PASSWORD, dkim_selector="og1")
    dns = publish_key("example.com", "og1", "rsa")

    def multipart(preamble: bytes, part_header: bytes = b"") -> bytes:
        return (b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: preamble\r\n"
                b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                + preamble + b"\r\n--b\r\nContent-Type: text/plain\r\n" + part_header
                + b"\r\nhello\r\n--b--\r\n")

    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, reply = send(smtp, multipart(b"MIME " * 400))
        assert code == 250, reply
        code, reply = send(smtp, multipart(b"", part_header=b"X-Long: " + b"z" * 1000
                                           + b"\r\n"))
        assert code == 550 and b"5.6.0" in reply, reply
    [relayed] = [m.data for m in sink.handler.wait_for(1)]
    assert max(len(line) for line in relayed.split(b"\r\n")) <= 998
    assert dkim.verify(relayed, dnsfunc=dns)
    assert b"\r\nhello\r\n--b--\r\n" in relayed


def test_a_form_feed_in_a_header_does_not_stop_a_long_body_line_being_reencoded(
        instance, start_proxy, sink):
    """The re-encoding of a long body line rewrote every header field, and one with a form
    feed before a "name:" made it raise: 451 for ever. Now 250, the field as it came, and
    a signature that verifies."""
    data.add_user("example.com", "user", "alice@example.com", PASSWORD, dkim_selector="og1")
    dns = publish_key("example.com", "og1", "rsa")
    raw = (b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: form feed\r\n"
           b"X-Note: a\x0cBcc: carol@example.net\r\n\r\n" + b"<p>web form</p>" * 100 + b"\r\n")
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, reply = send(smtp, raw)
        assert code == 250, reply
    [relayed] = [m.data for m in sink.handler.wait_for(1)]
    assert b"\r\nX-Note: a\x0cBcc: carol@example.net\r\n" in relayed
    assert max(len(line) for line in relayed.split(b"\r\n")) <= 998
    assert dkim.verify(relayed, dnsfunc=dns)
