"""Concurrent connections: per client address across all proxy processes of the machine, and
all of one process's together.

Per client address: an IPv4 address, or an IPv6 /64 (one subscriber's network: a client that
owns a /64 could otherwise open connections from as many addresses as it likes). The parent
creates one shared anonymous mapping before it forks the workers: an array of int32 counters
per worker, indexed by a keyed hash of the client address. A worker writes only its
own array (so no locks: each array has one writer, the worker's single event loop); the check
sums one slot over every array. When a worker dies, the parent zeroes that worker's array
before it starts the replacement, so a crash never leaves connections counted. No Redis round
trip, no per-connection allocation.

Two addresses whose hashes share a slot share a cap; with 65536 slots that is rare, and it
only ever makes the cap stricter for them, never looser. The hash is keyed with a secret drawn
when the parent makes the table (its workers inherit it): with an unkeyed one (CRC-32) a client
could work out offline which of its addresses (any /64 of a /48 it holds) shares the slot of
another customer's server, fill that slot and lock the other customer out.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mmap
import os
import resource

from scoring.locks import auth_network

log = logging.getLogger("proxy")

SLOTS = 65536
_INT = 4


class ConnectionCounts:
    def __init__(self, workers: int = 1, key: bytes | None = None):
        self.workers = max(1, workers)
        self._memory = mmap.mmap(-1, self.workers * SLOTS * _INT)  # MAP_SHARED: survives fork
        self._counts = memoryview(self._memory).cast("i")
        self.worker = 0  # the array this process writes; set in the child after fork
        self._key = key or os.urandom(16)  # the slots' secret, inherited by the workers

    def slot(self, ip: str) -> int:
        digest = hashlib.blake2b(client_key(ip).encode("utf-8", "surrogateescape"),
                                 key=self._key, digest_size=4).digest()
        return int.from_bytes(digest, "little") & (SLOTS - 1)

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


def client_key(ip: str) -> str:
    """What the per-address cap counts: an IPv4 address (also when it comes IPv4-mapped
    through an IPv6 socket), or the /64 of an IPv6 address."""
    return auth_network(ip, v4=32, v6=64)


def raise_file_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit, as servers do (a
    soft limit of 1024 is a few hundred idle clients); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d (%s)", soft, hard, exc)
            return soft
        log.info("open-file limit raised from %d to %d", soft, hard)
        return hard
    return soft


def default_max_connections() -> int:
    """Half the process's file descriptors: the other half is for the next hop (one
    connection per message in flight), Redis, the database and files. 0 (no cap) when
    descriptors are unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 0 if soft == resource.RLIM_INFINITY else max(1, soft // 2)


class OpenConnections:
    """The connections one process serves: a cap on all of them together (file descriptors
    run out per process, and then nobody is served), and the drain at shutdown.

    Each member is a protocol with ``drain()`` (end it now if it is between transactions)
    and ``shut_down()`` (421 and close, whatever it is doing)."""

    def __init__(self, limit: int = 0):
        self.limit = limit
        self.draining = False
        self._open: set = set()
        self._emptied: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._open)

    def add(self, connection) -> bool:
        """Count a new connection; False (not counted) when the process has ``limit``."""
        if self.limit and len(self._open) >= self.limit:
            return False
        self._open.add(connection)
        return True

    def discard(self, connection) -> None:
        self._open.discard(connection)
        if not self._open and self._emptied is not None:
            self._emptied.set()

    async def drain(self, seconds: float, answering_seconds: float = 0.0) -> None:
        """Shutdown, once the listening socket is closed: sessions between transactions end
        at once, with 421; those in a transaction finish it (their next reply is followed by
        421) for up to ``seconds``; then whatever is left gets 421 and is closed, except a
        session whose message is in and waits for its reply (``answering``: the next hop
        may have it already, and a 421 would have the client send it again), which gets up
        to ``answering_seconds`` more (the next hop's timeout)."""
        self.draining = True
        self._emptied = asyncio.Event()
        for connection in list(self._open):
            connection.drain()
        if self._open and seconds > 0:
            log.info("shutdown: waiting up to %g s for the transactions in flight", seconds)
            await self._wait(seconds)
        if self._open:
            busy = [c for c in self._open if not getattr(c, "answering", False)]
            if busy:
                log.warning("shutdown: %d connections still busy after %g s; closed with 421",
                            len(busy), seconds)
                for connection in busy:
                    connection.shut_down()
            answering = len(self._open) - len(busy)
            if answering and answering_seconds > 0:
                log.info("shutdown: waiting up to %g s more for %d messages' replies",
                         answering_seconds, answering)
            await self._wait(answering_seconds if answering and answering_seconds > 0 else 1)
        if self._open:
            log.warning("shutdown: %d connections still open; closed with 421", len(self._open))
            for connection in list(self._open):
                connection.shut_down()
            await self._wait(1)  # the closed ones end (their sessions give back what they owe)

    async def _wait(self, seconds: float) -> None:
        """Until every connection has ended, or ``seconds``."""
        if not self._open:
            return
        self._emptied.clear()
        try:
            await asyncio.wait_for(self._emptied.wait(), timeout=seconds)
        except TimeoutError:
            pass
