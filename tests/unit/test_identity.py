"""Identity extraction by envelope sender, authentication user or headers (RE2 only)."""

import pytest

from scoring.identity import (
    MAX_IDENTITY,
    MAX_PATTERN,
    HeaderRule,
    compile_rules,
    extract_identity,
    validate_header_name,
    validate_regex,
)

NO_RULES = compile_rules([])


def by_header(headers, rules):
    return extract_identity(
        "header", mail_from="bounce@example.com", auth_user="smarthost",
        headers=headers, rules=compile_rules(rules),
    )


def test_envelope_sender_method_uses_mail_from():
    result = extract_identity(
        "envelope_sender", mail_from=" alice@example.com ", auth_user="relay",
        headers=[("X-Client-ID", "42")], rules=NO_RULES,
    )
    assert (result.value, result.source, result.remove_headers) == (
        "alice@example.com", "envelope_sender", (),
    )


def test_null_envelope_sender_gives_no_identity():
    result = extract_identity(
        "envelope_sender", mail_from="", auth_user=None, headers=[], rules=NO_RULES
    )
    assert result.value is None


def test_auth_user_method_uses_the_login():
    result = extract_identity(
        "auth_user", mail_from="a@example.com", auth_user="customer-17", headers=[],
        rules=NO_RULES,
    )
    assert (result.value, result.source) == ("customer-17", "auth_user")


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown identification method"):
        extract_identity("guess", mail_from="", auth_user=None, headers=[], rules=NO_RULES)


def test_whole_header_value_is_the_identity_and_name_matches_any_case():
    result = by_header([("x-client-id", "  cust-42  ")], [("X-Client-ID", None, False)])
    assert (result.value, result.source) == ("cust-42", "header:X-Client-ID")


def test_regex_first_group_is_the_identity():
    result = by_header(
        [("X-Mailer-Info", "app=shop; account=acme-7; v=2")],
        [("X-Mailer-Info", r"account=([\w-]+)", False)],
    )
    assert result.value == "acme-7"


def test_regex_without_group_uses_the_whole_match():
    result = by_header([("X-User", "id 12345 here")], [("X-User", r"\d+", False)])
    assert result.value == "12345"


def test_rules_are_tried_in_order_and_the_first_match_wins():
    headers = [("X-Second", "second"), ("X-First", "first")]
    result = by_header(headers, [("X-First", None, False), ("X-Second", None, False)])
    assert result.value == "first"


def test_rule_whose_regex_does_not_match_falls_through_to_the_next():
    headers = [("X-Client-ID", "anonymous"), ("X-Account", "acct-9")]
    rules = [("X-Client-ID", r"^id-(\d+)$", False), ("X-Account", None, False)]
    result = by_header(headers, rules)
    assert (result.value, result.source) == ("acct-9", "header:X-Account")


def test_later_occurrence_of_the_same_header_is_tried_when_the_first_does_not_match():
    headers = [("X-Tag", "nothing"), ("X-Tag", "id-5")]
    assert by_header(headers, [("X-Tag", r"id-(\d+)", False)]).value == "5"


def test_empty_or_blank_header_gives_no_identity():
    result = by_header([("X-Client-ID", "   ")], [("X-Client-ID", None, False)])
    assert (result.value, result.source) == (None, "header")


def test_group_that_did_not_take_part_gives_no_identity():
    result = by_header([("X-Id", "plain")], [("X-Id", r"plain(-\d+)?", False)])
    assert result.value is None


def test_missing_header_gives_no_identity():
    assert by_header([("Subject", "hi")], [("X-Client-ID", None, True)]).value is None


def test_identity_is_capped_at_255_characters():
    result = by_header([("X-Id", "a" * 1000)], [("X-Id", None, False)])
    assert result.value == "a" * MAX_IDENTITY


def test_folded_and_control_characters_do_not_reach_the_identity():
    result = by_header([("X-Id", "cust\r\n 42\x00\tx")], [("X-Id", None, False)])
    assert result.value == "cust 42  x"


def test_undecodable_bytes_in_a_header_still_give_an_identity():
    value = b"id=\xff7".decode("utf-8", "surrogateescape")
    result = by_header([("X-Id", value)], [("X-Id", r"id=(.+)", False)])
    assert result.value == "\ufffd7"


def test_header_marked_remove_is_listed_for_removal_once():
    headers = [("X-Client-ID", "42"), ("x-client-id", "42")]
    result = by_header(headers, [("X-Client-ID", None, True)])
    assert result.value == "42"
    assert result.remove_headers == ("X-Client-ID",)


def test_header_marked_remove_is_removed_even_when_another_rule_found_the_identity():
    headers = [("X-Account", "acct-1"), ("X-Internal", "secret")]
    rules = [("X-Account", None, False), ("X-Internal", None, True)]
    result = by_header(headers, rules)
    assert result.value == "acct-1"
    assert result.remove_headers == ("X-Internal",)


def test_header_not_marked_remove_is_kept():
    assert by_header([("X-Id", "7")], [("X-Id", None, False)]).remove_headers == ()


def test_copies_of_the_header_naming_different_senders_give_no_identity():
    """A sender that adds its own copy above (or below) the trusted one would choose its
    identity, a locked one's way out: copies that disagree are a conflict, not a choice."""
    rules = [("X-Customer", None, True)]
    two = by_header([("X-Customer", "anything-else"), ("X-Customer", "spammer")], rules)
    assert (two.value, two.conflicting) == (None, ("anything-else", "spammer"))
    assert two.remove_headers == ("X-Customer",)
    same = by_header([("X-Customer", "Spammer"), ("X-Customer", " spammer")], rules)
    assert (same.value, same.conflicting) == ("spammer", ())
    unmatched = by_header([("X-Id", "none"), ("X-Id", "id-7")], [("X-Id", r"^id-(\d+)$", False)])
    assert (unmatched.value, unmatched.conflicting) == ("7", ())


def test_rules_accept_header_rule_objects():
    rules = compile_rules([HeaderRule("X-Id", r"(\d+)", True)])
    result = extract_identity(
        "header", mail_from="", auth_user=None, headers=[("X-ID", "n 8")], rules=rules
    )
    assert (result.value, result.remove_headers) == ("8", ("X-Id",))


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"(a)\1", "backreferences"),
        (r"(?=x)abc", "lookahead"),
        (r"a(?!b)", "negative lookahead"),
        (r"(?<=a)b", "lookbehind"),
        (r"(?P<n>a)(?P=n)", "named backreferences"),
        (r"a{2000}", "at most {1000}"),
        (r"[", "missing ]"),
        (r"a++", "not supported"),
    ],
)
def test_non_re2_or_invalid_regex_is_rejected_with_a_reason(pattern, message):
    problem = validate_regex(pattern)
    assert problem is not None and message in problem
    with pytest.raises(ValueError, match="identification header 1"):
        compile_rules([("X-Id", pattern, False)])


def test_overlong_regex_is_rejected():
    assert "too long" in validate_regex("a" * (MAX_PATTERN + 1))


def test_regex_whose_program_is_too_big_is_rejected():
    assert "too large" in validate_regex(r"[\p{L}\d]{1000}")


def test_catastrophic_backtracking_pattern_is_harmless_under_re2():
    # (a+)+$ stalls a backtracking engine on "aaaa...b"; RE2 answers in linear time.
    assert validate_regex(r"(a+)+$") is None
    result = by_header([("X-Id", "a" * 50_000 + "b")], [("X-Id", r"(a+)+$", False)])
    assert result.value is None


def test_valid_re2_regex_and_empty_regex_pass_the_form_check():
    assert validate_regex(r"(?i)^id=(?P<id>[a-z0-9-]+)$") is None
    assert validate_regex("") is None


@pytest.mark.parametrize("name", ["", "  ", "X Client", "X-Id:", "Ñame", "x" * 101])
def test_bad_header_name_is_rejected(name):
    assert validate_header_name(name) is not None
    with pytest.raises(ValueError):
        compile_rules([(name, None, False)])


def test_good_header_name_passes_the_form_check():
    assert validate_header_name("X-Client-ID") is None


def test_identities_are_lower_cased_by_every_method():
    from scoring.identity import normalise_identity

    assert extract_identity("envelope_sender", mail_from="Alice@Example.COM", auth_user=None,
                            headers=[], rules=NO_RULES).value == "alice@example.com"
    assert extract_identity("auth_user", mail_from="", auth_user="Customer-17", headers=[],
                            rules=NO_RULES).value == "customer-17"
    assert by_header([("X-Id", "ACME")], [("X-Id", None, False)]).value == "acme"
    assert normalise_identity("  ") is None
    assert len(normalise_identity("\u0130" * 300)) <= MAX_IDENTITY


def test_one_bad_stored_rule_is_left_out_and_the_others_still_work():
    from scoring.identity import compile_usable_rules

    rules, problems = compile_usable_rules([("X-Bad", "(?<=x)y", False),
                                            ("X-Good", r"id-(\d+)", True)])
    assert [r.header_name for r in rules.rules] == ["X-Good"]
    assert len(problems) == 1 and problems[0].startswith("identification header 1:")
    result = extract_identity("header", mail_from="", auth_user=None,
                              headers=[("X-Good", "id-7")], rules=rules)
    assert result.value == "7"
