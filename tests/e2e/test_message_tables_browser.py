"""The Quarantine and Archive lists on a 1366×768 laptop screen: every row's actions are on
screen, the time is one line, long subjects are cut with the whole text on hover, and a
breadcrumb says where you are."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from outgoing.archive import archive_message
from outgoing.config import load_config
from outgoing.quarantine import quarantine_message
from outgoing.storage import store_for
from outgoing.users import get_or_create_domain
from tests.e2e.conftest import PAGE_TIMEOUT_MS
from tests.support import data
from tests.support.browser import login
from tests.support.mail import GTUBE, message

pytestmark = pytest.mark.browser

OPS, OPS_PW = "ops@example.com", "Ops-pass-12345"
WIDTH, HEIGHT = 1366, 768
LONG_SUBJECT = ("Your invoice INV-2026-000123 for the quarterly hosting renewal of "
                "www.a-rather-long-shop-name.example.com is ready to download now")
LONG_SENDER = "newsletter-bounces+customer-0042@mailing.a-rather-long-shop-name.example.com"
RECIPIENTS = [f"customer-{n}@recipients-domain-number-{n}.example.org" for n in range(6)]


def hold_and_archive() -> None:
    """Quarantined and archived rows as the proxy files them, some with long values."""
    config = load_config()
    store = store_for(config)

    def add(session):
        domain = get_or_create_domain(session, "example.com")
        for n, (sender, subject) in enumerate([
                (LONG_SENDER, LONG_SUBJECT), ("alice@example.com", "Win a prize"),
                ("bob@example.com", "")]):
            raw = message(sender=sender, subject=subject, body=GTUBE)
            quarantine_message(session, store, domain_id=domain.id, user_id=None,
                               mail_from=sender, rcpt_tos=RECIPIENTS[: 6 - 2 * n], data=raw,
                               subject=subject, identity=f"shop-{n}" if n else sender,
                               client_ip="192.0.2.7",
                               reason="spam (builtin): GTUBE, very suspicious wording",
                               score=1000.0, rules=["GTUBE", "MISSING_DATE", "HTML_ONLY"])
            archive_message(session, store, domain_id=domain.id, user_id=None,
                            mail_from=sender,
                            rcpt_tos=RECIPIENTS[: 6 - 2 * n], data=raw, subject=subject)
    data.query(add)


def check_rows(page, rows_selector: str) -> None:
    page.wait_for_load_state()  # the page's stylesheet: the boxes measured below depend on it
    rows = page.locator(rows_selector)
    expect(rows).to_have_count(3)
    shown = page.locator(".table-wrap").bounding_box()  # what its scroll box does not clip
    right = min(WIDTH, shown["x"] + shown["width"])
    for i in range(rows.count()):
        row = rows.nth(i)
        actions = row.locator("td.actions").locator("a, button")
        assert actions.count() >= 2
        for j in range(actions.count()):
            box = actions.nth(j).bounding_box()
            assert box is not None and box["width"] > 0
            assert 0 <= box["x"] and box["x"] + box["width"] <= right, \
                (actions.nth(j).inner_text(), box)
        stamp = row.locator("td.when time")
        # An inline element that wraps has one client rect per line.
        assert stamp.evaluate("el => el.getClientRects().length") == 1, stamp.inner_text()
        assert "UTC" in stamp.get_attribute("title")
    assert page.evaluate("document.documentElement.scrollWidth") <= WIDTH


def test_quarantine_and_archive_lists_fit_a_1366_screen(stack, browser, artifacts):
    data.add_admin(OPS, OPS_PW, domain="example.com")
    hold_and_archive()
    context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        login(page, stack.web_url, OPS, OPS_PW)
        page.get_by_text("Outgoing", exact=True).click()
        page.get_by_role("link", name="Quarantine").click()
        crumbs = page.get_by_role("navigation", name="Breadcrumb")
        assert crumbs.inner_text().split() == ["Outgoing", "›", "Quarantine"]
        check_rows(page, "#quarantine-rows tr[id^=quarantined-]")
        subject = page.get_by_role("link", name=LONG_SUBJECT)
        assert subject.get_attribute("title") == LONG_SUBJECT
        assert subject.evaluate("el => el.scrollWidth > el.clientWidth")  # cut, not wrapped
        assert subject.evaluate("el => getComputedStyle(el).textOverflow") == "ellipsis"
        page.screenshot(path=str(artifacts / "quarantine-1366.png"))

        subject.click()
        crumbs = page.get_by_role("navigation", name="Breadcrumb")
        assert crumbs.inner_text().split() == ["Outgoing", "›", "Quarantine", "›", "Message"]
        page.screenshot(path=str(artifacts / "quarantine-message-1366.png"))
        crumbs.get_by_role("link", name="Quarantine").click()
        page.wait_for_url("**/outgoing/quarantine")

        page.get_by_text("Outgoing", exact=True).click()
        page.get_by_role("link", name="Archive").click()
        crumbs = page.get_by_role("navigation", name="Breadcrumb")
        assert crumbs.inner_text().split() == ["Outgoing", "›", "Archive"]
        page.screenshot(path=str(artifacts / "archive-1366.png"), full_page=True)
        check_rows(page, "#archive-rows tr[id^=archived-]")
        assert page.get_by_role("link", name=LONG_SUBJECT).get_attribute("title") == \
            LONG_SUBJECT
        page.screenshot(path=str(artifacts / "archive-1366.png"))
        page.get_by_role("link", name=LONG_SUBJECT).click()
        assert page.get_by_role("navigation", name="Breadcrumb").inner_text().split() == [
            "Outgoing", "›", "Archive", "›", "Message"]
    finally:
        context.close()
