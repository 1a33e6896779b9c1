"""Held mail released by the worker: at the user's pace, over the normal relay path, never
lost and never sent twice, also when a worker is killed in the middle of a release."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from outgoing.models import HeldMessage
from tests.support import data
from tests.support.mail import client, message, send
from tests.support.services import (
    ROOT,
    kill_worker,
    process_env,
    procfile_worker,
    run_worker_burst,
)

PW = "Alice-pass-123"
HOLD_ALL = dict(compromise_detection=True, detection_shadow_mode=False,
                detection_throttle_at=0, detection_hold_at=1, detection_lock_at=0,
                detection_throttle_rate=1000, detection_new_sender_allowance=0,
                detection_release_pace=3)


def hold_messages(start_proxy, count: int) -> None:
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)
        for i in range(count):
            msg = message(to=f"r{i}@dest.example", subject=f"Held {i}",
                          body=f"message number {i} of the held batch\n")
            assert send(smtp, msg, rcpts=[f"r{i}@dest.example"])[0] == 250


def states() -> dict[str, int]:
    def count(s):
        out: dict[str, int] = {}
        for row in s.scalars(select(HeldMessage)):
            out[row.state] = out.get(row.state, 0) + 1
        return out
    return data.query(count)


def queue_all() -> None:
    from outgoing import held

    def mark(s):
        held.queue_release(s, list(s.scalars(select(HeldMessage))))
    data.query(mark)


def release_in_a_worker(r, alice: int, sink) -> tuple[dict, subprocess.Popen]:
    """Queue alice's release and start a real RQ worker on it, in a session of its own (to
    be killed), with a 1 s HELD_CLAIM_SECONDS: its environment and its process."""
    from outgoing.jobs import enqueue

    env = process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}", HELD_CLAIM_SECONDS="1",
                      UPSTREAM_TIMEOUT="60")
    enqueue(r, "worker.held_jobs.release_for_user", alice, retry=None)
    worker = subprocess.Popen(procfile_worker("--burst"), cwd=ROOT, env=env,
                              start_new_session=True)
    return env, worker


def delivered_subjects(sink) -> list[str]:
    return sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode()
                  for m in sink.handler.messages)


def test_release_sends_at_most_the_pace_per_minute(instance, start_proxy, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PW, **HOLD_ALL)
    hold_messages(start_proxy, 7)
    assert states() == {"held": 7} and sink.handler.messages == []
    queue_all()
    import redis as redis_module

    from outgoing.jobs import enqueue

    r = redis_module.from_url(os.environ["REDIS_URL"])
    if time.time() % 60 > 45:  # both jobs inside one minute
        time.sleep(61 - time.time() % 60)
    enqueue(r, "worker.held_jobs.release_for_user", alice, retry=None)
    enqueue(r, "worker.held_jobs.release_for_user", alice, retry=None)  # a second, same minute
    env = process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}")
    result = run_worker_burst(env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(sink.handler.messages) == 3  # this minute's pace, whatever the jobs
    assert states() == {"released": 3, "queued": 4}
    for _ in range(2):  # the next minutes (their counters start empty)
        for key in r.scan_iter("og:{*}:released:*"):
            r.delete(key)
        enqueue(r, "worker.held_jobs.release_for_user", alice, retry=None)
        assert run_worker_burst(env).returncode == 0
    assert states() == {"released": 7}
    assert delivered_subjects(sink) == sorted(f"Held {i}" for i in range(7))  # once each


def test_a_worker_killed_mid_release_loses_nothing_and_sends_nothing_twice(
        instance, start_proxy, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PW,
                          **dict(HOLD_ALL, detection_release_pace=100))
    hold_messages(start_proxy, 4)
    queue_all()
    import redis as redis_module

    from outgoing.jobs import enqueue

    r = redis_module.from_url(os.environ["REDIS_URL"])
    sink.handler.delay = 30  # the next hop hangs on the first message: kill the worker then
    env, worker = release_in_a_worker(r, alice, sink)
    deadline = time.time() + 20
    while states().get("sending", 0) == 0 and time.time() < deadline:
        time.sleep(0.1)
    assert states().get("sending") == 1
    kill_worker(worker)  # and its work horse, which would else go on relaying
    sink.handler.delay = 0
    time.sleep(1.5)  # the claim goes stale
    enqueue(r, "worker.held_jobs.release_for_user", alice, retry=None)
    result = run_worker_burst(env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert states() == {"released": 4}
    assert delivered_subjects(sink) == sorted(f"Held {i}" for i in range(4))


def test_a_slow_next_hop_does_not_make_a_live_workers_claim_stale(
        instance, start_proxy, sink):
    """The next hop takes longer than HELD_CLAIM_SECONDS to answer DATA: the worker still
    waiting on it keeps its claim fresh, so another worker looking for stale claims meanwhile
    takes nothing, and the message goes out once."""
    from datetime import UTC, datetime, timedelta

    from outgoing import held

    alice = data.add_user("example.com", "user", "alice@example.com", PW,
                          **dict(HOLD_ALL, detection_release_pace=100))
    hold_messages(start_proxy, 1)
    queue_all()
    import redis as redis_module


    r = redis_module.from_url(os.environ["REDIS_URL"])
    sink.handler.delay = 6
    _env, slow = release_in_a_worker(r, alice, sink)
    try:
        assert sink.handler.data_started.wait(30)  # it is waiting on the next hop now
        time.sleep(2)  # twice HELD_CLAIM_SECONDS: only the beat keeps the claim fresh

        def look_for_stale_claims(s):  # what a second worker's release does first
            now = datetime.now(UTC).replace(tzinfo=None)
            return held.claim_next(s, alice, "other-worker", now, now - timedelta(seconds=1))
        assert data.query(look_for_stale_claims) is None
        assert slow.wait(timeout=60) == 0
    finally:
        if slow.poll() is None:
            kill_worker(slow)
    assert states() == {"released": 1}
    assert delivered_subjects(sink) == ["Held 0"]  # once


def test_held_mail_page_is_scoped_per_domain_and_releases_at_the_pace(
        instance, app, start_proxy, sink):
    from tests.support.web import csrf_token, log_in

    data.add_user("example.com", "user", "alice@example.com", PW, **HOLD_ALL)
    hold_messages(start_proxy, 2)
    data.add_admin("ops@example.com", "Ops-pass-1234", domain="example.com")
    data.add_admin("ops@other.example", "Ops-pass-1234", domain="other.example")
    first = data.query(lambda s: s.scalars(select(HeldMessage.id)).first())
    other = app.test_client()
    log_in(other, "ops@other.example", "Ops-pass-1234")
    assert b"Held 0" not in other.get("/outgoing/held").data
    assert other.get(f"/outgoing/held/{first}").status_code == 404
    token = csrf_token(other, "/outgoing/held")
    assert other.post(f"/outgoing/held/{first}/release",
                      data={"csrf_token": token}).status_code == 404
    web = app.test_client()
    log_in(web, "ops@example.com", "Ops-pass-1234")
    page = web.get("/outgoing/held").data
    assert b"Held 0" in page and b"Held 1" in page
    assert b"message number 0" in web.get(f"/outgoing/held/{first}").data
    token = csrf_token(web, "/outgoing/held")
    web.post(f"/outgoing/held/{first}/release-identity", data={"csrf_token": token})
    assert states() == {"queued": 2}
    result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert states() == {"released": 2}
    hold_messages(start_proxy, 1)
    last = data.query(lambda s: s.scalars(select(HeldMessage.id).where(
        HeldMessage.state == "held")).first())
    web.post(f"/outgoing/held/{last}/delete", data={"csrf_token": token})
    assert states() == {"released": 2}


def test_a_released_copy_is_archived_under_the_users_domain_whatever_its_sender(
        instance, start_proxy, sink):
    """Held with another customer's domain as the envelope sender, then released: the
    archive copy is alice's domain's, not that customer's."""
    import redis as redis_module

    from outgoing.jobs import enqueue
    from outgoing.models import ArchivedMessage, Domain

    alice = data.add_user("example.com", "user", "alice@example.com", PW,
                          **dict(HOLD_ALL, message_archiving=True))
    data.add_user("shop.example.net", "user", "owner@shop.example.net", PW)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)
        assert send(smtp, message(sender="sales@shop.example.net", subject="Held as the shop"),
                    sender="sales@shop.example.net")[0] == 250
    assert states() == {"held": 1}
    queue_all()
    r = redis_module.from_url(os.environ["REDIS_URL"])
    enqueue(r, "worker.held_jobs.release_for_user", alice, retry=None)
    assert run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}")).returncode == 0
    assert states() == {"released": 1}
    assert data.query(lambda s: [(a.subject, s.get(Domain, a.domain_id).name)
                                 for a in s.scalars(select(ArchivedMessage))]) == [
        ("Held as the shop", "example.com")]


def test_a_release_whose_commit_fails_after_the_next_hop_took_it_is_relayed_once(
        instance, start_proxy, sink, monkeypatch, database_behind_a_cable):
    """The database goes away while the next hop reads a released held message: its outcome
    is not recorded and the row stays "sending". Once the database is back and the claim is
    stale, the periodic release finishes that attempt without relaying it again (it did)."""
    from sqlalchemy import update
    from sqlalchemy.exc import OperationalError

    from outgoing.models import ArchivedMessage, utcnow
    from tests.support import worker
    from worker import held_jobs

    alice = data.add_user("example.com", "user", "alice@example.com", PW,
                          **dict(HOLD_ALL, message_archiving=True))
    hold_messages(start_proxy, 1)
    queue_all()
    with worker.database_cut_while_relaying(monkeypatch, database_behind_a_cable, sink,
                                            HELD_CLAIM_SECONDS="60") as database_back:
        with pytest.raises(OperationalError):
            held_jobs.release_for_user(alice)
        database_back()
        assert states() == {"sending": 1}
        data.query(lambda s: s.execute(update(HeldMessage).values(  # the claim is stale
            claimed_at=utcnow() - timedelta(seconds=61))))
        assert held_jobs.release_for_user(alice) == "released 1"

    assert delivered_subjects(sink) == ["Held 0"]  # once
    assert data.query(lambda s: [(r.state, r.attempts) for r in s.scalars(
        select(HeldMessage))]) == [("released", 1)]
    assert data.query(lambda s: len(s.scalars(select(ArchivedMessage)).all())) == 1


def test_a_release_that_fails_after_the_next_hop_answered_is_finished_without_relaying(
        instance, start_proxy, monkeypatch):
    """The next hop took one recipient and deferred the other; storing the deferred one's
    copy failed (a full disk), so nothing was recorded. The periodic release finishes that
    attempt from the answer noted in Redis: released for the one, retrying for the other,
    and the next hop never gets the message twice."""
    from sqlalchemy import update

    from outgoing import held
    from outgoing.models import utcnow
    from tests.support import worker
    from tests.support.content import NextHop
    from worker import held_jobs

    alice = data.add_user("example.com", "user", "alice@example.com", PW, **HOLD_ALL)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)
        assert send(smtp, message(subject="Held 0"),
                    rcpts=["took@dest.example", "later@dest.example"])[0] == 250
    queue_all()
    hop = NextHop().start()
    hop.handler.refuse_rcpt["later@dest.example"] = "451 4.3.0 try again later"
    split_off = held.split_off

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    try:
        with worker.jobs_in_this_process(monkeypatch, HELD_CLAIM_SECONDS="60",
                                         UPSTREAM_SMTP=f"127.0.0.1:{hop.port}"):
            monkeypatch.setattr(held, "split_off", full_disk)
            with pytest.raises(OSError):
                held_jobs.release_for_user(alice)
            assert states() == {"sending": 1}
            monkeypatch.setattr(held, "split_off", split_off)
            data.query(lambda s: s.execute(update(HeldMessage).values(  # the claim is stale
                claimed_at=utcnow() - timedelta(seconds=61))))
            assert held_jobs.release_for_user(alice) == "released 1"
    finally:
        hop.stop()

    assert [m.rcpt_tos for m in hop.handler.messages] == [["took@dest.example"]]  # once
    assert data.query(lambda s: sorted((r.state, r.rcpt_tos, r.attempts) for r in s.scalars(
        select(HeldMessage)))) == [("released", '["took@dest.example", "later@dest.example"]', 1),
                                   ("retrying", '["later@dest.example"]', 1)]


def hold_one_of_alice_and_one_of_bob(start_proxy) -> int:
    """One held message of each of two users of example.com; alice's user id."""
    alice = data.add_user("example.com", "user", "alice@example.com", PW, **HOLD_ALL)
    data.add_user("example.com", "user", "bob@example.com", "Bob-pass-1234", **HOLD_ALL)
    proxy = start_proxy()
    for login, password in (("alice@example.com", PW), ("bob@example.com", "Bob-pass-1234")):
        with client(proxy.port) as smtp:
            smtp.login(login, password)
            assert send(smtp, message(sender=login, subject=f"Held of {login}"), sender=login,
                        rcpts=["r@dest.example"])[0] == 250
    return alice


def test_a_held_message_whose_body_is_gone_is_retried_and_holds_back_no_other_user(
        instance, start_proxy, sink, monkeypatch):
    """Its stored file was removed (a disk, a clean-up). Before, the claim stayed "sending"
    for ever and each minute's release failed at it, skipping the users after it; now it is
    retried on the deferral schedule, and the other user's mail goes out."""
    from outgoing.config import load_config
    from tests.support import worker
    from worker import held_jobs

    alice = hold_one_of_alice_and_one_of_bob(start_proxy)
    key = data.query(lambda s: s.scalar(select(HeldMessage.storage_key).where(
        HeldMessage.user_id == alice)))
    os.remove(os.path.join(load_config()["STORAGE_DIR"], key))
    queue_all()
    with worker.jobs_in_this_process(monkeypatch, UPSTREAM_SMTP=f"127.0.0.1:{sink.port}"):
        assert held_jobs.release_when_calm() == "released held mail of 2 user(s)"
    assert delivered_subjects(sink) == ["Held of bob@example.com"]
    alices = data.query(lambda s: [(r.state, r.last_error) for r in s.scalars(
        select(HeldMessage).where(HeldMessage.user_id == alice))])
    assert alices == [("retrying", "attempt 1 deferred: r@dest.example: 451 4.3.0 the stored "
                                    "message cannot be read")]


def test_one_users_failing_release_holds_back_no_other_users(instance, start_proxy, sink,
                                                            monkeypatch):
    """The periodic release goes on to the next user when one user's release fails, and
    fails afterwards (so the failure is seen); before, every user after it waited."""
    from tests.support import worker
    from worker import held_jobs

    alice = hold_one_of_alice_and_one_of_bob(start_proxy)
    queue_all()
    release = held_jobs.release_for_user

    def failing_for_alice(user_id):
        if user_id == alice:
            raise OSError("alice's release fails")
        return release(user_id)
    monkeypatch.setattr(held_jobs, "release_for_user", failing_for_alice)
    with worker.jobs_in_this_process(monkeypatch, UPSTREAM_SMTP=f"127.0.0.1:{sink.port}"):
        with pytest.raises(RuntimeError, match=f"user\\(s\\) \\[{alice}\\] failed"):
            held_jobs.release_when_calm()
    assert delivered_subjects(sink) == ["Held of bob@example.com"]


def released_in_the_audit_log() -> int:
    from outgoing.models import AuditEvent

    return data.query(lambda s: len(s.scalars(select(AuditEvent).where(
        AuditEvent.action == "release_held")).all()))


def test_a_second_release_of_a_released_message_is_neither_queued_nor_audited_again(
        instance, app, start_proxy, sink):
    from tests.support.web import csrf_token, log_in

    data.add_user("example.com", "user", "alice@example.com", PW, **HOLD_ALL)
    hold_messages(start_proxy, 1)
    data.add_admin("ops@example.com", "Ops-pass-1234", domain="example.com")
    first = data.query(lambda s: s.scalars(select(HeldMessage.id)).first())
    web = app.test_client()
    log_in(web, "ops@example.com", "Ops-pass-1234")
    token = csrf_token(web, "/outgoing/held")
    web.post(f"/outgoing/held/{first}/release", data={"csrf_token": token})
    web.post(f"/outgoing/held/{first}/release", data={"csrf_token": token})  # a double click
    result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert states() == {"released": 1}
    assert released_in_the_audit_log() == 1
    page = web.post(f"/outgoing/held/{first}/release", data={"csrf_token": token},
                    follow_redirects=True).get_data(as_text=True)
    assert "Nothing to release" in page
    assert states() == {"released": 1}
    assert released_in_the_audit_log() == 1


def test_a_release_read_before_another_one_sent_the_message_does_not_queue_it_again(
        instance, start_proxy):
    from sqlalchemy import update

    from outgoing import held
    from outgoing.models import RELEASED

    data.add_user("example.com", "user", "alice@example.com", PW, **HOLD_ALL)
    hold_messages(start_proxy, 1)

    def stale_release(s):
        row = s.scalars(select(HeldMessage)).one()  # the panel read it: held
        data.query(lambda other: (other.execute(update(HeldMessage).values(state=RELEASED)),
                                  other.commit()))  # meanwhile queued and sent by another
        return held.queue_release(s, [row])
    assert data.query(stale_release) == []
    assert states() == {"released": 1}


def test_a_delete_read_before_a_worker_claimed_the_message_leaves_it_to_the_worker(
        instance, app, start_proxy):
    from sqlalchemy import update

    from outgoing import held
    from outgoing.models import SENDING, AuditEvent
    from tests.support.web import csrf_token, log_in

    data.add_user("example.com", "user", "alice@example.com", PW, **HOLD_ALL)
    hold_messages(start_proxy, 1)

    def stale_delete(s):
        row = s.scalars(select(HeldMessage)).one()  # the panel read it: held
        data.query(lambda other: (other.execute(update(HeldMessage).values(state=SENDING)),
                                  other.commit()))  # meanwhile a worker claimed it
        return held.delete_held(s, app.config, [row])
    assert data.query(stale_delete) == 0
    assert states() == {"sending": 1}
    # Through the page: not deleted, and the audit log says nothing was.
    data.add_admin("ops@example.com", "Ops-pass-1234", domain="example.com")
    first = data.query(lambda s: s.scalars(select(HeldMessage.id)).first())
    web = app.test_client()
    log_in(web, "ops@example.com", "Ops-pass-1234")
    page = web.post(f"/outgoing/held/{first}/delete",
                    data={"csrf_token": csrf_token(web, "/outgoing/held")},
                    follow_redirects=True).get_data(as_text=True)
    assert "being sent right now" in page
    assert states() == {"sending": 1}
    assert data.query(lambda s: s.scalars(select(AuditEvent.action).where(
        AuditEvent.action == "delete_held")).all()) == []
