"""The DATA bytes one proxy process holds at once, all connections together.

A message is read whole into memory before it is checked and relayed (about four times its
size at the peak of processing). With 50 connections per client address and 25 MiB per
message, one client could otherwise make a process hold gigabytes and be killed for it,
which stops mail for everybody. Postfix streams to a queue file and has no such exposure;
here each connection takes what its DATA grew by from a shared budget and, once it is spent,
reads the rest of its message keeping nothing and answers 452 (try again later). What a
message took is given back as soon as its DATA is answered, so a refusal lasts only as long
as the big messages that caused it.
"""

from __future__ import annotations

from typing import Protocol


class Gauge(Protocol):
    def set(self, value: float) -> None: ...


class DataBudget:
    """Bytes of DATA in flight in this process, up to ``limit`` (0: no limit); ``held_gauge``
    follows what is held, so operators see how near the 452s a process runs."""

    def __init__(self, limit: int = 0, held_gauge: Gauge | None = None):
        self.limit = max(0, limit)
        self.held = 0
        self._gauge = held_gauge

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes; False (nothing held) when that would pass the limit."""
        if self.limit and self.held + size > self.limit:
            return False
        self.held += size
        if self._gauge is not None:
            self._gauge.set(self.held)
        return True

    def give_back(self, size: int) -> None:
        self.held = max(0, self.held - size)
        if self._gauge is not None:
            self._gauge.set(self.held)
