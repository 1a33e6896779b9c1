"""The SMTP replies of each outcome: codes, enhanced codes and cleaned text."""

from scoring import outcomes


def test_locked_user_and_identity_get_550_5_7_1_naming_the_lock():
    assert outcomes.user_locked("alice@example.com", "5 spam messages in 10 minutes") == (
        "550 5.7.1 Outgoing user alice@example.com is locked: 5 spam messages in 10 minutes;"
        " contact your administrator")
    assert outcomes.identity_locked("shop@example.com", None) == (
        "550 5.7.1 Sender shop@example.com is locked; contact your administrator")


def test_lock_texts_cannot_break_the_reply_line():
    reply = outcomes.user_locked("a\r\nb", "why\r\n250 OK")
    assert "\r" not in reply and "\n" not in reply


def test_authentication_replies():
    assert outcomes.AUTH_REQUIRED.startswith("530 5.7.0")
    assert outcomes.AUTH_INVALID.startswith("535 5.7.8")
    assert outcomes.AUTH_TEMPORARY.startswith("454 4.7.0")
    assert outcomes.AUTH_BLOCKED.startswith("454 4.7.0")


def test_internal_faults_are_temporary():
    for reply in (outcomes.TEMPORARY, outcomes.NEXT_HOP_DOWN):
        assert reply.startswith("451 4.")


def test_next_hop_permanent_refusal_passes_on_anything_else_becomes_451():
    assert outcomes.next_hop_refused(554, "no thanks") == "554 no thanks"
    assert outcomes.next_hop_refused(421, "busy").startswith("451 4.4.0")


def test_quarantine_response_accept_is_silent_reject_names_rules():
    assert outcomes.quarantined("accept", ["GTUBE"]) == outcomes.QUEUED
    assert outcomes.quarantined("reject", ["GTUBE"]).startswith("550 5.7.1")
