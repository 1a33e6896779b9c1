"""An administrator opens a user's settings page, reads its activity chart and asks "Why?":
the proxy, the panel and the worker as separate processes, the log written by a real RQ
worker, the chart drawn by the server and loaded by HTMX."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect

from outgoing import message_log
from outgoing.changes import announce_config_change
from outgoing.jobs import enqueue
from tests.e2e.test_quarantine_browser import wait_until_known
from tests.support import data
from tests.support.browser import login
from tests.support.mail import GTUBE, client, message, send

pytestmark = pytest.mark.browser

ADMIN, ADMIN_PW = "ops@example.com", "Ops-pass-12345"
ALICE_PW = "Alice-pass-123"


def test_admin_sees_the_chart_and_opens_why(stack, page, artifacts, redis_client):
    stack.flask("create-admin", ADMIN, "--password", ADMIN_PW, "--domain", "example.com",
                "--create-domain")
    alice = data.add_user("example.com", "user", "alice@example.com", ALICE_PW,
                          connection_limits_enabled=True, limit_per_hour=10)
    announce_config_change(redis_client)
    wait_until_known(stack.smtp_port)
    with client(stack.smtp_port) as smtp:
        smtp.login("alice@example.com", ALICE_PW)
        for n in range(3):
            assert send(smtp, message(subject=f"Report {n}"))[0] == 250
        assert send(smtp, message(subject="Prize", body=GTUBE))[0] == 550
    deadline = time.monotonic() + 5
    while redis_client.xlen(message_log.STREAM) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    enqueue(redis_client, "worker.message_log_jobs.write_message_log", None, retry=None)
    result = stack.worker_burst()
    assert result.returncode == 0, result.stderr[-2000:]

    login(page, stack.web_url, ADMIN, ADMIN_PW)
    page.goto(f"{stack.web_url}/outgoing/users/{alice}")
    chart = page.get_by_role("img", name="Messages and recipients per hour, last 48 hours")
    expect(chart).to_be_visible()
    expect(chart.locator('rect.bar[data-series="messages"]:not([data-value="0"])')) \
        .to_have_attribute("data-value", "4")
    expect(chart.locator("line.limit")).to_have_attribute("data-limit", "10")
    page.get_by_role("tab", name="Last 30 days, per day").click()
    expect(page.get_by_role("img", name="Messages and recipients per day, last 30 days")) \
        .to_be_visible()
    page.locator("#activity-charts").screenshot(path=str(artifacts / "activity-charts.png"))

    page.get_by_role("link", name="Why?").click()
    panel = page.locator("#why-panel")
    expect(panel.get_by_role("heading", name="Why? alice@example.com")).to_be_visible()
    expect(panel.locator('tr[data-window="hour"]')).to_contain_text("10")
    expect(panel.locator("#why-spam-count")).to_contain_text("1 spam message(s)")
    expect(panel.get_by_role("link", name="Prize")).to_be_visible()
    expect(panel.locator('tr[data-signal="volume"]')).to_contain_text("4")
    panel.screenshot(path=str(artifacts / "why-panel.png"))
    panel.get_by_role("button", name="Close").click()
    expect(panel.get_by_role("heading")).to_have_count(0)
