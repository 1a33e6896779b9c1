"""Registrable domains (offline PSL), the newly-registered reply and RDAP registration dates."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from scoring.newdomains import (
    newly_registered_verdict,
    parse_rdap_registration,
    registrable_domain,
)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC).timestamp()
HOUR = 3600.0


@pytest.mark.parametrize(("given", "expected"), [
    ("alice@mail.example.co.uk", "example.co.uk"),
    ("<Bob@Example.COM.>", "example.com"),
    ("shop.example.com", "example.com"),
    ("x@bücher.de", "xn--bcher-kva.de"),
    ("alice.github.io", "github.io"),  # RDAP knows github.io, not the private subdomain
    ("someone@host.brand-new-tld", "host.brand-new-tld"),
])
def test_registrable_domain_is_the_one_a_registrar_sold(given, expected):
    assert registrable_domain(given) == expected


@pytest.mark.parametrize("given", [
    "", "   ", "user@", "co.uk", "com", "localhost", "[192.0.2.1]", "x@[2001:db8::1]",
    "192.0.2.1", "a..example.com", "x" * 64 + ".com", "<>",
])
def test_registrable_domain_is_none_for_what_no_registrar_sells(given):
    assert registrable_domain(given) is None


def test_domain_registered_an_hour_ago_is_rejected_naming_it():
    reply = newly_registered_verdict("fresh-shop.example", NOW - HOUR, NOW)
    assert reply == ("550 5.7.1 Sender domain fresh-shop.example was registered less than "
                     "a day ago")


def test_domain_registered_exactly_a_day_ago_is_accepted():
    assert newly_registered_verdict("example.com", NOW - 24 * HOUR, NOW) is None


def test_unknown_registration_date_never_rejects():
    assert newly_registered_verdict("example.com", None, NOW) is None


def test_custom_max_age_is_worded_in_the_reply():
    reply = newly_registered_verdict("example.com", NOW - HOUR, NOW, max_age=2 * HOUR)
    assert reply.endswith("registered less than 2 hours ago")
    assert newly_registered_verdict("example.com", NOW - 3 * HOUR, NOW, max_age=2 * HOUR) is None


def test_registration_slightly_in_the_future_counts_as_new_but_far_future_is_ignored():
    assert newly_registered_verdict("example.com", NOW + 60, NOW) is not None
    assert newly_registered_verdict("example.com", NOW + 48 * HOUR, NOW) is None


def test_reply_stays_one_ascii_line_for_a_hostile_domain():
    reply = newly_registered_verdict("evil\r\n250 ok.example", NOW - HOUR, NOW)
    assert "\r" not in reply and "\n" not in reply and reply.isascii()


def test_rdap_registration_event_is_read_as_a_timestamp():
    rdap = {"objectClassName": "domain", "ldhName": "EXAMPLE.COM", "events": [
        {"eventAction": "registration", "eventDate": "1995-08-14T04:00:00Z"},
        {"eventAction": "expiration", "eventDate": "2027-08-13T04:00:00Z"},
        {"eventAction": "last changed", "eventDate": "2026-08-14T07:01:39Z"},
    ]}
    assert parse_rdap_registration(rdap) == datetime(1995, 8, 14, 4, tzinfo=UTC).timestamp()


def test_rdap_dates_with_offsets_and_fractions_are_understood():
    rdap = {"events": [{"eventAction": "registration",
                        "eventDate": "2026-11-29T13:30:00.250+01:00"}]}
    expected = datetime(2026, 11, 29, 12, 30, 0, 250000, tzinfo=UTC).timestamp()
    assert parse_rdap_registration(rdap) == expected


def test_latest_registration_wins_for_a_re_registered_domain():
    rdap = {"events": [
        {"eventAction": "registration", "eventDate": "2001-01-01T00:00:00Z"},
        {"eventAction": "registration", "eventDate": "2026-11-29T11:00:00Z"},
    ]}
    assert parse_rdap_registration(rdap) == NOW - HOUR


@pytest.mark.parametrize("rdap", [
    {}, {"events": None}, {"events": "registration"}, {"events": [None, 3]},
    {"events": [{"eventAction": "expiration", "eventDate": "2027-01-01T00:00:00Z"}]},
    {"events": [{"eventAction": "registration", "eventDate": "yesterday"}]},
    {"events": [{"eventAction": "registration"}]},
    [], None,
])
def test_rdap_without_a_readable_registration_gives_none(rdap):
    assert parse_rdap_registration(rdap) is None
