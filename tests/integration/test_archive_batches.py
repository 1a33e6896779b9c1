"""The archive in batches: many sessions relaying at once get every message archived exactly
once, each under its own sender's domain, and one message the archive cannot take costs only
its own copy."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from outgoing.archive import ToArchive
from outgoing.db import make_sessionmaker
from outgoing.models import ArchivedMessage, Domain
from outgoing.storage import read_body
from proxy.content import ContentPipeline
from tests.support import data
from tests.support.mail import client, message, send

PASSWORD = "Alice-pass-123"


def archived() -> list[tuple[str, str, str]]:
    return data.query(lambda s: sorted(
        (a.subject, a.mail_from, s.get(Domain, a.domain_id).name)
        for a in s.scalars(select(ArchivedMessage))))


def test_concurrent_sessions_get_every_message_archived_once_under_its_domain(
        instance, start_proxy, sink):
    """Alice's copies under her domain, whatever sender she gives; the provider's shared
    smarthost's under the sender's domain when it is one of ours: both kinds in the same
    batches."""
    data.add_user("example.com", "user", "alice@example.com", PASSWORD, message_archiving=True)
    data.add_user("shop.example.net", "user", "owner@shop.example.net", PASSWORD)
    data.add_user("provider.example", "ip", "127.0.0.0/24", shared_smarthost=True,
                  message_archiving=True)
    proxy = start_proxy()

    def session(n: int) -> int:
        sender = "alice@example.com" if n % 2 else "sales@shop.example.net"
        with client(proxy.port, source="127.0.5.1" if n % 3 else None) as smtp:
            if n % 3:
                smtp.login("alice@example.com", PASSWORD)
            return send(smtp, message(sender=sender, subject=f"copy {n:02d}"),
                        sender=sender)[0]

    with ThreadPoolExecutor(24) as pool:
        assert list(pool.map(session, range(48))) == [250] * 48

    def expected(n: int) -> tuple[str, str, str]:
        sender = "alice@example.com" if n % 2 else "sales@shop.example.net"
        if n % 3:  # alice, authenticated
            return f"copy {n:02d}", sender, "example.com"
        return f"copy {n:02d}", sender, sender.partition("@")[2]  # the smarthost

    assert archived() == sorted(map(expected, range(48)))


def test_a_message_the_archive_cannot_take_costs_only_its_own_copy(instance, proxy_config):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    domain_id = data.query(lambda s: s.scalar(select(Domain.id)))
    pipeline = ContentPipeline(config=proxy_config,
                               sessionmaker=make_sessionmaker(os.environ["DATABASE_URL"]),
                               redis=None, redis_sync=None, clock=time.time)

    def copy(subject: str, body: bytes | None) -> ToArchive:
        return ToArchive(domain_id=domain_id, user_id=None, mail_from="alice@example.com",
                         rcpt_tos=["bob@example.org"], data=body, subject=subject)

    async def body():
        return await asyncio.gather(
            pipeline.archives.add(copy("first", b"Subject: first\r\n\r\none\r\n")),
            pipeline.archives.add(copy("broken", None)),  # no bytes to store
            pipeline.archives.add(copy("third", b"Subject: third\r\n\r\nthree\r\n")),
            return_exceptions=True)

    first, broken, third = asyncio.run(body())
    assert isinstance(broken, TypeError)
    assert [a[0] for a in archived()] == ["first", "third"]

    def bodies(s):
        return {row.id: read_body(proxy_config, row)
                for row in s.scalars(select(ArchivedMessage))}

    assert data.query(bodies) == {first: b"Subject: first\r\n\r\none\r\n",
                                  third: b"Subject: third\r\n\r\nthree\r\n"}


def test_a_database_outage_fails_the_batch_at_once_not_message_by_message(
        instance, proxy_config, tmp_path):
    """The database cannot be opened: every copy of the batch gets the error after one
    attempt (the sessions answer as relayed, the copies are logged as lost); filing them
    one by one would make each session wait for every attempt in turn."""
    attempts = []

    class Counted(ContentPipeline):
        def _archive_together(self, messages):
            attempts.append(len(messages))
            return super()._archive_together(messages)

    unreachable = make_sessionmaker(f"sqlite:///{tmp_path / 'no-such-folder' / 'x.db'}")
    pipeline = Counted(config=proxy_config, sessionmaker=unreachable, redis=None,
                       redis_sync=None, clock=time.time)

    async def body():
        return await asyncio.gather(*(pipeline.archives.add(ToArchive(
            domain_id=1, user_id=None, mail_from="alice@example.com",
            rcpt_tos=["bob@example.org"], data=b"Subject: x\r\n\r\nx\r\n", subject=f"{n}"))
            for n in range(3)), return_exceptions=True)

    outcomes = asyncio.run(body())
    assert all(isinstance(o, OperationalError) for o in outcomes)
    assert attempts == [3]
