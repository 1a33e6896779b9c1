"""Set-up for worker tests: locks and quarantined messages as data, and a real worker run.

Time is data here: a lock whose ``locked_at`` lies an hour in the past has timed out for the
real worker, so no test sleeps or moves a clock.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from contextlib import contextmanager
from datetime import datetime, timedelta

import redis as redis_lib
from sqlalchemy import select, update

from outgoing import locks, notify_addresses
from outgoing.models import (
    LOCK_AUTOMATIC,
    Domain,
    Identity,
    OutgoingUser,
    QuarantinedMessage,
    utcnow,
)
from tests.support import data
from tests.support.mail import message
from tests.support.services import process_env, run_worker_burst

PUBLIC_URL = "http://panel.example.test"
LINK = re.compile(re.escape(PUBLIC_URL) + r"/unlock/(\S+)")


def worker_env(sink, **extra) -> dict:
    """The environment of a worker whose next hop is ``sink`` (call after ``instance``)."""
    return process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}", PUBLIC_URL=PUBLIC_URL, **extra)


def burst(sink, **extra) -> subprocess.CompletedProcess:
    """One real ``rq worker --burst --with-scheduler outgoing`` run; fails the test on error."""
    result = run_worker_burst(worker_env(sink, **extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def redis_client():
    return redis_lib.from_url(os.environ["REDIS_URL"])


def set_domain(name: str, *, confirmed: bool = True, **fields) -> int:
    """Change a domain's columns; an abuse report address outside the domain is confirmed
    for it too (as a super admin's is), unless ``confirmed`` is False."""
    def change(session):
        session.execute(update(Domain).where(Domain.name == name).values(**fields))
        domain_id = session.scalar(select(Domain.id).where(Domain.name == name))
        if confirmed and fields.get("abuse_report_address"):
            notify_addresses.confirm(session, domain_id, fields["abuse_report_address"])
        return domain_id
    return data.query(change)


def lock(kind: str, target_id: int, *, minutes_ago: float = 0, lock_kind: str = LOCK_AUTOMATIC,
         reason: str = "5 spam messages in 10 minutes") -> str:
    """Lock through ``outgoing.locks.lock`` (which enqueues the worker's jobs), dated back."""
    client = redis_client()

    def do(session):
        model = Identity if kind == "identity" else OutgoingUser
        target = session.get(model, target_id)
        return locks.lock(session, client, target, kind=lock_kind, reason=reason,
                          actor="proxy", now=utcnow() - timedelta(minutes=minutes_ago))
    try:
        return data.query(do)
    finally:
        client.close()


def unlock(kind: str, target_id: int, actor: str = "admin@example.net") -> None:
    client = redis_client()

    def do(session):
        model = Identity if kind == "identity" else OutgoingUser
        locks.unlock(session, client, session.get(model, target_id), actor=actor,
                     reason="checked by hand")
    try:
        data.query(do)
    finally:
        client.close()


def target(kind: str, target_id: int):
    model = Identity if kind == "identity" else OutgoingUser
    return data.query(lambda s: s.get(model, target_id))


def add_spam(domain: str, user_id: int | None, *, subject: str = "Cheap pills",
             rcpts=("victim@example.org",), mail_from: str = "alice@example.com",
             identity: str | None = None, received_at: datetime | None = None,
             client_ip: str | None = "192.0.2.10", raw: bytes | None = None) -> int:
    """A quarantined message whose body lives in the row (the database store)."""
    body = raw or message(sender=mail_from, to=rcpts[0], subject=subject,
                          body="Buy now.\n")

    def add(session):
        domain_id = session.scalar(select(Domain.id).where(Domain.name == domain))
        row = QuarantinedMessage(
            domain_id=domain_id, user_id=user_id, mail_from=mail_from,
            rcpt_tos=json.dumps(list(rcpts)), subject=subject, size=len(body),
            storage_key="db:", body=body, identity=identity, client_ip=client_ip,
            reason="classified as spam (GTUBE)", score=1000.0, rules='["GTUBE"]',
            received_at=received_at or utcnow())
        session.add(row)
        session.flush()
        return row.id
    return data.query(add)


@contextmanager
def jobs_in_this_process(monkeypatch, **env):
    """Jobs called here, in the test, with ``env`` over the test's environment: the jobs'
    context (``worker.context``, cached per process) is built from it, and anew after."""
    from worker import context

    def forget():
        for cached in (context.config, context.sessionmaker, context.redis_client):
            cached.cache_clear()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    forget()
    try:
        yield
    finally:
        forget()


@contextmanager
def database_cut_while_relaying(monkeypatch, cable, sink, **env):
    """Jobs run in the test against the database behind ``cable`` (the fixture
    ``database_behind_a_cable``), cut as the next hop starts reading a message, which it
    takes (250) a moment later: the relaying job then fails on the database. Yields what
    to call after that job: it waits for the cut, checks the next hop has the message, and
    brings the database back."""
    relay, url = cable
    sink.handler.delay = 0.3
    cutting = relay.cut_when(sink.handler.data_started)

    def back() -> None:
        cutting.join()
        assert len(sink.handler.messages) == 1  # the next hop took it
        relay.start()
    with jobs_in_this_process(monkeypatch, DATABASE_URL=url,
                              UPSTREAM_SMTP=f"127.0.0.1:{sink.port}", **env):
        yield back


def defer_recipient(sink, deferred: str) -> None:
    """The sink answers 450 to ``RCPT TO:<deferred>`` (and takes the others) until
    ``del sink.handler.handle_RCPT``."""
    async def defer(server, session, envelope, address, rcpt_options):
        if address == deferred:
            return "450 4.2.0 Mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"
    sink.handler.handle_RCPT = defer
