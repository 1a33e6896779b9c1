"""Who is told of an identity's lock: only an address of the user's own domain, whatever the
identity holds (it is what the sender claimed, and a customer may claim anything)."""

from __future__ import annotations

import pytest

from outgoing.models import Domain, Identity, OutgoingUser
from worker.lock_mail import own_address


def identity(value: str) -> Identity:
    return Identity(value=value, user=OutgoingUser(name="192.0.2.1", kind="ip",
                                                   domain=Domain(name="example.com")))


@pytest.mark.parametrize("value", [
    "", "@", "victim@", "@example.com", "victim@example.com\r\nbcc@b.test",
    "victim\x00@example.com", "vic\x1btim@example.com", "victim@example.com\x00",
    "x" * 65 + "@example.com", "victim@" + "a" * 300 + ".example.com",
    "victim@example.com." + "a" * 300, "victim@-example.com", "victim@[192.0.2.1]",
    "victim@exam ple.com", "victim@b.test", "victim@example.com.b.test",
])
def test_a_hostile_or_foreign_identity_is_never_the_notices_recipient(value):
    assert own_address(identity(value)) is None


@pytest.mark.parametrize("value", ["victim@example.com", "victim@EXAMPLE.com",
                                   "victim@example.com."])
def test_an_address_of_the_users_own_domain_is_told_spelled_with_that_domain(value):
    assert own_address(identity(value)) == "victim@example.com"
