"""How many message-log records this process writes for refusals nobody is known for.

A refusal before anyone is known (530 to a client that never authenticated, a failed AUTH, a
connection over the per-address cap) is a record of its own. Such a client can ask for them
as fast as it can send commands and reconnect, and each costs a Redis append, a database row
kept for the retention, and a place in the stream that other customers' records wait in. So
each client network (an IPv4 address, an IPv6 /64) gets ``per_minute`` of them a minute, and
the whole process twenty times that; beyond, the refusal is counted in a metric and logged
once a minute per network, not recorded. Refusals of a known user are always recorded: they
are bounded by that user's own limits and show in that user's own log.
"""

from __future__ import annotations

from collections.abc import Callable

WINDOW = 60.0
IN_ALL = 20  # the process's budget, in client networks' budgets


class AnonymousRecords:
    def __init__(self, per_minute: int, key: Callable[[str], str], max_clients: int = 10000):
        self.per_minute = per_minute
        self.key = key
        self.max_clients = max_clients
        self._window = -1
        self._counts: dict[str, int] = {}
        self._total = 0

    def allow(self, ip: str, now: float) -> tuple[bool, bool]:
        """Whether a refusal from ``ip`` is recorded, and whether this is the first one of
        the network this minute that is not (the moment to say so, once). ``per_minute`` 0:
        every one is recorded."""
        if self.per_minute <= 0:
            return True, False
        window = int(now // WINDOW)
        if window != self._window:
            self._window, self._counts, self._total = window, {}, 0
        network = self.key(ip)
        used = self._counts.get(network)
        if used is None and len(self._counts) >= self.max_clients:
            network, used = "", self._counts.get("", 0)  # the rest of the clients together
        used = (used or 0) + 1
        self._counts[network] = used
        self._total += 1
        if used > self.per_minute or self._total > self.per_minute * IN_ALL:
            return False, used == self.per_minute + 1
        return True, False
