"""The built-in spam scorer: GTUBE, each documented rule, the threshold, malformed input."""

from __future__ import annotations

import base64
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring.spam import GTUBE, RULE_SCORES, SpamVerdict, score_message

ONE_RCPT = ["bob@example.org"]


def build(*, sender="alice@example.com", subject="Minutes of Tuesday's meeting",
          body="Hi Bob,\nthe minutes are below.\n", html=None, drop=(), **headers) -> bytes:
    msg = EmailMessage()
    values = {"From": sender, "To": "bob@example.org", "Subject": subject,
              "Date": "Sun, 29 Nov 2026 10:00:00 +0000", "Message-ID": "<m1@example.com>"}
    values.update({k.replace("_", "-"): v for k, v in headers.items()})
    for name, value in values.items():
        if name not in drop:
            msg[name] = value
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg.as_bytes()


def score(raw, mail_from="alice@example.com", rcpt_tos=ONE_RCPT, **kw) -> SpamVerdict:
    return score_message(raw, mail_from=mail_from, rcpt_tos=rcpt_tos, **kw)


def test_ordinary_message_scores_zero():
    assert score(build()) == SpamVerdict(False, 0.0, (), "builtin")


def test_gtube_in_the_body_is_spam_with_score_1000():
    verdict = score(build(body=f"test\n{GTUBE.decode()}\n"))
    assert verdict == SpamVerdict(True, 1000.0, ("GTUBE",))


def test_gtube_hidden_in_base64_text_is_found():
    encoded = base64.b64encode(b"hello " + GTUBE + b" bye").decode()
    raw = (b"From: alice@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/alternative; boundary=\"zz\"\r\n\r\n--zz\r\n"
           b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + encoded.encode() + b"\r\n--zz--\r\n")
    assert GTUBE not in raw
    assert score(raw).rules == ("GTUBE",)


def test_gtube_is_spam_whatever_the_threshold():
    assert score(build(body=GTUBE.decode()), threshold=5000).is_spam


def test_from_header_of_another_domain_than_the_envelope_is_flagged():
    verdict = score(build(sender="ceo@bank.example"), mail_from="mailer@example.com")
    assert verdict.rules == ("FROM_ENVELOPE_MISMATCH",)
    assert verdict.score == RULE_SCORES["FROM_ENVELOPE_MISMATCH"]


def test_subdomain_of_the_envelope_domain_is_not_forged():
    assert score(build(sender="news@mail.example.com"), mail_from="bounce@example.com").rules == ()


def test_null_envelope_sender_is_not_compared():
    assert score(build(sender="mailer-daemon@example.net"), mail_from="").rules == ()


def test_missing_from_header_is_flagged():
    assert score(build(drop=("From",))).rules == ("MISSING_FROM",)


@pytest.mark.parametrize("link", ["https://bit.ly/3xYz", "http://TinyURL.com/abc",
                                  "https://www.t.co/x?y=1", "https://user@is.gd:443/q"])
def test_link_through_a_url_shortener_is_flagged(link):
    assert score(build(body=f"Look: {link}\n")).rules == ("URL_SHORTENER",)


def test_shortener_name_inside_another_host_is_not_flagged():
    assert score(build(body="See https://notbit.ly.example.com/x\n")).rules == ()


def test_link_to_a_numeric_ip_is_flagged():
    assert score(build(body="Login at http://203.0.113.9/bank\n")).rules == ("URL_NUMERIC_IP",)


def test_all_caps_subject_is_flagged_but_short_acronyms_are_not():
    assert score(build(subject="URGENT: CLAIM YOUR PRIZE NOW")).rules == ("SUBJECT_ALL_CAPS",)
    assert score(build(subject="FYI: Q3 KPI")).rules == ()
    assert score(build(subject="=?utf-8?q?GRATIS_F=C3=9CR_SIE?=")).rules == (
        "SUBJECT_ALL_CAPS",)


def test_many_recipients_with_a_single_link_is_flagged():
    crowd = [f"user{i}@example.org" for i in range(20)]
    raw = build(body="Offer: https://shop.example.net/deal\n",
                html='<a href="https://shop.example.net/deal">deal</a>')
    assert score(raw, rcpt_tos=crowd).rules == ("MANY_RCPTS_ONE_LINK",)
    assert score(raw, rcpt_tos=crowd[:19]).rules == ()


def test_many_recipients_with_several_links_is_a_newsletter_not_a_lure():
    crowd = [f"user{i}@example.org" for i in range(30)]
    raw = build(body="https://example.com/a https://example.com/b\n")
    assert score(raw, rcpt_tos=crowd).rules == ()


def test_missing_date_message_id_and_subject_are_each_flagged():
    verdict = score(build(drop=("Date", "Message-ID", "Subject")))
    assert verdict.rules == ("MISSING_DATE", "MISSING_MESSAGE_ID", "MISSING_SUBJECT")
    assert verdict.score == 2.5


def test_rules_add_up_to_spam_at_the_threshold():
    raw = build(sender="support@paypa1.example", subject="ACCOUNT SUSPENDED TODAY",
                body="Verify: https://bit.ly/verify-now\n", drop=("Message-ID",))
    verdict = score(raw, mail_from="bulk@example.com")
    assert verdict.rules == ("FROM_ENVELOPE_MISMATCH", "URL_SHORTENER", "SUBJECT_ALL_CAPS",
                             "MISSING_MESSAGE_ID")
    assert (verdict.score, verdict.is_spam) == (6.0, True)
    assert not score(raw, mail_from="bulk@example.com", threshold=6.5).is_spam


def test_links_in_quoted_printable_html_are_decoded_before_matching():
    raw = (b"From: alice@example.com\r\nSubject: Hello there\r\nDate: x\r\nMessage-ID: <a@b>\r\n"
           b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
           b"<a href=3D\"https://bi=\r\nt.ly/abc\">x</a>\r\n")
    assert score(raw).rules == ("URL_SHORTENER",)


@pytest.mark.parametrize("raw", [
    b"", b"\r\n\r\n", b"garbage without headers", b"\xff\xfe\x00" * 100,
    b"Content-Type: multipart/mixed; boundary=\"\"\r\n\r\n--\r\n--\r\n",
    b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64===\r\n",
    b"Subject: =?utf-8?b?////?=\r\nFrom: <<<@@@>>>\r\n\r\nhttp://[::1\r\n",
    b"Content-Type: multipart/mixed; boundary=a\r\n\r\n"
    + b"--a\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n" * 5000,
])
def test_malformed_messages_get_a_verdict_not_an_exception(raw):
    verdict = score(raw, mail_from="<>", rcpt_tos=[])
    assert isinstance(verdict, SpamVerdict)
    assert set(verdict.rules) <= set(RULE_SCORES)


@settings(max_examples=50, deadline=None, database=None)
@given(raw=st.binary(max_size=4096), mail_from=st.text(max_size=80),
       rcpts=st.lists(st.text(max_size=40), max_size=25))
def test_arbitrary_bytes_and_envelopes_never_raise(raw, mail_from, rcpts):
    verdict = score_message(raw, mail_from=mail_from, rcpt_tos=rcpts)
    assert verdict.score == sum(RULE_SCORES[rule] for rule in verdict.rules)


def _from_domain_by_the_email_package(value: str):
    """What _from_domain gave before its shortcut: the e-mail package's address parser."""
    from email.utils import getaddresses

    from scoring.newdomains import registrable_domain

    for _, address in getaddresses([value[:2048]]):
        if "@" in address:
            domain = registrable_domain(address)
            if domain is not None:
                return domain
    return None


_NAME = st.text(alphabet=st.sampled_from("Ab zé.'-_9\"()<>,;:@\\[]\t\x00\r\n\x7f"),
               max_size=12)
_PART = st.text(alphabet=st.sampled_from("ab.Z9-+_=!#$%&'*/?^`{|}~é\"()<>,;:@\\[] "),
                min_size=1, max_size=10)


@settings(max_examples=500, deadline=None)
@given(_NAME, _PART, st.sampled_from(["example.com", "shop.example.co.uk", "github.io",
                                      "b", "EXAMPLE.org.", "xn--bcher-kva.example", "1.2.3.4",
                                      "[127.0.0.1]", "bücher.example", "a..b.com"]),
       st.sampled_from(["{name} <{addr}>", "{name}<{addr}>", "{addr}", "<{addr}>",
                        " {addr} ", "{name} <{addr}> ", "{name} {addr}", "  {name} <{addr}>",
                        "\t{addr}\r\n", "{name} <{addr}>, {addr}"]))
def test_the_from_domain_shortcut_gives_what_the_email_package_gives(name, local, domain,
                                                                      form):
    from scoring.spam import _from_domain

    value = form.format(name=name, addr=f"{local}@{domain}")
    assert _from_domain({"from": [value]}) == _from_domain_by_the_email_package(value)


@pytest.mark.parametrize("value", [
    "", " " * 5000, " " * 2047 + "<", "a" * 5000 + "@example.com",
    "x" * 2040 + " <alice@example.com>",  # the address falls past the 2,048 read
    "Alice <alice@example.com>" + " " * 5000, "Al\x00ice <alice@exa\x00mple.com>",
    "<alice@example.com\r\n>", "Alice <alice@@example.com>", "=?utf-8?q?A?= <a@example.com>",
])
def test_a_hostile_from_gets_what_the_email_package_gives(value):
    from scoring.spam import _from_domain

    assert _from_domain({"from": [value]}) == _from_domain_by_the_email_package(value)
