"""The default DKIM selector: each domain's key made on first use, "Check DNS" against a
real name server on loopback, and signing that starts only once the record is published."""

from __future__ import annotations

import dkim as dkimpy
import pytest
from sqlalchemy import select

from outgoing import dkim
from outgoing.models import DKIM_DEFAULT, AuditEvent, DkimKey, OutgoingUser
from tests.integration.test_panel_pages import domain_id
from tests.integration.test_panel_users import ROOT, ROOT_PW, Panel, text
from tests.support import data
from tests.support.dns import TxtServer
from tests.support.mail import client, message, send

PASSWORD = "Alice-pass-123"
RECORD = "og1._domainkey.example.com"


@pytest.fixture
def dns_server():
    server = TxtServer().start()
    yield server
    server.stop()


@pytest.fixture
def root(instance, redis_client, dns_server):
    from webapp import create_app

    app = create_app({"TESTING": True, "DNS_RESOLVER": dns_server.address})
    data.add_admin(ROOT, ROOT_PW)
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    return Panel(app.test_client()).login(ROOT, ROOT_PW)


def default_key() -> DkimKey:
    return data.query(lambda s: s.scalar(select(DkimKey).where(DkimKey.selector == "og1")))


def record_value(key: DkimKey) -> str:
    return dkim.txt_record("og1", "example.com",
                           dkim.DkimKeyPair("", key.public_key_b64, "rsa"))[1]


def check(root) -> str:
    key = default_key()
    response = root.post(f"/outgoing/dkim/keys/{key.id}/check")
    assert response.status_code == 302
    return text(root.get(response.headers["Location"]))


def test_new_users_use_the_default_and_each_domain_gets_its_key_on_first_use(root):
    assert data.query(lambda s: s.scalar(select(OutgoingUser.dkim_selector))) == DKIM_DEFAULT
    assert default_key() is None
    page = text(root.get(f"/outgoing/dkim/{domain_id()}"))
    key = default_key()
    assert key is not None and key.algorithm == "rsa" and key.dns_published is False
    assert RECORD in page and record_value(key) in page and "Not checked" in page
    text(root.get(f"/outgoing/dkim/{domain_id()}"))  # the same key on every visit
    assert data.query(lambda s: len(s.scalars(select(DkimKey)).all())) == 1
    user = data.query(lambda s: s.scalar(select(OutgoingUser.id)))
    settings = text(root.get(f"/outgoing/users/{user}"))
    assert "Use the default (og1, not signing until its DNS record is published)" in settings


def test_check_dns_says_what_is_wrong_until_the_record_is_right(root, dns_server):
    root.get(f"/outgoing/dkim/{domain_id()}")
    assert f"There is no {RECORD} in DNS yet." in check(root)
    assert default_key().dns_published is False

    dns_server.publish(RECORD, "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIold")
    assert "publishes another key" in check(root)

    dns_server.records.clear()
    dns_server.publish(RECORD, record_value(default_key()))  # > 255 characters: split
    page = check(root)
    assert "Published" in page and f"{RECORD} publishes this key." in page
    assert default_key().dns_published is True
    assert data.query(lambda s: [e.action for e in s.scalars(select(AuditEvent))]).count(
        "dns_check") == 1
    user = data.query(lambda s: s.scalar(select(OutgoingUser.id)))
    assert "Use the default (og1, signing)" in text(root.get(f"/outgoing/users/{user}"))


def test_a_dns_outage_is_an_answer_not_an_error(root, dns_server):
    root.get(f"/outgoing/dkim/{domain_id()}")
    dns_server.silent = True
    assert "DNS did not answer in time" in check(root)
    assert default_key().dns_published is False


def test_the_default_key_cannot_be_deleted(root):
    root.get(f"/outgoing/dkim/{domain_id()}")
    key = default_key()
    root.post(f"/outgoing/dkim/keys/{key.id}/delete")
    assert default_key() is not None


def test_mail_is_signed_with_the_default_only_once_the_record_is_published(
        root, dns_server, start_proxy, sink):
    root.get(f"/outgoing/dkim/{domain_id()}")
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message())[0] == 250
    assert b"DKIM-Signature" not in sink.handler.wait_for(1)[0].data  # not published yet

    dns_server.publish(RECORD, record_value(default_key()))
    check(root)
    proxy = start_proxy()  # a fresh process: keys are cached for a minute
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message())[0] == 250
    relayed = sink.handler.wait_for(2)[1].data
    assert relayed.startswith(b"DKIM-Signature") and b"s=og1" in relayed

    def resolve(name, timeout=5):
        return record_value(default_key()).encode() if name.decode().rstrip(".") == RECORD \
            else b""
    assert dkimpy.verify(relayed, dnsfunc=resolve)
