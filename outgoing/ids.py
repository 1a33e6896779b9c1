"""Row ids read from text (a URL, a query argument, a form field, a page cursor).

The id columns are INTEGER (PostgreSQL's is 4 bytes) and, for the message log, BIGINT. A
number larger than its column holds names no row, but handed to the database it is an
error (SQLite: OverflowError, PostgreSQL: NumericValueOutOfRange), a 500 for a typo; and
``str.isdigit`` also accepts "²", which ``int`` refuses. So every id from a request is
parsed here: ASCII digits, bounded by the column.
"""

from __future__ import annotations

MAX_ID = 2**31 - 1  # INTEGER
MAX_BIG_ID = 2**63 - 1  # BIGINT (the message log)


def parse_id(text: str | None, *, maximum: int = MAX_ID) -> int | None:
    """The id ``text`` spells, or None when it spells none a row can have."""
    if not text or not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if value <= maximum else None
