"""A sender's charts and its Why? panel, from real mail: sent through the real proxy, logged
by a real RQ worker, read back by the panel. Scoped per domain like every page."""

from __future__ import annotations

import re
import time

import pytest
from sqlalchemy import select

from outgoing import message_log
from outgoing.jobs import enqueue
from outgoing.models import Domain, Identity, QuarantinedMessage
from tests.integration.test_incident_pack import log, store_log
from tests.support import data, worker
from tests.support.content import NextHop, with_attachment
from tests.support.mail import GTUBE, client, message, send
from tests.support.services import process_env, run_worker_burst
from tests.support.web import csrf_token, log_in

PW = "Alice-pass-123"
OPS_PW = "Ops-pass-12345"
HX = {"HX-Request": "true"}


@pytest.fixture
def hop():
    server = NextHop().start()
    yield server
    server.stop()


def write_log(redis_client, count: int, hop) -> None:
    """Wait for the proxy's fire-and-forget appends, then one real worker run writes them."""
    deadline = time.monotonic() + 5
    while redis_client.xlen(message_log.STREAM) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    enqueue(redis_client, "worker.message_log_jobs.write_message_log", None, retry=None)
    result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}"))
    assert result.returncode == 0, result.stderr[-3000:]


def bar(svg: str, series: str, start: int) -> int:
    found = re.search(rf'data-series="{series}" data-start="{start}" data-value="(\d+)"', svg)
    assert found, f"no {series} bar at {start}"
    return int(found.group(1))


def chart(html: str, name: str) -> str:
    return re.search(rf'<svg class="chart" id="[^"]*-{name}-[^"]*".*?</svg>', html, re.S).group(0)


@pytest.fixture
def sent(instance, start_proxy, hop, clock, redis_client):
    """alice@example.com sent 7 messages this hour: 4 relayed (one partly refused by the
    next hop, one from a second identity) to 6 recipients, 2 spam to 2, and 1 rejected for
    its attachment."""
    alice = data.add_user("example.com", "user", "alice@example.com", PW,
                          connection_limits_enabled=True, limit_per_hour=20,
                          maximum_recipients_per_day=20, compromise_detection=True,
                          detection_shadow_mode=True, detection_throttle_at=20,
                          block_unwanted_attachments=True)
    data.add_user("other.example", "user", "mallory@other.example", "Mal-pass-123")
    proxy = start_proxy(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}")
    hop.handler.refuse_rcpt["nobody@example.org"] = "550 5.1.1 No such user"
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)
        assert send(smtp, message(subject="One"))[0] == 250
        assert send(smtp, message(subject="Two"), rcpts=("bob@example.org",
                                                          "carol@example.org"))[0] == 250
        assert send(smtp, message(subject="Partly"), rcpts=("bob@example.org",
                                                             "nobody@example.org"))[0] == 250
        assert send(smtp, message(sender="billing@example.com", subject="Invoice"),
                    sender="billing@example.com")[0] == 250
        for n in range(2):
            assert send(smtp, message(subject=f"Prize {n}", body=GTUBE))[0] == 550
        assert send(smtp, with_attachment("setup.exe", b"MZ\x90\x00" * 64))[0] == 550
    write_log(redis_client, 7, hop)
    data.add_admin("ops@example.com", OPS_PW, domain="example.com")
    data.add_admin("ops@other.example", OPS_PW, domain="other.example")
    # The proxy writes identities to the database every IDENTITY_FLUSH_SECONDS: wait for both.
    deadline = time.monotonic() + 15
    while True:
        identities = data.query(lambda s: {i.value: i.id for i in s.scalars(select(Identity))})
        if {"alice@example.com", "billing@example.com"} <= set(identities) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return {"user": alice, "identities": identities,
            "hour": int(clock.now // 3600) * 3600, "day": int(clock.now // 86400) * 86400}


def test_user_charts_count_this_hours_mail_and_draw_the_limits(app, sent):
    web = app.test_client()
    log_in(web, "ops@example.com", OPS_PW)
    response = web.get(f"/outgoing/users/{sent['user']}/charts?span=hour", headers=HX)
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "<html" not in html and 'hx-trigger="every 60s"' in html  # refreshes itself
    volume, trouble = chart(html, "volume"), chart(html, "trouble")
    assert len(re.findall(r'data-series="messages"', volume)) == 48
    assert bar(volume, "messages", sent["hour"]) == 7
    assert bar(volume, "recipients", sent["hour"]) == 9
    assert bar(trouble, "spam", sent["hour"]) == 2
    assert bar(trouble, "refusals", sent["hour"]) == 2  # nobody@example.org, setup.exe
    assert bar(volume, "messages", sent["hour"] - 3600) == 0
    assert 'data-limit="20"' in volume  # Limit per hour and Recipients per day, both 20
    assert "Limit per hour: 20" in volume and "Recipients per day: 20" in volume
    assert "messages / recipients per hour" in volume  # the unit on the axis

    daily = web.get(f"/outgoing/users/{sent['user']}/charts?span=day",
                    headers=HX).get_data(as_text=True)
    volume = chart(daily, "volume")
    assert len(re.findall(r'data-series="messages"', volume)) == 30
    assert bar(volume, "messages", sent["day"]) == 7
    # 20 an hour is 480 a day: far above 7 bars, so named rather than drawn at 480.
    assert "Limit per hour: 20 (= 480 per day) (above the chart)" in volume
    assert 'data-limit="20"' in volume  # the recipients' 20 a day is drawn


def test_identity_charts_count_only_that_identity(app, sent):
    web = app.test_client()
    log_in(web, "ops@example.com", OPS_PW)
    billing = sent["identities"]["billing@example.com"]
    html = web.get(f"/outgoing/identities/{billing}/charts", headers=HX).get_data(as_text=True)
    assert bar(chart(html, "volume"), "messages", sent["hour"]) == 1
    alice = sent["identities"]["alice@example.com"]
    html = web.get(f"/outgoing/identities/{alice}/charts", headers=HX).get_data(as_text=True)
    assert bar(chart(html, "volume"), "messages", sent["hour"]) == 6
    assert bar(chart(html, "trouble"), "spam", sent["hour"]) == 2
    page = web.get(f"/outgoing/identities/{alice}").get_data(as_text=True)
    assert f'hx-get="/outgoing/identities/{alice}/charts"' in page
    assert f'hx-get="/outgoing/identities/{alice}/why"' in page


def test_settings_page_loads_the_charts_and_offers_why(app, sent):
    web = app.test_client()
    log_in(web, "ops@example.com", OPS_PW)
    page = web.get(f"/outgoing/users/{sent['user']}").get_data(as_text=True)
    assert re.search(rf'hx-get="/outgoing/users/{sent["user"]}/charts" hx-trigger="load"', page)
    assert f'hx-get="/outgoing/users/{sent["user"]}/why"' in page and ">Why?</a>" in page
    listing = web.get(f"/outgoing/identities?user={sent['user']}").get_data(as_text=True)
    for identity_id in sent["identities"].values():
        assert f'hx-get="/outgoing/identities/{identity_id}/why"' in listing


def test_why_panel_shows_usage_signals_spam_and_the_last_lock(app, sent):
    web = app.test_client()
    log_in(web, "ops@example.com", OPS_PW)
    url = f"/outgoing/users/{sent['user']}/why"
    html = web.get(url, headers=HX).get_data(as_text=True)
    assert "<html" not in html and 'id="why-panel"' in html
    recipients = re.search(r'<tr[^>]*data-window="recipients">(.*?)</tr>', html, re.S).group(1)
    assert re.findall(r'class="num">([^<]*)<', recipients) == ["9", "20"]
    assert "Resets in" in html
    hour = re.search(r'<tr[^>]*data-window="hour">(.*?)</tr>', html, re.S).group(1)
    assert re.findall(r'class="num">([^<]*)<', hour) == ["1", "20"]  # one connection
    # The spam lock window, and the spam with links to the quarantined messages.
    assert re.search(r'<strong>2</strong> spam message\(s\) in the last 10 minutes', html)
    stored = data.query(lambda s: list(s.scalars(select(QuarantinedMessage.id))))
    assert len(stored) == 2
    for message_id in stored:
        assert f'href="/outgoing/quarantine/{message_id}"' in html
    # The risk signals against the baseline, and the rung: 2 spam at 15 points each are
    # past Throttle at 20, but shadow mode only records it.
    volume = re.search(r'<tr data-signal="volume"[^>]*>(.*?)</tr>', html, re.S).group(1)
    assert re.findall(r'class="num">([^<]*)<', volume)[0] == "6"
    assert "Within" in volume
    assert 'data-signal="refusals"' in html and 'data-signal="spread"' in html
    risk_row = re.search(r'<tr data-subject="user">(.*?)</tr>', html, re.S).group(1)
    assert float(re.search(r'class="num">([\d.]+)<', risk_row).group(1)) >= 30
    assert "Throttle" in risk_row
    assert "it would be throttled, but shadow mode only records this" in html
    assert "Never locked." in html

    # Lock with a reason, then unlock: the panel names both.
    token = csrf_token(web, f"/outgoing/users/{sent['user']}")
    web.post(f"/outgoing/users/{sent['user']}/lock",
             data={"csrf_token": token, "reason": "Customer called: laptop stolen"})
    html = web.get(url, headers=HX).get_data(as_text=True)
    assert "This user is locked (manual): Customer called: laptop stolen." in html
    last_lock = re.search(r'id="why-last-lock">(.*?)</dd>', html, re.S).group(1)
    assert "ops@example.com" in last_lock and "Customer called: laptop stolen" in last_lock
    web.post(f"/outgoing/users/{sent['user']}/unlock", data={"csrf_token": token})
    html = web.get(url, headers=HX).get_data(as_text=True)
    assert "Customer called: laptop stolen" in re.search(
        r'id="why-last-lock">(.*?)</dd>', html, re.S).group(1)
    assert "unlocked by ops@example.com" in re.search(
        r'id="why-last-unlock">(.*?)</dd>', html, re.S).group(1)
    assert "is locked" not in html
    # Without HTMX it is a page of its own.
    assert "<html" in web.get(url).get_data(as_text=True)


def test_identity_why_panel_reads_the_identitys_own_signals(app, sent):
    web = app.test_client()
    log_in(web, "ops@example.com", OPS_PW)
    billing = sent["identities"]["billing@example.com"]
    html = web.get(f"/outgoing/identities/{billing}/why", headers=HX).get_data(as_text=True)
    volume = re.search(r'<tr data-signal="volume"[^>]*>(.*?)</tr>', html, re.S).group(1)
    assert re.findall(r'class="num">([^<]*)<', volume)[0] == "1"
    assert 'data-subject="identity"' in html and 'data-subject="user"' in html
    assert re.search(r'<strong>0</strong> spam message\(s\)', html)


def test_another_domains_admin_gets_404_for_every_chart_and_panel(app, sent):
    alice_identity = sent["identities"]["alice@example.com"]
    urls = [f"/outgoing/users/{sent['user']}/charts", f"/outgoing/users/{sent['user']}/why",
            f"/outgoing/identities/{alice_identity}",
            f"/outgoing/identities/{alice_identity}/charts",
            f"/outgoing/identities/{alice_identity}/why"]
    other = app.test_client()
    log_in(other, "ops@other.example", OPS_PW)
    for url in urls:
        assert other.get(url).status_code == 404, url
        assert other.get(url, headers=HX).status_code == 404, url
    own = app.test_client()
    log_in(own, "ops@example.com", OPS_PW)
    for url in urls:
        assert own.get(url).status_code == 200, url
    assert own.get(f"/outgoing/users/{sent['user']}/charts?span=week").status_code == 404


@pytest.fixture
def moved(instance):
    """alice@example.com sent spam and other mail while in example.com; then the provider
    moved it to other.example, where it sent spam once more."""
    alice = data.add_user("example.com", "user", "alice@example.com", PW)
    identity = data.add_identity(alice, "alice@example.com")
    before = [worker.add_spam("example.com", alice, identity="alice@example.com",
                              subject=f"Example.com board minutes {n}",
                              rcpts=("banker@example.org",)) for n in range(3)]
    data.move_user(alice, "other.example")
    after = worker.add_spam("other.example", alice, identity="alice@example.com",
                            subject="Prize draw", rcpts=("victim@example.net",))
    ids = data.query(lambda s: dict(s.execute(select(Domain.name, Domain.id)).all()))
    sent = {"user_id": alice, "identity": "alice@example.com"}
    store_log(*(log(n, n, domain_id=ids["example.com"], **sent) for n in range(4)),
              log(4, 5, domain_id=ids["other.example"], **sent))
    data.add_admin("ops@other.example", OPS_PW, domain="other.example")
    data.add_admin("root@example.net", OPS_PW)
    return {"user": alice, "identity": identity, "before": before, "after": after}


def test_a_moved_users_why_panel_shows_none_of_its_old_domains_spam(app, moved):
    web = app.test_client()
    log_in(web, "ops@other.example", OPS_PW)
    urls = [f"/outgoing/users/{moved['user']}/why",
            f"/outgoing/identities/{moved['identity']}/why"]
    leaked = []
    for locked in (False, True):  # the spam of the current window, then of the lock's
        if locked:
            worker.lock("user", moved["user"])
        for url in urls:
            html = web.get(url, headers=HX).get_data(as_text=True)
            assert f'href="/outgoing/quarantine/{moved["after"]}"' in html, (url, locked)
            assert "Prize draw" in html, (url, locked)
            if "Example.com board minutes" in html or any(
                    f'href="/outgoing/quarantine/{message_id}"' in html
                    for message_id in moved["before"]):
                leaked.append((url, locked))
    assert leaked == []


def messages_charted(html: str) -> int:
    return sum(int(n) for n in re.findall(
        r'data-series="messages" data-start="\d+" data-value="(\d+)"', chart(html, "volume")))


def test_a_moved_users_charts_count_none_of_its_old_domains_mail(app, moved):
    urls = [f"/outgoing/users/{moved['user']}/charts",
            f"/outgoing/identities/{moved['identity']}/charts"]
    web = app.test_client()
    log_in(web, "ops@other.example", OPS_PW)
    for url in urls:
        assert messages_charted(web.get(url, headers=HX).get_data(as_text=True)) == 1, url
    root = app.test_client()  # the provider's record of the user: all of it
    log_in(root, "root@example.net", OPS_PW)
    for url in urls:
        assert messages_charted(root.get(url, headers=HX).get_data(as_text=True)) == 5, url
