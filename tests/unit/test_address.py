"""The canonical spelling of a mailbox: needless quoting never makes another sender."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scoring.address import (
    a_label_mailbox,
    canonical_domain,
    canonical_mailbox,
    mailbox_domain,
    split_mailbox,
)
from scoring.identity import extract_identity, normalise_identity

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-é"
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=8)
dot_strings = st.lists(atoms, min_size=1, max_size=4).map(".".join)
# What a quoted string may hold (RFC 5321 qtextSMTP and quoted-pair's printable ASCII).
quoted_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                      max_size=12)
domains = st.sampled_from(["a.test", "Example.COM", "[192.0.2.1]", "bücher.example"])


def quote(text: str, escape_all: st.DataObject) -> str:
    """``text`` as a quoted string, each character escaped or not as Hypothesis chooses
    (``\\`` and ``"`` always)."""
    out = []
    for c in text:
        if c in '\\"' or escape_all.draw(st.booleans()):
            out.append("\\" + c)
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


@pytest.mark.parametrize("given_address, expected", [
    ('"locked"@a.test', "locked@a.test"),
    ('"lock\\ed"@a.test', "locked@a.test"),
    ('"first.last"@a.test', "first.last@a.test"),
    ('"a b"@a.test', '"a b"@a.test'),  # not a dot-string: another mailbox, quotes kept
    ('"a\\ b"@a.test', '"a b"@a.test'),
    ('"a..b"@a.test', '"a..b"@a.test'),
    ('".a"@a.test', '".a"@a.test'),
    ('"x@evil.test"@a.test', '"x@evil.test"@a.test'),
    ('"a\\"b"@a.test', '"a\\"b"@a.test'),
    ('"a\\\\b"@a.test', '"a\\\\b"@a.test'),
    ('""@a.test', '""@a.test'),
    ("plain@a.test", "plain@a.test"),
    ("<>", "<>"),
    ("customer-17", "customer-17"),
    ('"unterminated@a.test', '"unterminated@a.test'),
    ('"a"b@a.test', '"a"b@a.test'),
])
def test_needless_quoting_is_removed_and_needed_quoting_kept(given_address, expected):
    assert canonical_mailbox(given_address) == expected


@given(dot_strings, domains, st.data())
def test_a_quoted_dot_string_is_the_same_mailbox_as_the_plain_one(local, domain, draw):
    plain = f"{local}@{canonical_domain(domain)}"
    assert canonical_mailbox(f"{quote(local, draw)}@{domain}") == plain
    assert normalise_identity(f"{quote(local, draw)}@{domain}") == normalise_identity(plain)


@given(quoted_text, domains, st.data())
def test_every_spelling_of_a_quoted_local_part_has_one_canonical_form(text, domain, draw):
    one = canonical_mailbox(f"{quote(text, draw)}@{domain}")
    assert canonical_mailbox(f"{quote(text, draw)}@{domain}") == one
    assert canonical_mailbox(one) == one  # idempotent
    assert split_mailbox(one) is not None
    assert mailbox_domain(one) == canonical_domain(domain).lower()


@given(quoted_text, quoted_text, domains, st.data())
def test_different_local_parts_stay_different(one, two, domain, draw):
    if one != two:
        assert canonical_mailbox(f"{quote(one, draw)}@{domain}") != \
            canonical_mailbox(f"{quote(two, draw)}@{domain}")


def test_identities_from_the_envelope_and_from_headers_drop_needless_quotes():
    from scoring.identity import compile_rules

    assert extract_identity("envelope_sender", mail_from='"Lock\\ed"@A.test', auth_user=None,
                            headers=[], rules=compile_rules([])).value == "locked@a.test"
    found = extract_identity("header", mail_from="", auth_user=None,
                             headers=[("From", 'Mallory <"locked"@a.test>')],
                             rules=compile_rules([("From", "<([^>]+)>", False)]))
    assert found.value == "locked@a.test"


@pytest.mark.parametrize(("address", "canonical"), [
    ("bob@b\u00fccher.example", "bob@xn--bcher-kva.example"),
    ("bob@B\u00dcCHER.example", "bob@xn--bcher-kva.example"),
    ("bob@xn--bcher-kva.example", "bob@xn--bcher-kva.example"),
    ("bob@\uff41.example", "bob@a.example"),  # a full-width a: nameprep maps it
    ('"bob"@b\u00fccher.example', "bob@xn--bcher-kva.example"),
    ("Bob@Example.COM", "Bob@Example.COM"),  # ASCII case: the callers' to fold
    ("bob@a..\u00fc", "bob@a..\u00fc"),  # no valid IDN: as it is
    ("bob@[192.0.2.1]", "bob@[192.0.2.1]"),
])
def test_the_domain_is_spelled_in_its_a_label_form(address, canonical):
    assert canonical_mailbox(address) == canonical


@given(st.text(max_size=300), st.text(min_size=1, max_size=300))
def test_any_text_gets_one_canonical_form_and_never_raises(local, domain):
    """Control characters, lone surrogates (8-bit header bytes), NUL, labels too long for
    IDNA, empty labels: the domain is mapped or kept, never an error, and mapping twice
    changes nothing more."""
    once = canonical_mailbox(f"{local}@{domain}")
    assert canonical_mailbox(once) == once
    assert canonical_domain(canonical_domain(domain)) == canonical_domain(domain)


@pytest.mark.parametrize("domain, a_label", [
    ("straße.de", "xn--strae-oqa.de"),  # a domain of its own, not strasse.de
    ("STRAßE.de", "xn--strae-oqa.de"),
    ("ὀδυσσεύς.gr", "xn--pxac3bcak3d8526a.gr"),  # final sigma kept (IDNA 2003 made it σ)
    ("ＢÜＣＨＥＲ。de", "xn--bcher-kva.de"),  # full-width mapped, case folded
    ("ex\u200dample.com", "example.com"),  # a zero-width joiner out of context: dropped
    ("☃.net", "xn--n3h.net"),  # a symbol IDNA 2008 refuses: IDNA 2003's form, as before
])
def test_a_domain_is_mapped_as_registries_map_it(domain, a_label):
    assert canonical_domain(domain) == a_label


def test_strasse_and_strasse_with_eszett_are_two_domains_everywhere():
    from outgoing.users import normalise_domain
    from scoring.newdomains import registrable_domain

    assert normalise_domain("Straße.de") == "xn--strae-oqa.de" != normalise_domain("strasse.de")
    assert registrable_domain("bob@mail.straße.de") == "xn--strae-oqa.de"
    assert canonical_mailbox("bob@straße.de") != canonical_mailbox("bob@strasse.de")


def test_a_notice_address_keeps_its_local_part_and_spells_its_domain_in_a_label_form():
    assert a_label_mailbox("ops@Bücher.example") == "ops@xn--bcher-kva.example"
    assert a_label_mailbox("jürgen@bücher.example") == "jürgen@xn--bcher-kva.example"
    assert a_label_mailbox('"a b"@bücher.example') == '"a b"@xn--bcher-kva.example'
    assert a_label_mailbox("ops@example.com") == "ops@example.com"
    assert a_label_mailbox("<>") == "<>"
