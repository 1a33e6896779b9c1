"""When to try again the recipients the next hop refused *for now* (4xx) while it accepted
others for the same message.

One reply after DATA cannot speak per recipient, so the sender has been told 250; a proxy has
no queue of its own, so those recipients go to the worker, which retries on a growing schedule
as an MTA's deferred queue does, and gives up with a delivery report to the sender once the
message is older than the give-up age (Postfix's ``maximal_queue_lifetime`` is 5 days).
"""

from __future__ import annotations

from datetime import datetime, timedelta


def parse_delays(raw: str) -> tuple[int, ...]:
    """``"300,900,3600"`` -> (300, 900, 3600): seconds before retry 1, 2, 3, ... (the last
    one repeats). Raises ValueError on anything else."""
    parts = [part.strip() for part in str(raw).split(",") if part.strip()]
    delays = tuple(int(part) for part in parts)
    if not delays or any(d < 0 for d in delays):
        raise ValueError(f"expected comma-separated seconds, got {raw!r}")
    return delays


def next_attempt_at(*, attempt: int, arrival: datetime, now: datetime,
                    delays: tuple[int, ...], give_up_seconds: int) -> datetime | None:
    """When retry ``attempt`` (1 = the first) is due, or None when it would fall after the
    give-up age and the recipients are to be reported as undeliverable instead."""
    due = now + timedelta(seconds=delays[min(attempt, len(delays)) - 1])
    if (due - arrival).total_seconds() > give_up_seconds:
        return None
    return due


def split_refusals(refused: dict[str, tuple[int, str]],
                   ) -> tuple[dict[str, tuple[int, str]], dict[str, tuple[int, str]]]:
    """The next hop's refusals, per recipient, as (for good: 5xx, for now: 4xx or no answer)."""
    final = {r: reply for r, reply in refused.items() if reply[0] >= 500}
    later = {r: reply for r, reply in refused.items() if reply[0] < 500}
    return final, later
