"""Signed, expiring links: the unlock links mailed to a domain's contact when something is
locked, and the links that confirm an address for a domain's notices.

A token proves that we issued it (HMAC over the payload and timestamp with the app secret) and
when. It does not by itself stop reuse: every token carries a random ``jti``, and the caller
that performs the unlock must record that jti (e.g. a unique column or a Redis SET NX with the
token's max_age as TTL) and refuse a jti it has seen before. A token also names the lock it
was issued for (``lock_id``), so the caller should refuse it once that lock has ended.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from itsdangerous import (
    BadData,
    BadSignature,
    SignatureExpired,
    TimestampSigner,
    URLSafeTimedSerializer,
)

KINDS = ("user", "identity")
DEFAULT_MAX_AGE = 86400
_SALT = "outbound-guard.unlock-link"
_CONFIRM_SALT = "outbound-guard.confirm-address"
CONFIRM_MAX_AGE = 7 * 86400


class InvalidUnlockToken(Exception):
    """The link cannot be used; ``reason`` is "expired", "tampered" or "invalid"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class UnlockClaim:
    """What a valid token allows: unlock ``kind`` ``target_id`` for lock ``lock_id``, once."""

    kind: str
    target_id: int
    lock_id: str
    jti: str


class _ClockedSigner(TimestampSigner):
    """TimestampSigner whose clock is passed in, so tests can move time without patching."""

    def __init__(self, *args, clock: Callable[[], float] = time.time, **kwargs):
        super().__init__(*args, **kwargs)
        self._clock = clock

    def get_timestamp(self) -> int:
        return int(self._clock())


def _serializer(secret: str, now: float | None, salt: str = _SALT) -> URLSafeTimedSerializer:
    if not secret:
        raise ValueError("a signed link needs a non-empty secret")
    clock = time.time if now is None else (lambda: now)
    return URLSafeTimedSerializer(
        secret, salt=salt, signer=_ClockedSigner, signer_kwargs={"clock": clock}
    )


def _loads(secret: str, token: str, max_age: int, now: float | None, salt: str):
    """A token's payload once its signature and age are checked, else InvalidUnlockToken."""
    if not isinstance(token, str) or not token:
        raise InvalidUnlockToken("invalid")
    try:
        return _serializer(secret, now, salt).loads(token, max_age=max_age)
    except SignatureExpired as exc:
        raise InvalidUnlockToken("expired") from exc
    except BadSignature as exc:
        # Wrong secret, altered payload, truncated link: all look the same from here.
        raise InvalidUnlockToken("tampered") from exc
    except BadData as exc:
        raise InvalidUnlockToken("invalid") from exc


def make_unlock_token(
    secret: str, *, kind: str, target_id: int, lock_id: str, now: float | None = None
) -> str:
    """Return a URL-safe token for an unlock link; ``now`` overrides the issue time."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if isinstance(target_id, bool) or not isinstance(target_id, int):
        raise ValueError("target_id must be an int")
    if not isinstance(lock_id, str) or not lock_id:
        raise ValueError("lock_id must be a non-empty string")
    payload = {"k": kind, "t": target_id, "l": lock_id, "j": secrets.token_urlsafe(16)}
    return _serializer(secret, now).dumps(payload)


def read_unlock_token(
    secret: str, token: str, *, max_age: int = DEFAULT_MAX_AGE, now: float | None = None
) -> UnlockClaim:
    """Check signature and age of ``token`` and return its claim, or raise InvalidUnlockToken.

    A token dated after ``now`` (clocks of web and worker apart) is reported as expired.
    """
    payload = _loads(secret, token, max_age, now, _SALT)
    try:
        claim = UnlockClaim(
            kind=payload["k"], target_id=payload["t"], lock_id=payload["l"], jti=payload["j"]
        )
    except (KeyError, TypeError) as exc:
        raise InvalidUnlockToken("invalid") from exc
    if (
        claim.kind not in KINDS
        or isinstance(claim.target_id, bool)
        or not isinstance(claim.target_id, int)
        or not isinstance(claim.lock_id, str)
        or not isinstance(claim.jti, str)
        or not claim.jti
    ):
        raise InvalidUnlockToken("invalid")
    return claim


@dataclass(frozen=True)
class AddressClaim:
    """What a valid confirmation link says: ``address`` may get ``domain_id``'s notices."""

    domain_id: int
    address: str


def make_confirm_token(secret: str, *, domain_id: int, address: str,
                       now: float | None = None) -> str:
    """A URL-safe token for the link that confirms ``address`` for a domain's notices (its own
    salt: an unlock token is never a confirmation, nor the other way round)."""
    return _serializer(secret, now, _CONFIRM_SALT).dumps({"d": domain_id, "a": address})


def read_confirm_token(secret: str, token: str, *, max_age: int = CONFIRM_MAX_AGE,
                       now: float | None = None) -> AddressClaim:
    """The claim of a confirmation token, or InvalidUnlockToken("expired"/"tampered"/
    "invalid")."""
    payload = _loads(secret, token, max_age, now, _CONFIRM_SALT)
    if not isinstance(payload, dict):
        raise InvalidUnlockToken("invalid")
    domain_id, address = payload.get("d"), payload.get("a")
    if isinstance(domain_id, bool) or not isinstance(domain_id, int) \
            or not isinstance(address, str) or not address:
        raise InvalidUnlockToken("invalid")
    return AddressClaim(domain_id=domain_id, address=address)
