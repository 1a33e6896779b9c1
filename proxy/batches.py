"""Work that many sessions hand over at once, done in batches in a thread: what arrives
while a batch runs goes into the next one.

Filing an archive copy is a database transaction and a synced file per message. Done one
by one, each in its own thread hop and transaction, it cost the proxy about as much CPU as
everything else on the content path (1.9 ms a message at 20 concurrent sessions, where the
whole path without it took 2.6 ms). Batched, a busy proxy pays the hop, the transaction and
the folder sync once per batch; an idle one still files each message at once (a batch of
one), so nothing waits for a batch to fill.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Batches:
    """``await add(item)`` gives ``run(items)[i]`` for the item, ``run`` taking every item
    queued since the last batch began (at most ``size``), in the loop's default executor.
    A result that is an exception is raised to its caller; when ``run`` raises, every
    caller of that batch gets the exception."""

    def __init__(self, run: Callable[[list], list], size: int = 64):
        self._run = run
        self._size = size
        self._queued: list[tuple[Any, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None

    async def add(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        # A caller that goes away (its session cancelled) leaves its item in the batch: the
        # work is done all the same, only its answer is not waited for (nor its error).
        done.add_done_callback(_retrieved)
        self._queued.append((item, done))
        if self._runner is None:
            self._runner = loop.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queued:
                batch, self._queued = self._queued[:self._size], self._queued[self._size:]
                try:
                    results = await loop.run_in_executor(None, self._run,
                                                         [item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} "
                                           "results")
                except Exception as exc:  # every caller of the batch gets it
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                except BaseException:
                    self._queued[:0] = batch  # cancelled below with the rest
                    raise
                for (_, done), result in zip(batch, results, strict=True):
                    if done.done():
                        continue
                    if isinstance(result, Exception):
                        done.set_exception(result)
                    else:
                        done.set_result(result)
        finally:
            self._runner = None
            for _, done in self._queued:  # only when this task itself was cancelled
                done.cancel()
            self._queued = []

    async def close(self) -> None:
        """Wait until every queued item is done."""
        while self._runner is not None:
            await asyncio.shield(self._runner)


def _retrieved(done: asyncio.Future) -> None:
    if not done.cancelled():
        done.exception()
