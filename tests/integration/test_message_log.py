"""The message log: one record per SMTP transaction through the real proxy, whatever its
outcome, written to the database by a real RQ worker from the Redis stream; nothing lost and
nothing doubled when a worker dies mid-batch; retention."""

from __future__ import annotations

import base64
import json
import smtplib
import subprocess
import sys
import time
from datetime import UTC, timedelta

import pytest
from sqlalchemy import select

from outgoing import message_log
from outgoing.jobs import enqueue
from outgoing.models import MessageLogEntry, QuarantinedMessage, utcnow
from tests.support import data
from tests.support.content import NextHop, with_attachment
from tests.support.mail import GTUBE, client, message, send
from tests.support.services import ROOT, process_env, run_worker_burst
from tests.support.worker import lock

PASSWORD = "Alice-pass-123"
WRITE_JOB = "worker.message_log_jobs.write_message_log"


@pytest.fixture
def hop():
    server = NextHop().start()
    yield server
    server.stop()


def write_log(redis_client, **env) -> None:
    """One run of the writer job through a real ``rq worker --burst``."""
    enqueue(redis_client, WRITE_JOB, None, retry=None)
    result = run_worker_burst(process_env(**env))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "message_log_jobs.py" not in result.stderr, result.stderr[-3000:]


def rows(**where) -> list[MessageLogEntry]:
    def load(session):
        query = select(MessageLogEntry).order_by(MessageLogEntry.at, MessageLogEntry.id)
        for name, value in where.items():
            query = query.where(getattr(MessageLogEntry, name) == value)
        found = list(session.scalars(query))
        session.expunge_all()
        return found
    return data.query(load)


def wait_for_stream(redis_client, count: int, timeout: float = 5.0) -> None:
    """Appends are fire-and-forget: wait until the proxy's background XADDs landed."""
    deadline = time.monotonic() + timeout
    while redis_client.xlen(message_log.STREAM) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert redis_client.xlen(message_log.STREAM) >= count


def test_every_outcome_is_one_record_with_what_happened(instance, start_proxy, hop,
                                                        redis_client):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          quarantine_response="accept", block_unwanted_attachments=True)
    data.add_user("example.com", "user", "carol@example.com", PASSWORD,
                  maximum_recipients_per_day=1)
    ip_user = data.add_user("example.net", "ip", "127.0.0.5", connection_limits_enabled=True,
                            limit_per_hour=1)
    proxy = start_proxy(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}")

    with client(proxy.port) as smtp:  # relayed, then partially refused by the next hop
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message(subject="Quarterly figures"))[0] == 250
        hop.handler.refuse_rcpt["nobody@example.org"] = "550 5.1.1 No such user"
        assert send(smtp, message(), rcpts=("bob@example.org", "nobody@example.org"))[0] == 250
        hop.handler.refuse_rcpt.clear()
        hop.handler.refuse_data = "451 4.3.2 Try again later"  # deferred
        assert send(smtp, message(subject="Later"))[0] == 451
        hop.handler.refuse_data = None
        assert send(smtp, message(subject="Prize", body=GTUBE))[0] == 250  # quarantined
        assert send(smtp, with_attachment("setup.exe", b"MZ\x90\x00" * 64))[0] == 550
    with client(proxy.port) as smtp:  # refused at AUTH (one AUTH command, one record)
        blob = base64.b64encode(b"\0alice@example.com\0wrong-password-1").decode()
        assert smtp.docmd("AUTH", f"PLAIN {blob}")[0] == 535
    with client(proxy.port) as smtp:  # refused at MAIL: nobody authenticated
        assert send(smtp, message())[0] == 530
    with client(proxy.port) as smtp:  # refused at RCPT: carol may send to one a day
        smtp.login("carol@example.com", PASSWORD)
        assert send(smtp, message(sender="carol@example.com"),
                    sender="carol@example.com",
                    rcpts=("one@example.org", "two@example.org"))[0] == 452
    with client(proxy.port, source="127.0.0.5") as smtp:  # the IP user's one connection
        smtp.noop()
    with pytest.raises(smtplib.SMTPConnectError):  # refused at connect
        smtplib.SMTP("127.0.0.1", proxy.port, source_address=("127.0.0.5", 0), timeout=10)
    wait_for_stream(redis_client, 9)

    write_log(redis_client, UPSTREAM_SMTP=f"127.0.0.1:{hop.port}")
    found = rows()
    outcomes = [(r.stage, r.verdict, (r.reply or "")[:3]) for r in found]
    assert outcomes == [
        ("relay", "relayed", "250"), ("relay", "partial", "250"), ("relay", "deferred", "451"),
        ("content", "quarantined", "250"), ("content", "rejected", "550"),
        ("auth", "refused", "535"), ("mail", "refused", "530"), ("rcpt", "refused", "452"),
        ("connect", "refused", "421")]
    relayed, partial, deferred, quarantined, rejected, auth, mail, rcpt, connect = found

    # The relayed message: everything the issue lists, and our queue id is the one in the
    # Received: header the next hop got.
    assert (relayed.user_id, relayed.user_name, relayed.mail_from) == (
        alice, "alice@example.com", "alice@example.com")
    assert relayed.client_ip == "127.0.0.1" and relayed.login == "alice@example.com"
    assert relayed.identity == "alice@example.com"
    assert relayed.recipients == "bob@example.org" and relayed.rcpt_count == 1
    assert relayed.message_id == "<test@example.com>"
    assert relayed.subject == "Quarterly figures"
    assert relayed.size and relayed.size > 100
    assert relayed.next_hop_reply == "250 2.0.0 hop took it"
    assert relayed.relay_seconds is not None and 0 < relayed.relay_seconds < 5
    assert f"id {relayed.queue_id}".encode() in hop.handler.messages[0].data
    assert relayed.domain_id is not None and relayed.domain_id == quarantined.domain_id

    assert partial.rcpt_count == 2 and partial.refused_count == 1
    assert deferred.next_hop_reply == "451 4.3.2 Try again later"
    stored = data.query(lambda s: s.scalar(select(QuarantinedMessage.id)))
    assert (quarantined.stored_kind, quarantined.stored_id) == ("quarantine", stored)
    assert "GTUBE" in message_log.rules_of(quarantined)
    assert "setup.exe" in rejected.reply

    # Refused before anyone authenticated: no user, so no domain (super admins only).
    assert (auth.user_id, auth.domain_id, auth.login) == (None, None, "alice@example.com")
    assert (mail.user_id, mail.mail_from) == (None, "alice@example.com")
    assert rcpt.user_name == "carol@example.com" and rcpt.refused_count == 1
    assert rcpt.recipients == "one@example.org"
    assert (connect.user_id, connect.client_ip) == (ip_user, "127.0.0.5")

    # Written once: the group has nothing pending, and a second run adds nothing.
    assert redis_client.xpending(message_log.STREAM, message_log.GROUP)["pending"] == 0
    assert redis_client.xlen(message_log.STREAM) <= 1  # Redis keeps only what is unwritten
    write_log(redis_client, UPSTREAM_SMTP=f"127.0.0.1:{hop.port}")
    assert len(rows()) == 9


def test_a_connection_over_the_per_address_cap_is_a_connect_refusal(
        instance, start_proxy, hop, redis_client):
    proxy = start_proxy(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}", SMTP_MAX_CONNECTIONS_PER_IP=1)
    with client(proxy.port, source="127.0.0.6") as smtp:
        smtp.noop()
        with pytest.raises(smtplib.SMTPConnectError):
            smtplib.SMTP("127.0.0.1", proxy.port, source_address=("127.0.0.6", 0), timeout=10)
    wait_for_stream(redis_client, 1)
    write_log(redis_client)
    (refused,) = rows()
    assert (refused.stage, refused.verdict, refused.client_ip) == (
        "connect", "refused", "127.0.0.6")
    assert refused.reply.startswith("421 4.7.0")


def stream_clients(redis_client) -> list[str]:
    return [json.loads(fields[b"r"])["client_ip"]
            for _, fields in redis_client.xrange(message_log.STREAM)]


def test_refusals_nobody_is_known_for_are_recorded_within_a_budget_per_network(
        instance, start_proxy, hop, redis_client):
    """Unauthenticated clients asking for refusals as fast as they can: each network gets
    MESSAGE_LOG_ANONYMOUS_PER_MINUTE records a minute, whatever it sends and however often it
    reconnects; another network keeps its own, and a known user's refusals are all kept."""
    lock("user", data.add_user("example.com", "ip", "127.0.0.9"))
    proxy = start_proxy(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}",
                        MESSAGE_LOG_ANONYMOUS_PER_MINUTE=5)
    for _ in range(3):  # reconnecting starts nothing afresh
        with client(proxy.port, source="127.0.0.66") as smtp:
            smtp.ehlo()
            for _ in range(4):
                assert smtp.mail("x@evil.test")[0] == 530
    with client(proxy.port, source="127.0.0.67") as smtp:
        smtp.ehlo()
        assert smtp.mail("y@evil.test")[0] == 530
    with client(proxy.port, source="127.0.0.9") as smtp:
        smtp.ehlo()
        for _ in range(8):
            assert smtp.mail("ops@example.com")[0] == 550
    wait_for_stream(redis_client, 14)
    time.sleep(0.3)
    seen = stream_clients(redis_client)
    assert seen.count("127.0.0.66") == 5
    assert seen.count("127.0.0.67") == 1
    assert seen.count("127.0.0.9") == 8


def test_data_refused_before_it_is_checked_is_a_data_refusal_not_abandoned(
        instance, start_proxy, hop, redis_client):
    """Over the size limit (552) or with a line too long (500): the reply comes from the
    protocol, before the handler sees a message (as the DATA budget's 452 does); the record
    still says what happened."""
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    proxy = start_proxy(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}", MAX_MESSAGE_SIZE=100_000,
                        SMTP_MAX_LINE_LENGTH=1000)
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message(subject="Too big", body=("x" * 70 + "\n") * 2500))[0] == 552
        assert send(smtp, b"Subject: One long line\r\n\r\n" + b"z" * 2000 + b"\r\n")[0] == 500
        assert send(smtp, message(subject="Fits"))[0] == 250
    wait_for_stream(redis_client, 3)
    write_log(redis_client, UPSTREAM_SMTP=f"127.0.0.1:{hop.port}")
    assert [(r.stage, r.verdict, (r.reply or "")[:3]) for r in rows()] == [
        ("data", "refused", "552"), ("data", "refused", "500"), ("relay", "relayed", "250")]


def test_a_reply_never_waits_for_the_log_when_redis_refuses_the_append(
        instance, start_proxy, hop, redis_client):
    """The stream key holds the wrong type, so every XADD fails: mail flows on regardless."""
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    redis_client.set(message_log.STREAM, "not a stream")
    proxy = start_proxy(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}")
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message())[0] == 250
    assert len(hop.handler.messages) == 1


def fill_stream(redis_client, count: int) -> list[str]:
    now = time.time()
    return [redis_client.xadd(message_log.STREAM, message_log.encode({
        "at": now + n / 1000, "stage": "relay", "verdict": "relayed",
        "mail_from": f"sender{n}@example.com", "reply": "250 2.0.0 OK",
        "recipients": ["bob@example.org"], "rcpt_count": 1})).decode() for n in range(count)]


DIE_BEFORE_ACK = """
import os
from worker import context, message_log_jobs as jobs

redis = context.redis_client()

class DiesBeforeAck:
    def __getattr__(self, name):
        return getattr(redis, name)

    def xack(self, *ids):
        os._exit(9)  # the batch is committed; the acknowledgement never happens

jobs.write_batches(DiesBeforeAck(), context.sessionmaker(), consumer="doomed",
                   claim_idle=3600, batch=5)
"""


def test_a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(instance, redis_client):
    ids = fill_stream(redis_client, 20)
    # One consumer inserts a batch and dies before XACK ...
    died = subprocess.run([sys.executable, "-c", DIE_BEFORE_ACK], cwd=ROOT,
                          env=process_env(), capture_output=True, text=True, timeout=60)
    assert died.returncode == 9, died.stderr[-2000:]
    assert len(rows()) == 5
    # ... another reads a batch and dies before inserting anything.
    redis_client.xreadgroup(message_log.GROUP, "crashed", {message_log.STREAM: ">"}, count=5)
    assert redis_client.xpending(message_log.STREAM, message_log.GROUP)["pending"] == 10

    time.sleep(0.6)  # both batches are now older than the claim threshold below
    write_log(redis_client, MESSAGE_LOG_CLAIM_IDLE_SECONDS="0.5")

    written = rows()
    assert sorted(r.stream_id for r in written) == sorted(ids)  # each exactly once
    assert redis_client.xpending(message_log.STREAM, message_log.GROUP)["pending"] == 0
    assert message_log.lag(redis_client).entries == 0


def test_entries_pending_for_less_than_the_claim_time_are_left_to_their_consumer(
        instance, redis_client):
    fill_stream(redis_client, 3)
    redis_client.xgroup_create(message_log.STREAM, message_log.GROUP, id="0")
    redis_client.xreadgroup(message_log.GROUP, "busy", {message_log.STREAM: ">"}, count=2)
    write_log(redis_client)  # the default threshold: 60 s
    assert len(rows()) == 1
    assert message_log.lag(redis_client).entries == 2
    assert redis_client.xlen(message_log.STREAM) == 3  # pending entries are never trimmed


def insert(session, *entries) -> None:
    message_log.insert_rows(session, [
        message_log.row_from_entry(f"{n}-0", message_log.encode(entry))
        for n, entry in enumerate(entries, start=1)])


def test_retention_drops_what_is_older_than_the_setting(instance, redis_client):
    now = utcnow().replace(tzinfo=UTC)
    data.query(lambda s: insert(s, *[
        {"at": (now - timedelta(days=days)).timestamp(), "stage": "relay",
         "verdict": "relayed", "mail_from": f"d{days}@x.test"}
        for days in (40, 31.5, 29, 1, 0)]))
    assert len(rows()) == 5
    enqueue(redis_client, "worker.message_log_jobs.expire_message_log", None, retry=None)
    result = run_worker_burst(process_env(MESSAGE_LOG_RETENTION_DAYS="30"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(r.mail_from for r in rows()) == ["d0@x.test", "d1@x.test", "d29@x.test"]


def test_unreadable_entries_are_skipped_not_retried_forever(instance, redis_client):
    redis_client.xadd(message_log.STREAM, {"r": "{not json"})
    fill_stream(redis_client, 1)
    write_log(redis_client)
    assert len(rows()) == 1
    assert redis_client.xpending(message_log.STREAM, message_log.GROUP)["pending"] == 0


def test_a_hostile_value_in_one_record_never_stalls_the_log(instance, start_proxy, hop,
                                                           redis_client):
    """Anyone may send AUTH LOGIN with a NUL in the name, which the record keeps as its login;
    PostgreSQL refuses NUL in text, and the batch is one transaction: that one record failed
    every run, so no record after it was ever written. Written now, the NUL replaced; the
    next record is written too and nothing is left pending."""
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    proxy = start_proxy(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}")
    with client(proxy.port) as smtp:
        name = base64.b64encode(b"alice\0@example.com").decode()
        assert smtp.docmd("AUTH", f"LOGIN {name}")[0] == 334
        assert smtp.docmd(base64.b64encode(b"wrong-password-1").decode())[0] == 535
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message(subject="After the hostile one"))[0] == 250
    wait_for_stream(redis_client, 2)

    write_log(redis_client, UPSTREAM_SMTP=f"127.0.0.1:{hop.port}")
    auth, relayed = rows()
    assert (auth.stage, auth.verdict, auth.login) == ("auth", "refused",
                                                      "alice\ufffd@example.com")
    assert relayed.subject == "After the hostile one"
    assert redis_client.xpending(message_log.STREAM, message_log.GROUP)["pending"] == 0


@pytest.mark.parametrize("odd", [
    {"at": 1e300}, {"at": "NaN"}, {"size": 1e30}, {"size": float("inf")},
    {"rcpt_count": "many"}, {"recipients": 5}, {"rules": 7}, {"user_id": 2**40},
    {"subject": "lone \udc80 surrogate"}])
def test_an_odd_entry_is_skipped_or_written_never_stalls_the_writer(instance, redis_client,
                                                                    odd):
    """An entry the reader cannot take whole (a number out of range, a value of the wrong
    type) is written as far as it can be, or skipped: it never fails the batch, which would
    stop every run at it."""
    record = {"at": time.time(), "stage": "relay", "verdict": "relayed",
              "mail_from": "odd@x.test", **odd}
    redis_client.xadd(message_log.STREAM,
                      {"r": json.dumps(record, ensure_ascii=True, allow_nan=True)})
    fill_stream(redis_client, 1)
    write_log(redis_client)
    assert "sender0@example.com" in [r.mail_from for r in rows()]
    assert redis_client.xpending(message_log.STREAM, message_log.GROUP)["pending"] == 0
    assert message_log.lag(redis_client).entries == 0


def test_records_written_moments_apart_share_a_round_trip(instance, redis_client):
    """Under load, a record every few milliseconds: the writer lingers, so they go to Redis
    in one pipeline rather than one round trip each (each costs the proxy more CPU than the
    XADDs in it); every record lands, the last ones when the log is closed."""
    import asyncio
    import os

    import redis.asyncio as redis_async
    from prometheus_client import REGISTRY

    from proxy import message_log as mlog
    from proxy.handler import RateLimitedLog

    def batches() -> float:
        return REGISTRY.get_sample_value("outbound_guard_message_log_batches_total") or 0.0

    async def scenario() -> float:
        client_ = redis_async.Redis.from_url(os.environ["REDIS_URL"])
        log = mlog.MessageLog(client_, maxlen=1000, faults=RateLimitedLog(), linger=0.5)
        before = batches()
        try:
            for n in range(20):
                log.write(mlog.finish(mlog.new_record(float(n), "192.0.2.1"), "250 OK"))
                await asyncio.sleep(0.002)  # the next transaction's reply, a moment later
            await log.close()
        finally:
            await client_.aclose()
        return batches() - before

    trips = asyncio.run(scenario())
    assert redis_client.xlen(message_log.STREAM) == 20
    assert trips <= 2
