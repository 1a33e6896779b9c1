"""The proxy's database calls while a sender waits: in threads of their own, each given up
after PROXY_DATABASE_TIMEOUT seconds.

A hung database (a network black hole, a frozen server) answers nothing and raises
nothing: a call waited for ever, the sender got no reply at all, and each such call held a
thread, so that the checks of big messages and, with them, scrypt (AUTH) waited too. Given
up, a call raises ``DatabaseTimeout`` and the sender gets 4xx; its thread goes on until the
database answers or the driver's own bounds end it (``outgoing.db.engine_options``). These
threads are the database's alone: the ones blocked there take none from anything else.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

DATABASE_THREADS = 8  # the engine's pool holds 5 connections, and 10 more when busy


class DatabaseTimeout(TimeoutError):
    """The database did not answer in time; the sender gets 4xx."""


class Waiter:
    """Whether the caller of a write still waits for it, decided once: the thread says
    ``done`` after committing, the caller ``give_up`` when its time is over; whichever comes
    first wins, so a message is either acknowledged or undone, never both nor neither."""

    def __init__(self):
        self._lock = threading.Lock()
        self._outcome: str | None = None

    def _settle(self, outcome: str) -> bool:
        with self._lock:
            if self._outcome is None:
                self._outcome = outcome
            return self._outcome == outcome

    def waiting(self) -> bool:
        """Asked before committing: False means roll back (the caller has answered 4xx)."""
        with self._lock:
            return self._outcome is None

    def done(self) -> bool:
        """Committed: True when the caller will have the result, False when it gave up
        meanwhile and what was committed must be undone."""
        return self._settle("done")

    def give_up(self) -> bool:
        """The caller's time is over: True unless the write was done already."""
        return self._settle("given up")


class Database:
    def __init__(self, timeout: float, threads: int = DATABASE_THREADS):
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="database")

    def _start(self, fn, *args, **kwargs) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._executor,
                                                          partial(fn, *args, **kwargs))

    def _timeout(self) -> DatabaseTimeout:
        return DatabaseTimeout(f"the database did not answer within {self.timeout:g} s")

    async def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in a database thread; ``DatabaseTimeout`` when it takes
        longer than ``timeout`` (what it does later is then nobody's answer)."""
        try:
            return await asyncio.wait_for(self._start(fn, *args, **kwargs), self.timeout)
        except TimeoutError:
            raise self._timeout() from None

    async def write(self, fn, *args, **kwargs):
        """``fn(waiter, *args, **kwargs)``, a write the sender's reply depends on, as
        ``call``; ``fn`` asks ``waiter.waiting()`` before it commits and ``waiter.done()``
        after, and undoes the write when that is False: a sender answered 4xx sends the
        message again, and a copy kept as well would be a duplicate."""
        waiter = Waiter()
        future = self._start(fn, waiter, *args, **kwargs)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            if not waiter.give_up():  # committed just now: the result is on its way
                return await future
            future.cancel()  # not started yet: it never will be
            raise self._timeout() from None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
