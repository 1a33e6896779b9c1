"""A domain admin names an outside address for the domain's abuse reports in a real browser;
whoever reads that mailbox opens the mailed link, without a login, and confirms."""

from __future__ import annotations

import email
import email.policy
import re

import pytest
from sqlalchemy import select

from outgoing.models import ConfirmedAddress
from tests.e2e.conftest import PAGE_TIMEOUT_MS
from tests.support import data

pytestmark = pytest.mark.browser

ADMIN, ADMIN_PW = "ops@example.com", "Ops-pass-123"
OUTSIDE = "noc@elsewhere.example"


def log_in(page, web_url: str) -> None:
    page.goto(web_url + "/login")
    page.get_by_label("Email").fill(ADMIN)
    page.get_by_label("Password").fill(ADMIN_PW)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r".*/outgoing/.*"))


def test_the_mailed_link_confirms_the_address_after_a_press_not_a_visit(
        stack, page, browser, sink, artifacts):
    data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    data.add_admin(ADMIN, ADMIN_PW, domain="example.com")
    log_in(page, stack.web_url)
    page.goto(stack.web_url + "/outgoing/settings")
    page.get_by_label("Abuse report address").fill(OUTSIDE)
    page.get_by_role("button", name="Save").first.click()
    page.get_by_text(f"We mailed {OUTSIDE} a link to confirm it").wait_for()
    assert f"{OUTSIDE} is not confirmed yet" in page.inner_text("main")

    result = stack.worker_burst()
    assert result.returncode == 0, result.stderr[-2000:]
    [mail] = [email.message_from_bytes(m.data, policy=email.policy.default)
              for m in sink.handler.messages if m.rcpt_tos == [OUTSIDE]]
    link = re.search(re.escape(stack.web_url) + r"/confirm-address/\S+",
                     mail.get_content()).group(0)

    stranger = browser.new_context().new_page()  # the mailbox's reader: no login here
    stranger.set_default_timeout(PAGE_TIMEOUT_MS)
    stranger.goto(link)
    stranger.get_by_role("heading", name=f"Confirm {OUTSIDE}?").wait_for()
    stranger.screenshot(path=str(artifacts / "confirm-address.png"), full_page=True)
    assert data.query(lambda s: s.scalars(select(ConfirmedAddress.address)).all()) == []
    stranger.get_by_role("button", name="Confirm").click()
    stranger.get_by_role("heading", name="Confirmed").wait_for()
    stranger.context.close()
    assert data.query(lambda s: s.scalars(select(ConfirmedAddress.address)).all()) == [OUTSIDE]

    page.reload()
    assert "is not confirmed yet" not in page.inner_text("main")
