"""Abuse reports must parse as RFC 5965 feedback reports with the original attached."""

import email
import email.policy
from datetime import UTC, datetime

from worker.arf import build_abuse_report

ORIGINAL = (
    b"From: Spammer <promo@shop.example.com>\r\n"
    b"To: victim@example.org\r\n"
    b"Subject: =?utf-8?q?Gro=C3=9Fe_Rabatte?=\r\n"
    b"Message-ID: <promo-1@shop.example.com>\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Kaufen Sie jetzt sch\xc3\xb6ne Dinge.\r\n"
    b"--not-a-boundary\r\n"
)


def _report(**overrides):
    fields = {
        "original": ORIGINAL,
        "reporter": "Abuse Desk <abuse@provider.example>",
        "to": "postmaster@shop.example.com",
        "mail_from": "promo@shop.example.com",
        "rcpt_tos": ["victim@example.org", "other@example.net"],
        "arrival": datetime(2025, 3, 4, 9, 15, tzinfo=UTC),
        "source_ip": "192.0.2.10",
        "reported_domain": "shop.example.com",
        "auth_results": "provider.example; auth=pass smtp.auth=shop.example.com",
        "reason": "5 messages classified as spam within 10 minutes",
    }
    fields.update(overrides)
    return build_abuse_report(**fields)


def _parse(raw):
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_report_is_multipart_report_of_three_parts():
    report = _parse(_report())

    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "feedback-report"
    assert [p.get_content_type() for p in report.iter_parts()] == [
        "text/plain", "message/feedback-report", "message/rfc822",
    ]
    assert report["From"] == "Abuse Desk <abuse@provider.example>"
    assert report["To"] == "postmaster@shop.example.com"


def test_feedback_fields_are_readable():
    fields = list(_parse(_report()).iter_parts())[1].get_payload(0)

    assert fields["Feedback-Type"] == "abuse"
    assert fields["User-Agent"] == "OutboundGuard/1.0"
    assert fields["Version"] == "1"
    assert fields["Original-Mail-From"] == "<promo@shop.example.com>"
    assert fields.get_all("Original-Rcpt-To") == ["<victim@example.org>", "<other@example.net>"]
    assert fields["Arrival-Date"] == "Tue, 04 Mar 2025 09:15:00 +0000"
    assert fields["Source-IP"] == "192.0.2.10"
    assert fields["Reported-Domain"] == "shop.example.com"
    assert fields["Authentication-Results"].startswith("provider.example; auth=pass")


def test_unknown_source_ip_and_auth_results_are_left_out():
    fields = list(_parse(_report(source_ip=None, auth_results=None)).iter_parts())[1]

    assert fields.get_payload(0)["Source-IP"] is None
    assert fields.get_payload(0)["Authentication-Results"] is None


def test_human_part_states_the_reason():
    text = list(_parse(_report()).iter_parts())[0].get_content()

    assert "5 messages classified as spam within 10 minutes" in text


def test_original_is_attached_byte_for_byte():
    raw = _report()
    attached = list(_parse(raw).iter_parts())[2].get_payload(0)

    assert ORIGINAL in raw
    assert attached["Subject"] == "Große Rabatte"
    assert attached["Message-ID"] == "<promo-1@shop.example.com>"


def test_report_uses_crlf_line_endings_only():
    raw = _report()

    assert b"\n" not in raw.replace(b"\r\n", b"")


def test_line_breaks_in_field_values_cannot_add_fields():
    raw = _report(auth_results="provider.example;\r\nFeedback-Type: not-spam")
    fields = list(_parse(raw).iter_parts())[1].get_payload(0)

    assert fields.get_all("Feedback-Type") == ["abuse"]


def test_big_original_is_reduced_to_its_headers():
    big = ORIGINAL + b"x" * 200 + b"\r\n"

    report = _parse(_report(original=big, max_original=len(ORIGINAL)))

    headers = list(report.iter_parts())[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    text = headers.get_content()
    assert "Message-ID: <promo-1@shop.example.com>" in text
    assert "Kaufen" not in text


def test_naive_arrival_is_taken_as_utc():
    raw = _report(arrival=datetime(2025, 3, 4, 9, 15))
    fields = list(_parse(raw).iter_parts())[1].get_payload(0)

    assert fields["Arrival-Date"] == "Tue, 04 Mar 2025 09:15:00 +0000"


def test_big_original_without_a_blank_line_is_not_included_whole_as_its_headers():
    """A message with no blank line after its header fields had its every byte taken for
    the header block: a report as large as the message it was to leave out, which the next
    hop may refuse for its size."""
    big = (b"Subject: no blank line follows\r\nFrom: promo@shop.example.com\r\n"
           + b"body text " * 10_000 + b"\r\n" + b"more body\r\n" * 10_000)

    raw = _report(original=big, max_original=1000)

    assert len(raw) < 10_000
    headers = list(_parse(raw).iter_parts())[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers.get_content() == ("Subject: no blank line follows\r\n"
                                     "From: promo@shop.example.com\r\n")


def test_huge_header_block_is_cut_at_whole_lines():
    big = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"y" * 60) for n in range(5000)) \
        + b"\r\nbody\r\n"

    raw = _report(original=big, max_original=2000)

    assert len(raw) < 6000
    text = list(_parse(raw).iter_parts())[2].get_content()
    assert text.startswith("X-Filler-0: ") and text.endswith("y\r\n")


def test_an_abuse_address_cannot_write_headers_into_the_report():
    """The address is stored as a domain admin typed it; set as it was, an encoded word in it
    decoded to CR LF and a header block (the job crashed on every try), or to other
    addresses; alerts' To handling names it exactly or not at all."""
    for to in ("=?utf-8?q?a=0D=0ABcc:_evil@attacker.test?=@shop.example.com",
               "=?utf-8?q?boss=40attacker.test=2C_x?=@shop.example.com",
               "postmaster@shop.example.com\r\nBcc: evil@attacker.test"):
        raw = _report(to=to)
        head = raw.split(b"\r\n\r\n", 1)[0]
        assert b"attacker" not in head, to
        report = _parse(raw)
        assert report["Bcc"] is None
        assert report["To"] == "undisclosed-recipients:;"
        assert report.get_content_type() == "multipart/report"


def test_a_plain_abuse_address_is_the_reports_to():
    assert _parse(_report(to='"desk, abuse"@shop.example.com'))["To"] == \
        '"desk, abuse"@shop.example.com'


def test_idn_envelope_addresses_are_reported_with_a_labels():
    """The feedback fields are SMTP paths in an ASCII part: a U-label domain goes in the
    A-label form the next hop was given."""
    fields = list(_parse(_report(mail_from="promo@bücher.example",
                                 rcpt_tos=["kunde@müller.example"])).iter_parts())[1]
    fields = fields.get_payload(0)
    assert fields["Original-Mail-From"] == "<promo@xn--bcher-kva.example>"
    assert fields.get_all("Original-Rcpt-To") == ["<kunde@xn--mller-kva.example>"]
    assert _parse(_report(mail_from="")).get_payload(1).get_payload(0)[
        "Original-Mail-From"] == "<>"
