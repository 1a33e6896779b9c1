"""Sliding-window limit policy: windows, the weighted estimate, decisions and their replies."""

import pytest

from scoring.limits import (
    ALLOWED,
    CONNECTION_WINDOWS,
    DAY,
    HOUR,
    MINUTE,
    MONTH,
    RECIPIENTS,
    WEEK,
    WINDOW_SECONDS,
    bucket_index,
    bucket_start,
    connection_limits,
    decide,
    estimate,
    limit_reply,
    usage_report,
)
from scoring.replies import Reply

# A moment that starts a bucket of every window (divisible by 30 days and by 7 days).
T0 = 700 * MONTH


def test_windows_are_a_minute_hour_day_week_thirty_day_month_and_a_day_of_recipients():
    assert dict(WINDOW_SECONDS) == {
        "month": 2592000, "week": 604800, "day": 86400, "hour": 3600, "minute": 60,
        "recipients": 86400,
    }
    assert list(CONNECTION_WINDOWS) == ["month", "week", "day", "hour", "minute"]
    assert T0 % WEEK == 0 and T0 % MONTH == 0


def test_bucket_changes_exactly_at_the_window_edge():
    assert bucket_index(T0 + 59.999, MINUTE) == bucket_index(T0, MINUTE)
    assert bucket_index(T0 + 60, MINUTE) == bucket_index(T0, MINUTE) + 1
    assert bucket_start(T0 + 3599.5, HOUR) == T0
    assert bucket_start(T0 + 3600, HOUR) == T0 + 3600


def test_previous_bucket_weighs_less_as_the_current_bucket_ages():
    assert estimate(60, 0, T0 + 60, MINUTE) == 60
    assert estimate(60, 0, T0 + 90, MINUTE) == 30
    assert estimate(60, 5, T0 + 105, MINUTE) == 20
    assert estimate(0, 7, T0 + 119.9, MINUTE) == 7


def test_sixtieth_connection_in_a_minute_fits():
    assert decide({"minute": 60}, {"minute": (0, 59)}, T0 + 30) == ALLOWED


def test_sixty_first_connection_in_a_minute_is_refused_with_451():
    decision = decide({"minute": 60}, {"minute": (0, 60)}, T0 + 30)
    assert not decision.allowed
    assert decision.window == "minute"
    assert str(decision.reply) == (
        "451 4.7.1 Outgoing connection limit per minute (60) reached, try again later"
    )


def test_hourly_limit_reply_names_the_window_and_the_limit():
    decision = decide({"hour": 100}, {"hour": (0, 100)}, T0 + 10)
    assert decision.reply == Reply(
        451, "4.7.1 Outgoing connection limit per hour (100) reached, try again later"
    )


def test_full_previous_minute_still_blocks_when_the_next_minute_starts():
    assert not decide({"minute": 60}, {"minute": (60, 0)}, T0 + 60).allowed


def test_full_previous_minute_frees_half_the_limit_half_way_through_the_next():
    # 60 * (1 - 30/60) = 30 estimated: 30 more fit, the 31st does not.
    assert decide({"minute": 60}, {"minute": (60, 29)}, T0 + 90).allowed
    assert not decide({"minute": 60}, {"minute": (60, 30)}, T0 + 90).allowed


def test_counts_two_buckets_old_do_not_matter():
    # Counts are given for the buckets around now; older ones are simply not passed.
    assert decide({"day": 10}, {}, T0 + 3 * DAY) == ALLOWED


def test_window_without_limit_never_refuses():
    assert decide({"minute": None}, {"minute": (10**9, 10**9)}, T0) == ALLOWED


def test_zero_limit_refuses_the_first_connection():
    assert decide({"day": 0}, {}, T0).window == "day"


def test_longest_full_window_is_the_one_reported():
    limits = {"minute": 1, "month": 10, "hour": 1000}
    counts = {"minute": (0, 1), "month": (0, 10), "hour": (0, 11)}
    assert decide(limits, counts, T0 + 1).window == "month"


def test_recipients_over_the_daily_maximum_get_452():
    decision = decide({RECIPIENTS: 500}, {RECIPIENTS: (0, 500)}, T0 + 5)
    assert decision.window == RECIPIENTS
    assert str(decision.reply) == (
        "452 4.5.3 Maximum number of recipients per day (500) reached, try again later"
    )


def test_limit_reply_can_use_421_when_refusing_at_connect():
    assert str(limit_reply("minute", 5, code=421)).startswith("421 4.7.1 ")


def test_disabled_connection_limits_are_all_unlimited():
    assert connection_limits(False, limit_per_minute=1) == dict.fromkeys(CONNECTION_WINDOWS)
    assert connection_limits(True, limit_per_hour=100)["hour"] == 100


def test_unknown_window_or_negative_limit_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown limit window"):
        decide({"fortnight": 5}, {}, T0)
    with pytest.raises(ValueError, match="non-negative"):
        decide({"hour": -1}, {}, T0)


def test_usage_report_shows_estimate_remaining_and_when_it_clears():
    rows = {
        row.window: row
        for row in usage_report(
            {"minute": (60, 10), "day": (0, 3)}, T0 + 90, {"minute": 100, "day": 3}
        )
    }
    assert [r for r in rows] == ["month", "week", "day", "hour", "minute", "recipients"]
    minute = rows["minute"]
    assert minute.estimate == 40
    assert minute.remaining == 60
    assert minute.resets_at == T0 + 150  # never more than the window (a minute) away
    assert rows["day"].remaining == 0
    # Full (3 of 3): the estimate is down to 2 only 8 hours into the next day's bucket, but
    # all three happened in the last 90 s, so a day from now they are out of the window.
    assert rows["day"].resets_at == T0 + 90 + DAY
    assert rows["hour"].estimate == 0 and rows["hour"].resets_at is None
    assert rows["hour"].limit is None and rows["hour"].remaining is None


def test_usage_report_clears_at_end_of_bucket_when_only_the_previous_one_counted():
    (row,) = [r for r in usage_report({"week": (4, 0)}, T0 + WEEK + 1) if r.window == "week"]
    assert row.resets_at == T0 + 2 * WEEK


@pytest.mark.parametrize("offset", [0.5, 0.9, 0.999])
def test_resets_in_is_never_past_the_window_right_after_traffic(offset):
    for window, seconds in WINDOW_SECONDS.items():
        now = T0 + seconds * offset  # late in the bucket, right after traffic
        counts = {window: (7, 12)}
        (row,) = [r for r in usage_report(counts, now) if r.window == window]
        assert 0 < row.resets_at - now <= seconds, window
        (row,) = [r for r in usage_report(counts, now, {window: 1000}) if r.window == window]
        assert 0 < row.resets_at - now <= seconds, window


def test_a_full_window_resets_when_one_more_fits_again():
    # 10 connections last hour, 1 this hour, 10 minutes in: 10 * 50/60 + 1 = 9.33 of 10, so
    # the next one is refused until the estimate is down to 9, at 12 minutes in.
    counts, now = {"hour": (10, 1)}, T0 + HOUR + 600
    (row,) = [r for r in usage_report(counts, now, {"hour": 10}) if r.window == "hour"]
    assert row.remaining == 0
    assert row.resets_at == pytest.approx(T0 + HOUR + 720)
    assert decide({"hour": 10}, counts, row.resets_at + 1e-6).allowed
    assert not decide({"hour": 10}, counts, row.resets_at - 1).allowed


def test_reply_is_one_line_with_its_code():
    assert str(Reply(452, "4.5.3 Too many")) == "452 4.5.3 Too many"
    assert Reply(451, "x").is_transient and Reply(550, "x").is_permanent
    with pytest.raises(ValueError):
        Reply(250, "two\r\nlines")
    with pytest.raises(ValueError):
        Reply(99, "no such code")
