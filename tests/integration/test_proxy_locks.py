"""Locks at the proxy: a locked user is refused at MAIL, a locked identity after DATA, both
with 550 5.7.1 naming the lock; locks and unlocks from the control panel apply to the very
next message."""

from __future__ import annotations

import json
import time

import pytest
import redis as redis_py
from sqlalchemy import select

from outgoing import locks, redis_keys
from outgoing.models import LOCK_MANUAL, Identity, OutgoingUser
from tests.support import data
from tests.support.mail import GTUBE, client, message, send
from tests.support.services import RedisServer, free_port
from tests.support.web import csrf_token, log_in

PASSWORD = "Alice-pass-123"


@pytest.fixture
def alice(instance):
    return data.add_user("example.com", "user", "alice@example.com", PASSWORD)


@pytest.fixture
def admin(app):
    web = app.test_client()
    data.add_admin("root@example.net", "Root-pass-123")
    log_in(web, "root@example.net", "Root-pass-123")
    web.token = csrf_token(web, "/outgoing/users")
    return web


def test_manual_user_lock_and_unlock_from_the_panel_apply_to_the_next_message(
        alice, admin, start_proxy, sink):
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message())[0] == 250
        response = admin.post(f"/outgoing/users/{alice}/lock",
                              data={"csrf_token": admin.token, "reason": "stolen password"})
        assert response.status_code in (200, 302)
        code, reply = smtp.mail("alice@example.com")
        assert code == 550
        assert reply.startswith(b"5.7.1 Outgoing user alice@example.com is locked")
        assert b"stolen password" in reply
        admin.post(f"/outgoing/users/{alice}/unlock", data={"csrf_token": admin.token})
        assert send(smtp, message())[0] == 250
    assert len(sink.handler.messages) == 2


def lock_from_panel(admin, user_id: int, reason: str) -> None:
    response = admin.post(f"/outgoing/users/{user_id}/lock",
                          data={"csrf_token": admin.token, "reason": reason})
    assert response.status_code in (200, 302)


def test_a_user_locked_mid_transaction_is_refused_at_its_next_rcpt_and_after_data(
        alice, admin, start_proxy, sink):
    """The lock lands after MAIL: the next recipient hears what MAIL would have said, and
    the message goes nowhere (the first RCPT rides on MAIL's round trip, unchecked; the
    check after DATA stops it)."""
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt("bob@example.org")[0] == 250
        lock_from_panel(admin, alice, "stolen password")
        code, reply = smtp.rcpt("carol@example.org")
        assert code == 550
        assert reply.startswith(b"5.7.1 Outgoing user alice@example.com is locked: "
                                b"stolen password")
        code, reply = smtp.data(message())
        assert code == 550
        assert reply.startswith(b"5.7.1 Outgoing user alice@example.com is locked")
        assert smtp.mail("alice@example.com")[0] == 550  # as at MAIL
    assert sink.handler.messages == []


@pytest.mark.parametrize(("detection", "method"), [
    (True, "envelope_sender"), (False, "envelope_sender"),
    # a header method with no header set: no identity, so no identity check after DATA
    (True, "header"), (False, "header"),
], ids=["detection on", "detection off", "no identity, detection on",
        "no identity, detection off"])
def test_a_user_locked_between_rcpt_and_the_end_of_data_is_refused_and_not_relayed(
        instance, admin, start_proxy, sink, detection, method):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          compromise_detection=detection, identification_method=method)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt("bob@example.org")[0] == 250
        assert smtp.rcpt("carol@example.org")[0] == 250
        lock_from_panel(admin, alice, "stolen password")
        code, reply = smtp.data(message())
        assert code == 550
        assert reply.startswith(b"5.7.1 Outgoing user alice@example.com is locked: "
                                b"stolen password")
    assert sink.handler.messages == []


@pytest.mark.parametrize("detection", [True, False], ids=["detection on", "detection off"])
def test_locked_identity_is_refused_after_data_and_others_of_the_user_still_send(
        instance, admin, start_proxy, sink, detection):
    """With compromise detection on, its one call per message checks the identity's lock;
    off, the identity check makes its own: the same replies either way."""
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          compromise_detection=detection)
    shop = data.add_identity(alice, "shop@example.com")
    response = admin.post(f"/outgoing/identities/{shop}/lock",
                          data={"csrf_token": admin.token, "reason": "phishing"})
    assert response.status_code in (200, 302)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert smtp.mail("Shop@Example.com")[0] == 250  # the user is not locked
        assert smtp.rcpt("bob@example.org")[0] == 250
        code, reply = smtp.data(message(sender="shop@example.com"))
        assert code == 550
        assert reply.startswith(b"5.7.1 Sender shop@example.com is locked: phishing")
        code, reply = send(smtp, message(body=GTUBE), sender="shop@example.com")
        assert code == 550 and b"is locked: phishing" in reply  # locked, not quarantined
        assert send(smtp, message(sender="news@example.com"), sender="news@example.com")[0] \
            == 250
        admin.post(f"/outgoing/identities/{shop}/unlock", data={"csrf_token": admin.token})
        assert send(smtp, message(), sender="shop@example.com")[0] == 250
    assert [m.mail_from for m in sink.handler.messages] == ["news@example.com",
                                                           "shop@example.com"]


def test_fifth_spam_from_one_identity_locks_that_identity_only(instance, start_proxy, clock,
                                                              sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          automatic_lock=False, lock_identities_automatically=True)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        for _ in range(5):
            assert send(smtp, message(body=GTUBE), sender="spam@example.com")[0] == 550
            clock.advance(30)
        code, reply = send(smtp, message(), sender="spam@example.com")
        assert code == 550 and b"Sender spam@example.com is locked: 5 spam messages" in reply
        assert send(smtp, message(sender="ok@example.com"), sender="ok@example.com")[0] == 250
    locked = data.query(lambda s: [(i.value, i.lock_kind) for i in s.scalars(
        select(Identity).where(Identity.user_id == alice, Identity.locked.is_(True)))])
    assert locked == [("spam@example.com", "automatic")]
    assert not data.query(lambda s: s.get(OutgoingUser, alice).locked)


def test_identity_locks_are_off_when_lock_identities_automatically_is_off(
        instance, start_proxy, clock, sink):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                  automatic_lock=False, lock_identities_automatically=False)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        for _ in range(6):
            assert send(smtp, message(body=GTUBE), sender="spam@example.com")[0] == 550
        assert send(smtp, message(), sender="spam@example.com")[0] == 250


def test_unlock_starts_the_spam_count_afresh(instance, admin, start_proxy, clock, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        for _ in range(5):
            assert send(smtp, message(body=GTUBE))[0] == 550
            clock.advance(10)
        assert data.query(lambda s: s.get(OutgoingUser, alice).locked)
        admin.post(f"/outgoing/users/{alice}/unlock", data={"csrf_token": admin.token})

        assert send(smtp, message(body=GTUBE))[0] == 550  # quarantined, not a lock
        assert send(smtp, message())[0] == 250
    assert not data.query(lambda s: s.get(OutgoingUser, alice).locked)
    assert not data.query(lambda s: s.scalars(
        select(Identity).where(Identity.user_id == alice, Identity.locked.is_(True))).all())


def test_identity_unlock_starts_its_spam_count_afresh(instance, admin, start_proxy, clock,
                                                       sink):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD, automatic_lock=False)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        for _ in range(5):
            assert send(smtp, message(body=GTUBE), sender="spam@example.com")[0] == 550
            clock.advance(10)
        spam = data.query(lambda s: s.scalar(select(Identity.id).where(
            Identity.value == "spam@example.com", Identity.locked.is_(True))))
        assert spam
        admin.post(f"/outgoing/identities/{spam}/unlock", data={"csrf_token": admin.token})

        assert send(smtp, message(body=GTUBE), sender="spam@example.com")[0] == 550
        assert send(smtp, message(), sender="spam@example.com")[0] == 250
    assert not data.query(lambda s: s.get(Identity, spam).locked)


def test_locks_come_back_when_redis_loses_its_data_while_the_proxy_runs(
        instance, start_proxy, sink, redis_client):
    """Redis restarted without persistence (or flushed) forgets every lock, and the proxy
    reads locks there only: within one configuration refresh it writes the database's locks
    back, so a locked sender stays refused without a proxy restart."""
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    shop = data.add_identity(data.add_user("example.com", "user", "bob@example.com",
                                           "Bob-pass-123"), "shop@example.com")
    for kind, target in (("user", alice), ("identity", shop)):
        data.query(lambda s, kind=kind, target=target: locks.lock(
            s, redis_client, s.get(OutgoingUser if kind == "user" else Identity, target),
            kind=LOCK_MANUAL, reason="stolen password", actor="root@example.net"))
    proxy = start_proxy()  # CONFIG_REFRESH_SECONDS 0.2
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert smtp.mail("alice@example.com")[0] == 550

    redis_client.flushdb()
    time.sleep(1.0)  # several refreshes

    assert_alice_refused_as_locked(proxy)
    with client(proxy.port) as smtp:
        smtp.login("bob@example.com", "Bob-pass-123")
        code, reply = send(smtp, message(sender="shop@example.com"), sender="shop@example.com")
        assert code == 550 and b"is locked: stolen password" in reply
    assert sink.handler.messages == []


def test_locks_come_back_while_the_jobs_redis_is_still_down(
        instance, start_proxy, sink, redis_client):
    """The worker's jobs may live in another Redis (RQ_REDIS_URL) that comes back later
    than the locks' one: writing the locks back must not wait for it."""
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    data.query(lambda s: locks.lock(s, redis_client, s.get(OutgoingUser, alice),
                                    kind=LOCK_MANUAL, reason="stolen password",
                                    actor="root@example.net"))
    proxy = start_proxy(RQ_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    redis_client.flushdb()
    time.sleep(1.0)  # several refreshes
    assert_alice_refused_as_locked(proxy)


def test_locks_come_back_when_redis_restarts_from_an_older_snapshot(
        instance, start_proxy, tmp_path):
    """A Redis restarted from a snapshot taken before a lock has the locks' mark (written
    long before) but not that lock: a mark alone would have let the locked sender's mail
    through. The server's new run_id has the proxy write the locks back."""
    own = RedisServer(data_dir=tmp_path).start()
    own_client = redis_py.Redis.from_url(own.url)
    try:
        alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
        proxy = start_proxy(REDIS_URL=own.url)
        eventually_true(lambda: own_client.exists(redis_keys.LOCKS_MIRRORED))
        own_client.save()  # the snapshot: the mark, no lock yet
        data.query(lambda s: locks.lock(s, own_client, s.get(OutgoingUser, alice),
                                        kind=LOCK_MANUAL, reason="stolen password",
                                        actor="root@example.net"))
        assert_alice_refused_as_locked(proxy)

        own.stop()  # never saves: the snapshot stays the older one
        own.start()
        assert own_client.exists(redis_keys.LOCKS_MIRRORED)
        eventually_true(lambda: own_client.exists(redis_keys.user_lock(alice)))

        assert_alice_refused_as_locked(proxy)
    finally:
        own_client.close()
        own.stop()


def test_locks_come_back_when_redis_comes_up_after_the_proxy_from_an_older_snapshot(
        instance, start_proxy, redis_client, tmp_path):
    """The machine restarts: the proxy comes up before Redis, so its start-up write-back
    fails; Redis then loads a snapshot that holds the mark but not alice's lock. The
    proxy's first look at Redis writes the locks back all the same."""
    own = RedisServer(data_dir=tmp_path).start()
    own_client = redis_py.Redis.from_url(own.url)
    try:
        own_client.set(redis_keys.LOCKS_MIRRORED, "before the lock")
        own_client.save()
        own.stop()
        alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
        data.query(lambda s: locks.lock(s, redis_client, s.get(OutgoingUser, alice),
                                        kind=LOCK_MANUAL, reason="stolen password",
                                        actor="root@example.net"))
        proxy = start_proxy(REDIS_URL=own.url)
        time.sleep(0.5)  # its start-up write-back has failed
        own.start()
        eventually_true(lambda: own_client.exists(redis_keys.user_lock(alice)))
        assert_alice_refused_as_locked(proxy)
    finally:
        own_client.close()
        own.stop()


def test_locks_come_back_for_a_redis_user_not_allowed_info(instance, start_proxy, tmp_path):
    """A least-privilege Redis user (``-@dangerous``) may not run INFO: the proxy cannot
    see run_ids then, and the mark alone must still have the locks written back."""
    own = RedisServer(options=("--user", "default", "off", "--user", "admin", "on", ">admin",
                               "~*", "&*", "+@all", "--user", "og", "on", ">og", "~*", "&*",
                               "+@all", "-@dangerous")).start()
    admin = redis_py.Redis(port=own.port, username="admin", password="admin")
    try:
        alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
        data.query(lambda s: locks.lock(s, admin, s.get(OutgoingUser, alice),
                                        kind=LOCK_MANUAL, reason="stolen password",
                                        actor="root@example.net"))
        proxy = start_proxy(REDIS_URL=f"redis://og:og@127.0.0.1:{own.port}/0")
        eventually_true(lambda: admin.exists(redis_keys.LOCKS_MIRRORED))
        time.sleep(0.5)  # a few refreshes, INFO refused in each
        admin.flushall()
        eventually_true(lambda: admin.exists(redis_keys.user_lock(alice)))
        assert_alice_refused_as_locked(proxy)
    finally:
        admin.close()
        own.stop()


def test_an_unlock_stays_when_redis_restarts_from_a_snapshot_taken_while_locked(
        instance, start_proxy, tmp_path):
    """The snapshot holds alice's lock; she was unlocked since. Redis restarts from it: the
    lock key is back, the database says unlocked. The write-back takes the key away (and
    leaves a lock of bob's that was set a moment ago, before its commit, alone)."""
    from datetime import timedelta

    from outgoing.models import utcnow

    own = RedisServer(data_dir=tmp_path).start()
    own_client = redis_py.Redis.from_url(own.url)
    try:
        alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
        bob = data.add_user("example.com", "user", "bob@example.com", "Bob-pass-123")
        data.query(lambda s: locks.lock(s, own_client, s.get(OutgoingUser, alice),
                                        kind=LOCK_MANUAL, reason="stolen password",
                                        actor="root@example.net",
                                        now=utcnow() - timedelta(minutes=10)))
        proxy = start_proxy(REDIS_URL=own.url)
        eventually_true(lambda: own_client.exists(redis_keys.LOCKS_MIRRORED))
        young = json.dumps({"lock_id": "x", "reason": "r", "kind": "automatic",
                            "at": utcnow().isoformat()})
        own_client.set(redis_keys.user_lock(bob), young)  # a lock being made: not committed
        own_client.save()  # the snapshot: the mark, alice's lock and bob's new one
        data.query(lambda s: locks.unlock(s, own_client, s.get(OutgoingUser, alice),
                                          actor="root@example.net", reason="new password"))
        assert_snapshot_holds(tmp_path, redis_keys.user_lock(alice))
        own.stop()
        own.start()  # the proxy may write back at once: only the end state is checked here
        eventually_true(lambda: not own_client.exists(redis_keys.user_lock(alice)))

        with client(proxy.port) as smtp:
            smtp.login("alice@example.com", PASSWORD)
            assert smtp.mail("alice@example.com")[0] == 250
        assert own_client.get(redis_keys.user_lock(bob)) == young.encode()
    finally:
        own_client.close()
        own.stop()


def assert_snapshot_holds(data_dir, key: str) -> None:
    """The snapshot in ``data_dir`` holds ``key``: read in a Redis of its own, started on a
    copy, since the proxy may take the key away as soon as the real one restarts."""
    import shutil

    copy = data_dir / "snapshot-copy"
    copy.mkdir()
    shutil.copy(data_dir / "dump.rdb", copy / "dump.rdb")
    reader = RedisServer(data_dir=copy).start()
    try:
        with redis_py.Redis.from_url(reader.url) as peek:
            assert peek.exists(key)
    finally:
        reader.stop()


def eventually_true(fn, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.1)


def assert_alice_refused_as_locked(proxy) -> None:
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, reply = smtp.mail("alice@example.com")
        assert code == 550 and b"stolen password" in reply
