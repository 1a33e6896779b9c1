"""The "CRLF only" mark that the message carries from DATA to the relay: given only where
it is true, and lost with any change to the bytes."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from scoring.message import CrlfLines, crlf_lines, lines_end_in_crlf, normalise_line_endings

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_TEXT = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\n\r", b"\r\r\n",
                                  b"\r\n.\r\n", b" "]), max_size=30).map(b"".join)


def _crlf_only(data: bytes) -> bool:
    return _BARE.search(bytes(data)) is None


@settings(max_examples=500, deadline=None)
@given(_TEXT)
def test_plain_bytes_are_scanned(data):
    assert lines_end_in_crlf(data) == _crlf_only(data)


@settings(max_examples=500, deadline=None)
@given(_TEXT)
def test_normalised_bytes_are_marked_and_are_crlf_only(data):
    fixed = normalise_line_endings(data).data
    assert type(fixed) is CrlfLines
    assert _crlf_only(fixed)


@settings(max_examples=500, deadline=None)
@given(st.lists(_TEXT, min_size=1, max_size=4))
def test_joined_parts_are_marked_only_when_each_part_is_crlf_only(parts):
    joined = crlf_lines(*parts)
    assert joined == b"".join(parts)
    assert (type(joined) is CrlfLines) == all(_crlf_only(part) for part in parts)
    if type(joined) is CrlfLines:
        assert _crlf_only(joined)


def test_a_marked_part_is_not_scanned_again_and_a_plain_one_is():
    """The mark stands for the scan: a marked part is taken as it is (so it must only ever
    be made where the scan or the normalisation ran)."""
    assert type(crlf_lines(b"Received: x\r\n", CrlfLines(b"a\r\nb\r\n"))) is CrlfLines
    assert type(crlf_lines(b"Received: x\r\n", b"a\nb\r\n")) is bytes
    assert type(crlf_lines(b"Received: x\n", CrlfLines(b"a\r\nb\r\n"))) is bytes


def test_any_change_to_marked_bytes_gives_plain_bytes():
    data = CrlfLines(b"Subject: x\r\n\r\nbody\r\n")
    for changed in (data[:-1], data + b"\n", b"\r" + data, data.replace(b"\r\n", b"\n"),
                    data.rstrip(b"\n"), data.split(b"\r\n\r\n")[1], data.lower(),
                    CrlfLines.fromhex("0a2e0a"), data.fromhex("0d2e0d0a")):
        assert type(changed) is bytes
        assert lines_end_in_crlf(changed) == _crlf_only(changed)
