"""Reject messages from newly registered domains: the daily list and RDAP, at MAIL."""

from __future__ import annotations

import time

import pytest

from outgoing import newdomains
from outgoing.newdomains import LIST_KEY, rdap_cache_key
from tests.support import data
from tests.support.content import RdapServer
from tests.support.mail import client

PASSWORD = "Alice-pass-123"
DAY = 86400


@pytest.fixture
def alice(instance):
    return data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                         reject_newly_registered_domains=True)


def mail_from(proxy, sender: str) -> tuple[int, bytes]:
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        return smtp.mail(sender)


@pytest.fixture
def rdap(clock):
    server = RdapServer({"fresh-shop.com": clock() - 3600, "old-shop.com": clock() - 400 * DAY},
                        slow={"slow-shop.com"}, delay=2.0).start()
    yield server
    server.stop()


def test_imported_list_domain_is_refused_at_mail_with_550(alice, app, start_proxy, tmp_path):
    listing = tmp_path / "nrd.txt"
    listing.write_text("# newly registered today\nfresh-shop.com\nnot a domain!\n"
                       "old-shop.com,2001-05-01\n")
    result = app.test_cli_runner().invoke(args=["nrd", "import", str(listing)])
    assert result.exit_code == 0, result.output
    assert "2 domains imported, 1 lines skipped" in result.output
    proxy = start_proxy(NEWLY_REGISTERED_LIST=str(listing))
    code, reply = mail_from(proxy, "shop@mail.fresh-shop.com")
    assert code == 550
    assert b"5.7.1" in reply and b"fresh-shop.com" in reply and b"less than a day" in reply
    assert mail_from(proxy, "shop@old-shop.com")[0] == 250
    assert mail_from(proxy, "someone@example.net")[0] == 250


def test_listed_domain_passes_a_day_after_registration(alice, redis_client, start_proxy,
                                                        clock):
    newdomains.import_list(redis_client, ["fresh-shop.com"], registered_at=clock(),
                           now=clock())
    proxy = start_proxy(NEWLY_REGISTERED_LIST="/unused")
    assert mail_from(proxy, "shop@fresh-shop.com")[0] == 550
    clock.advance(DAY + 1)
    assert mail_from(proxy, "shop@fresh-shop.com")[0] == 250


def test_new_domain_is_accepted_when_the_setting_is_off(instance, redis_client, start_proxy,
                                                        clock):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    newdomains.import_list(redis_client, ["fresh-shop.com"], registered_at=clock(),
                           now=clock())
    assert mail_from(start_proxy(), "shop@fresh-shop.com")[0] == 250


def test_list_import_drops_entries_older_than_three_days(redis_client, clock):
    newdomains.import_list(redis_client, ["older.com"], registered_at=clock() - 4 * DAY,
                           now=clock() - 4 * DAY)
    result = newdomains.import_list(redis_client, ["newer.com"], registered_at=clock(),
                                    now=clock())
    assert result.dropped == 1
    assert redis_client.zscore(LIST_KEY, "older.com") is None
    assert redis_client.zscore(LIST_KEY, "newer.com") == pytest.approx(clock())


def test_rdap_registration_today_is_refused_and_cached(alice, start_proxy, rdap,
                                                       redis_client):
    proxy = start_proxy(RDAP_URL=rdap.url)
    assert mail_from(proxy, "shop@fresh-shop.com")[0] == 550
    assert mail_from(proxy, "sales@www.fresh-shop.com")[0] == 550
    assert rdap.requests == ["/rdap/domain/fresh-shop.com"]
    assert 0 < redis_client.ttl(rdap_cache_key("fresh-shop.com")) <= DAY


def test_rdap_old_domain_is_accepted(alice, start_proxy, rdap):
    proxy = start_proxy(RDAP_URL=rdap.url)
    assert mail_from(proxy, "shop@old-shop.com")[0] == 250


def test_rdap_unknown_domain_is_accepted_and_negatively_cached(alice, start_proxy, rdap,
                                                               redis_client):
    proxy = start_proxy(RDAP_URL=rdap.url, RDAP_NEGATIVE_CACHE_SECONDS=600)
    assert mail_from(proxy, "a@unknown-shop.com")[0] == 250
    assert mail_from(proxy, "b@unknown-shop.com")[0] == 250
    assert rdap.requests == ["/rdap/domain/unknown-shop.com"]
    assert 0 < redis_client.ttl(rdap_cache_key("unknown-shop.com")) <= 600


def test_rdap_timeout_lets_the_message_through_and_is_not_asked_again_at_once(
        alice, start_proxy, rdap, redis_client):
    proxy = start_proxy(RDAP_URL=rdap.url, RDAP_TIMEOUT=0.3)
    assert mail_from(proxy, "a@slow-shop.com")[0] == 250
    assert mail_from(proxy, "b@slow-shop.com")[0] == 250
    assert rdap.requests == ["/rdap/domain/slow-shop.com"]
    assert 0 < redis_client.ttl(rdap_cache_key("slow-shop.com")) <= 300


def test_rdap_server_down_lets_the_message_through_and_counts_the_failure(
        alice, start_proxy, redis_client):
    from tests.support.services import free_port

    proxy = start_proxy(RDAP_URL=f"http://127.0.0.1:{free_port()}/rdap")
    assert mail_from(proxy, "shop@fresh-shop.com")[0] == 250
    assert mail_from(proxy, "shop@other-shop.com")[0] == 250
    assert newdomains.failed_lookups_today(redis_client, time.time()) == 2


def test_an_unknown_domain_is_not_a_failed_lookup(alice, start_proxy, rdap, redis_client):
    proxy = start_proxy(RDAP_URL=rdap.url)
    assert mail_from(proxy, "b@unknown-shop.com")[0] == 250
    assert newdomains.failed_lookups_today(redis_client, time.time()) == 0


def test_setting_is_unavailable_without_any_source(redis_client):
    assert newdomains.available({"RDAP_URL": "", "NEWLY_REGISTERED_LIST": ""}) is False
    assert newdomains.available({"RDAP_URL": "", "NEWLY_REGISTERED_LIST": ""},
                                redis_client) is False


def test_setting_is_available_with_rdap_a_list_file_or_an_imported_list(redis_client):
    assert newdomains.available({"RDAP_URL": "https://rdap.example/"}) is True
    assert newdomains.available({"NEWLY_REGISTERED_LIST": "/srv/nrd.txt"}) is True
    newdomains.import_list(redis_client, ["fresh-shop.com"], registered_at=time.time(),
                           now=time.time())
    assert newdomains.available({}, redis_client) is True
