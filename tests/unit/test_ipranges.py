"""Parsing "IP or Range" text and finding the user whose range holds a client address."""

import ipaddress
import random

import pytest

from scoring.ipranges import (
    IpRange,
    RangeIndex,
    nested,
    overlaps,
    parse_client_ip,
    parse_ip_range,
    validate_ip_range,
    whole_space_problem,
    width_problem,
)


def v4(first: str, last: str | None = None) -> IpRange:
    a = int(ipaddress.IPv4Address(first))
    return IpRange(4, a, int(ipaddress.IPv4Address(last)) if last else a)


def test_single_ipv4_address_is_a_range_of_one():
    r = parse_ip_range(" 192.0.2.7 ")
    assert r == v4("192.0.2.7")
    assert r.text == "192.0.2.7" and r.size == 1


def test_cidr_block_covers_its_whole_network():
    r = parse_ip_range("192.0.2.0/24")
    assert r == v4("192.0.2.0", "192.0.2.255")
    assert str(r) == "192.0.2.0/24"


def test_dash_range_keeps_its_bounds_and_reads_back_the_same():
    r = parse_ip_range("10.0.0.5 - 10.0.0.9")
    assert r == v4("10.0.0.5", "10.0.0.9")
    assert r.text == "10.0.0.5-10.0.0.9"


def test_dash_range_that_is_exactly_a_block_is_written_as_cidr():
    assert parse_ip_range("10.1.0.0-10.1.255.255").text == "10.1.0.0/16"


def test_ipv6_address_block_and_range_are_accepted():
    assert parse_ip_range("2001:DB8::1").text == "2001:db8::1"
    block = parse_ip_range("2001:db8::/32")
    assert block.family == 6 and block.size == 2**96
    assert parse_ip_range("2001:db8::1-2001:db8::ff").text == "2001:db8::1-2001:db8::ff"


def test_ipv4_mapped_ipv6_text_is_stored_as_ipv4():
    assert parse_ip_range("::ffff:192.0.2.7") == v4("192.0.2.7")
    assert parse_ip_range("::ffff:192.0.2.0/120").text == "192.0.2.0/24"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "Enter an IP address"),
        ("   ", "Enter an IP address"),
        ("example.com", "is not a valid IPv4 or IPv6 address"),
        ("256.1.1.1", "is not a valid IPv4 or IPv6 address"),
        ("192.0.2.7/24", "did you mean 192.0.2.0/24?"),
        ("192.0.2.0/33", "an IPv4 prefix is at most /32"),
        ("2001:db8::/129", "an IPv6 prefix is at most /128"),
        ("192.0.2.0/", "prefix length after / must be a number"),
        ("192.0.2.9-192.0.2.1", "the first address is after the last one"),
        ("192.0.2.1-2001:db8::1", "both ends of a range must be IPv4, or both IPv6"),
        ("1.1.1.1-1.1.1.2-1.1.1.3", "two addresses separated by one -"),
        ("10.0.0.0/8-10.0.0.9", "not both"),
        ("fe80::1%eth0", "zone indexes"),
        ("1" * 200, "too long"),
    ],
)
def test_bad_ip_or_range_text_says_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        parse_ip_range(text)
    assert message in validate_ip_range(text)


def test_valid_text_passes_the_form_check():
    assert validate_ip_range("198.51.100.0/24") is None


def test_ranges_overlap_only_within_one_family_and_when_they_share_an_address():
    a = parse_ip_range("10.0.0.0-10.0.0.10")
    assert overlaps(a, parse_ip_range("10.0.0.10-10.0.0.20"))
    assert not overlaps(a, parse_ip_range("10.0.0.11-10.0.0.20"))
    assert overlaps(parse_ip_range("10.0.0.0/8"), parse_ip_range("10.9.9.9"))
    assert not overlaps(parse_ip_range("::/0"), parse_ip_range("0.0.0.0/0"))


def test_client_address_is_found_in_its_range():
    index = RangeIndex([(parse_ip_range("192.0.2.0/24"), 1)])
    assert index.lookup("192.0.2.200") == 1
    assert index.lookup("192.0.3.1") is None
    assert parse_ip_range("192.0.2.0/24").contains("192.0.2.9")


def test_most_specific_range_wins_over_the_wider_one_around_it():
    index = RangeIndex([
        (parse_ip_range("10.0.0.0/8"), "wide"),
        (parse_ip_range("10.1.0.0/16"), "middle"),
        (parse_ip_range("10.1.2.3"), "host"),
    ])
    assert index.lookup("10.1.2.3") == "host"
    assert index.lookup("10.1.2.4") == "middle"
    assert index.lookup("10.2.0.1") == "wide"
    assert index.lookup("11.0.0.1") is None


def test_wider_range_resumes_after_a_nested_range_ends():
    index = RangeIndex([
        (parse_ip_range("10.0.0.0-10.0.0.100"), 1),
        (parse_ip_range("10.0.0.10-10.0.0.20"), 2),
    ])
    assert [index.lookup(f"10.0.0.{n}") for n in (9, 10, 20, 21, 100, 101)] == [
        1, 2, 2, 1, 1, None,
    ]


def test_partly_overlapping_ranges_give_each_address_to_the_smaller_one():
    index = RangeIndex([
        (parse_ip_range("10.0.0.0-10.0.0.50"), "big"),
        (parse_ip_range("10.0.0.40-10.0.0.60"), "small"),
    ])
    assert index.lookup("10.0.0.39") == "big"
    assert index.lookup("10.0.0.45") == "small"
    assert index.lookup("10.0.0.60") == "small"


def test_equal_ranges_go_to_the_lower_user_id_whatever_the_order():
    r = parse_ip_range("10.0.0.0/24")
    assert RangeIndex([(r, 7), (r, 3)]).lookup("10.0.0.1") == 3
    assert RangeIndex([(r, 3), (r, 7)]).lookup("10.0.0.1") == 3


def test_ipv4_mapped_client_address_matches_an_ipv4_range():
    index = RangeIndex([(parse_ip_range("192.0.2.0/24"), 5)])
    assert index.lookup("::ffff:192.0.2.9") == 5
    assert parse_client_ip("::ffff:192.0.2.9") == (4, int(ipaddress.IPv4Address("192.0.2.9")))


def test_ipv6_client_does_not_match_an_ipv4_range_with_the_same_number():
    index = RangeIndex([(IpRange(4, 0, 2**32 - 1), 1), (parse_ip_range("2001:db8::/64"), 2)])
    assert index.lookup("::5") is None
    assert index.lookup("2001:db8::abcd") == 2
    assert index.lookup("2001:db8:0:1::1") is None


def test_non_ip_peer_matches_nothing():
    index = RangeIndex([(parse_ip_range("0.0.0.0/0"), 1)])
    assert index.lookup("/run/proxy.sock") is None
    assert index.lookup("") is None


def test_index_of_a_hundred_thousand_ranges_agrees_with_a_linear_scan():
    rng = random.Random(20240601)
    entries = []
    for user_id in range(100_000):
        prefix = rng.randint(12, 32)
        size = 1 << (32 - prefix)
        first = rng.getrandbits(32) // size * size
        entries.append((IpRange(4, first, first + size - 1), user_id))
    index = RangeIndex(entries)
    assert len(index) == 100_000
    probes = [rng.getrandbits(32) for _ in range(200)]
    probes += [r.first for r, _ in entries[:100]] + [r.last + 1 for r, _ in entries[:100]]
    for probe in probes:
        if probe >= 2**32:
            continue
        holders = [(r.size, u) for r, u in entries if r.first <= probe <= r.last]
        expected = min(holders)[1] if holders else None
        assert index.lookup(str(ipaddress.IPv4Address(probe))) == expected


def test_range_bounds_must_be_ordered_and_inside_the_family():
    with pytest.raises(ValueError):
        IpRange(4, 10, 9)
    with pytest.raises(ValueError):
        IpRange(4, 0, 2**32)
    with pytest.raises(ValueError):
        IpRange(5, 0, 1)


# -- tenancy rules (DESIGN.md "Tenancy") -------------------------------------------------------

@pytest.mark.parametrize("text", ["0.0.0.0/0", "::/0", "0.0.0.0-255.255.255.255",
                                  "::ffff:0.0.0.0/96",
                                  "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"])
def test_the_whole_address_space_is_an_open_relay(text):
    assert "open relay" in whole_space_problem(parse_ip_range(text))


@pytest.mark.parametrize("text", ["0.0.0.0/1", "128.0.0.0/1", "::/1",
                                  "0.0.0.1-255.255.255.255"])
def test_less_than_the_whole_space_is_not_refused_by_that_rule(text):
    assert whole_space_problem(parse_ip_range(text)) is None


@pytest.mark.parametrize(("text", "too_wide"), [
    ("192.0.2.0/24", False), ("192.0.2.0/23", True), ("192.0.2.0-192.0.2.255", False),
    ("192.0.2.1-192.0.3.0", False), ("192.0.2.0-192.0.3.0", True),
    ("2001:db8::/48", False), ("2001:db8::/47", True),
    ("192.0.2.7", False), ("::1", False)])
def test_a_customers_range_is_capped_per_family(text, too_wide):
    problem = width_problem(parse_ip_range(text), {4: 24, 6: 48})
    assert (problem is not None) is too_wide


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("192.0.2.0/24", "192.0.2.7", True), ("192.0.2.7", "192.0.2.0/24", True),
    ("192.0.2.0/24", "192.0.2.0/24", True), ("192.0.2.10-192.0.2.20", "192.0.2.15-192.0.2.30",
                                              False),
    ("192.0.2.0/24", "198.51.100.0/24", False), ("::/64", "0.0.0.0/8", False)])
def test_nested_means_one_range_lies_wholly_inside_the_other(a, b, expected):
    assert nested(parse_ip_range(a), parse_ip_range(b)) is expected
