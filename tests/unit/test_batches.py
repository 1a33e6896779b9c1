"""proxy.batches.Batches: what sessions hand over while a batch runs goes into the next
batch, each caller gets its own result or error, and nothing queued is dropped."""

from __future__ import annotations

import asyncio
import threading

import pytest

from proxy.batches import Batches


class Recorder:
    """A ``run`` that records its batches; the first batch waits until released, so that
    the items added meanwhile queue up behind it."""

    def __init__(self):
        self.batches: list[list] = []
        self.release = threading.Event()

    def __call__(self, items: list) -> list:
        if not self.batches:
            self.release.wait(5)
        self.batches.append(list(items))
        return [ValueError(f"bad {item}") if item < 0 else item * 10 for item in items]


def test_items_added_during_a_batch_go_together_into_the_next():
    async def body(run: Recorder):
        batches = Batches(run, size=3)
        first = asyncio.ensure_future(batches.add(1))
        await asyncio.sleep(0.05)  # the first batch runs, alone
        rest = [asyncio.ensure_future(batches.add(n)) for n in (2, 3, 4, 5, 6)]
        await asyncio.sleep(0.05)
        run.release.set()
        return await first, await asyncio.gather(*rest)

    run = Recorder()
    assert asyncio.run(body(run)) == (10, [20, 30, 40, 50, 60])
    assert run.batches == [[1], [2, 3, 4], [5, 6]]


def test_an_error_goes_to_its_own_caller_only():
    async def body():
        run = Recorder()
        run.release.set()
        batches = Batches(run)
        ok, bad, other = (asyncio.ensure_future(batches.add(n)) for n in (1, -2, 3))
        with pytest.raises(ValueError, match="bad -2"):  # raised, not handed back
            await bad
        return await ok, await other, run.batches

    assert asyncio.run(body()) == (10, 30, [[1, -2, 3]])


def test_a_batch_that_fails_fails_its_callers_and_the_next_batch_still_runs():
    calls = []

    def run(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise OSError("disk full")
        return items

    async def body():
        batches = Batches(run)
        failed = await asyncio.gather(batches.add("a"), batches.add("b"),
                                      return_exceptions=True)
        return failed, await batches.add("c")

    failed, later = asyncio.run(body())
    assert [type(e) for e in failed] == [OSError, OSError]
    assert later == "c" and calls == [["a", "b"], ["c"]]


def test_a_caller_that_goes_away_leaves_its_item_done_and_close_waits_for_it():
    async def body(run: Recorder):
        batches = Batches(run)
        blocked = asyncio.ensure_future(batches.add(1))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batches.add(2))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        run.release.set()
        await batches.close()
        assert blocked.done()

    run = Recorder()
    asyncio.run(body(run))
    assert run.batches == [[1], [2]]
