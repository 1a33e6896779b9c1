"""Timed unlocks by the real worker: after the lock timeout, at most the maximum number of
times, never undoing a newer lock, and caught up by the sweep after an outage.

Lock time is data: a lock dated 31 minutes back has outlived a 30-minute timeout, for the
worker's real clock, with nothing patched and nobody sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from rq import Queue
from rq.job import Job
from sqlalchemy import select, update

from outgoing import jobs, locks, redis_keys
from outgoing.models import LOCK_MANUAL, AuditEvent, OutgoingUser
from tests.support import data, worker

TIMEOUT = 30


@pytest.fixture
def alice(instance, redis_client):
    user_id = data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123",
                            lock_timeout_minutes=TIMEOUT, maximum_unlocks_by_timeout=2)
    worker.set_domain("example.com", abuse_report_address="postmaster@example.com")
    return user_id


def audit(action: str) -> list[AuditEvent]:
    return data.query(lambda s: list(s.scalars(select(AuditEvent).where(
        AuditEvent.action == action).order_by(AuditEvent.id))))


def test_lock_is_lifted_after_the_timeout_and_counted(alice, sink, redis_client):
    worker.lock("user", alice, minutes_ago=TIMEOUT + 1)
    worker.burst(sink)

    alice_now = worker.target("user", alice)
    assert not alice_now.locked and alice_now.automatic_unlocks_used == 1
    assert redis_client.get(redis_keys.user_lock(alice)) is None
    [event] = audit("unlock")
    assert event.actor == "worker" and json.loads(event.detail)["automatic"] is True


def test_timed_unlock_starts_the_spam_count_afresh(alice, sink, redis_client):
    worker.add_spam("example.com", alice, identity="shop@example.com")
    for key in (redis_keys.user_spam(alice), redis_keys.identity_spam(alice, "shop@example.com")):
        redis_client.zadd(key, {f"event-{n}": time.time() for n in range(5)})
    worker.lock("user", alice, minutes_ago=TIMEOUT + 1)
    worker.burst(sink)

    assert not worker.target("user", alice).locked
    assert redis_client.exists(redis_keys.user_spam(alice)) == 0
    assert redis_client.exists(redis_keys.identity_spam(alice, "shop@example.com")) == 0


def test_lock_stays_until_the_timeout_has_passed(alice, sink):
    worker.lock("user", alice, minutes_ago=TIMEOUT - 1)
    worker.burst(sink)
    assert worker.target("user", alice).locked


def test_automatic_unlocks_stop_at_the_maximum_and_the_alert_says_so(alice, sink):
    for used in (1, 2):
        worker.lock("user", alice, minutes_ago=TIMEOUT + 1)
        worker.burst(sink)
        assert worker.target("user", alice).automatic_unlocks_used == used
        assert not worker.target("user", alice).locked

    lock_id = worker.lock("user", alice, minutes_ago=TIMEOUT + 1)
    worker.burst(sink)

    third = worker.target("user", alice)
    assert third.locked and third.lock_id == lock_id and third.automatic_unlocks_used == 2
    [declined] = audit("auto_unlock_declined")
    assert "administrator must unlock" in json.loads(declined.detail)["reason"]
    alerts = [m for m in sink.handler.messages if m.rcpt_tos == ["postmaster@example.com"]]
    assert len(alerts) == 3
    last = alerts[-1].data.decode()
    assert "a manual unlock is needed: all 2 automatic unlocks have been used" in last
    assert "Automatic unlocks used: 2 of 2" in last


def test_old_timed_unlock_does_not_undo_a_newer_lock(alice, sink):
    old_lock = worker.lock("user", alice, minutes_ago=TIMEOUT + 1)
    worker.unlock("user", alice)  # an administrator unlocks ...
    new_lock = worker.lock("user", alice)  # ... and spam locks alice again right away
    assert new_lock != old_lock

    worker.burst(sink)  # the old lock's timed unlock is due and runs now

    alice_now = worker.target("user", alice)
    assert alice_now.locked and alice_now.lock_id == new_lock
    assert alice_now.automatic_unlocks_used == 0
    assert [e.actor for e in audit("unlock")] == ["admin@example.net"]


def test_manual_lock_is_never_lifted_by_the_timeout(alice, sink):
    worker.lock("user", alice, minutes_ago=TIMEOUT + 1, lock_kind=LOCK_MANUAL,
                reason="locked by ops@example.com")
    worker.burst(sink)
    assert worker.target("user", alice).locked


def test_raised_timeout_postpones_the_scheduled_unlock(alice, sink, redis_client):
    worker.lock("user", alice, minutes_ago=TIMEOUT + 1)
    data.query(lambda s: s.execute(update(OutgoingUser).where(OutgoingUser.id == alice)
                                   .values(lock_timeout_minutes=TIMEOUT * 4)))
    worker.burst(sink)
    assert worker.target("user", alice).locked
    registry = Queue("outgoing", connection=redis_client).scheduled_job_registry
    later = [job for job in Job.fetch_many(registry.get_job_ids(), redis_client)
             if job.func_name == "worker.jobs.auto_unlock"]
    assert len(later) == 1


def test_sweep_unlocks_what_expired_while_jobs_were_lost(alice, sink, redis_client):
    """The worker was down and Redis came back empty: the scheduled unlock is gone."""
    worker.lock("user", alice, minutes_ago=TIMEOUT + 1)
    redis_client.flushdb()
    # Back up: the proxy restores the locks into Redis and (like the web app) the periodic
    # jobs; then a worker starts.
    data.query(lambda s: locks.restore_redis_locks(s, redis_client))
    jobs.ensure_periodic(redis_client)
    assert redis_client.get(redis_keys.user_lock(alice)) is not None

    result = worker.burst(sink)

    assert "sweep-locks" in result.stderr + result.stdout
    alice_now = worker.target("user", alice)
    assert not alice_now.locked and alice_now.automatic_unlocks_used == 1
    assert redis_client.get(redis_keys.user_lock(alice)) is None


def test_sweep_also_respects_the_maximum(alice, sink, redis_client):
    data.query(lambda s: s.execute(update(OutgoingUser).where(OutgoingUser.id == alice)
                                   .values(automatic_unlocks_used=2)))
    worker.lock("user", alice, minutes_ago=TIMEOUT + 1)
    redis_client.flushdb()
    data.query(lambda s: locks.restore_redis_locks(s, redis_client))
    jobs.ensure_periodic(redis_client)
    worker.burst(sink)
    assert worker.target("user", alice).locked


def test_web_app_start_schedules_the_sweep_which_unlocks_expired_identity(instance, redis_client,
                                                                          sink):
    user_id = data.add_user("example.com", "domain", "example.com", "Domain-pass-123",
                            lock_timeout_minutes=TIMEOUT)
    identity_id = data.add_identity(user_id, "news@example.com")
    worker.lock("identity", identity_id, minutes_ago=TIMEOUT + 5)
    redis_client.flushdb()
    data.query(lambda s: locks.restore_redis_locks(s, redis_client))
    from webapp import create_app

    create_app()  # as gunicorn does at start

    worker.burst(sink)
    assert not worker.target("identity", identity_id).locked
    assert redis_client.get(redis_keys.identity_lock(user_id, "news@example.com")) is None


def test_a_lock_set_after_the_sweep_read_the_expired_ones_is_not_lifted(alice, redis_client):
    """The sweep reads every expired automatic lock, then unlocks them one by one, each
    commit taking a while. An administrator who meanwhile unlocks one of them and locks it
    again by hand sets a lock the timeout must never lift; the sweep lifted it (and its
    Redis key, so the proxy let the sender's mail through again) from the row it had read."""
    from datetime import timedelta

    from outgoing.db import make_sessionmaker, session_scope
    from outgoing.models import utcnow
    from worker import unlocks

    old_lock = worker.lock("user", alice, minutes_ago=TIMEOUT + 1)
    with session_scope(make_sessionmaker(os.environ["DATABASE_URL"])) as sweep_db:
        [read_by_sweep] = unlocks.expired_locks(sweep_db, utcnow())

        def relock_by_hand(session):
            target = session.get(OutgoingUser, alice)
            locks.unlock(session, redis_client, target, actor="ops@example.com",
                         reason="checked")
            return locks.lock(session, redis_client, target, kind=LOCK_MANUAL,
                              reason="still spamming", actor="ops@example.com")
        new_lock = data.query(relock_by_hand)

        note = unlocks.expire(sweep_db, redis_client, read_by_sweep, old_lock,
                              utcnow() + timedelta(seconds=1))

    alice_now = worker.target("user", alice)
    assert alice_now.locked and alice_now.lock_id == new_lock, note
    assert json.loads(redis_client.get(redis_keys.user_lock(alice)))["lock_id"] == new_lock


def test_a_lock_lifted_while_the_locks_are_restored_stays_lifted(alice, redis_client):
    """Redis lost its data; while the proxy writes the database's locks back, an admin
    unlocks alice (the unlock deletes the key, then commits). The restore had read alice as
    locked and wrote her key after that delete: she stayed refused while the panel said
    unlocked, and a new lock of hers found the key taken and was never recorded."""
    import redis as redis_py

    worker.lock("user", alice, lock_kind=LOCK_MANUAL, reason="checking")
    redis_client.flushdb()

    class UnlockedMeanwhile(redis_py.Redis):
        """A real client: the admin's unlock runs just before the restore's first write."""
        raced = False

        def set(self, name, *args, **kwargs):
            if name == redis_keys.user_lock(alice) and not self.raced:
                self.raced = True
                data.query(lambda s: locks.unlock(s, redis_client, s.get(OutgoingUser, alice),
                                                  actor="ops@example.com", reason="fine"))
            return super().set(name, *args, **kwargs)

    racing = UnlockedMeanwhile.from_url(os.environ["REDIS_URL"])
    try:
        restored = data.query(lambda s: locks.restore_redis_locks(s, racing))
    finally:
        racing.close()

    assert racing.raced and restored == 0
    assert not worker.target("user", alice).locked
    assert redis_client.get(redis_keys.user_lock(alice)) is None
    assert redis_client.exists(redis_keys.LOCKS_MIRRORED)
    # and a new lock of alice's is recorded again
    assert worker.lock("user", alice, reason="5 spam messages in 10 minutes") is not None
    assert worker.target("user", alice).locked


def test_a_restore_run_inside_an_unlock_leaves_the_sender_unlocked(alice, redis_client):
    """The unlock deletes the key, then commits. A restore that runs in between reads alice
    as locked (twice: before its write and after), writes her key back and keeps it; the
    unlock then commits, and she stayed refused while the panel said unlocked."""
    from sqlalchemy import event

    worker.lock("user", alice, lock_kind=LOCK_MANUAL, reason="checking")
    redis_client.flushdb()
    restored = []

    def unlock(session):
        def restore_meanwhile(_session):
            restored.append(data.query(lambda s: locks.restore_redis_locks(s, redis_client)))

        event.listen(session, "before_commit", restore_meanwhile, once=True)
        locks.unlock(session, redis_client, session.get(OutgoingUser, alice),
                     actor="ops@example.com", reason="fine")

    data.query(unlock)

    assert restored == [1]  # the restore saw alice locked and wrote her key
    assert not worker.target("user", alice).locked
    assert redis_client.get(redis_keys.user_lock(alice)) is None


def test_a_lock_set_just_after_an_unlock_committed_is_kept(alice, redis_client):
    """The unlock's second delete (after its commit) takes away only the lock it lifted: a
    new lock that the proxy set in between (the next spam run) keeps its key."""
    from sqlalchemy import event

    worker.lock("user", alice, lock_kind=LOCK_MANUAL, reason="checking")
    relocked = []

    def unlock(session):
        event.listen(session, "after_commit", lambda _s: relocked.append(
            worker.lock("user", alice, reason="5 spam messages in 10 minutes")), once=True)
        locks.unlock(session, redis_client, session.get(OutgoingUser, alice),
                     actor="ops@example.com", reason="fine")

    data.query(unlock)

    assert relocked[0] is not None
    assert worker.target("user", alice).lock_id == relocked[0]
    assert json.loads(redis_client.get(redis_keys.user_lock(alice)))["lock_id"] == relocked[0]


def test_an_unlock_whose_user_is_deleted_just_after_its_commit_does_not_fail(
        alice, redis_client):
    """The panel's sessions expire rows at commit; what the unlock does after it (the second
    delete of the key, its warning) must not load the row again: deleted meanwhile, that
    raised after the unlock had been made."""
    from sqlalchemy import delete, event
    from sqlalchemy.orm import Session

    from outgoing.db import make_engine

    worker.lock("user", alice, lock_kind=LOCK_MANUAL, reason="checking")
    engine = make_engine(os.environ["DATABASE_URL"])
    try:
        with Session(engine, expire_on_commit=True) as session:  # as Flask-SQLAlchemy's
            event.listen(session, "after_commit", lambda _s: data.query(
                lambda other: other.execute(delete(OutgoingUser).where(
                    OutgoingUser.id == alice))), once=True)
            assert locks.unlock(session, redis_client, session.get(OutgoingUser, alice),
                                actor="ops@example.com", reason="fine") is True
    finally:
        engine.dispose()
    assert redis_client.get(redis_keys.user_lock(alice)) is None


def test_the_write_back_takes_only_stale_lock_keys_it_can_read(alice, redis_client):
    """Keys the write-back did not write, of shapes it may meet: an old lock of an unknown
    user and of an identity with odd characters go (the database holds no such lock); a
    value that is not a lock as this code writes it, a tag that is no user id, and a key of
    another kind stay; nothing raises."""
    from datetime import timedelta

    from outgoing.models import utcnow

    old = json.dumps({"lock_id": "x", "reason": "r", "kind": "manual",
                      "at": (utcnow() - timedelta(hours=1)).isoformat()})
    stale = [redis_keys.user_lock(999_999),
             redis_keys.identity_lock(alice, "Jürgen\r\nBcc: x@evil.example"),
             redis_keys.identity_lock(alice, "x" * 5000)]
    kept = {f"og:{{{alice}}}:lock": "not json", "og:{abc}:lock": old,
            redis_keys.identity_lock(alice, "no-time"): json.dumps({"lock_id": "y"}),
            f"og:{{{alice}}}:idlockish": old, f"og:{{{alice}}}:lock:": old}
    for key in stale:
        redis_client.set(key, old)
    for key, value in kept.items():
        redis_client.set(key, value)

    assert data.query(lambda s: locks.restore_redis_locks(s, redis_client)) == 0

    assert [key for key in stale if redis_client.exists(key)] == []
    assert {k: redis_client.get(k).decode() for k in kept} == kept


# A sweep that dies (SIGKILL, as the OOM killer or a node's restart would) inside the unlock,
# after it has claimed the lock and before it commits.
KILLED_SWEEP = """
import os, signal
from outgoing import audit
from worker import jobs

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

audit.record = die  # written inside the unlock's transaction, before its commit
jobs.sweep_expired_locks()
"""


def test_a_sweep_killed_mid_unlock_does_not_keep_the_sender_locked(alice, sink, redis_client):
    worker.lock("user", alice, minutes_ago=TIMEOUT + 1)
    killed = subprocess.run([sys.executable, "-c", KILLED_SWEEP], env=worker.worker_env(sink),
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert worker.target("user", alice).locked  # nothing of the unlock was committed

    jobs.ensure_periodic(redis_client)
    worker.burst(sink)  # the scheduled unlock and the next sweep

    alice_now = worker.target("user", alice)
    assert not alice_now.locked and alice_now.automatic_unlocks_used == 1
    assert [e.actor for e in audit("unlock")] == ["worker"]
