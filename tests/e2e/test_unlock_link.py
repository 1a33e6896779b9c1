"""The unlock link of a lock alert, end to end: the proxy locks a spamming sender, the worker
mails the alert, and an administrator follows the link in a real browser."""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import time

import pytest
from sqlalchemy import update

from outgoing.changes import announce_config_change
from outgoing.models import Domain
from tests.support import data
from tests.support.mail import GTUBE, client, message, send

pytestmark = pytest.mark.browser

ADMIN, ADMIN_PW = "ops@example.com", "Ops-pass-123"
ALICE_PW = "Alice-pass-123"


def alert_link(sink, web_url: str) -> str:
    for received in sink.handler.messages:
        mail = email.message_from_bytes(received.data, policy=email.policy.default)
        if mail["Subject"].startswith("[Outbound Guard] Locked"):
            return re.search(re.escape(web_url) + r"/unlock/\S+", mail.get_content()).group(0)
    raise AssertionError("no lock alert arrived")


def wait_until_proxy_knows_alice(smtp, attempts: int = 8) -> None:
    """The proxy reloads users when told; until then AUTH fails like a wrong password."""
    for _ in range(attempts):
        try:
            smtp.login("alice@example.com", ALICE_PW)
            return
        except smtplib.SMTPAuthenticationError:
            time.sleep(0.25)  # the stack polls for changes every 0.2 s
    raise AssertionError("the proxy never accepted alice's password")


def test_admin_follows_the_alert_link_logs_in_confirms_and_the_link_is_spent(
        stack, page, sink, artifacts, redis_client):
    data.add_user("example.com", "user", "alice@example.com", ALICE_PW)
    data.add_admin(ADMIN, ADMIN_PW, domain="example.com")
    data.query(lambda s: s.execute(update(Domain).values(
        abuse_report_address="postmaster@example.com")))
    announce_config_change(redis_client)  # the running proxy reloads its users

    with client(stack.smtp_port) as smtp:
        wait_until_proxy_knows_alice(smtp)
        for _ in range(5):
            send(smtp, message(subject="Cheap stuff", body=GTUBE))
        assert smtp.mail("alice@example.com")[0] == 550
    result = stack.worker_burst()
    assert result.returncode == 0, result.stderr[-2000:]
    link = alert_link(sink, stack.web_url)

    page.goto(link)
    page.get_by_label("Email").fill(ADMIN)
    page.get_by_label("Password").fill(ADMIN_PW)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("heading", name="Unlock Authenticating User alice@example.com?").wait_for()
    assert "Cheap stuff" in page.inner_text("main")
    page.screenshot(path=str(artifacts / "unlock-confirm.png"), full_page=True)
    with client(stack.smtp_port) as smtp:  # opening the page changed nothing
        smtp.login("alice@example.com", ALICE_PW)
        assert smtp.mail("alice@example.com")[0] == 550

    page.get_by_role("button", name="Unlock").click()
    page.get_by_role("heading", name="Unlocked").wait_for()
    with client(stack.smtp_port) as smtp:
        smtp.login("alice@example.com", ALICE_PW)
        assert send(smtp, message())[0] == 250

    page.goto(link)
    page.get_by_role("heading", name="This unlock link has already been used").wait_for()
    assert page.get_by_role("button", name="Unlock").count() == 0
