"""The Outgoing User Settings page: labels, every setting saved, validation, audit, usage."""

from __future__ import annotations

import json
import re
import time

import pytest
from sqlalchemy import select

from outgoing.models import AuditEvent, DkimKey, Identity, LockTemplate, OutgoingUser
from outgoing.passwords import verify_password
from outgoing.redis_keys import user_limits
from scoring.limits import WINDOW_SECONDS, bucket_index
from tests.integration.test_panel_users import ROOT, ROOT_PW, Panel, text
from tests.support import data

PW = "Bob-pass-12345"

LABELS = {
    "ip": {"ip_range": "IP/Range", "shared_smarthost": "Shared smarthost"},  # super admin
    "user": {"username": "Username", "password": "Password",
             "confirm_password": "Confirm Password",
             "reauthenticate_permitted": "Re-authenticate permitted"},
    "domain": {"password": "Password", "confirm_password": "Confirm Password",
               "reauthenticate_permitted": "Re-authenticate permitted"},
}
COMMON_LABELS = {
    "domain": "Domain", "identification_method": "Identification Method",
    "automatic_lock": "Automatic lock",
    "lock_identities_automatically": "Lock Identities Automatically",
    "lock_timeout_minutes": "User and Identity Lock timeout",
    "maximum_unlocks_by_timeout": "Maximum unlocks by timeout",
    "lock_template_id": "Lock Template",
    "contact_email": "Contact email",
    "connection_limits_enabled": "Enable outgoing connection limits",
    "limit_per_month": "Limit per month", "limit_per_week": "Limit per week",
    "limit_per_day": "Limit per day", "limit_per_hour": "Limit per hour",
    "limit_per_minute": "Limit per minute", "dkim_selector": "DKIM Selector",
    "maximum_recipients_per_day": "Maximum number of recipients per day",
    "quarantine_response": "Quarantine Response",
    "message_archiving": "Message archiving for senders",
    "block_macro_attachments": "Block attachments with macros for senders",
    "block_unwanted_attachments": "Block potentially unwanted attachments",
    "reject_newly_registered_domains": "Reject messages from newly registered domains",
    "headers-0-header_name": "Header name", "headers-0-regex": "Regular expression",
    "headers-0-remove_header": "Remove header",
    "compromise_detection": "Compromise detection", "detection_shadow_mode": "Shadow mode",
    "detection_throttle_at": "Throttle at risk", "detection_hold_at": "Hold at risk",
    "detection_lock_at": "Lock at risk",
    "detection_throttle_rate": "Throttle rate (messages per minute)",
    "detection_new_sender_allowance": "New sender allowance (messages per hour)",
    "detection_release_pace": "Release pace (messages per minute)",
}


def settings(**overrides) -> dict:
    """A complete Save of the settings form; a False checkbox is simply not sent."""
    form = {"domain": "example.com", "identification_method": "envelope_sender",
            "automatic_lock": "y", "lock_identities_automatically": "y",
            "lock_timeout_minutes": "60", "maximum_unlocks_by_timeout": "3",
            "lock_template_id": "", "limit_per_month": "", "limit_per_week": "",
            "limit_per_day": "", "limit_per_hour": "", "limit_per_minute": "",
            "dkim_selector": "", "maximum_recipients_per_day": "",
            "quarantine_response": "reject", "reauthenticate_as": "none"}
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not False}


def load(user_id: int) -> OutgoingUser:
    def fetch(session):
        user = session.get(OutgoingUser, user_id)
        user.identification_headers  # noqa: B018 - load before the session closes
        return user
    return data.query(fetch)


@pytest.fixture
def root(app):
    data.add_admin(ROOT, ROOT_PW)
    return Panel(app.test_client()).login(ROOT, ROOT_PW)


@pytest.fixture
def bob(root):
    return data.add_user("example.com", "user", "bob@example.com", PW)


@pytest.fixture
def ip_user(root):
    return data.add_user("example.com", "ip", "192.0.2.0/24")


@pytest.mark.parametrize("kind, name, password", [
    ("ip", "192.0.2.0/24", None), ("user", "bob@example.com", PW),
    ("domain", "example.com", PW)])
def test_every_input_has_a_label_with_the_settings_exact_name(root, kind, name, password):
    user_id = data.add_user("example.com", kind, name, password)
    html = text(root.get(f"/outgoing/users/{user_id}"))
    labels = dict(re.findall(r'<label for="([^"]+)">([^<]+)</label>', html))
    inputs = {re.search(r'\bid="([^"]+)"', tag).group(1)
              for tag in re.findall(r"<(?:input|select|textarea)\b[^>]*>", html)
              if 'type="hidden"' not in tag} - {"q"}
    expected = {**COMMON_LABELS, **LABELS[kind]}
    if kind == "ip":
        expected["reauthenticate_as"] = "Re-authenticate as"
    assert {i: labels.get(i) for i in inputs} == expected
    assert 'id="ip_range"' not in html or "readonly" in re.search(
        r'<input[^>]*id="ip_range"[^>]*>', html).group(0)


def test_the_help_texts_carry_the_advice_on_headers_and_smarthosts(root, ip_user):
    html = text(root.get(f"/outgoing/users/{ip_user}"))
    assert "Header is recommended" in html
    assert "Leave off for an IP or range that is a shared smarthost" in html
    for option in ("Envelope Sender", "Authentication User", "Header", "Rejected (550)",
                   "Accepted (250)", "Do not re-authenticate",
                   "Authenticating User matching the envelope sender",
                   "Authenticating Domain matching the envelope sender&#39;s domain"):
        assert f">{option}</option>" in html


def test_saving_changes_every_setting_audits_it_and_tells_the_proxies(app, root, ip_user,
                                                                      redis_client):
    app.config["RDAP_URL"] = "https://rdap.example/"  # newly registered domains available
    template = data.query(lambda s: _add_template(s, "Friendly", None))
    data.query(lambda s: s.add(DkimKey(domain_id=load(ip_user).domain_id, selector="mail1",
                                       private_key_pem="x", public_key_b64="y")))
    version = int(redis_client.get("og:config-version") or 0)
    response = root.post(f"/outgoing/users/{ip_user}", settings(
        identification_method="header", **{"headers-0-header_name": "X-Client-ID",
                                           "headers-0-regex": r"^client-(\d+)$",
                                           "headers-0-remove_header": "y",
                                           "headers-1-header_name": "X-Customer"},
        automatic_lock=False, lock_identities_automatically="y", lock_timeout_minutes="15",
        maximum_unlocks_by_timeout="0", lock_template_id=str(template),
        connection_limits_enabled="y", limit_per_month="100000", limit_per_week="50000",
        limit_per_day="10000", limit_per_hour="1000", limit_per_minute="60",
        dkim_selector="mail1", maximum_recipients_per_day="5000",
        quarantine_response="accept", message_archiving="y", block_macro_attachments="y",
        block_unwanted_attachments="y", reject_newly_registered_domains="y",
        reauthenticate_as="domain"))
    assert response.status_code == 302, text(response)[-2000:]
    user = load(ip_user)
    assert (user.identification_method, user.automatic_lock, user.lock_timeout_minutes,
            user.maximum_unlocks_by_timeout, user.lock_template_id) == (
        "header", False, 15, 0, template)
    assert [(h.header_name, h.regex, h.remove_header) for h in user.identification_headers] \
        == [("X-Client-ID", r"^client-(\d+)$", True), ("X-Customer", None, False)]
    assert user.limits == {"month": 100000, "week": 50000, "day": 10000, "hour": 1000,
                           "minute": 60}
    assert (user.dkim_selector, user.maximum_recipients_per_day, user.quarantine_response,
            user.message_archiving, user.block_macro_attachments,
            user.block_unwanted_attachments, user.reject_newly_registered_domains,
            user.reauthenticate_as) == ("mail1", 5000, "accept", True, True, True, True,
                                        "domain")
    events = data.query(lambda s: [json.loads(e.detail) for e in s.scalars(
        select(AuditEvent).where(AuditEvent.action == "update"))])
    assert events[0]["changes"]["lock_timeout_minutes"] == [60, 15]
    assert events[0]["changes"]["quarantine_response"] == ["reject", "accept"]
    assert int(redis_client.get("og:config-version")) == version + 1


def checkbox(html: str, name: str) -> str:
    return re.search(rf'<input[^>]*id="{name}"[^>]*>', html).group(0)


def test_newly_registered_domains_without_a_source_is_disabled_says_why_and_is_not_saved(
        root, bob):
    html = text(root.get(f"/outgoing/users/{bob}"))
    assert "disabled" in checkbox(html, "reject_newly_registered_domains")
    assert "Unavailable: no source of registration dates is configured" in html
    assert "set RDAP_URL" in html and "NEWLY_REGISTERED_LIST" in html
    response = root.post(f"/outgoing/users/{bob}",
                         settings(reject_newly_registered_domains="y"))
    assert response.status_code == 302
    assert load(bob).reject_newly_registered_domains is False


def test_newly_registered_domains_with_a_source_is_offered_and_saved(app, root, bob):
    app.config["NEWLY_REGISTERED_LIST"] = "/srv/nrd.txt"
    html = text(root.get(f"/outgoing/users/{bob}"))
    assert "disabled" not in checkbox(html, "reject_newly_registered_domains")
    assert "Unavailable" not in html
    assert root.post(f"/outgoing/users/{bob}", settings(
        reject_newly_registered_domains="y")).status_code == 302
    assert load(bob).reject_newly_registered_domains is True


def test_usage_panel_counts_failed_registration_lookups(app, root, bob, redis_client):
    from outgoing.newdomains import failed_lookups_key

    assert "Registration look-ups that failed" not in text(root.get(f"/outgoing/users/{bob}"))
    app.config["RDAP_URL"] = "https://rdap.example/"
    redis_client.set(failed_lookups_key(time.time()), 3)
    html = text(root.get(f"/outgoing/users/{bob}"))
    assert re.search(r"Registration look-ups that failed today: <strong>3</strong>", html)


@pytest.mark.parametrize("kind, name", [("ip", "192.0.2.0/24"), ("domain", "example.com")])
def test_contact_email_is_editable_validated_and_audited(root, kind, name):
    user_id = data.add_user("example.com", kind, name, None if kind == "ip" else PW)
    response = root.post(f"/outgoing/users/{user_id}", settings(contact_email="not an address"))
    assert response.status_code == 400
    assert "Enter an email address such as postmaster@example.com" in text(response)
    assert load(user_id).contact_email is None

    response = root.post(f"/outgoing/users/{user_id}",
                         settings(contact_email=" ops@Example.COM "))
    assert response.status_code == 302
    assert load(user_id).contact_email == "ops@example.com"
    assert 'value="ops@example.com"' in text(root.get(f"/outgoing/users/{user_id}"))
    events = data.query(lambda s: [json.loads(e.detail) for e in s.scalars(
        select(AuditEvent).where(AuditEvent.action == "update"))])
    assert events[-1]["changes"]["contact_email"] == [None, "ops@example.com"]

    assert root.post(f"/outgoing/users/{user_id}", settings(contact_email="")).status_code \
        == 302
    assert load(user_id).contact_email is None


def test_an_htmx_save_re_renders_the_form_in_place_saying_saved(root, bob):
    response = root.post(f"/outgoing/users/{bob}", settings(lock_timeout_minutes="30"),
                         htmx=True, **{"HX-Target": "user-settings"})
    body = text(response)
    assert response.status_code == 200
    assert body.lstrip().startswith("<form") and 'id="user-settings"' in body
    assert "Saved." in body and load(bob).lock_timeout_minutes == 30


def test_an_empty_password_keeps_the_old_one_and_a_new_one_must_be_confirmed(root, bob):
    assert root.post(f"/outgoing/users/{bob}", settings()).status_code == 302
    assert verify_password(load(bob).password_hash, PW)
    response = root.post(f"/outgoing/users/{bob}", settings(
        password="New-pass-12345", confirm_password="New-pass-54321"))
    assert response.status_code == 400
    assert "Confirm Password does not match Password." in text(response)
    response = root.post(f"/outgoing/users/{bob}",
                         settings(password="weak", confirm_password="weak"))
    assert "Use at least 10 characters." in text(response)
    assert verify_password(load(bob).password_hash, PW)
    response = root.post(f"/outgoing/users/{bob}", settings(
        password="New-pass-12345", confirm_password="New-pass-12345"))
    assert response.status_code == 302
    assert verify_password(load(bob).password_hash, "New-pass-12345")
    details = data.query(lambda s: [e.detail for e in s.scalars(select(AuditEvent))])
    assert any('"password"' in d for d in details)
    assert not any("New-pass-12345" in d for d in details)


@pytest.mark.parametrize("field, value, message", [
    ("lock_timeout_minutes", "0", "Enter 1 to 10080 minutes"),
    ("lock_timeout_minutes", "10081", "Enter 1 to 10080 minutes"),
    ("lock_timeout_minutes", "", "Enter the lock timeout in minutes."),
    ("maximum_unlocks_by_timeout", "101", "Enter a number from 0 to 100."),
    ("maximum_unlocks_by_timeout", "-1", "Enter a number from 0 to 100."),
    ("maximum_recipients_per_day", "0", "Enter a whole number of at least 1"),
    ("maximum_recipients_per_day", "lots", "Not a valid integer value."),
])
def test_numbers_out_of_range_are_form_errors(root, bob, field, value, message):
    response = root.post(f"/outgoing/users/{bob}", settings(**{field: value}))
    assert response.status_code == 400
    assert message in text(response)


@pytest.mark.parametrize("minutes", ["1", "10080"])
def test_the_lock_timeout_may_be_one_minute_to_one_week(root, bob, minutes):
    assert root.post(f"/outgoing/users/{bob}", settings(
        lock_timeout_minutes=minutes)).status_code == 302
    assert load(bob).lock_timeout_minutes == int(minutes)


def test_a_longer_limit_window_must_allow_at_least_the_shorter_one(root, bob):
    response = root.post(f"/outgoing/users/{bob}", settings(
        connection_limits_enabled="y", limit_per_day="100", limit_per_hour="500"))
    assert response.status_code == 400
    assert "Limit per day (100) is below Limit per hour (500)" in text(response)
    response = root.post(f"/outgoing/users/{bob}", settings(
        connection_limits_enabled="y", limit_per_week="100", limit_per_minute="10"))
    assert response.status_code == 302
    assert load(bob).limits == {"month": None, "week": 100, "day": None, "hour": None,
                                "minute": 10}


def test_enabled_limits_need_a_value_and_disabled_ones_keep_what_was_stored(root, bob):
    response = root.post(f"/outgoing/users/{bob}", settings(connection_limits_enabled="y"))
    assert response.status_code == 400
    assert "Set at least one Limit per" in text(response)
    root.post(f"/outgoing/users/{bob}", settings(connection_limits_enabled="y",
                                                 limit_per_hour="40"))
    response = root.post(f"/outgoing/users/{bob}", settings(limit_per_hour="nonsense"))
    assert response.status_code == 302  # hidden while off: neither checked nor changed
    user = load(bob)
    assert user.connection_limits_enabled is False and user.limit_per_hour == 40


def test_limit_fields_are_hidden_until_limits_are_enabled(root, bob):
    html = text(root.get(f"/outgoing/users/{bob}"))
    block = re.search(r'<div class="field[^"]*" id="field-limit_per_hour"[^>]*>', html).group(0)
    assert 'data-show-if="connection_limits_enabled"' in block and "hidden" in block


@pytest.mark.parametrize("regex, message", [
    ("(?=lookahead)", "lookahead (?=...) is not supported"),
    (r"(a)\1", "backreferences like \\1 are not supported"),
    ("([unclosed", "Not a valid RE2 regular expression"),
])
def test_header_regular_expressions_must_be_valid_re2(root, bob, regex, message):
    response = root.post(f"/outgoing/users/{bob}", settings(
        identification_method="header",
        **{"headers-0-header_name": "X-Client-ID", "headers-0-regex": regex}))
    assert response.status_code == 400
    assert message in text(response)
    assert load(bob).identification_method == "envelope_sender"


def test_the_header_method_needs_a_header_and_blank_rows_are_ignored(root, bob):
    response = root.post(f"/outgoing/users/{bob}", settings(
        identification_method="header", **{"headers-0-header_name": " "}))
    assert "Add at least one header" in text(response)
    response = root.post(f"/outgoing/users/{bob}", settings(
        identification_method="header", **{"headers-0-header_name": "Bad Name:"}))
    assert "A header name is printable ASCII without spaces or colons" in text(response)
    response = root.post(f"/outgoing/users/{bob}", settings(
        identification_method="header", **{"headers-3-header_name": "X-Id",
                                           "headers-7-header_name": ""}))
    assert response.status_code == 302
    assert [h.header_name for h in load(bob).identification_headers] == ["X-Id"]


@pytest.mark.parametrize("index", ["²", "0²", "9" * 5000])
def test_a_header_row_whose_index_is_no_number_is_ignored(root, bob, index):
    """WTForms read any index str.isdigit passes with int(), which refuses these: a 500."""
    response = root.post(f"/outgoing/users/{bob}", settings(
        identification_method="header", **{"headers-1-header_name": "X-Id",
                                           f"headers-{index}-header_name": "X-Other"}))
    assert response.status_code == 302
    assert [h.header_name for h in load(bob).identification_headers] == ["X-Id"]


def test_other_methods_keep_the_stored_header_rows(root, bob):
    root.post(f"/outgoing/users/{bob}", settings(
        identification_method="header", **{"headers-0-header_name": "X-Id"}))
    response = root.post(f"/outgoing/users/{bob}", settings(
        identification_method="auth_user", **{"headers-0-header_name": "X-Id",
                                              "headers-0-regex": "(?=broken"}))
    assert response.status_code == 302
    user = load(bob)
    assert user.identification_method == "auth_user"
    assert [h.header_name for h in user.identification_headers] == ["X-Id"]


def test_add_header_returns_one_labelled_row_for_htmx(root, bob):
    response = root.get(f"/outgoing/users/{bob}/header-row?index=4", htmx=True)
    body = text(response)
    assert response.status_code == 200
    assert '<label for="headers-4-header_name">Header name</label>' in body
    assert '<label for="headers-4-regex">Regular expression</label>' in body
    assert '<label for="headers-4-remove_header">Remove header</label>' in body
    assert root.get(f"/outgoing/users/{bob}/header-row?index=x", htmx=True).status_code == 400


def test_re_authentication_settings_belong_to_their_user_types(root, bob, ip_user):
    root.post(f"/outgoing/users/{bob}", settings(reauthenticate_as="user",
                                                 reauthenticate_permitted="y"))
    user = load(bob)
    assert user.reauthenticate_as == "none" and user.reauthenticate_permitted is True
    root.post(f"/outgoing/users/{ip_user}", settings(reauthenticate_as="user",
                                                     reauthenticate_permitted="y"))
    user = load(ip_user)
    assert user.reauthenticate_as == "user" and user.reauthenticate_permitted is False


def test_the_dkim_selector_must_be_one_of_the_domains_keys(root, bob):
    response = root.post(f"/outgoing/users/{bob}", settings(dkim_selector="nokey"))
    assert response.status_code == 400
    assert "That selector has no key in this domain" in text(response)
    domain_id = load(bob).domain_id
    data.query(lambda s: s.add(DkimKey(domain_id=domain_id, selector="s1",
                                       private_key_pem="x", public_key_b64="y")))
    html = text(root.get(f"/outgoing/users/{bob}"))
    assert '<option value="s1">s1</option>' in html
    assert root.post(f"/outgoing/users/{bob}", settings(dkim_selector="s1")).status_code == 302


def test_a_super_admin_moves_a_user_to_another_domain_if_its_range_fits(root, ip_user):
    data.add_user("other.example", "ip", "192.0.2.128-192.0.3.5")
    data.add_user("third.example", "ip", "198.51.100.1")
    response = root.post(f"/outgoing/users/{ip_user}", settings(domain="other.example"))
    assert response.status_code == 400
    assert "overlaps 192.0.2.128-192.0.3.5" in text(response)
    data.add_identity(ip_user, "shop@example.com")
    response = root.post(f"/outgoing/users/{ip_user}", settings(domain="third.example"))
    assert response.status_code == 400  # still overlaps other.example's range
    assert 'name="confirm_overlap"' in text(response)
    response = root.post(f"/outgoing/users/{ip_user}", settings(domain="third.example",
                                                                confirm_overlap="y"))
    assert response.status_code == 302
    moved = load(ip_user)
    assert moved.domain.name == "third.example"
    # Its identities go along: the new domain's admin sees them in Manage Identities.
    assert data.query(lambda s: s.scalars(select(Identity.domain_id).where(
        Identity.user_id == ip_user)).all()) == [moved.domain_id]


def test_the_page_shows_current_usage_of_every_limit_window(root, bob, redis_client):
    now = time.time()
    redis_client.hset(user_limits(bob), mapping={
        f"minute:{bucket_index(now, WINDOW_SECONDS['minute'])}": 7,
        f"recipients:{bucket_index(now, WINDOW_SECONDS['recipients'])}": 42})
    root.post(f"/outgoing/users/{bob}", settings(connection_limits_enabled="y",
                                                 limit_per_minute="10",
                                                 maximum_recipients_per_day="500"))
    html = text(root.get(f"/outgoing/users/{bob}"))
    usage = html[html.index('id="usage-title"'):]
    minute = re.search(r'<th scope="row">Minute</th>\s*<td class="num">(\d+)</td>\s*'
                       r'<td class="num">(\d+)</td>\s*<td>(.*?)</td>', usage, re.S)
    assert minute.group(1, 2) == ("7", "10") and " s" in minute.group(3)
    recipients = re.search(r'<th scope="row">Recipients / day</th>\s*<td class="num">(\d+)'
                           r'</td>\s*<td class="num">(\d+)</td>', usage)
    assert recipients.group(1, 2) == ("42", "500")


def _add_template(session, name: str, domain_id: int | None) -> int:
    template = LockTemplate(name=name, subject="", body="", domain_id=domain_id)
    session.add(template)
    session.flush()
    return template.id
