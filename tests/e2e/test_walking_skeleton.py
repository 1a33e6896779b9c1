"""The foundation slice, as an administrator and a customer's mail server live it."""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest
from sqlalchemy import select, update

from outgoing.models import Domain, QuarantinedMessage
from tests.e2e.test_panel_users import SETTINGS_URL, open_manage_authentication
from tests.support import data
from tests.support.browser import login
from tests.support.mail import GTUBE, client, message, send

pytestmark = pytest.mark.browser

ADMIN, ADMIN_PW = "admin@example.net", "Admin-pass-123"
ALICE_PW = "Alice-pass-123"


def test_admin_adds_alice_who_sends_then_spams_is_locked_notified_and_unlocked(
        stack, page, sink, artifacts):
    stack.flask("create-domain", "example.com")
    stack.flask("create-admin", ADMIN, "--password", ADMIN_PW)
    data.query(lambda s: s.execute(update(Domain).values(
        abuse_report_address="postmaster@example.com")))

    # The super admin adds alice under example.com.
    login(page, stack.web_url, ADMIN, ADMIN_PW)
    open_manage_authentication(page)
    page.get_by_role("tab", name="Authenticating User").click()
    page.get_by_label("Domain").fill("example.com")
    page.get_by_label("Username").fill("alice@example.com")
    page.get_by_label("Password", exact=True).fill(ALICE_PW)
    page.get_by_label("Confirm Password").fill(ALICE_PW)
    page.screenshot(path=str(artifacts / "skeleton-add-user.png"), full_page=True)
    page.get_by_role("button", name="Add & Configure").click()
    page.wait_for_url(SETTINGS_URL)
    page.get_by_role("button", name="Save").click()  # the settings page, with defaults
    page.get_by_text("Saved").wait_for()
    page.get_by_role("link", name="Back to the list").click()
    row = page.locator("tr", has_text="alice@example.com")
    assert "Authenticating User" in row.inner_text()

    # A wrong password is refused; the right one relays through the next hop.
    with client(stack.smtp_port) as smtp, pytest.raises(smtplib.SMTPAuthenticationError) as err:
        smtp.login("alice@example.com", "wrong-password")
    assert err.value.smtp_code == 535
    with client(stack.smtp_port) as smtp:
        smtp.login("alice@example.com", ALICE_PW)
        assert send(smtp, message())[0] == 250
    assert [m.rcpt_tos for m in sink.handler.messages] == [["bob@example.org"]]

    # GTUBE is quarantined with 550; the fifth one in ten minutes locks alice.
    with client(stack.smtp_port) as smtp:
        smtp.login("alice@example.com", ALICE_PW)
        for _ in range(5):
            code, reply = send(smtp, message(subject="Cheap stuff", body=GTUBE))
            assert code == 550, reply
        code, reply = smtp.mail("alice@example.com")
    assert code == 550 and b"locked" in reply
    assert data.query(lambda s: len(s.scalars(select(QuarantinedMessage)).all())) == 5
    assert len(sink.handler.messages) == 1

    # A real RQ worker mails the lock notice (and the admin alert) through the next hop.
    result = stack.worker_burst()
    assert result.returncode == 0, result.stderr[-2000:]
    notices = [m for m in sink.handler.wait_for(3, timeout=5)[1:]  # abuse reports: own tests
               if email.message_from_bytes(m.data).get_content_type() != "multipart/report"]
    assert len(notices) == 2, result.stderr[-3000:]
    by_rcpt = {m.rcpt_tos[0]: email.message_from_bytes(m.data, policy=email.policy.default)
               for m in notices}
    assert "alice@example.com" in by_rcpt
    assert "postmaster@example.com" in by_rcpt
    assert "/unlock/" in by_rcpt["postmaster@example.com"].get_content()

    # The panel shows alice locked; one click unlocks her in place (HTMX, no reload).
    page.reload()
    row = page.locator("tr", has_text="alice@example.com")
    assert "Automatic" in row.inner_text()
    page.evaluate("window.__stillSamePage = true")
    row.get_by_role("button", name="Unlock").click()
    page.locator("tr", has_text="alice@example.com").get_by_text("Unlocked").wait_for()
    assert page.evaluate("window.__stillSamePage") is True
    page.screenshot(path=str(artifacts / "skeleton-unlocked.png"), full_page=True)

    with client(stack.smtp_port) as smtp:
        smtp.login("alice@example.com", ALICE_PW)
        assert send(smtp, message())[0] == 250
