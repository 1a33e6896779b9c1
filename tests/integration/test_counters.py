"""Redis counters against a real Redis: limits, recipients, spam events, memory."""

import asyncio
import os
import random

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from outgoing import redis_keys
from outgoing.usage import read_usage_sync
from proxy.counters import (
    check_and_count,
    check_mail,
    count_connection,
    count_recipient,
    give_back,
    limits_key,
    read_usage,
    record_spam_event,
    spam_key,
)
from scoring.limits import CONNECTION_WINDOWS, DAY, MONTH, RECIPIENTS, WEEK, decide

T0 = 700 * MONTH  # starts a bucket of every window
USER = 42


@pytest.fixture(autouse=True)
def clean_db(redis_client):
    """Each test starts from an empty database of the test Redis."""
    return redis_client


def run(scenario, *, clients=1, decode=False):
    """Run ``scenario(*clients)`` on fresh asyncio clients, each with its own pool, as
    separate proxy instances would have."""

    async def main():
        url = os.environ["REDIS_URL"]
        made = [aioredis.Redis.from_url(url, decode_responses=decode) for _ in range(clients)]
        try:
            return await scenario(*made)
        finally:
            for client in made:
                await client.aclose()

    return asyncio.run(main())


def test_sixty_first_connection_in_a_minute_is_refused_and_not_counted():
    async def scenario(r):
        results = [await count_connection(r, USER, {"minute": 60}, T0 + i * 0.5) for i in range(61)]
        return results, await read_usage(r, USER, T0 + 31)

    results, usage = run(scenario)
    assert all(d.allowed for d in results[:60])
    refused = results[60]
    assert (refused.allowed, refused.window) == (False, "minute")
    assert str(refused.reply) == (
        "451 4.7.1 Outgoing connection limit per minute (60) reached, try again later"
    )
    assert usage["minute"] == (0, 60)


@pytest.mark.parametrize("window", list(CONNECTION_WINDOWS))
def test_each_window_refuses_its_fourth_connection_at_a_limit_of_three(window):
    async def scenario(r):
        results = [await count_connection(r, USER, {window: 3}, T0 + i) for i in range(1, 6)]
        return results, await read_usage(r, USER, T0 + 10)

    results, usage = run(scenario)
    assert [d.allowed for d in results] == [True, True, True, False, False]
    assert results[3].window == window
    assert f"limit per {window} (3) reached" in str(results[3].reply)
    assert str(results[3].reply).startswith("451 4.7.1 ")
    # The refused attempts were counted nowhere, the allowed ones everywhere.
    assert all(usage[w] == (0, 3) for w in CONNECTION_WINDOWS)


def test_connections_are_counted_even_without_limits():
    async def scenario(r):
        for i in range(4):
            assert (await count_connection(r, USER, {}, T0 + i)).allowed
        return await read_usage(r, USER, T0 + 5)

    usage = run(scenario)
    assert usage["hour"] == (0, 4) and usage["month"] == (0, 4)


def test_sliding_window_frees_up_as_time_moves_on():
    limits = {"minute": 10}

    async def allowed_at(r, now, attempts):
        return [(await count_connection(r, USER, limits, now)).allowed for _ in range(attempts)]

    async def scenario(r):
        full = await allowed_at(r, T0 + 50, 11)
        next_minute_start = await allowed_at(r, T0 + 60, 1)
        half_way = await allowed_at(r, T0 + 90, 6)  # 10 * 0.5 left over from last minute
        two_minutes_on = await allowed_at(r, T0 + 180, 11)
        return full, next_minute_start, half_way, two_minutes_on

    full, next_minute_start, half_way, two_minutes_on = run(scenario)
    assert full == [True] * 10 + [False]
    assert next_minute_start == [False]
    assert half_way == [True] * 5 + [False]
    assert two_minutes_on == [True] * 10 + [False]


def test_recipients_per_day_refuse_with_452_and_free_up_after_a_day():
    async def scenario(r):
        first_day = [await count_recipient(r, USER, 3, T0 + i * 60) for i in range(4)]
        next_day_start = await count_recipient(r, USER, 3, T0 + DAY)
        two_days_on = [await count_recipient(r, USER, 3, T0 + 2 * DAY + i) for i in range(4)]
        return first_day, next_day_start, two_days_on

    first_day, next_day_start, two_days_on = run(scenario)
    assert [d.allowed for d in first_day] == [True, True, True, False]
    assert str(first_day[3].reply) == (
        "452 4.5.3 Maximum number of recipients per day (3) reached, try again later"
    )
    assert not next_day_start.allowed
    assert [d.allowed for d in two_days_on] == [True, True, True, False]


def test_recipients_and_connections_are_counted_apart():
    async def scenario(r):
        await count_connection(r, USER, {"day": 1}, T0)
        recipients = [await count_recipient(r, USER, None, T0 + 1) for _ in range(5)]
        connection = await count_connection(r, USER, {"day": 1}, T0 + 2)
        return recipients, connection, await read_usage(r, USER, T0 + 3)

    recipients, connection, usage = run(scenario)
    assert all(d.allowed for d in recipients)
    assert connection.window == "day"
    assert usage["recipients"] == (0, 5) and usage["day"] == (0, 1)


def test_users_do_not_share_limits():
    async def scenario(r):
        await count_connection(r, 1, {"hour": 1}, T0)
        return await count_connection(r, 2, {"hour": 1}, T0 + 1)

    assert run(scenario).allowed


def test_spam_events_are_counted_for_ten_minutes_and_forgotten_after():
    async def scenario(r):
        key = spam_key(USER)
        counts = [await record_spam_event(r, key, T0 + i * 60) for i in range(5)]
        # T0 is now more than 600 s old: it drops out, this event comes in.
        counts.append(await record_spam_event(r, key, T0 + 601))
        counts.append(await record_spam_event(r, key, T0 + 5000))
        return counts

    assert run(scenario) == [1, 2, 3, 4, 5, 5, 1]


def test_spam_events_at_the_same_moment_all_count():
    async def scenario(r):
        return [await record_spam_event(r, spam_key(USER), T0) for _ in range(3)]

    assert run(scenario) == [1, 2, 3]


def test_identity_spam_is_counted_apart_from_the_user():
    async def scenario(r):
        await record_spam_event(r, spam_key(USER), T0)
        await record_spam_event(r, spam_key(USER), T0 + 1)
        return await record_spam_event(r, spam_key(USER, "bob@example.com"), T0 + 2)

    assert run(scenario) == 1


def test_two_proxy_instances_share_one_limit():
    async def scenario(a, b):
        results = []
        for i in range(8):
            client = a if i % 2 == 0 else b
            results.append((await count_connection(client, USER, {"hour": 5}, T0 + i)).allowed)
        return results

    assert run(scenario, clients=2) == [True] * 5 + [False] * 3


def test_concurrent_connections_from_two_instances_never_overshoot_the_limit():
    async def scenario(a, b):
        attempts = [
            count_connection(a if i % 2 else b, USER, {"minute": 20}, T0 + 1) for i in range(60)
        ]
        results = await asyncio.gather(*attempts)
        return results, await read_usage(a, USER, T0 + 2)

    results, usage = run(scenario, clients=2, decode=True)
    assert sum(d.allowed for d in results) == 20
    assert usage["minute"] == (0, 20)


def test_proxies_whose_clocks_differ_at_a_buckets_turn_still_share_one_limit():
    """Host A's clock runs 2 s ahead of host B's: for a second at the turn of the hour A
    counts in the new bucket while B still counts in the old one. B's calls deleted A's
    field as stale (neither B's current nor its previous bucket), so both filled the
    limit: 20 connections in one second at a limit of 10."""
    async def scenario(a, b):
        results = []
        for i in range(40):
            real = T0 - 1.5 + i * 0.025
            host, now = (a, real + 2.0) if i % 2 == 0 else (b, real)
            results.append((await count_connection(host, USER, {"hour": 10}, now)).allowed)
        return results, await read_usage(a, USER, T0 + 1)

    results, usage = run(scenario, clients=2, decode=True)
    assert sum(results) == 10
    assert usage["hour"] == (5, 5)  # B's in the hour before, A's in this one: none lost


def test_redis_and_python_policy_agree_on_every_decision():
    """The Lua script and scoring.limits.decide must refuse exactly the same attempts."""
    rng = random.Random(7)
    limits = {"minute": 7, "hour": 40, "day": 150}

    async def scenario(r):
        now = T0 + 0.25
        for _ in range(600):
            now += rng.choice([0.5, 1.7, 3.0, 9.9, 29.5, 61.0, 400.0])
            before = await read_usage(r, USER, now)
            decision, counts = await check_and_count(r, USER, limits, now)
            assert counts == {w: before[w] for w in ("day", "hour", "minute")}
            assert decision == decide(limits, counts, now)

    run(scenario)


def test_keys_share_one_cluster_slot_per_user_and_expire():
    async def scenario(r):
        await count_connection(r, USER, {}, T0)
        await count_recipient(r, USER, None, T0)
        await record_spam_event(r, spam_key(USER, "x@example.com"), T0)
        await record_spam_event(r, spam_key(USER), T0)
        return sorted(await r.keys("*")), await r.ttl(limits_key(USER)), await r.ttl(
            spam_key(USER)
        )

    keys, limits_ttl, spam_ttl = run(scenario)
    assert keys == sorted(
        [b"og:{42}:limits", b"og:{42}:spam", b"og:{42}:idspam:x@example.com"]
    )
    assert len({key_slot(k) for k in keys}) == 1
    assert 0 < limits_ttl <= 2 * MONTH
    assert 0 < spam_ttl <= 600


def test_memory_per_user_stays_under_two_kilobytes_after_exercising_all_windows(clean_db):
    async def scenario(r):
        now = T0 + 13
        # Ninety days of traffic every 7 hours, crossing every bucket edge of every window.
        while now < T0 + 90 * DAY:
            await count_connection(r, USER, {"minute": 100, "month": 10_000}, now)
            await count_recipient(r, USER, 1000, now)
            now += 7 * 3600 + 17
        for i in range(5):
            await record_spam_event(r, spam_key(USER), now + i)
        return await r.hlen(limits_key(USER))

    fields = run(scenario)
    limits_bytes = clean_db.memory_usage(limits_key(USER))
    spam_bytes = clean_db.memory_usage(spam_key(USER))
    print(f"memory per user: limits hash {limits_bytes} B, spam window {spam_bytes} B")
    assert fields <= 2 * len(CONNECTION_WINDOWS) + 2
    assert limits_bytes + spam_bytes < 2048


def test_spam_window_keeps_a_bounded_number_of_events():
    async def scenario(r):
        for i in range(150):
            count = await record_spam_event(r, spam_key(USER), T0 + i)
        return count, await r.zcard(spam_key(USER))

    assert run(scenario) == (100, 100)


def test_control_panel_reads_the_same_usage_synchronously(clean_db):
    async def scenario(r):
        for i in range(3):
            await count_connection(r, USER, {}, T0 + WEEK + i)
        return await read_usage(r, USER, T0 + WEEK + 30)

    async_usage = run(scenario)
    sync_usage = read_usage_sync(clean_db, USER, T0 + WEEK + 30)
    assert sync_usage == async_usage
    assert sync_usage["week"] == (0, 3) and sync_usage["minute"] == (0, 3)
    assert sync_usage["recipients"] == (0, 0)


def test_usage_of_a_user_never_seen_is_all_zero(clean_db):
    usage = read_usage_sync(clean_db, 999, T0)
    assert set(usage.values()) == {(0, 0)}


def test_unknown_connection_window_is_refused_before_touching_redis():
    async def scenario(r):
        with pytest.raises(ValueError, match="not connection windows"):
            await count_connection(r, USER, {"recipients": 5}, T0)
        return await r.dbsize()

    assert run(scenario) == 0


def test_mail_check_counts_the_session_and_reserves_one_recipient_in_one_call(clean_db):
    async def scenario(r):
        first = await check_mail(r, USER, T0 + 1, connection_limits={"hour": 5},
                                 maximum_recipients_per_day=10)
        return first, await read_usage(r, USER, T0 + 2)

    check, usage = run(scenario)
    assert check.decision.allowed and check.lock is None
    assert check.fields[RECIPIENTS] == f"recipients:{T0 // DAY}"
    assert usage["hour"] == (0, 1) and usage["recipients"] == (0, 1)


def test_mail_check_reports_the_lock_and_counts_nothing(clean_db):
    clean_db.set(redis_keys.user_lock(USER), '{"reason": "spam"}')

    async def scenario(r):
        check = await check_mail(r, USER, T0, connection_limits={},
                                 maximum_recipients_per_day=None)
        return check, await read_usage(r, USER, T0)

    check, usage = run(scenario)
    assert check.lock == '{"reason": "spam"}'
    assert set(usage.values()) == {(0, 0)}


def test_full_recipient_window_does_not_refuse_mail_and_reserves_nothing(clean_db):
    async def scenario(r):
        for i in range(2):
            await count_recipient(r, USER, 2, T0 + i)
        return await check_mail(r, USER, T0 + 5, connection_limits={"minute": 9},
                                maximum_recipients_per_day=2)

    check = run(scenario)
    assert check.decision.allowed and RECIPIENTS not in check.fields
    assert check.counted == frozenset(CONNECTION_WINDOWS)


def test_full_connection_window_refuses_mail_and_reserves_nothing(clean_db):
    async def scenario(r):
        await count_connection(r, USER, {"minute": 1}, T0)
        check = await check_mail(r, USER, T0 + 1, connection_limits={"minute": 1},
                                 maximum_recipients_per_day=None)
        return check, await read_usage(r, USER, T0 + 2)

    check, usage = run(scenario)
    assert (check.decision.allowed, check.decision.window) == (False, "minute")
    assert check.counted == frozenset() and usage["recipients"] == (0, 0)


def test_given_back_reservation_never_goes_below_zero(clean_db):
    async def scenario(r):
        check = await check_mail(r, USER, T0, connection_limits=None,
                                 maximum_recipients_per_day=None)
        field_name = check.fields[RECIPIENTS]
        for _ in range(3):
            await give_back(r, USER, field_name, T0 + 1)
        return await read_usage(r, USER, T0 + 2)

    assert run(scenario)["recipients"] == (0, 0)


def test_give_back_rides_along_with_the_next_mail_check(clean_db):
    async def scenario(r):
        first = await check_mail(r, USER, T0, connection_limits=None,
                                 maximum_recipients_per_day=None)
        await check_mail(r, USER, T0 + 1, connection_limits=None,
                         maximum_recipients_per_day=None,
                         give_back=first.fields[RECIPIENTS])
        return await read_usage(r, USER, T0 + 2)

    assert run(scenario)["recipients"] == (0, 1)
