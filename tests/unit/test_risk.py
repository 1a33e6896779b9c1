"""The compromise-detection policy: points per signal, decay, the ladder, shadow mode."""

import pytest

from scoring import risk
from scoring.fingerprint import fingerprint, phrases
from scoring.risk import Settings, Signals

SETTINGS = Settings(enabled=True, shadow=False, throttle_at=60, hold_at=120, lock_at=400)
OLD = 30 * 86400  # an established sender


def test_risk_halves_every_half_life():
    assert risk.decay(100, 3600, 3600) == pytest.approx(50)
    assert risk.decay(100, 7200, 3600) == pytest.approx(25)
    assert risk.decay(100, 0, 3600) == 100


def test_sending_within_own_baseline_adds_nothing():
    quiet = Signals(messages_hour=20, recipients_hour=20, domains_hour=10,
                    baseline_messages=6, baseline_recipients=6, baseline_domains=3,
                    age_seconds=OLD)
    assert risk.points(quiet, SETTINGS) == {}


def test_volume_far_beyond_baseline_scores():
    burst = Signals(messages_hour=100, recipients_hour=100, baseline_messages=1,
                    baseline_recipients=1, age_seconds=OLD)
    got = risk.points(burst, SETTINGS)
    unproven = risk.bulk_factor(risk.refused_share(0, 0), OLD)  # no answers yet
    assert got["volume"] == pytest.approx(risk.WEIGHTS["volume"] * 3 * unproven)  # cap 3x
    assert got["recipients"] > 0


def test_new_identity_ramps_up_from_the_allowance():
    young = Signals(messages_hour=15, age_seconds=0)
    assert "volume" not in risk.points(young, Settings(new_sender_allowance=20))
    assert "volume" in risk.points(young, Settings(new_sender_allowance=5))
    half = risk.expected_per_hour(0, risk.RAMP_SECONDS / 2, 20, 6)
    assert 6 < half < 20


def test_spread_counts_distinct_domains_beyond_baseline():
    spread = Signals(messages_hour=5, domains_hour=60, baseline_domains=1, age_seconds=OLD)
    assert risk.points(spread, SETTINGS)["spread"] > 0


def test_refusals_count_only_beyond_the_normal_share():
    few = Signals(refused_hour=1, answered_hour=20, age_seconds=OLD)
    many = Signals(refused_hour=10, answered_hour=20, age_seconds=OLD)
    assert "refusals" not in risk.points(few, SETTINGS)
    share = (10 + risk.REFUSAL_PRIOR * risk.REFUSAL_PRIOR_SHARE) / (20 + risk.REFUSAL_PRIOR)
    assert risk.points(many, SETTINGS)["refusals"] == pytest.approx(
        risk.WEIGHTS["refusals"] * (share - risk.REFUSAL_FLOOR), abs=1e-3)


def test_few_answers_prove_nothing_either_way():
    assert risk.refused_share(0, 0) == risk.REFUSAL_PRIOR_SHARE
    assert risk.refused_share(2, 3) < risk.REFUSAL_FLOOR * 2  # 2 of 3 is not 67 %
    assert risk.refused_share(250, 1000) == pytest.approx(0.25, abs=0.01)


# A newsletter hour: far beyond the own baseline on every bulk signal.
BULK = dict(messages_hour=120, recipients_hour=4000, domains_hour=300, baseline_messages=0.3,
            baseline_recipients=0.5, baseline_domains=0.4, campaign_own=120)


def test_a_clean_list_cancels_the_bulk_points_of_an_established_sender():
    newsletter = risk.points(Signals(**BULK, refused_hour=90, answered_hour=3000,
                                     age_seconds=OLD), SETTINGS)
    assert newsletter == {}  # 3 % refused: a newsletter day, not a compromise


def test_a_new_sender_keeps_its_bulk_points_even_on_a_clean_list():
    whole = risk.points(Signals(**BULK, age_seconds=OLD, refused_hour=500,
                                answered_hour=5000), SETTINGS)
    young = risk.points(Signals(**BULK, refused_hour=0, answered_hour=3000, age_seconds=3600),
                        SETTINGS)
    assert young["volume"] > 0.9 * whole["volume"] and young["spread"] > 0.9 * whole["spread"]


def test_a_harvested_list_multiplies_the_bulk_points():
    unproven = risk.points(Signals(**BULK, age_seconds=OLD), SETTINGS)
    harvested = risk.points(Signals(**BULK, refused_hour=250, answered_hour=1000,
                                    age_seconds=OLD), SETTINGS)
    assert harvested["volume"] == pytest.approx(unproven["volume"] * 2 * risk.BULK_FACTOR_CAP,
                                                rel=0.01)
    assert harvested["refusals"] > 0
    assert risk.bulk_factor(risk.REFUSAL_PRIOR_SHARE, OLD) == pytest.approx(0.5)


def test_copies_of_a_clean_newsletter_cannot_push_its_sender():
    """However many others send the same content, an established sender's own clean
    newsletter scores nothing: the cross-customer count only weighs its own points."""
    copied = risk.points(Signals(**dict(BULK, campaign_own=500), campaign_senders=10**6,
                                 refused_hour=90, answered_hour=3000, age_seconds=OLD),
                         SETTINGS)
    assert "campaign" not in copied


def test_last_hour_slides_over_two_buckets():
    assert risk.last_hour(10, 40, 7 * 3600) == 50  # the hour just began
    assert risk.last_hour(10, 40, 7 * 3600 + 2700) == pytest.approx(20)


def test_campaign_points_come_only_from_own_copies_beyond_own_baseline():
    rival_copies = Signals(campaign_own=1, campaign_senders=50, age_seconds=OLD)
    assert "campaign" not in risk.points(rival_copies, SETTINGS)
    own_blast = Signals(campaign_own=10, campaign_senders=1, age_seconds=OLD)
    alone = risk.points(own_blast, SETTINGS)["campaign"]
    shared = risk.points(Signals(campaign_own=10, campaign_senders=8, age_seconds=OLD),
                         SETTINGS)["campaign"]
    assert shared > alone > 0  # others only weigh one's own excess copies


def test_auth_and_content_signals():
    got = risk.points(Signals(auth_failed=True, auth_new_network=True, spam_score=4,
                              spam_threshold=5, age_seconds=OLD), SETTINGS)
    assert set(got) == {"auth_failed", "auth_new_network", "content"}
    assert "spam" in risk.points(Signals(spam=True, age_seconds=OLD), SETTINGS)
    assert risk.points(Signals(spam_score=0.5, age_seconds=OLD), SETTINGS) == {}


@pytest.mark.parametrize(("value", "rung"), [(0, risk.OBSERVE), (60, risk.THROTTLE),
                                             (120, risk.HOLD), (400, risk.LOCK)])
def test_each_threshold_starts_its_rung(value, rung):
    assert risk.rung_for(value, SETTINGS) == rung


def test_the_riskier_of_identity_and_user_decides():
    assert risk.decide(10, 130, SETTINGS).effective == risk.HOLD


def test_shadow_mode_records_the_rung_and_changes_nothing():
    shadow = Settings(shadow=True, throttle_at=60, hold_at=120, lock_at=400)
    decision = risk.decide(500, 0, shadow, {"volume": 12})
    assert decision.rung == risk.LOCK and decision.effective == risk.OBSERVE
    assert decision.would_have


def test_detection_off_does_nothing():
    off = Settings(enabled=False, shadow=False)
    assert risk.decide(1000, 1000, off).effective == risk.OBSERVE


def test_lock_reason_names_the_signals():
    reason = risk.lock_reason(risk.decide(410, 20, SETTINGS, {"volume": 12, "spread": 4}))
    assert "volume 12" in reason and "spread 4" in reason


def test_baseline_corrects_for_a_young_sender():
    mean = 0.0
    for _ in range(24):
        mean = risk.ema_fold(mean, 10, 1)
    assert risk.baseline(mean, 24) == pytest.approx(10, rel=0.01)


def test_throttle_rate():
    assert not risk.throttled(10, 10) and risk.throttled(11, 10)


def test_personalised_copies_share_a_fingerprint():
    body = (b"Dear {name}, your account has been suspended. Please verify your password "
            b"within 24 hours at the link below or lose access to your mailbox forever.")
    a = fingerprint("Account suspended", body.replace(b"{name}", b"Alice") + b" ref 12345")
    b = fingerprint("Account suspended", body.replace(b"{name}", b"Bob") + b" ref 99881")
    other = fingerprint("Lunch", b"are we still on for lunch tomorrow at the usual place ok")
    assert a == b and a != other
    assert fingerprint("hi", b"ok") is None


def test_markup_links_and_case_do_not_change_a_fingerprint():
    plain = b"Your invoice is attached please pay within seven days thank you"
    html = (b"<html><body><p>Your <b>INVOICE</b> is attached&nbsp;please pay within "
            b"https://track.example/abc?u=1 seven days</p><p>Thank you</p></body></html>")
    assert fingerprint("Invoice", plain) == fingerprint("invoice", html)
    # Spaces, line breaks (a quoted-printable soft break too) and digits do not count;
    # punctuation breaks phrases, and short ones (a greeting, a name) are left out.
    assert phrases("Hi Bob", b"Dear Bob,\r\nyour parcel 4711 is on its way; track it he=\r\n"
                   b"re today!") == [b"yourparcelisonitsway", b"trackitheretoday"]
    assert fingerprint("Hi Bob", b"Dear Bob, your parcel 4711 is on its way; track it here") \
        == fingerprint("Hi Alice", b"Dear Alice, your parcel 9 is on its  way;\r\ntrack it here")


def test_mime_structure_is_not_content():
    """Two unrelated multipart messages share only MIME's lines: different keys; the same
    text in a multipart and a plain message: one key."""
    def multipart(text: bytes, boundary: bytes) -> bytes:
        return (b"This is a multi-part message in MIME format.\r\n--" + boundary + b"\r\n"
                b"Content-Type: text/plain;\r\n\tcharset=utf-8, format=flowed\r\n"
                b"Content-Transfer-Encoding: 7bit\r\n\r\n" + text + b"\r\n--" + boundary
                + b"--\r\n")
    a = (b"Are we still meeting for the planning session on Thursday afternoon? "
         b"Bring the budget figures, please.")
    b = (b"The garden centre opens again next week. New seedlings arrived, "
         b"and the cafe serves soup again.")
    assert fingerprint("x", multipart(a, b"AAA")) != fingerprint("x", multipart(b, b"BBB"))
    assert phrases("x", multipart(a, b"AAA")) == phrases("x", a)
    assert fingerprint("x", multipart(a, b"AAA")) == fingerprint("x", a)

