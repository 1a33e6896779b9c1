"""Compromise detection's Redis script against a real Redis: every signal, the risk's decay,
the rungs, and that the script's points are exactly scoring.risk's."""

import asyncio
import os
import random

import pytest
import redis.asyncio as aioredis

from proxy.detection import Answers, CampaignCounts, Evidence, measure
from scoring import risk

T0 = 20_000 * 3600.0  # the start of an hour
USER_A, USER_B = 7, 8
SETTINGS = risk.Settings(enabled=True, shadow=True, throttle_at=60, hold_at=120,
                         lock_at=400, throttle_rate=5, new_sender_allowance=20)


@pytest.fixture(autouse=True)
def clean_db(redis_client):
    return redis_client


def run(scenario):
    async def main():
        r = aioredis.Redis.from_url(os.environ["REDIS_URL"])
        try:
            return await scenario(r)
        finally:
            await r.aclose()
    return asyncio.run(main())


def mail(identity="a@x.example", rcpts=("r@one.example",), **kw):
    return Evidence(identity=identity, recipients=tuple(rcpts), **kw)


def test_script_points_equal_scoring_points_for_a_young_identity():
    rng = random.Random(3)

    async def scenario(r):
        checked = 0
        for i in range(40):
            rcpts = tuple(f"u{i}@d{rng.randrange(30)}.example" for _ in range(rng.randrange(1, 4)))
            got = await measure(r, USER_A, mail(rcpts=rcpts), SETTINGS, T0 + i * 10)
            domains = await r.pfcount(f"og:{{{USER_A}}}:dom:{int(T0 // 3600)}:a@x.example")
            state = await r.hgetall(f"og:{{{USER_A}}}:risk")
            m = float(state[b"a@x.example|m"])
            n = float(state[b"a@x.example|n"])
            want = risk.points(risk.Signals(messages_hour=m, recipients_hour=n,
                                            domains_hour=domains, age_seconds=i * 10),
                               SETTINGS)
            assert got.identity_signals == pytest.approx(want, abs=1e-3)
            checked += bool(want)
        return checked

    assert run(scenario) > 5  # the volume and spread signals fired and agreed


def test_volume_burst_climbs_to_throttle_hold_and_lock():
    async def scenario(r):
        rungs = []
        for i in range(300):
            got = await measure(r, USER_A, mail(rcpts=(f"x{i}@d{i}.example",)),
                                risk.Settings(enabled=True, shadow=True, throttle_at=60,
                                              hold_at=120, lock_at=400), T0 + i)
            rungs.append(got.rung)
        return rungs

    rungs = run(scenario)
    first = {rung: rungs.index(rung) for rung in (risk.THROTTLE, risk.HOLD, risk.LOCK)}
    assert first[risk.THROTTLE] < first[risk.HOLD] < first[risk.LOCK]


def test_risk_decays_with_the_half_life():
    async def scenario(r):
        for i in range(60):
            last = await measure(r, USER_A, mail(rcpts=(f"x{i}@d{i}.example",)), SETTINGS,
                                 T0 + i)
        later = await measure(r, USER_A, mail(), SETTINGS, T0 + 59 + 3600)
        return last.identity_risk, later.identity_risk

    before, after = run(scenario)
    assert after == pytest.approx(before / 2, rel=0.05)


def test_refusals_share_raises_risk():
    """The next hop's answers ride along with the user's next message and count for the
    identity and the user; the one after has no answers to bring and still sees them."""
    answers = Answers()

    async def scenario(r):
        for i in range(6):
            await measure(r, USER_A, mail(), SETTINGS, T0 + i, answers=answers)
            answers.add(USER_A, "a@x.example", 1, 1 if i < 4 else 0, T0 + i)
        first = await measure(r, USER_A, mail(), SETTINGS, T0 + 7, answers=answers)
        second = await measure(r, USER_A, mail(), SETTINGS, T0 + 8, answers=answers)
        return first, second

    first, second = run(scenario)
    assert "refusals" in first.identity_signals and "refusals" in first.user_signals
    assert second.identity_signals["refusals"] == first.identity_signals["refusals"]


def test_script_weighs_bulk_by_refusals_as_scoring_does_for_an_established_identity():
    """An identity with 10 days of history: the script's points equal scoring.points() with
    the refused share of the sliding hour, clean (bulk cancelled) and harvested (multiplied),
    across an hour's boundary."""
    hour = int(T0 // 3600)

    async def scenario(r):
        start = T0 - 10 * 86400
        await measure(r, USER_A, mail(), SETTINGS, start)  # first seen 10 days ago
        results = {}
        for label, refused_each in (("clean", 0), ("harvested", 1)):
            answers = Answers()
            identity = f"{label}@x.example"
            await measure(r, USER_A, mail(identity), SETTINGS, start)
            got = None
            for i in range(60):
                now = T0 - 1800 + i * 60  # half an hour before the boundary, half after
                rcpts = tuple(f"u{i}.{k}@d{i}.{k}.example" for k in range(3))
                got = await measure(r, USER_A, mail(identity, rcpts), SETTINGS, now,
                                    answers=answers)
                answers.add(USER_A, identity, 3, refused_each, now)
            state = await r.hgetall(f"og:{{{USER_A}}}:risk")
            cur = await r.hgetall(f"og:{{{USER_A}}}:ref:{hour}")
            prev = await r.hgetall(f"og:{{{USER_A}}}:ref:{hour - 1}")

            def field(h, name):
                return float(h.get(name.encode(), 0))

            now = T0 - 1800 + 59 * 60
            domains = await r.pfcount(f"og:{{{USER_A}}}:dom:{hour}:{identity}")
            age = now - (int(start // 3600) * 3600)
            base = {k: risk.baseline(field(state, f"{identity}|b{k}"),
                                     hour - int(start // 3600)) for k in "mnd"}
            want = risk.points(risk.Signals(
                messages_hour=field(state, f"{identity}|m"),
                recipients_hour=field(state, f"{identity}|n"), domains_hour=domains,
                baseline_messages=base["m"], baseline_recipients=base["n"],
                baseline_domains=base["d"], age_seconds=age,
                refused_hour=risk.last_hour(field(cur, identity), field(prev, identity), now),
                answered_hour=risk.last_hour(field(cur, f"{identity}|k"),
                                             field(prev, f"{identity}|k"), now)), SETTINGS)
            assert got.identity_signals == pytest.approx(want, abs=1e-3)
            results[label] = got.identity_signals
        return results

    results = run(scenario)
    assert not {"volume", "spread", "recipients"} & set(results["clean"])
    assert results["harvested"]["spread"] > 0 and results["harvested"]["refusals"] > 0


def test_auth_and_content_signals_reach_identity_and_user():
    async def scenario(r):
        return await measure(r, USER_A, mail(auth_failed=True, auth_new_network=True,
                                             spam_score=4.0), SETTINGS, T0)

    got = run(scenario)
    assert {"auth_failed", "auth_new_network", "content"} <= set(got.identity_signals)
    assert {"auth_failed", "auth_new_network", "content"} <= set(got.user_signals)


def test_throttled_sender_beyond_the_rate_is_refused_and_not_counted():
    async def scenario(r):
        for i in range(200):
            got = await measure(r, USER_A, mail(rcpts=(f"x{i}@d{i}.example",)),
                                risk.Settings(enabled=True, shadow=False, throttle_at=20,
                                              hold_at=0, lock_at=0, throttle_rate=3),
                                T0 + i * 0.1)
            if got.throttled:
                return i, got
        return None, None

    at, got = run(scenario)
    assert at is not None and got.identity_rung[1] == risk.THROTTLE


def test_copying_a_rivals_newsletter_raises_only_the_copier():
    """Customer A blasts B's newsletter: A's own excess copies score, boosted by B also
    sending it; B's few copies stay below its own baseline and score nothing."""
    body_fp = "c0ffee00"
    campaigns = CampaignCounts()

    async def scenario(r):
        for i in range(2):
            await measure(r, USER_B, mail("news@b.example", fingerprint=body_fp), SETTINGS,
                          T0 + i, campaigns)
        a = None
        for i in range(60):
            a = await measure(r, USER_A, mail("x@a.example", (f"v{i}@d{i % 5}.example",),
                                              fingerprint=body_fp), SETTINGS, T0 + 10 + i,
                              campaigns)
        b = await measure(r, USER_B, mail("news@b.example", fingerprint=body_fp), SETTINGS,
                          T0 + 100, campaigns)
        return a, b

    a, b = run(scenario)
    assert a.identity_signals.get("campaign", 0) > risk.WEIGHTS["campaign"]  # boosted
    assert a.rung in (risk.HOLD, risk.LOCK)
    assert "campaign" not in b.identity_signals and b.rung == risk.OBSERVE


def test_measuring_survives_a_redis_that_forgot_its_scripts():
    """The content count and the detection script go in one pipeline of EVALSHAs without
    SCRIPT EXISTS; after a restart or SCRIPT FLUSH Redis knows neither, and the next message
    loads them and is measured all the same, once."""
    async def scenario(r):
        evidence = mail(fingerprint="0badc0de")
        first = await measure(r, USER_A, evidence, SETTINGS, T0)
        await r.script_flush()
        second = await measure(r, USER_A, evidence, SETTINGS, T0 + 1)
        state = await r.hgetall(f"og:{{{USER_A}}}:risk")
        return first, second, float(state[b"a@x.example|m"])

    first, second, messages = run(scenario)
    assert not first.throttled and not second.throttled
    assert messages == 2  # the retried pipeline counted the message once
