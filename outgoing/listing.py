"""Paged lists for the control panel that stay fast with 100,000s of rows.

Keyset pagination: a page is "the next ``size`` rows after this (sort key, id)", served by
walking an index from that point, never OFFSET (which reads every row it skips). A search is
a prefix, turned into a range on the same index (``name >= 'ab' AND name < 'ab\\uffff'``),
so it is an index seek on SQLite and PostgreSQL alike. Each page is one query per source of
rows, with the domain (and the user of an identity) joined in, so rendering a row never
queries again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select

from outgoing.ids import parse_id
from outgoing.models import AuditEvent, Domain, Identity, OutgoingUser
from scoring.ipranges import parse_client_ip

PAGE_SIZE = 50
MAX_SEARCH = 320
MAX_DOMAIN_MATCHES = 10  # domains whose users a search by domain-name prefix lists
_TOP = "\U0010ffff"


@dataclass(frozen=True)
class Cursor:
    """A position in a list: the sort key and id of a row (the page starts after it)."""

    key: str
    id: int

    def encode(self) -> str:
        return f"{self.id}:{self.key}"

    @classmethod
    def decode(cls, text: str | None) -> Cursor | None:
        """The cursor in ``text``, or None for a missing or tampered one (first page)."""
        if not text or ":" not in text:
            return None
        id_text, _, key = text.partition(":")
        row_id = parse_id(id_text)
        if row_id is None:
            return None
        return cls(key[:400], row_id)


@dataclass
class Page:
    rows: list[Any]
    next: str | None = None  # cursor of the following page
    previous: str | None = None  # cursor of the preceding page ("before")
    total: int | None = None


def prefix_range(column, prefix: str):
    """Rows whose ``column`` starts with ``prefix``, as an index range."""
    return and_(column >= prefix, column < prefix + _TOP)


def _after(key_col, id_col, cursor: Cursor, backwards: bool):
    """Rows strictly after (or before) ``cursor`` in (key, id) order; the first clause lets
    the planner start the index walk at the cursor instead of at the first row."""
    if backwards:
        return and_(key_col <= cursor.key,
                    or_(key_col < cursor.key, id_col < cursor.id))
    return and_(key_col >= cursor.key, or_(key_col > cursor.key, id_col > cursor.id))


def _ordered(query, key_col, id_col, backwards: bool):
    if backwards:
        return query.order_by(key_col.desc(), id_col.desc())
    return query.order_by(key_col, id_col)


def _paged(session, queries, key_of, *, after: Cursor | None, before: Cursor | None,
           size: int) -> Page:
    """Merge the first rows of each source query into one page with its cursors."""
    backwards = before is not None and after is None
    seen: dict[int, Any] = {}
    for query in queries:
        for row in session.scalars(query.limit(size + 1)).unique():
            seen.setdefault(row.id, row)
    rows = sorted(seen.values(), key=lambda r: (key_of(r), r.id), reverse=backwards)
    more = len(rows) > size
    rows = rows[:size]
    if backwards:
        rows.reverse()
    page = Page(rows)
    if rows:
        first = Cursor(key_of(rows[0]), rows[0].id).encode()
        last = Cursor(key_of(rows[-1]), rows[-1].id).encode()
        if backwards:
            page.previous = first if more else None
            page.next = last
        else:
            page.next = last if more else None
            page.previous = first if after is not None else None
    return page


def _cursors(after: str | None, before: str | None) -> tuple[Cursor | None, Cursor | None]:
    return Cursor.decode(after), Cursor.decode(before)


# --- outgoing users ---------------------------------------------------------------------

def users_page(session, *, domain_id: int | None = None, search: str = "",
               after: str | None = None, before: str | None = None,
               size: int = PAGE_SIZE) -> Page:
    """Outgoing users ordered by name: all (``domain_id`` None) or one domain's.

    A search lists users whose name starts with it, the users of domains whose name starts
    with it (all domains only), and, when it is an IP address, the ranges containing it."""
    after_c, before_c = _cursors(after, before)
    backwards = before_c is not None and after_c is None
    cursor = after_c or before_c
    search = search.strip().lower()[:MAX_SEARCH]

    def source(*conditions):
        query = select(OutgoingUser).where(*conditions)
        if domain_id is not None:
            query = query.where(OutgoingUser.domain_id == domain_id)
        if cursor is not None:
            query = query.where(_after(OutgoingUser.name, OutgoingUser.id, cursor, backwards))
        return _ordered(query, OutgoingUser.name, OutgoingUser.id, backwards)

    if not search:
        queries = [source()]
    else:
        queries = [source(prefix_range(OutgoingUser.name, search))]
        if domain_id is None:
            domain_ids = session.scalars(
                select(Domain.id).where(prefix_range(Domain.name, search))
                .order_by(Domain.name).limit(MAX_DOMAIN_MATCHES))
            queries += [source(OutgoingUser.domain_id == d) for d in domain_ids]
        queries += _containing_ranges(search, source)
    page = _paged(session, queries, lambda u: u.name, after=after_c, before=before_c,
                  size=size)
    if not search:
        count = select(func.count()).select_from(OutgoingUser)
        if domain_id is not None:
            count = count.where(OutgoingUser.domain_id == domain_id)
        page.total = session.scalar(count)
    return page


def _containing_ranges(search: str, source) -> list:
    """For an IP address: the IP users whose range contains it (nearest starts first)."""
    parsed = parse_client_ip(search)
    if parsed is None:
        return []
    family, value = parsed
    hexed = f"{value:032x}"
    # Ranges starting at or below the address, nearest first; a bounded look back keeps
    # this an index seek however many ranges there are.
    starts = (select(OutgoingUser.id)
              .where(OutgoingUser.ip_family == family, OutgoingUser.ip_first <= hexed)
              .order_by(OutgoingUser.ip_family.desc(), OutgoingUser.ip_first.desc())
              .limit(200).subquery())
    return [source(OutgoingUser.id.in_(select(starts.c.id)), OutgoingUser.ip_last >= hexed)]


# --- identities ---------------------------------------------------------------------------

def identities_page(session, *, domain_id: int | None = None, user_id: int | None = None,
                    search: str = "", after: str | None = None, before: str | None = None,
                    size: int = PAGE_SIZE) -> Page:
    """Identities ordered by value: all, one domain's or one outgoing user's."""
    after_c, before_c = _cursors(after, before)
    backwards = before_c is not None and after_c is None
    cursor = after_c or before_c
    search = search.strip()[:MAX_SEARCH]

    def source(*conditions):
        query = select(Identity).where(*conditions)
        if user_id is not None:
            query = query.where(Identity.user_id == user_id)
        if domain_id is not None:
            query = query.where(Identity.domain_id == domain_id)
        if cursor is not None:
            query = query.where(_after(Identity.value, Identity.id, cursor, backwards))
        return _ordered(query, Identity.value, Identity.id, backwards)

    if not search:
        queries = [source()]
    else:
        queries = [source(prefix_range(Identity.value, prefix))
                   for prefix in dict.fromkeys((search, search.lower()))]
    return _paged(session, queries, lambda i: i.value, after=after_c, before=before_c,
                  size=size)


# --- audit log ----------------------------------------------------------------------------

def audit_page(session, *, domain_id: int | None = None, after: str | None = None,
               size: int = PAGE_SIZE) -> Page:
    """Audit events, newest first."""
    cursor = Cursor.decode(after)
    query = select(AuditEvent).order_by(AuditEvent.id.desc())
    if domain_id is not None:
        query = query.where(AuditEvent.domain_id == domain_id)
    if cursor is not None:
        query = query.where(AuditEvent.id < cursor.id)
    rows = list(session.scalars(query.limit(size + 1)))
    page = Page(rows[:size])
    if len(rows) > size:
        page.next = Cursor("", rows[size - 1].id).encode()
    return page


# --- domains ------------------------------------------------------------------------------

def domains_page(session, *, search: str = "", after: str | None = None,
                 before: str | None = None, size: int = PAGE_SIZE) -> Page:
    after_c, before_c = _cursors(after, before)
    backwards = before_c is not None and after_c is None
    cursor = after_c or before_c
    query = select(Domain)
    search = search.strip().lower()[:MAX_SEARCH]
    if search:
        query = query.where(prefix_range(Domain.name, search))
    if cursor is not None:
        query = query.where(_after(Domain.name, Domain.id, cursor, backwards))
    query = _ordered(query, Domain.name, Domain.id, backwards)
    page = _paged(session, [query], lambda d: d.name, after=after_c, before=before_c,
                  size=size)
    if not search:
        page.total = session.scalar(select(func.count()).select_from(Domain))
    return page


def user_counts(session, domain_ids: list[int]) -> dict[int, int]:
    """Outgoing users per domain, for one page of domains (one grouped query)."""
    if not domain_ids:
        return {}
    rows = session.execute(select(OutgoingUser.domain_id, func.count())
                           .where(OutgoingUser.domain_id.in_(domain_ids))
                           .group_by(OutgoingUser.domain_id))
    return dict(rows.all())
