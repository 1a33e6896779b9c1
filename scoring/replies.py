"""SMTP replies as data, so policy can decide a reply without speaking SMTP itself."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP reply line: the basic code and the rest of the line (usually an RFC 3463
    enhanced status code followed by human text). ``str(reply)`` is what an aiosmtpd hook
    returns."""

    code: int
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code}")
        if "\r" in self.text or "\n" in self.text:
            raise ValueError("SMTP reply text must be a single line")

    @property
    def is_transient(self) -> bool:
        """4xx: the sender keeps the message and retries later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5xx: the sender gives up and bounces."""
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}"
