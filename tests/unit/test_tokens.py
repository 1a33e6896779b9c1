"""Unlock links: only links we issued, unchanged and young enough, unlock anything."""

import pytest

from outgoing.tokens import InvalidUnlockToken, make_unlock_token, read_unlock_token

SECRET = "test-secret-key"
ISSUED = 1_741_080_000.0


def _token(**overrides):
    fields = {"kind": "identity", "target_id": 42, "lock_id": "lock-7", "now": ISSUED}
    fields.update(overrides)
    return make_unlock_token(SECRET, **fields)


def test_token_reads_back_as_the_claim_it_was_made_for():
    claim = read_unlock_token(SECRET, _token(), now=ISSUED + 60)

    assert (claim.kind, claim.target_id, claim.lock_id) == ("identity", 42, "lock-7")
    assert claim.jti


def test_each_token_gets_its_own_jti_for_single_use_tracking():
    first = read_unlock_token(SECRET, _token(), now=ISSUED)
    second = read_unlock_token(SECRET, _token(), now=ISSUED)

    assert first.jti != second.jti


def test_token_is_still_valid_at_exactly_max_age():
    claim = read_unlock_token(SECRET, _token(), max_age=3600, now=ISSUED + 3600)

    assert claim.target_id == 42


def test_token_older_than_max_age_is_expired():
    with pytest.raises(InvalidUnlockToken) as excinfo:
        read_unlock_token(SECRET, _token(), max_age=3600, now=ISSUED + 3601)

    assert excinfo.value.reason == "expired"


def test_default_lifetime_is_one_day():
    token = _token()

    read_unlock_token(SECRET, token, now=ISSUED + 86400)
    with pytest.raises(InvalidUnlockToken) as excinfo:
        read_unlock_token(SECRET, token, now=ISSUED + 86401)

    assert excinfo.value.reason == "expired"


def test_changed_payload_is_tampered():
    token = _token(target_id=42)
    other = _token(target_id=43)
    # Our payload with the other token's timestamp and signature.
    forged = token.split(".")[0] + "." + ".".join(other.split(".")[1:])

    with pytest.raises(InvalidUnlockToken) as excinfo:
        read_unlock_token(SECRET, forged, now=ISSUED)

    assert excinfo.value.reason == "tampered"


def test_token_signed_with_another_secret_is_tampered():
    token = make_unlock_token("another-secret", kind="user", target_id=1, lock_id="x", now=ISSUED)

    with pytest.raises(InvalidUnlockToken) as excinfo:
        read_unlock_token(SECRET, token, now=ISSUED)

    assert excinfo.value.reason == "tampered"


@pytest.mark.parametrize("garbage", ["", "not-a-token", "a.b.c"])
def test_garbage_is_not_accepted(garbage):
    with pytest.raises(InvalidUnlockToken) as excinfo:
        read_unlock_token(SECRET, garbage, now=ISSUED)

    assert excinfo.value.reason in {"tampered", "invalid"}


def test_unknown_kind_cannot_be_issued():
    with pytest.raises(ValueError):
        make_unlock_token(SECRET, kind="admin", target_id=1, lock_id="x")
