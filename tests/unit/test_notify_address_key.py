"""A confirmed notice address is keyed by the mailbox it names, not by how it was spelled:
the next hop delivers each of these spellings to the same mailbox, so a confirmation of one
holds for the others, and a different mailbox never shares a key."""

from __future__ import annotations

import pytest

from outgoing.notify_addresses import address_key


@pytest.mark.parametrize("spelling", [
    "alerts@bücher.example", " Alerts@BÜCHER.example ", '"alerts"@xn--bcher-kva.example',
    '"al\\erts"@bücher.example.', "ALERTS@xn--bcher-kva.EXAMPLE"])
def test_spellings_of_one_mailbox_share_a_key(spelling):
    assert address_key(spelling) == "alerts@xn--bcher-kva.example"


def test_a_quoted_local_part_that_needs_its_quotes_is_another_mailbox():
    assert address_key('"al erts"@a.test') == '"al erts"@a.test'
    assert address_key('"al erts"@a.test') != address_key("alerts@a.test")
    assert address_key('"a@b"@c.test') == '"a@b"@c.test'


def test_what_is_no_mailbox_is_kept_as_written_in_lower_case():
    assert address_key(" Not An Address ") == "not an address"
