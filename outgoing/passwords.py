"""Password hashing for admins and outgoing users (werkzeug's salted scrypt)."""

import secrets
from functools import cache

from werkzeug.security import check_password_hash, generate_password_hash

MIN_LENGTH = 10


def hash_password(password: str) -> str:
    return generate_password_hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    return bool(password_hash) and check_password_hash(password_hash, password)


@cache
def stand_in_hash() -> str:
    """The hash of a random password nobody knows, made like real ones, once per process:
    checking a password for a login that does not exist against it costs what checking a
    wrong password of a real login costs, so the time of a refusal tells nothing."""
    return hash_password(secrets.token_urlsafe(32))


def weakness(password: str) -> str | None:
    """Why a password is too weak to protect a mail relay, or None."""
    if len(password) < MIN_LENGTH:
        return f"Use at least {MIN_LENGTH} characters."
    classes = sum((any(c.islower() for c in password), any(c.isupper() for c in password),
                   any(c.isdigit() for c in password), any(not c.isalnum() for c in password)))
    if classes < 2:
        return "Mix at least two of: lower case, upper case, digits, symbols."
    return None
