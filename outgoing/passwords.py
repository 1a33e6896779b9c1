"""Password hashing for admins and outgoing users (werkzeug's salted scrypt)."""

from werkzeug.security import check_password_hash, generate_password_hash

MIN_LENGTH = 10


def hash_password(password: str) -> str:
    return generate_password_hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    return bool(password_hash) and check_password_hash(password_hash, password)


def weakness(password: str) -> str | None:
    """Why a password is too weak to protect a mail relay, or None."""
    if len(password) < MIN_LENGTH:
        return f"Use at least {MIN_LENGTH} characters."
    classes = sum((any(c.islower() for c in password), any(c.isupper() for c in password),
                   any(c.isdigit() for c in password), any(not c.isalnum() for c in password)))
    if classes < 2:
        return "Mix at least two of: lower case, upper case, digits, symbols."
    return None
