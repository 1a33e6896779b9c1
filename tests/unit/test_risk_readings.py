"""The Why? panel's reading of the detection state: each signal against the sender's own
baseline, agreeing with scoring.risk.points, and the risk decayed to now."""

from scoring import risk
from scoring.risk_readings import parse_state, standing

SETTINGS = risk.Settings(enabled=True, shadow=True, throttle_at=60, hold_at=120, lock_at=400,
                         new_sender_allowance=20)
NOW = 1_800_000_000.0
HOUR = int(NOW // 3600)


def state(subject="alice@example.com", **fields):
    return {f"{subject}|{k}": float(v) for k, v in fields.items()}


def by_signal(found):
    return {r.signal: r for r in found.readings}


def test_a_new_senders_burst_is_over_its_allowance_as_points_says():
    fields = state(f=HOUR, h=HOUR, m=30, n=30, d=25, r=80, t=NOW - 3600, g=1)
    found = standing(fields, "alice@example.com", NOW, SETTINGS, refused=(6, 6),
                     answered=(20, 20))  # the previous hour's answers count whole at :00
    readings = by_signal(found)
    assert found.known and found.risk == 40.0  # halved once in an hour
    assert found.rung == risk.OBSERVE
    assert readings["volume"].value == 30 and readings["volume"].over
    assert readings["refusals"].value == 0.225 and readings["refusals"].over  # 13.5 / 60
    expected = risk.points(risk.Signals(messages_hour=30, recipients_hour=30, domains_hour=25,
                                        age_seconds=NOW - HOUR * 3600, refused_hour=12,
                                        answered_hour=40), SETTINGS)
    assert {r.signal for r in found.readings if r.over} == set(expected)


def test_an_established_sender_within_its_baseline_is_within():
    mean = 10 / 336 * (1 - (1 - 1 / 336) ** 0)  # a plain EMA value of a steady sender
    fields = state(f=HOUR - 24 * 30, h=HOUR, m=3, n=3, d=2, bm=mean, bn=mean, bd=mean)
    readings = by_signal(standing(fields, "alice@example.com", NOW, SETTINGS))
    assert not any(r.over for r in readings.values())
    assert readings["volume"].limit >= risk.SLACK_MESSAGES


def test_a_finished_hour_is_folded_into_the_baseline_and_this_hour_starts_at_zero():
    fields = state(f=HOUR - 100, h=HOUR - 2, m=50, n=50, d=10, r=300, t=NOW, g=2)
    found = standing(fields, "alice@example.com", NOW, SETTINGS)
    readings = by_signal(found)
    assert readings["volume"].value == 0 and readings["volume"].baseline > 0
    assert found.risk == 300 and found.rung == risk.HOLD


def test_the_user_subject_and_an_unknown_sender():
    fields = state("*", f=HOUR, h=HOUR, m=1, n=1, d=1, r=70, t=NOW)
    assert standing(fields, "*", NOW, SETTINGS).rung == risk.THROTTLE
    unknown = standing(fields, "bob@example.com", NOW, SETTINGS)
    assert not unknown.known and unknown.risk == 0


def test_parse_state_reads_redis_bytes():
    assert parse_state({b"*|r": b"12.5", b"*|x": b"junk"}) == {"*|r": 12.5}


def test_an_established_senders_clean_list_is_beyond_its_baseline_but_adds_no_points():
    """A newsletter day: far over the baseline, but the next hop took the list cleanly, so
    the bulk points are weighed to nothing, and the panel must not say they are added."""
    fields = state(f=HOUR - 24 * 30, h=HOUR, m=400, n=4000, d=300, bm=2, bn=2, bd=2)
    found = standing(fields, "alice@example.com", NOW, SETTINGS, refused=(20, 0),
                     answered=(4000, 0))
    readings = by_signal(found)
    assert readings["volume"].beyond and not readings["volume"].over
    assert readings["volume"].weight == 0
    expected = risk.points(risk.Signals(messages_hour=400, recipients_hour=4000,
                                        domains_hour=300, baseline_messages=2,
                                        baseline_recipients=2, baseline_domains=2,
                                        age_seconds=30 * 86400, refused_hour=20,
                                        answered_hour=4000), SETTINGS)
    assert "volume" not in expected
    assert {r.signal for r in found.readings if r.over} == set(expected)
