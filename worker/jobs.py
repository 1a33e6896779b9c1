"""RQ jobs. Each takes ids, reloads what it needs, and is safe to run twice."""

from __future__ import annotations

import logging
from datetime import timedelta

from outgoing import locks
from outgoing.changes import announce_config_change
from outgoing.db import session_scope
from outgoing.lock_templates import DEFAULT_BODY, DEFAULT_SUBJECT, render_lock_template
from outgoing.models import Identity, OutgoingUser
from outgoing.tokens import make_unlock_token
from scoring.locks import auto_unlock_decision
from worker import context, mail

log = logging.getLogger(__name__)


def _load(db, kind: str, target_id: int):
    return db.get(Identity if kind == "identity" else OutgoingUser, target_id)


def _owner(target) -> OutgoingUser:
    return target.user if isinstance(target, Identity) else target


def _sender_address(target) -> str | None:
    """Who is told of the lock: the identity if it is an address, else the user's contact."""
    owner = _owner(target)
    candidates = [target.value] if isinstance(target, Identity) else []
    candidates += [owner.contact_email, owner.name]
    for value in candidates:
        if value and "@" in value:
            return value
    return None


def _once(redis, marker: str) -> bool:
    """True the first time ``marker`` is claimed, so a retried job does not mail twice."""
    return bool(redis.set(f"og:sent:{marker}", 1, nx=True, ex=7 * 86400))


def notify_lock(kind: str, target_id: int, lock_id: str) -> str:
    """Mail the lock template to the locked sender and an alert to the domain's contact."""
    config, redis = context.config(), context.redis_client()
    with session_scope(context.sessionmaker()) as db:
        target = _load(db, kind, target_id)
        if target is None or target.lock_id != lock_id:
            return "lock no longer current; nothing sent"
        owner = _owner(target)
        unlock_at = None
        if target.lock_kind == "automatic" and owner.lock_timeout_minutes and target.locked_at:
            unlock_at = target.locked_at + timedelta(minutes=owner.lock_timeout_minutes)
        ctx = {
            "user": owner.name, "identity": target.value if kind == "identity" else "",
            "reason": target.lock_reason or "", "lock_time": str(target.locked_at or ""),
            "unlock_time": str(unlock_at) if unlock_at else "manual unlock required",
            "domain": owner.domain.name,
            "automatic_unlocks_used": target.automatic_unlocks_used or 0,
            "max_unlocks": owner.maximum_unlocks_by_timeout,
        }
        template = owner.lock_template
        rendered = render_lock_template(template.subject if template else DEFAULT_SUBJECT,
                                        template.body if template else DEFAULT_BODY, ctx)
        if rendered.error:
            log.warning("lock template of %s is broken (%s); sent the default", owner.name,
                        rendered.error)
        sent = []
        recipient = _sender_address(target)
        if recipient and _once(redis, f"{lock_id}:notice"):
            mail.send(config, mail.compose(sender=config["NOTIFY_FROM"], to=recipient,
                                           subject=rendered.subject, body=rendered.body),
                      sender=config["NOTIFY_FROM"], to=[recipient])
            sent.append(recipient)
        admin = owner.domain.abuse_report_address
        if admin and _once(redis, f"{lock_id}:alert"):
            token = make_unlock_token(config["SECRET_KEY"], kind=kind, target_id=target_id,
                                      lock_id=lock_id)
            link = f"{config['PUBLIC_URL'].rstrip('/')}/unlock/{token}"
            who = f"identity {target.value} of {owner.name}" if kind == "identity" else owner.name
            body = (
                f"Outbound Guard locked {who} ({owner.domain.name}).\n\n"
                f"Why: {target.lock_reason}\nSince: {target.locked_at} UTC\n"
                f"Until: {ctx['unlock_time']}\n"
                f"Automatic unlocks used: {ctx['automatic_unlocks_used']} of "
                f"{ctx['max_unlocks']}\n\nUnlock (after you have checked the sender): {link}\n"
            )
            mail.send(config, mail.compose(sender=config["NOTIFY_FROM"], to=admin,
                                           subject=f"[Outbound Guard] Locked: {who}", body=body),
                      sender=config["NOTIFY_FROM"], to=[admin])
            sent.append(admin)
    return f"sent to {', '.join(sent) or 'nobody'}"


def auto_unlock(kind: str, target_id: int, lock_id: str) -> str:
    """Lift a timed-out automatic lock, if it is still that lock and unlocks remain."""
    redis = context.redis_client()
    with session_scope(context.sessionmaker()) as db:
        target = _load(db, kind, target_id)
        if target is None:
            return "target gone"
        owner = _owner(target)
        decision = auto_unlock_decision(
            locked=bool(target.locked), current_lock_id=target.lock_id, job_lock_id=lock_id,
            unlocks_used=target.automatic_unlocks_used or 0,
            maximum_unlocks=owner.maximum_unlocks_by_timeout or 0)
        if decision.unlock:
            locks.unlock(db, redis, target, actor="worker", reason="lock timeout expired",
                         automatic=True)
            announce_config_change(redis)
        return decision.note
