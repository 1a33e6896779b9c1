from datetime import datetime, timedelta

import pytest

from scoring.retry import next_attempt_at, parse_delays

T0 = datetime(2026, 11, 29, 10, 0, 0)


def test_delays_parse_and_reject_junk():
    assert parse_delays("300, 900,3600") == (300, 900, 3600)
    assert parse_delays("0") == (0,)
    for bad in ("", " , ", "5m", "-1", "300,,x"):
        with pytest.raises(ValueError):
            parse_delays(bad)


def test_each_retry_waits_longer_and_the_last_delay_repeats():
    delays = (60, 600, 3600)
    at = [next_attempt_at(attempt=n, arrival=T0, now=T0, delays=delays, give_up_seconds=86400)
          for n in (1, 2, 3, 4, 9)]
    assert [(a - T0).total_seconds() for a in at] == [60, 600, 3600, 3600, 3600]


def test_a_retry_that_would_fall_after_the_give_up_age_is_not_scheduled():
    delays = (3600,)
    now = T0 + timedelta(hours=22)
    assert next_attempt_at(attempt=5, arrival=T0, now=now, delays=delays,
                           give_up_seconds=23 * 3600) == now + timedelta(hours=1)
    assert next_attempt_at(attempt=5, arrival=T0, now=now + timedelta(seconds=1), delays=delays,
                           give_up_seconds=23 * 3600) is None
