"""What the next hop answers to a held message's release: deferrals retried from the stored
message (never lost, never sent twice, also across a killed worker), permanent refusals
reported to the sender, each recipient handled on its own; and the retention of held mail."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis as redis_module
from rq.registry import ScheduledJobRegistry
from sqlalchemy import select

from outgoing import redis_keys
from outgoing.config import load_config
from outgoing.jobs import enqueue
from outgoing.models import ArchivedMessage, AuditEvent, HeldMessage, OutgoingUser
from outgoing.quarantine import recipients
from outgoing.storage import read_body
from tests.integration.test_held_release import HOLD_ALL, PW, queue_all, states
from tests.support import data
from tests.support.content import NextHop
from tests.support.mail import client, message, send
from tests.support.services import (
    ROOT,
    kill_worker,
    process_env,
    procfile_worker,
    run_worker_burst,
)

RELEASE_JOB = "worker.held_jobs.release_for_user"


@pytest.fixture
def hop():
    server = NextHop().start()
    yield server
    server.stop()


@pytest.fixture
def alice(instance):
    return data.add_user("example.com", "user", "alice@example.com", PW,
                         **dict(HOLD_ALL, detection_release_pace=100))


def hold(start_proxy, count: int, rcpts=("r@dest.example",)) -> None:
    with client(start_proxy().port) as smtp:
        smtp.login("alice@example.com", PW)
        for i in range(count):
            msg = message(to=", ".join(rcpts), subject=f"Held {i}",
                          body=f"message number {i} of the held batch\n")
            assert send(smtp, msg, rcpts=list(rcpts))[0] == 250


def rows() -> list[dict]:
    def read(s):
        return [dict(id=r.id, state=r.state, rcpts=recipients(r), note=r.last_error,
                     attempts=r.attempts, key=r.storage_key)
                for r in s.scalars(select(HeldMessage).order_by(HeldMessage.id))]
    return data.query(read)


def worker(hop, **extra) -> None:
    env = process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}", UPSTREAM_TIMEOUT="5", **extra)
    result = run_worker_burst(env)
    assert result.returncode == 0, result.stderr[-3000:]


def release(alice) -> None:
    queue_all()
    enqueue(redis_module.from_url(os.environ["REDIS_URL"]), RELEASE_JOB, alice, retry=None)


def delivered(hop, rcpt: str) -> list:
    return [m for m in hop.handler.messages if m.mail_from != "<>" and rcpt in m.rcpt_tos]


def reports(hop) -> list:
    return [m for m in hop.handler.messages if m.mail_from == "<>"]


def scheduled_releases() -> list[float]:
    r = redis_module.from_url(os.environ["REDIS_URL"])
    registry = ScheduledJobRegistry("outgoing", connection=r)
    return [registry.get_scheduled_time(job_id).timestamp() - time.time()
            for job_id in registry.get_job_ids() if re.match(r"og-release-\d", job_id)]


def age_last_attempt(seconds: float) -> None:
    """Time is data: the last attempt of every retrying message lies ``seconds`` earlier."""
    def move(s):
        for row in s.scalars(select(HeldMessage).where(HeldMessage.state == "retrying")):
            row.claimed_at -= timedelta(seconds=seconds)
    data.query(move)


def test_a_deferred_release_is_retried_after_its_delay_and_sent_once(
        alice, start_proxy, hop, app):
    hold(start_proxy, 1)
    hop.stop()  # the next hop is down at the release
    release(alice)
    started = time.time()
    worker(hop, DEFER_RETRY_SECONDS="600,1200")
    (row,) = rows()
    assert row["state"] == "retrying" and row["attempts"] == 1
    assert "451" in row["note"] and "unreachable" in row["note"]
    (due,) = scheduled_releases()  # the retry is scheduled, after the first delay
    assert started + 599 <= time.time() + due <= time.time() + 600  # (RQ keeps seconds)

    # Visible on the page, with its last reply and the next try.
    from tests.support.web import log_in
    data.add_admin("ops@example.com", "Ops-pass-1234", domain="example.com")
    web = app.test_client()
    log_in(web, "ops@example.com", "Ops-pass-1234")
    page = web.get("/outgoing/held").data
    assert b"retrying" in page and b"next try about" in page and b"unreachable" in page

    r = redis_module.from_url(os.environ["REDIS_URL"])
    hop = NextHop(port=hop.port).start()  # back, but busy: 451 to the message
    try:
        hop.handler.refuse_data = "451 4.3.0 Try again later"
        enqueue(r, RELEASE_JOB, alice, retry=None)
        worker(hop, DEFER_RETRY_SECONDS="600,1200")  # before its delay: not tried
        assert rows()[0]["attempts"] == 1 and rows()[0]["state"] == "retrying"

        age_last_attempt(601)
        enqueue(r, RELEASE_JOB, alice, retry=None)  # as the minutely release-held run does
        worker(hop, DEFER_RETRY_SECONDS="600,1200")  # due: 451 again
        (row,) = rows()
        assert row["state"] == "retrying" and row["attempts"] == 2
        assert "451 4.3.0 Try again later" in row["note"]
        assert hop.handler.messages == []
        age_last_attempt(601)  # the second delay is longer: still not due
        enqueue(r, RELEASE_JOB, alice, retry=None)
        worker(hop, DEFER_RETRY_SECONDS="600,1200")
        assert rows()[0]["attempts"] == 2

        hop.handler.refuse_data = None
        age_last_attempt(600)
        enqueue(r, RELEASE_JOB, alice, retry=None)
        worker(hop, DEFER_RETRY_SECONDS="600,1200")
        assert states() == {"released": 1}
        assert len(delivered(hop, "r@dest.example")) == 1 and reports(hop) == []
        enqueue(r, RELEASE_JOB, alice, retry=None)
        worker(hop, DEFER_RETRY_SECONDS="600,1200")
        assert len(hop.handler.messages) == 1  # never twice
    finally:
        hop.stop()


def test_a_deferral_past_the_give_up_age_is_reported_to_the_sender(alice, start_proxy, hop):
    hold(start_proxy, 1)
    hop.handler.refuse_rcpt["r@dest.example"] = "451 4.3.0 Try again later"
    release(alice)
    worker(hop, DEFER_GIVE_UP_SECONDS="0")
    (row,) = rows()
    assert row["state"] == "refused" and "451 4.3.0" in row["note"]
    (report,) = reports(hop)
    assert report.rcpt_tos == ["alice@example.com"]
    assert b"Final-Recipient: rfc822; r@dest.example" in report.data


def test_a_permanent_refusal_is_reported_and_marked_refused(alice, start_proxy, hop, app):
    hold(start_proxy, 1, rcpts=("nobody@dest.example",))
    hop.handler.refuse_rcpt["nobody@dest.example"] = "550 5.1.1 No such user here"
    release(alice)
    worker(hop)
    (row,) = rows()
    assert row["state"] == "refused"
    assert "nobody@dest.example: 550 5.1.1 No such user here" in row["note"]
    (report,) = reports(hop)
    assert report.rcpt_tos == ["alice@example.com"]
    assert b"Status: 5.1.1" in report.data and b"Subject: Held 0" in report.data
    worker(hop)
    assert len(hop.handler.messages) == 1  # no second report, nothing retried

    from tests.support.web import log_in
    data.add_admin("ops@example.com", "Ops-pass-1234", domain="example.com")
    data.add_admin("ops@other.example", "Ops-pass-1234", domain="other.example")
    web = app.test_client()
    log_in(web, "ops@example.com", "Ops-pass-1234")
    assert b"550 5.1.1 No such user here" in web.get(f"/outgoing/held/{row['id']}").data
    other = app.test_client()
    log_in(other, "ops@other.example", "Ops-pass-1234")
    assert b"No such user" not in other.get("/outgoing/held").data
    assert other.get(f"/outgoing/held/{row['id']}").status_code == 404


def test_partial_acceptance_is_handled_per_recipient(alice, start_proxy, hop):
    hold(start_proxy, 1, rcpts=("ok@dest.example", "nobody@dest.example",
                                "busy@dest.example"))
    hop.handler.refuse_rcpt["nobody@dest.example"] = "550 5.1.1 No such user here"
    hop.handler.refuse_rcpt["busy@dest.example"] = "452 4.2.2 Mailbox full, try later"
    release(alice)
    worker(hop, DEFER_RETRY_SECONDS="1")
    first, rest = rows()
    assert first["state"] == "released"
    assert first["rcpts"] == ["ok@dest.example", "nobody@dest.example", "busy@dest.example"]
    assert "delivered to 1 of 3" in first["note"] and "550 5.1.1" in first["note"]
    assert rest["state"] == "retrying" and rest["rcpts"] == ["busy@dest.example"]
    assert "452 4.2.2" in rest["note"] and rest["key"] != first["key"]
    (report,) = reports(hop)  # the refused one only
    assert b"Final-Recipient: rfc822; nobody@dest.example" in report.data
    assert b"busy@dest.example" not in report.data.split(b"text/rfc822-headers")[0]
    assert [m.rcpt_tos for m in hop.handler.messages if m.mail_from != "<>"] == [
        ["ok@dest.example"]]

    hop.handler.refuse_rcpt.clear()  # the mailbox has room again
    time.sleep(1.3)
    worker(hop, DEFER_RETRY_SECONDS="1")  # the scheduled retry
    assert [r["state"] for r in rows()] == ["released", "released"]
    assert [m.rcpt_tos for m in hop.handler.messages if m.mail_from != "<>"] == [
        ["ok@dest.example"], ["busy@dest.example"]]
    assert len(reports(hop)) == 1
    assert delivered(hop, "busy@dest.example")[0].data == delivered(hop, "ok@dest.example")[
        0].data  # the same stored message, prepared the same way


def test_a_release_is_archived_and_its_refusals_weigh_on_the_sender(
        alice, start_proxy, hop):
    """As on the inline path: the archive gets the bytes as relayed, for the recipients the
    next hop took, and the refused ones count in detection's refused share."""
    data.query(lambda s: setattr(s.get(OutgoingUser, alice), "message_archiving", True))
    hold(start_proxy, 1, rcpts=("ok@dest.example", "nobody@dest.example"))
    hop.handler.refuse_rcpt["nobody@dest.example"] = "550 5.1.1 No such user here"
    release(alice)
    worker(hop)
    assert states() == {"released": 1}
    (sent,) = delivered(hop, "ok@dest.example")

    def archived(s):
        return [(json.loads(a.rcpt_tos), read_body(load_config(), a))
                for a in s.scalars(select(ArchivedMessage))]
    assert data.query(archived) == [(["ok@dest.example"], sent.data)]

    r = redis_module.from_url(os.environ["REDIS_URL"])
    hour = int(time.time() // 3600)
    answers = {}
    for h in (hour - 1, hour):
        for name, value in r.hgetall(redis_keys.detection_refusals(alice, h)).items():
            answers[name.decode()] = answers.get(name.decode(), 0) + int(value)
    assert answers == {"alice@example.com|k": 2, "alice@example.com": 1, "*|k": 2, "*": 1}


def test_a_worker_killed_mid_retry_loses_nothing_and_sends_nothing_twice(
        alice, start_proxy, hop):
    hold(start_proxy, 3)
    hop.handler.refuse_data = "451 4.3.0 Try again later"
    release(alice)
    env = process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}", HELD_CLAIM_SECONDS="1",
                      UPSTREAM_TIMEOUT="60", DEFER_RETRY_SECONDS="1")
    assert run_worker_burst(env).returncode == 0
    assert states() == {"retrying": 3}
    hop.handler.refuse_data = None
    hop.handler.stall_data = 20  # the retry hangs at DATA: kill the worker then
    time.sleep(1.3)
    proc = subprocess.Popen(procfile_worker("--burst"), cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while states().get("sending", 0) == 0 and time.time() < deadline:
        time.sleep(0.1)
    assert states() == {"sending": 1, "retrying": 2}
    kill_worker(proc)  # and its work horse, which would else go on relaying
    hop.handler.stall_data = 0
    time.sleep(1.5)  # the claim goes stale; the other two are due
    enqueue(redis_module.from_url(os.environ["REDIS_URL"]), RELEASE_JOB, alice, retry=None)
    result = run_worker_burst(env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert states() == {"released": 3}
    subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode()
                      for m in hop.handler.messages)
    assert subjects == ["Held 0", "Held 1", "Held 2"]  # each once
    assert reports(hop) == []


def test_retention_purges_finished_held_mail_and_keeps_what_is_still_held(
        alice, start_proxy, hop, instance, app):
    bob = data.add_user("other.example", "user", "bob@other.example", PW, **HOLD_ALL)
    hold(start_proxy, 3, rcpts=("r@dest.example",))
    hold(start_proxy, 1, rcpts=("nobody@dest.example",))
    with client(start_proxy().port) as smtp:  # another domain's finished mail
        smtp.login("bob@other.example", PW)
        assert send(smtp, message(sender="bob@other.example", subject="Bob's"),
                    sender="bob@other.example", rcpts=["r@dest.example"])[0] == 250
    ids = [r["id"] for r in rows()]
    keys = {r["id"]: r["key"] for r in rows()}

    def setup(s):  # 0, 1 and bob's released; 3 refused; 2 stays held
        from outgoing import held
        held.queue_release(s, [s.get(HeldMessage, i) for i in (ids[0], ids[1], ids[3],
                                                               ids[4])])
    data.query(setup)
    hop.handler.refuse_rcpt["nobody@dest.example"] = "550 5.1.1 No such user here"
    r = redis_module.from_url(os.environ["REDIS_URL"])
    enqueue(r, RELEASE_JOB, alice, retry=None)
    enqueue(r, RELEASE_JOB, bob, retry=None)
    worker(hop)
    assert [x["state"] for x in rows()] == ["released", "released", "held", "refused",
                                            "released"]

    def age(s):  # one message released long ago; the one still held arrived long ago
        s.get(HeldMessage, ids[0]).released_at -= timedelta(days=10)
        s.get(HeldMessage, ids[2]).received_at -= timedelta(days=40)
    data.query(age)
    storage = Path(instance) / "storage"
    assert all((storage / keys[i]).exists() for i in ids)
    now = datetime.now(UTC).replace(tzinfo=None)

    def expire(at: datetime) -> None:  # the periodic run, on an injected clock
        enqueue(r, "worker.held_jobs.expire_held_mail", at.isoformat(), retry=None)
        worker(hop)

    expire(now + timedelta(days=3))  # 13 days after the oldest release: nothing goes
    assert len(rows()) == 5
    expire(now + timedelta(days=5))  # 15 days after it: that one goes
    assert [x["id"] for x in rows()] == ids[1:]
    assert not (storage / keys[ids[0]]).exists() and (storage / keys[ids[1]]).exists()
    expire(now + timedelta(days=15))  # everything finished goes; held mail never does
    assert [(x["id"], x["state"]) for x in rows()] == [(ids[2], "held")]
    assert [(storage / keys[i]).exists() for i in ids] == [False, False, True, False, False]

    def events(s):
        return [(e.domain_id, e.detail) for e in s.scalars(
            select(AuditEvent).where(AuditEvent.action == "expire_held"))]
    found = data.query(events)
    alice_domain = data.query(lambda s: s.get(HeldMessage, ids[2]).domain_id)
    assert sorted(domain_id == alice_domain for domain_id, _ in found) == [False, True, True]
    assert all('"days": 14' in detail for _, detail in found)

    from tests.support.web import log_in
    data.add_admin("ops@example.com", "Ops-pass-1234", domain="example.com")
    web = app.test_client()
    log_in(web, "ops@example.com", "Ops-pass-1234")
    assert b"held for more than 14 days" in web.get("/outgoing/held").data
