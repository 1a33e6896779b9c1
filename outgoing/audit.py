"""Audit events: who did what, when and why, for every lock, unlock and change."""

from __future__ import annotations

import json

from outgoing.models import AuditEvent


def record(session, *, actor: str, action: str, target_type: str, target_id: int | None,
           domain_id: int | None, **detail) -> AuditEvent:
    event = AuditEvent(
        actor=actor,
        action=action,
        target_type=target_type,
        target_id=target_id,
        domain_id=domain_id,
        detail=json.dumps(detail, default=str, sort_keys=True),
    )
    session.add(event)
    return event
