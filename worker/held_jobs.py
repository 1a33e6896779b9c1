"""Held mail released at a pace: by an administrator, for a whole identity, or by itself once
the sender's risk has fallen below Hold and it is not locked.

Never a flood: a user's releases share one counter per minute in Redis (``release_pace``), so
however many workers and jobs run, at most the user's "Release pace" messages leave per
minute (a retry takes a slot too). Never lost, never twice: a message is claimed in the
database (``UPDATE ... WHERE state``) before it is relayed and its outcome is written to the
same row right after the next hop's answer, only while the claim is still ours; a worker
killed while relaying leaves a claim that goes stale after HELD_CLAIM_SECONDS and is taken
over. A live worker keeps its claim fresh while it waits on the next hop (``_keep_claim``),
so a slow next hop (each step may take UPSTREAM_TIMEOUT, and a message has many steps) never
makes a claim look abandoned and the message go out twice. The next hop's answer is noted
in Redis (``_note_relay``, per message and attempt) before anything else can fail: when the
commit of the outcome does not happen (the database is away, a delivery report cannot be
queued, the deferred recipients' copy cannot be stored), the claim goes stale and whoever
takes it over finishes that attempt from the note instead of relaying again, however long
the outage. The window left is a kill, or a Redis outage, between the next hop's answer and
the note; the message is then sent again rather than lost.

The next hop's answer is handled per recipient as the proxy's normal path does
(``proxy/content.py``), except that the sender was told 250 long ago, so nothing can be
passed back in the SMTP reply: recipients it took are done; those it refused for good get a
delivery report (``worker.content_jobs.send_delivery_report``) to the envelope sender; those
it deferred (4xx, or no next hop) are tried again after DEFER_RETRY_SECONDS from the stored
body, and reported like refused ones once DEFER_GIVE_UP_SECONDS have passed since the
release. Unlike the normal path's retries (``retry_deferred_recipients``, whose bytes live in
the RQ job), a held message retries from its own durable row: it stays on the Held Mail page
as "retrying", survives a worker or Redis restart, and can still be deleted.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from outgoing import held, redis_keys
from outgoing.archive import archive_message
from outgoing.db import session_scope
from outgoing.jobs import enqueue, enqueue_delivery_report
from outgoing.models import (
    HELD,
    QUEUED,
    REFUSED,
    RELEASED,
    RETRYING,
    SENDING,
    HeldMessage,
    Identity,
    OutgoingUser,
)
from outgoing.quarantine import recipients
from outgoing.storage import StorageError, read_body, store_for
from scoring import risk
from scoring.message import header_block, parse_headers, subject_of
from scoring.retry import next_attempt_at, parse_delays, split_refusals
from worker import context
from worker.content_jobs import try_relay
from worker.mail import SENT_MARKER_SECONDS
from worker.quarantine_jobs import prepared_for_relay

log = logging.getLogger(__name__)

RELEASE_JOB = "worker.held_jobs.release_for_user"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _take_slot(redis, user_id: int, pace: int, now: float) -> bool:
    """One of this minute's ``pace`` release slots of the user, or False when used up."""
    key = redis_keys.release_pace(user_id, int(now // 60))
    with redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, 120)
        count = pipe.execute()[0]
    if int(count) > pace:
        return False
    return True


def _give_slot_back(redis, user_id: int, now: float) -> None:
    redis.decr(redis_keys.release_pace(user_id, int(now // 60)))


def release_for_user(user_id: int) -> str:
    """Send the user's queued held messages (and retries now due), at most its release pace
    this minute; schedules itself for the next minute while queued ones remain."""
    config, redis = context.config(), context.redis_client()
    outcomes: dict[str, int] = {}
    stale = timedelta(seconds=float(config.get("HELD_CLAIM_SECONDS", 120)))
    delays = parse_delays(config["DEFER_RETRY_SECONDS"])
    with session_scope(context.sessionmaker()) as db:
        user = db.get(OutgoingUser, user_id)
        pace = max(int(user.detection_release_pace or 1), 1) if user else 1
        while True:
            now = time.time()
            if not _take_slot(redis, user_id, pace, now):
                break
            token = secrets.token_hex(8)
            row = held.claim_next(db, user_id, token, _now(), _now() - stale, delays)
            if row is None:
                _give_slot_back(redis, user_id, now)
                break
            outcome = _send(db, config, redis, user, row, token)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        remaining = db.scalar(select(HeldMessage.id).where(
            HeldMessage.user_id == user_id,
            HeldMessage.state.in_((QUEUED, SENDING))).limit(1))
    if remaining is not None:
        due = datetime.fromtimestamp((int(time.time() // 60) + 1) * 60, UTC)
        enqueue(redis, RELEASE_JOB, user_id, at=due.replace(tzinfo=None),
                job_id=f"og-release-{user_id}-{int(due.timestamp())}", retry=None)
    summary = ", ".join(f"{state} {count}" for state, count in sorted(outcomes.items()))
    return (summary or "nothing due") + (", more next minute" if remaining else "")


@contextmanager
def _keep_claim(config: dict, row_id: int, token: str):
    """While the body runs, move the claim's ``claimed_at`` on every third of
    HELD_CLAIM_SECONDS, in a session of its own, so it goes stale only once this worker is
    gone. It stops as soon as the claim is no longer ours."""
    every = max(float(config.get("HELD_CLAIM_SECONDS", 120)) / 3, 0.05)
    done = threading.Event()

    def beat():
        while not done.wait(every):
            try:
                with session_scope(context.sessionmaker()) as db:
                    kept = db.execute(update(HeldMessage).where(
                        HeldMessage.id == row_id, HeldMessage.state == SENDING,
                        HeldMessage.claim == token).values(claimed_at=_now())).rowcount
                if kept != 1:
                    return
            except Exception:  # the next beat tries again; staleness is the fallback
                log.exception("could not keep the claim on held message %s", row_id)

    thread = threading.Thread(target=beat, name=f"held-claim-{row_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _brief(replies: dict[str, tuple[int, str]]) -> str:
    return "; ".join(f"{rcpt}: {code} {' '.join(str(text).split())}"
                     for rcpt, (code, text) in sorted(replies.items()))


def _send(db, config: dict, redis, user, row: HeldMessage, token: str) -> str:
    """Relay one claimed message over the normal path and record the next hop's answer, per
    recipient; returns the state the row is left in (or "lost claim")."""
    rcpts = recipients(row)
    refused = _relayed(redis, row)
    try:
        stored = read_body(config, row)
    except StorageError as exc:
        # Its sender was told 250: the body may come back (a storage mount), so it is tried
        # again on the usual schedule, as if every recipient were deferred, and given up on,
        # with a report to the sender, after DEFER_GIVE_UP_SECONDS; never a claim stuck in
        # "sending" and a job failing each minute.
        log.error("held message %s: %s", row.id, exc)
        stored = data = b""
        if refused is None:
            refused = {rcpt: (451, "4.3.0 the stored message cannot be read") for rcpt in rcpts}
    else:
        data = prepared_for_relay(db, user, stored)
    if refused is None:
        with _keep_claim(config, row.id, token):
            refused = try_relay(config, row.mail_from, rcpts, data)
        _note_relay(redis, row, refused)
    accepted = [r for r in rcpts if r not in refused]
    final, later = split_refusals(refused)
    due = None
    if later:
        due = next_attempt_at(attempt=int(row.attempts or 1), arrival=row.queued_at or
                              row.received_at, now=_now(),
                              delays=parse_delays(config["DEFER_RETRY_SECONDS"]),
                              give_up_seconds=config["DEFER_GIVE_UP_SECONDS"])
        if due is None:  # too old to try again: the sender hears of them as refused
            log.warning("held message %s: giving up on %d deferred recipient(s) after %d "
                        "attempts", row.id, len(later), row.attempts)
            final.update(later)
            later = {}
    rest = None
    if later and (accepted or final):  # the deferred ones go on in a row of their own
        rest = held.split_off(store_for(config), row, sorted(later),
                              stored, f"deferred: {_brief(later)}")
    if final and row.mail_from and row.mail_from != "<>":
        # Before our commit: a kill in between sends the report again, which send_once's
        # marker (the same refusals of the same message) turns into nothing. It quotes the
        # stored headers: the relayed ones carry a DKIM signature made anew each time.
        head, _ = header_block(stored)
        enqueue_delivery_report(redis, row.mail_from, final, head, row.received_at.isoformat(),
                                config["SMTP_HOSTNAME"])
    notes = []
    if later and rest is None:
        state = RETRYING
        notes.append(f"attempt {row.attempts} deferred: {_brief(later)}")
    else:
        state = RELEASED if accepted else REFUSED
        if final:
            notes.append(f"refused (sender notified): {_brief(final)}")
    if rest is not None:
        notes.append(f"{len(later)} deferred recipient(s) retrying separately")
    if accepted and (final or later):
        notes.insert(0, f"delivered to {len(accepted)} of {len(rcpts)}")
    if not _finish(db, config, row, token, state, "; ".join(notes) or None, rest):
        return "lost claim"
    _after_answer(db, config, redis, user, row, accepted, final, data)
    if later:  # the retry's job; were it lost, the minutely release-held run finds it due
        enqueue(redis, RELEASE_JOB, row.user_id, at=due,
                job_id=f"og-release-{row.user_id}-{int(due.replace(tzinfo=UTC).timestamp())}",
                retry=None)
    if final or later:
        log.warning("held message %s: %s", row.id, "; ".join(notes))
    return state


RELAYED_SECONDS = SENT_MARKER_SECONDS  # far beyond any outage a stale claim outlives


def _relayed_key(row: HeldMessage) -> str:
    return f"og:held-relayed:{row.id}:{row.attempts}"


def _note_relay(redis, row: HeldMessage, refused: dict[str, tuple[int, str]]) -> None:
    """The next hop's answer to this attempt, kept apart from the database whose commit of
    it may fail. A note that cannot be written leaves that commit as the only record."""
    try:
        redis.set(_relayed_key(row), json.dumps(refused), ex=RELAYED_SECONDS)
    except Exception:
        log.exception("held message %s was relayed; cannot note it in Redis", row.id)


def _relayed(redis, row: HeldMessage) -> dict[str, tuple[int, str]] | None:
    """The next hop's answer noted by an earlier run of this attempt, else None."""
    noted = redis.get(_relayed_key(row))
    if noted is None:
        return None
    log.warning("held message %s was relayed before its outcome was recorded; recording "
                "it now", row.id)
    return {rcpt: (int(code), str(text)) for rcpt, (code, text) in json.loads(noted).items()}


def _after_answer(db, config: dict, redis, user, row: HeldMessage, accepted: list[str],
                  final: dict, data: bytes) -> None:
    """What the proxy does after the next hop's answer, for a released message too: the copy
    for "Message archiving for senders" (of the recipients the next hop took, the bytes as
    relayed), and the answers for compromise detection's refused share. Neither can undo
    the delivery, so a failure is logged, not raised."""
    if user is None:
        return
    if accepted and data and user.message_archiving:  # no data: its body could not be read
        try:
            archive_message(db, store_for(config), domain_id=row.domain_id, user_id=user.id,
                            mail_from=row.mail_from, rcpt_tos=accepted, data=data,
                            subject=subject_of(parse_headers(data)),
                            by_sender=bool(user.shared_smarthost))
        except Exception:
            log.exception("held message %s was relayed but not archived", row.id)
    if user.compromise_detection and (accepted or final):
        try:
            held.record_next_hop_answers(redis, user.id, row.identity,
                                         len(accepted) + len(final), len(final), time.time())
        except Exception:
            log.exception("could not count the next hop's answers to held message %s", row.id)


def _finish(db, config: dict, row: HeldMessage, token: str, state: str, note: str | None,
            rest: HeldMessage | None = None) -> bool:
    """Write the outcome (and add the split-off row) in one transaction, only while the claim
    is still ours; False when another worker took it over (it then decides)."""
    values = {"state": state, "last_error": (note or None) and note[:500]}
    if state == RELEASED:
        values["released_at"] = _now()
    done = db.execute(update(HeldMessage).where(
        HeldMessage.id == row.id, HeldMessage.state == SENDING, HeldMessage.claim == token)
        .values(**values))
    if done.rowcount != 1:
        db.rollback()
        if rest is not None:
            store_for(config).discard(rest.storage_key)
        return False
    if rest is not None:
        db.add(rest)
    db.commit()
    return True


def release_when_calm(due: str | None = None) -> str:
    """The periodic automatic release: held mail of senders whose risk has decayed below
    their Hold threshold and that are not locked goes to the paced release; users with
    queued mail (or a stale claim) get their release job."""
    config, redis = context.config(), context.redis_client()
    half_life = float(config.get("DETECTION_HALF_LIFE_SECONDS", 3600))
    now = time.time()
    users: set[int] = set()
    with session_scope(context.sessionmaker()) as db:
        pairs = db.execute(select(HeldMessage.user_id, HeldMessage.identity).where(
            HeldMessage.state == HELD, HeldMessage.user_id.is_not(None)).distinct()).all()
        for user_id, identity in pairs:
            user = db.get(OutgoingUser, user_id)
            if user is None or user.locked or _identity_locked(db, user_id, identity):
                continue
            identity_risk, user_risk = held.current_risk(redis, user_id, identity, now,
                                                         half_life)
            hold_at = float(user.detection_hold_at or 0)
            if hold_at and max(identity_risk, user_risk) >= hold_at:
                continue
            rows = db.scalars(select(HeldMessage).where(
                HeldMessage.user_id == user_id, HeldMessage.identity == identity,
                HeldMessage.state == HELD)).all()
            users.update(held.queue_release(db, rows))
            log.info("automatic release of %d held message(s) of %s (%s): risk %.1f",
                     len(rows), user.name, identity, max(identity_risk, user_risk))
        # Queued mail, stale claims and retries (each job claims only what is due).
        users.update(db.scalars(select(HeldMessage.user_id).where(
            HeldMessage.state.in_((QUEUED, SENDING, RETRYING))).distinct()).all())
    failed = []
    for user_id in sorted(u for u in users if u is not None):
        try:  # one user's failure holds back no other user's release
            release_for_user(user_id)
        except Exception:
            log.exception("releasing the held mail of user %s failed", user_id)
            failed.append(user_id)
    if failed:
        raise RuntimeError(f"releasing the held mail of user(s) {failed} failed")
    return f"released held mail of {len(users)} user(s)"


def expire_held_mail(due: str | None = None) -> str:
    """Retention (periodic, takes its run's due time): released and refused held mail
    finished more than HELD_RETENTION_DAYS ago goes, row and body, with an audit event per
    domain. Mail still held past it is kept for an administrator's decision (the sender was
    told 250) and only counted here; the Held Mail page flags it."""
    config = context.config()
    now = (datetime.fromisoformat(due).astimezone(UTC).replace(tzinfo=None) if due
           else _now())
    with session_scope(context.sessionmaker()) as db:
        removed = held.expire_finished(db, config, now)
        kept = held.held_past_retention(db, config, now)
    if kept:
        log.warning("%d held message(s) older than HELD_RETENTION_DAYS wait for an "
                    "administrator's Release or Delete", kept)
    return (f"removed {sum(removed.values())} finished held message(s); {kept} still held "
            "past the retention, kept")


def _identity_locked(db, user_id: int, identity: str | None) -> bool:
    if not identity:
        return False
    return bool(db.scalar(select(Identity.locked).where(
        Identity.user_id == user_id, Identity.value == identity)))


__all__ = ["release_for_user", "release_when_calm", "risk"]
