"""The content stages of a message: inspect, quarantine, and deliver (sign, relay, archive).

The handler decides who sent a message and whether they may; this module decides what
happens to the message itself. Every path that answers 250 has either handed the message to
the next hop or stored it durably in the quarantine first.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial

from outgoing.db import session_scope
from outgoing.quarantine import quarantine_message
from outgoing.snapshot import UserPolicy
from outgoing.storage import FileStore
from proxy.relay import relay
from scoring import outcomes
from scoring.message import remove_headers, subject_of
from scoring.spam import SpamVerdict, score_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    """One message after DATA, line endings already normalised."""

    user: UserPolicy
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    headers: tuple[tuple[str, str], ...]
    identity: str | None
    client_ip: str | None
    remove_headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Inspection:
    reject: str | None = None  # a full SMTP reply when a policy refuses the message
    spam: SpamVerdict | None = None  # set when the message belongs in the quarantine


class ContentPipeline:
    def __init__(self, *, config: dict, sessionmaker, redis, redis_sync, clock):
        self.config = config
        self.sessionmaker = sessionmaker
        self.redis = redis
        self.redis_sync = redis_sync
        self.clock = clock
        self.store = FileStore(config["STORAGE_DIR"])
        host, _, port = config["UPSTREAM_SMTP"].rpartition(":")
        self.upstream = (host.strip("[]"), int(port))

    async def _in_thread(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args, **kwargs))

    async def check_sender(self, user: UserPolicy, mail_from: str) -> str | None:
        """MAIL-time checks of the sender's domain; a reply refuses it."""
        return None

    async def inspect(self, msg: Message) -> Inspection:
        verdict = score_message(msg.data, mail_from=msg.mail_from, rcpt_tos=list(msg.rcpt_tos))
        if verdict.is_spam:
            return Inspection(spam=verdict)
        return Inspection()

    async def quarantine(self, msg: Message, verdict: SpamVerdict) -> None:
        """Store durably; returns only when the message is safe in the quarantine."""
        reason = "spam: " + ", ".join(verdict.rules)

        def store():
            with session_scope(self.sessionmaker) as db:
                quarantine_message(
                    db, self.store, domain_id=msg.user.domain_id, user_id=msg.user.id,
                    mail_from=msg.mail_from, rcpt_tos=list(msg.rcpt_tos), data=msg.data,
                    subject=subject_of(list(msg.headers)), identity=msg.identity,
                    client_ip=msg.client_ip, reason=reason, score=verdict.score,
                    rules=verdict.rules)

        await self._in_thread(store)

    async def deliver(self, msg: Message) -> str:
        """Strip identity headers and relay; the reply is the next hop's verdict."""
        data = remove_headers(msg.data, set(msg.remove_headers)) if msg.remove_headers \
            else msg.data
        result = await relay(host=self.upstream[0], port=self.upstream[1],
                             mail_from=msg.mail_from, rcpt_tos=list(msg.rcpt_tos), data=data,
                             timeout=self.config["UPSTREAM_TIMEOUT"],
                             local_hostname=self.config["SMTP_HOSTNAME"])
        if result.refused:
            log.warning("next hop refused %d recipient(s): %s", len(result.refused),
                        result.refused)
        return outcomes.QUEUED if result.delivered else result.reply
