"""Concurrent connections per client IP, counted across all proxy processes of the machine.

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

import mmap
import zlib

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
