"""``parse_headers`` (what policy looks at: the identity header) and ``remove_headers`` (what
is taken out before relaying) must agree on what a header field is, or the field that was
checked is not the field that is removed: an indented first line was a field to one and a
fold of the proxy's Received: field to the other, and leaked."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from scoring.message import line_not_a_field, parse_headers, remove_headers, starts_folded

TRACE = b"Received: from client.example.com by proxy.example.net; Mon, 30 Nov 2026\r\n"
NAMES = ["X-Secret", "x-secret", "X-Other", "From", "", "X Secret"]


def names(raw: bytes) -> list[str]:
    return [name for name, _ in parse_headers(raw)]


def test_an_indented_first_line_is_no_field_and_the_message_starts_folded():
    raw = b" X-Secret: customer-4711\r\nFrom: a@example.com\r\n\r\nbody\r\n"
    assert starts_folded(raw) and starts_folded(b"\t" + raw[1:])
    assert names(raw) == ["From"]
    assert not starts_folded(b"From: a@example.com\r\n\r\n")


def test_a_line_that_is_no_field_is_found_and_folds_and_obsolete_spacing_are_fields():
    fine = (b"From: a@example.com\r\nSubject \t: obsolete but valid\r\n folded\r\n"
            b"\tmore\r\n\r\nno colon in the body\r\n")
    assert line_not_a_field(fine) is None
    assert line_not_a_field(b"\r\nbody without header\r\n") is None
    for bad in (b"garbage line", b"X Secret: spaced name", b": nameless", b"Subj\xc3\xa9ct: hi",
                b"From a@example.com Mon Nov 30 10:00:00 2026", b"X-\x00: nul"):
        raw = b"From: a@example.com\r\n" + bad + b"\r\nX-Secret: b\r\n\r\nbody\r\n"
        assert line_not_a_field(raw) == bad
    assert line_not_a_field(b"text without any header line\r\n") == (
        b"text without any header line")


def test_folds_belong_to_the_field_above_them_and_go_with_it():
    raw = (b"X-Secret: customer-\r\n 4711\r\n\t gold\r\nFrom: a@example.com\r\n"
           b"\r\n body stays\r\n")
    assert parse_headers(raw)[0] == ("X-Secret", "customer- 4711 gold")
    assert remove_headers(raw, {"x-secret"}) == b"From: a@example.com\r\n\r\n body stays\r\n"


def test_folds_under_a_line_without_a_colon_belong_to_that_line_not_the_field_before():
    raw = b"X-Secret: a\r\ngarbage line\r\n more\r\nFrom: a@example.com\r\n\r\n"
    assert parse_headers(raw) == [("X-Secret", "a"), ("From", "a@example.com")]
    assert remove_headers(raw, {"X-Secret"}) == (
        b"garbage line\r\n more\r\nFrom: a@example.com\r\n\r\n")


def test_an_empty_name_is_a_field_named_empty_to_both():
    raw = b": nameless\r\nFrom: a@example.com\r\n\r\n"
    assert parse_headers(raw)[0] == ("", "nameless")
    assert remove_headers(raw, {"X-Secret"}) == raw


def test_removing_every_field_leaves_the_body_as_it_was():
    raw = b"X-Secret: a\r\n\r\nbody\r\n"
    assert remove_headers(raw, {"X-Secret"}) == b"\r\nbody\r\n"
    assert remove_headers(b"\r\n" + b"body\r\n", {"X-Secret"}) == b"\r\nbody\r\n"


header_lines = st.one_of(
    st.builds(lambda name, value: f"{name}: {value}".encode(), st.sampled_from(NAMES),
              st.text(alphabet="ab: \t", max_size=8)),
    st.builds(lambda lead, text: lead + text.encode(), st.sampled_from([b" ", b"\t"]),
              st.text(alphabet="ab:X-Secret \t", max_size=12)),
    st.text(alphabet="abX-Secret \t", max_size=12).map(str.encode),  # no colon
    st.just(b"X-Secret : spaced"),
)


@given(lines=st.lists(header_lines, max_size=10), wanted=st.sampled_from(NAMES))
def test_what_remove_headers_leaves_is_what_parse_headers_saw_less_the_removed_fields(
        lines, wanted):
    raw = b"".join(line + b"\r\n" for line in lines) + b"\r\nbody\r\n"
    removed = remove_headers(raw, {wanted})
    assert parse_headers(removed) == [
        (name, value) for name, value in parse_headers(raw) if name.lower() != wanted.lower()]
    assert removed.endswith(b"\r\n\r\nbody\r\n") or removed == b"\r\nbody\r\n"
    if not starts_folded(raw):
        # The proxy prepends its trace field to every message it accepts: that changes
        # nothing of what either function sees below it.
        assert parse_headers(TRACE + raw)[1:] == parse_headers(raw)
        assert remove_headers(TRACE + raw, {wanted}) == (
            TRACE + removed if wanted.lower() != "received" else removed)
