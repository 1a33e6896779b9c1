"""Bucketing a sender's activity for the charts, and the limits scaled to one bucket."""

from datetime import UTC, datetime

from scoring.activity import (
    DAILY,
    HOURLY,
    bounds,
    fill,
    message_ceiling,
    recipient_ceiling,
    totals,
)

NOW = datetime(2026, 11, 20, 14, 35, tzinfo=UTC).timestamp()
HOUR_14 = int(datetime(2026, 11, 20, 14, tzinfo=UTC).timestamp()) // 3600


def test_hourly_span_is_48_utc_hours_ending_with_the_current_one():
    start, end = bounds(NOW, HOURLY)
    assert datetime.fromtimestamp(start, UTC) == datetime(2026, 11, 18, 15, tzinfo=UTC)
    assert datetime.fromtimestamp(end, UTC) == datetime(2026, 11, 20, 15, tzinfo=UTC)


def test_daily_span_is_30_utc_days_ending_today():
    start, end = bounds(NOW, DAILY)
    assert datetime.fromtimestamp(start, UTC) == datetime(2026, 10, 22, tzinfo=UTC)
    assert datetime.fromtimestamp(end, UTC) == datetime(2026, 11, 21, tzinfo=UTC)


def test_fill_puts_counts_in_their_bucket_and_zeros_elsewhere():
    rows = [(HOUR_14, 3, 7, 1, 2), (HOUR_14 - 2, 1, 1, 0, 0),
            (HOUR_14 - 48, 99, 99, 99, 99), (HOUR_14 + 1, 5, 5, 5, 5)]  # outside: ignored
    buckets = fill(rows, NOW, HOURLY)
    assert len(buckets) == 48
    assert (buckets[-1].messages, buckets[-1].recipients, buckets[-1].spam,
            buckets[-1].refusals) == (3, 7, 1, 2)
    assert buckets[-3].messages == 1 and buckets[-2].messages == 0
    assert totals(buckets) == {"messages": 4, "recipients": 8, "spam": 1, "refusals": 2}
    assert [b.start for b in buckets] == sorted(b.start for b in buckets)


def test_message_ceiling_is_the_tightest_limit_scaled_to_the_bucket():
    limits = {"month": 100_000, "week": None, "day": 1000, "hour": 100, "minute": 1}
    hourly = message_ceiling(limits, HOURLY)
    assert (hourly.value, hourly.window) == (60, "minute")  # 1 a minute is 60 an hour
    assert hourly.label == "Limit per minute: 1 (= 60 per hour)"
    daily = message_ceiling(limits, DAILY)
    assert (daily.value, daily.window) == (1000, "day")
    assert daily.label == "Limit per day: 1,000"
    # A longer window caps a bucket at its whole limit: a day's 50 may go in one hour.
    assert message_ceiling({"day": 50, "hour": 80}, HOURLY).value == 50
    assert message_ceiling({}, HOURLY) is None
    assert message_ceiling({"hour": None}, DAILY) is None


def test_recipient_ceiling_is_the_rolling_daily_maximum():
    assert recipient_ceiling(None, HOURLY) is None
    assert recipient_ceiling(500, DAILY).value == 500
    assert recipient_ceiling(500, HOURLY).label == "Recipients per day: 500"
