"""An administrator finds a quarantined message, reads it safely and releases it."""

from __future__ import annotations

import email.policy
from email.message import EmailMessage

import pytest
from playwright.sync_api import expect

from outgoing.changes import announce_config_change
from tests.support import data
from tests.support.browser import login
from tests.support.mail import GTUBE, client, send

pytestmark = pytest.mark.browser

ADMIN, ADMIN_PW = "ops@example.com", "Ops-pass-12345"
ALICE_PW = "Alice-pass-123"


def wait_until_known(port: int, timeout: float = 10) -> None:
    """The proxy reloads its configuration on the announcement; wait until alice can log in."""
    import smtplib
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with client(port) as smtp:
                smtp.login("alice@example.com", ALICE_PW)
                return
        except smtplib.SMTPAuthenticationError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def spam_with_html() -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "Win a prize"
    msg["Date"] = "Sun, 29 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<prize@example.com>"
    msg.set_content("You won. " + GTUBE)
    msg.add_alternative('<h1 id="won">You won</h1><script>alert("owned")</script>'
                        '<img id="tracker" src="http://127.0.0.1:9/t.gif">', subtype="html")
    return msg.as_bytes(policy=email.policy.SMTP)


def test_domain_admin_views_a_quarantined_message_safely_and_releases_it(
        stack, page, sink, artifacts, redis_client):
    stack.flask("create-admin", ADMIN, "--password", ADMIN_PW, "--domain", "example.com",
                "--create-domain")
    data.add_user("example.com", "user", "alice@example.com", ALICE_PW,
                  quarantine_response="accept")
    announce_config_change(redis_client)  # as the control panel does after a change
    wait_until_known(stack.smtp_port)
    with client(stack.smtp_port) as smtp:
        smtp.login("alice@example.com", ALICE_PW)
        code, reply = send(smtp, spam_with_html())
    assert code == 250, reply  # Accepted: the sender is not told
    assert sink.handler.messages == []

    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    login(page, stack.web_url, ADMIN, ADMIN_PW)
    page.get_by_text("Outgoing", exact=True).click()
    page.get_by_role("link", name="Quarantine").click()
    row = page.locator("tr", has_text="Win a prize")
    assert "alice@example.com" in row.inner_text()
    assert "GTUBE" in row.inner_text() and "Held" in row.inner_text()
    page.screenshot(path=str(artifacts / "quarantine-list.png"), full_page=True)

    row.get_by_role("link", name="View").click()
    expect(page.get_by_text('<script>alert("owned")</script>', exact=False)).to_have_count(1)
    assert page.locator("#won").count() == 0 and page.locator("#tracker").count() == 0
    assert dialogs == []
    page.screenshot(path=str(artifacts / "quarantine-view.png"), full_page=True)

    page.get_by_role("button", name="Release").click()
    expect(page.get_by_text("Release of 1 message(s) queued")).to_have_count(1)
    result = stack.worker_burst()
    assert result.returncode == 0, result.stderr[-2000:]
    [released] = sink.handler.wait_for(1)
    assert released.rcpt_tos == ["bob@example.org"] and b"Win a prize" in released.data
    page.reload()
    assert "Released" in page.locator("dl.facts").inner_text()
    assert page.get_by_role("button", name="Release").count() == 0
