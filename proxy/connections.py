"""Concurrent connections: per client IP across all proxy processes of the machine, and the
ones one process serves (to drain them at shutdown).

The parent creates one shared anonymous mapping before it forks the workers: an array of
int32 counters per worker, indexed by a stable hash of the client IP. A worker writes only its
own array (so no locks: each array has one writer, the worker's single event loop); the check
sums one slot over every array. When a worker dies, the parent zeroes that worker's array
before it starts the replacement, so a crash never leaves connections counted. No Redis round
trip, no per-connection allocation.

Two addresses whose hashes share a slot share a cap; with 65536 slots that is rare, and it
only ever makes the cap stricter for them, never looser.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import zlib

log = logging.getLogger("proxy")

SLOTS = 65536
_INT = 4


class ConnectionCounts:
    def __init__(self, workers: int = 1):
        self.workers = max(1, workers)
        self._memory = mmap.mmap(-1, self.workers * SLOTS * _INT)  # MAP_SHARED: survives fork
        self._counts = memoryview(self._memory).cast("i")
        self.worker = 0  # the array this process writes; set in the child after fork

    @staticmethod
    def slot(ip: str) -> int:
        return zlib.crc32(ip.encode("utf-8", "surrogateescape")) & (SLOTS - 1)

    def count(self, slot: int) -> int:
        """Open connections in ``slot`` over all processes."""
        counts = self._counts
        return sum(counts[w * SLOTS + slot] for w in range(self.workers))

    def acquire(self, ip: str, limit: int) -> int | None:
        """Count a new connection from ``ip``; its slot, or None when that would make more
        than ``limit`` (0: no limit). Counted first, then checked, so two processes racing
        for the last place may both refuse, but never both accept."""
        slot = self.slot(ip)
        own = self.worker * SLOTS + slot
        self._counts[own] += 1
        if limit and self.count(slot) > limit:
            self._counts[own] -= 1
            return None
        return slot

    def release(self, slot: int) -> None:
        own = self.worker * SLOTS + slot
        if self._counts[own] > 0:
            self._counts[own] -= 1

    def clear(self, worker: int) -> None:
        """Forget every connection of a worker that died (the parent, before a replacement)."""
        start = worker * SLOTS * _INT
        self._memory[start:start + SLOTS * _INT] = bytes(SLOTS * _INT)


class OpenConnections:
    """The connections one process serves, to drain them at shutdown.

    Each member is a protocol with ``drain()`` (end it now if it is between transactions)
    and ``shut_down()`` (421 and close, whatever it is doing)."""

    def __init__(self):
        self.draining = False
        self._open: set = set()
        self._emptied: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._open)

    def add(self, connection) -> None:
        self._open.add(connection)

    def discard(self, connection) -> None:
        self._open.discard(connection)
        if not self._open and self._emptied is not None:
            self._emptied.set()

    async def drain(self, seconds: float) -> None:
        """Shutdown, once the listening socket is closed: sessions between transactions end
        at once, with 421; those in a transaction finish it (their next reply is followed by
        421) for up to ``seconds``; then whatever is left gets 421 and is closed."""
        self.draining = True
        self._emptied = asyncio.Event()
        for connection in list(self._open):
            connection.drain()
        if self._open and seconds > 0:
            log.info("shutdown: waiting up to %g s for the transactions in flight", seconds)
            try:
                await asyncio.wait_for(self._emptied.wait(), timeout=seconds)
            except TimeoutError:
                pass
        if self._open:
            log.warning("shutdown: %d connections still busy after %g s; closed with 421",
                        len(self._open), seconds)
            for connection in list(self._open):
                connection.shut_down()
            try:  # let the closed connections end (their sessions give back what they owe)
                await asyncio.wait_for(self._emptied.wait(), timeout=1)
            except TimeoutError:
                pass
