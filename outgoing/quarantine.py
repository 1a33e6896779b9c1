"""Putting a message into the outgoing quarantine, durably, before the sender hears back."""

from __future__ import annotations

import json

from outgoing.models import QuarantinedMessage
from outgoing.storage import FileStore


def quarantine_message(session, store: FileStore, *, domain_id: int, user_id: int | None,
                       mail_from: str, rcpt_tos: list[str], data: bytes, subject: str,
                       identity: str | None, client_ip: str | None, reason: str,
                       score: float, rules: list[str] | tuple[str, ...]) -> QuarantinedMessage:
    """Store the body, then the row; both are durable when this returns."""
    key = store.new_key("quarantine")
    store.put(key, data)
    row = QuarantinedMessage(
        domain_id=domain_id, user_id=user_id, mail_from=mail_from,
        rcpt_tos=json.dumps(list(rcpt_tos)), subject=subject[:500], size=len(data),
        storage_key=key, identity=identity, client_ip=client_ip, reason=reason[:500],
        score=score, rules=json.dumps(list(rules)),
    )
    session.add(row)
    try:
        session.commit()
    except BaseException:
        store.delete(key)
        raise
    return row
