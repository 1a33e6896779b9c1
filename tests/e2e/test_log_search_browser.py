"""An administrator finds a transaction in Log Search by its labelled filters and opens it:
the proxy and the panel as separate processes, the log written by a real RQ worker."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

from outgoing import message_log
from outgoing.changes import announce_config_change
from outgoing.jobs import enqueue
from tests.e2e.test_quarantine_browser import wait_until_known
from tests.support import data
from tests.support.browser import login
from tests.support.mail import client, message, send

pytestmark = pytest.mark.browser

ADMIN, ADMIN_PW = "ops@example.com", "Ops-pass-12345"
ALICE_PW = "Alice-pass-123"


def test_admin_searches_the_log_by_sender_and_opens_the_transaction(stack, page, sink,
                                                                    artifacts, redis_client):
    stack.flask("create-admin", ADMIN, "--password", ADMIN_PW, "--domain", "example.com",
                "--create-domain")
    data.add_user("example.com", "user", "alice@example.com", ALICE_PW)
    announce_config_change(redis_client)
    wait_until_known(stack.smtp_port)
    with client(stack.smtp_port) as smtp:
        smtp.login("alice@example.com", ALICE_PW)
        assert send(smtp, message(subject="Invoice 4711"), rcpts=("bob@example.org",))[0] \
            == 250
        assert send(smtp, message(sender="billing@example.com", subject="Reminder"),
                    sender="billing@example.com")[0] == 250
    deadline = time.monotonic() + 5
    while redis_client.xlen(message_log.STREAM) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    enqueue(redis_client, "worker.message_log_jobs.write_message_log", None, retry=None)
    result = stack.worker_burst()
    assert result.returncode == 0, result.stderr[-2000:]

    login(page, stack.web_url, ADMIN, ADMIN_PW)
    page.get_by_text("Outgoing", exact=True).click()
    page.get_by_role("link", name="Log Search").click()
    expect(page.get_by_role("heading", name="Log Search", level=1)).to_be_visible()
    expect(page.locator("#log-rows tr")).to_have_count(2)
    page.wait_for_load_state()  # the search goes through htmx, not a page load
    page.get_by_label("Sender").fill("billing@example.com")
    page.get_by_label("Verdict").select_option(label="Relayed")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#log-rows tr", has_text="Invoice 4711")).to_have_count(0)
    row = page.locator("#log-rows tr", has_text="Reminder")
    expect(page.locator("#log-rows tr")).to_have_count(1)
    expect(page).to_have_url(re.compile(r"sender=billing%40example\.com"))  # a link to share
    page.screenshot(path=str(artifacts / "log-search.png"), full_page=True)

    row.get_by_role("link", name="Details").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("Transaction")
    facts = page.locator("dl.facts")
    text = facts.inner_text()
    assert "billing@example.com" in text and "bob@example.org" in text
    assert "250 2.0.0 sink took it" in text  # the next hop's reply
    assert "Relayed" in page.get_by_role("heading", level=1).inner_text()
    page.screenshot(path=str(artifacts / "log-transaction.png"), full_page=True)
