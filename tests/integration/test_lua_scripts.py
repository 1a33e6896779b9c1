"""proxy.scripts: the proxy's Lua scripts run by EVALSHA, and again after Redis forgot them."""

from __future__ import annotations

from proxy.scripts import LuaScript
from tests.integration.test_detection_signals import run

ECHO = LuaScript('redis.call("INCR", KEYS[1]); return {KEYS[1], ARGV[1], ARGV[2]}')


def test_a_script_runs_with_its_keys_and_arguments_and_again_after_a_script_flush(redis_client):
    async def scenario(r):
        first = await ECHO(r, ["og:test:n"], ["a", 2])
        await r.script_flush()  # a restarted Redis: NOSCRIPT, then loaded and run once
        second = await ECHO(r, ["og:test:n"], ["b", 3])
        return first, second

    first, second = run(scenario)
    assert first == [b"og:test:n", b"a", b"2"]
    assert second == [b"og:test:n", b"b", b"3"]
    assert redis_client.get("og:test:n") == b"2"  # the retry ran it once, not twice
