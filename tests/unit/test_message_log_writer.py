"""The proxy's message-log writer: a hung Redis holds one pipeline, never one connection per
message, and a full queue drops records (counted) instead of growing or delaying anyone."""

from __future__ import annotations

import asyncio
import time

from proxy import message_log as mlog
from proxy import metrics
from proxy.handler import RateLimitedLog


class FakeRedis:
    """A Redis of pipelines only: what each pipeline sends is answered by ``_answer``."""

    def __init__(self):
        self.sent: list[dict] = []

    async def _answer(self) -> None:
        raise NotImplementedError

    def pipeline(self, transaction=False):
        redis = self

        class Pipe:
            def __init__(self):
                self.fields = []

            def xadd(self, stream, fields, **_):
                self.fields.append(fields)

            async def execute(self):
                await redis._answer()
                redis.sent.extend(self.fields)
        return Pipe()


class HungRedis(FakeRedis):
    """A Redis whose pipelines never answer until released."""

    def __init__(self):
        super().__init__()
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()

    async def _answer(self) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await self.release.wait()
        self.in_flight -= 1


def lost() -> float:
    return metrics.MESSAGE_LOG_ERRORS._value.get()


def test_a_hung_redis_holds_one_round_trip_and_a_full_queue_drops_records():
    async def scenario():
        redis = HungRedis()
        # no linger: the first record goes out the moment it is written, as it would
        # whenever Redis hangs after a quiet spell
        log = mlog.MessageLog(redis, maxlen=1000, faults=RateLimitedLog(), limit=50,
                              linger=0)
        before = lost()
        for n in range(80):
            log.write(mlog.finish(mlog.new_record(float(n), "192.0.2.1"), "250 OK"))
            await asyncio.sleep(0)  # each SMTP reply goes out at once: nothing awaits Redis
        assert redis.most_in_flight == 1
        redis.release.set()
        await log.close()
        assert redis.most_in_flight == 1
        return len(redis.sent), lost() - before

    sent, dropped = asyncio.run(scenario())
    assert sent + dropped == 80
    assert dropped == 29  # one record went out before the hang, 50 waited, the rest dropped


class SlowRedis(FakeRedis):
    """A Redis whose pipelines take ``delay`` seconds to answer; it counts them."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.trips = 0

    async def _answer(self) -> None:
        self.trips += 1
        await asyncio.sleep(self.delay)


def test_records_written_while_a_batch_is_sent_linger_for_the_next_one():
    """A record every 2 ms and a round trip of 10 ms: what comes in while a batch is on its
    way waits out the linger with the records after it, rather than going at once in a
    round trip of its own (and the next, and the next)."""
    linger = 0.05

    async def scenario():
        redis = SlowRedis(delay=0.01)
        log = mlog.MessageLog(redis, maxlen=1000, faults=RateLimitedLog(), linger=linger)
        started = time.monotonic()
        for n in range(50):
            log.write(mlog.finish(mlog.new_record(float(n), "192.0.2.1"), "250 OK"))
            await asyncio.sleep(0.002)
        writing = time.monotonic() - started
        await log.close()
        return redis, writing

    redis, writing = asyncio.run(scenario())
    assert len(redis.sent) == 50
    # a batch per linger while records came (about 100 ms: 2 or 3), and the close's; a
    # round trip each time one ends would make one per 10 ms
    assert redis.trips <= writing / linger + 2
