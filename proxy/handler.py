"""The aiosmtpd handler: one hook per SMTP moment, each returning the reply as a string.

Stages, as the design names them: authenticate (AUTH or client IP), limit (MAIL, RCPT),
identify and inspect (DATA), then quarantine or sign and relay. Policy decisions come from
``scoring``; this module does the I/O around them. Any unexpected fault answers 4xx so the
sender keeps the message and retries: nothing is lost, nothing slips through.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import json
import logging
from base64 import b64decode
from dataclasses import dataclass, field
from functools import partial

from aiosmtpd.smtp import AuthResult, LoginPassword

from outgoing import locks, redis_keys
from outgoing.db import session_scope
from outgoing.models import LOCK_AUTOMATIC, Identity, OutgoingUser
from outgoing.passwords import verify_password
from outgoing.snapshot import UserPolicy
from proxy import counters
from proxy.content import ContentPipeline, Message
from proxy.directory import Directory
from scoring import identity as identities
from scoring import outcomes
from scoring.locks import lock_reason, should_lock
from scoring.message import normalise_line_endings, parse_headers

log = logging.getLogger(__name__)

MAX_RECIPIENTS_PER_MESSAGE = 1000


@dataclass
class SessionState:
    """What the proxy knows about one SMTP connection beyond aiosmtpd's session."""

    auth_user_id: int | None = None
    auth_login: str | None = None
    counted_user_ids: set[int] = field(default_factory=set)
    user_id: int | None = None  # the user the current message is attributed to


def _state(session) -> SessionState:
    state = getattr(session, "og_state", None)
    if state is None:
        state = SessionState()
        session.og_state = state
    return state


def _client_ip(session) -> str:
    peer = session.peer
    return peer[0] if isinstance(peer, tuple) else "127.0.0.1"


class OutboundHandler:
    def __init__(self, *, config: dict, directory: Directory, redis, redis_sync,
                 sessionmaker, clock):
        self.config = config
        self.directory = directory
        self.redis = redis
        self.redis_sync = redis_sync
        self.sessionmaker = sessionmaker
        self.clock = clock
        self.content = ContentPipeline(config=config, sessionmaker=sessionmaker, redis=redis,
                                       redis_sync=redis_sync, clock=clock)
        self._verified: dict[tuple[int, str], bytes] = {}

    # -- helpers ---------------------------------------------------------------------------
    async def _in_thread(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args, **kwargs))

    async def _check_password(self, user: UserPolicy, password: str) -> bool:
        """Verify in a thread (scrypt is slow); remember a success for this exact hash."""
        digest = hmac.new(self.config["SECRET_KEY"].encode(), password.encode(),
                          hashlib.sha256).digest()
        cached = self._verified.get((user.id, user.password_hash or ""))
        if cached is not None and hmac.compare_digest(cached, digest):
            return True
        ok = await self._in_thread(verify_password, user.password_hash, password)
        if ok:
            if len(self._verified) > 10000:
                self._verified.clear()
            self._verified[(user.id, user.password_hash or "")] = digest
        return ok

    # -- AUTH ------------------------------------------------------------------------------
    async def _authenticate(self, server, login: bytes, password: bytes) -> AuthResult:
        try:
            login_text = login.decode("utf-8")
            password_text = password.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False, message=outcomes.AUTH_INVALID)
        if not self.directory.ready:
            return AuthResult(success=False, handled=False, message=outcomes.AUTH_TEMPORARY)
        user = self.directory.user_for_login(login_text)
        if user is None or not await self._check_password(user, password_text):
            log.info("AUTH failed for %r from %s", login_text[:100], _client_ip(server.session))
            return AuthResult(success=False, handled=False, message=outcomes.AUTH_INVALID)
        state = _state(server.session)
        state.auth_user_id = user.id
        state.auth_login = login_text
        return AuthResult(success=True, auth_data=LoginPassword(login, b""))

    async def auth_PLAIN(self, server, args):
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                return AuthResult(success=False, handled=False,
                                  message="501 5.5.2 Cannot decode base64")
        parts = blob.split(b"\x00")
        if len(parts) != 3 or len(blob) > 2048:
            return AuthResult(success=False, handled=False,
                              message="501 5.5.2 Malformed AUTH PLAIN data")
        return await self._authenticate(server, parts[1], parts[2])

    async def auth_LOGIN(self, server, args):
        if len(args) == 1:
            login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
            if not isinstance(login, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                return AuthResult(success=False, handled=False,
                                  message="501 5.5.2 Cannot decode base64")
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        if len(login) > 1024 or len(password) > 1024:
            return AuthResult(success=False, handled=False,
                              message="501 5.5.2 AUTH data too long")
        return await self._authenticate(server, login, password)

    # -- MAIL ------------------------------------------------------------------------------
    def _resolve_user(self, session, mail_from: str) -> UserPolicy | None:
        state = _state(session)
        if state.auth_user_id is not None:
            return self.directory.user(state.auth_user_id)
        ip_user = self.directory.user_for_ip(_client_ip(session))
        if ip_user is None:
            return None
        return self.directory.reauthentication_target(ip_user, mail_from) or ip_user

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        try:
            return await self._mail(session, envelope, address, mail_options)
        except Exception:
            log.exception("MAIL failed")
            return outcomes.TEMPORARY

    async def _mail(self, session, envelope, address, mail_options):
        if not self.directory.ready:
            return outcomes.TEMPORARY
        user = self._resolve_user(session, address)
        if user is None:
            return outcomes.AUTH_REQUIRED
        state = _state(session)
        lock = await self.redis.get(redis_keys.user_lock(user.id))
        if lock is not None:
            reason = json.loads(lock).get("reason")
            return outcomes.user_locked(user.name, reason)
        refusal = await self.content.check_sender(user, address)
        if refusal:
            return refusal
        if user.id not in state.counted_user_ids:
            decision = await counters.count_connection(self.redis, user.id, user.limits,
                                                       self.clock())
            if not decision.allowed:
                return str(decision.reply)
            state.counted_user_ids.add(user.id)
        state.user_id = user.id
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return outcomes.OK

    # -- RCPT ------------------------------------------------------------------------------
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        try:
            if len(envelope.rcpt_tos) >= MAX_RECIPIENTS_PER_MESSAGE:
                return outcomes.TOO_MANY_RECIPIENTS
            user = self.directory.user(_state(session).user_id or -1)
            if user is None:
                return "503 5.5.1 Error: need MAIL command"
            decision = await counters.count_recipient(
                self.redis, user.id, user.maximum_recipients_per_day, self.clock())
            if not decision.allowed:
                return str(decision.reply)
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return outcomes.OK
        except Exception:
            log.exception("RCPT failed")
            return outcomes.TEMPORARY

    # -- DATA ------------------------------------------------------------------------------
    async def handle_DATA(self, server, session, envelope):
        try:
            return await self._data(session, envelope)
        except Exception:
            log.exception("DATA failed")
            return outcomes.TEMPORARY

    async def _data(self, session, envelope):
        state = _state(session)
        user = self.directory.user(state.user_id or -1)
        if user is None:
            return outcomes.TEMPORARY
        raw = envelope.original_content or b""
        endings = normalise_line_endings(raw)
        if endings.had_bare and self.config["BARE_LINE_ENDINGS"] == "reject":
            return outcomes.BARE_LINE_ENDING
        data = endings.data
        headers = parse_headers(data)

        rules = identities.compile_rules(
            [(h.header_name, h.regex, h.remove_header) for h in user.headers])
        found = identities.extract_identity(
            user.identification_method, mail_from=envelope.mail_from or "",
            auth_user=state.auth_login, headers=headers, rules=rules)
        identity = found.value
        if identity:
            lock = await self.redis.get(redis_keys.identity_lock(user.id, identity))
            if lock is not None:
                return outcomes.identity_locked(identity, json.loads(lock).get("reason"))
        else:
            log.info("no identity found for user %s; attributing to the user", user.name)

        msg = Message(user=user, mail_from=envelope.mail_from or "",
                      rcpt_tos=tuple(envelope.rcpt_tos), data=data, headers=tuple(headers),
                      identity=identity, client_ip=_client_ip(session),
                      remove_headers=found.remove_headers)
        inspection = await self.content.inspect(msg)
        if inspection.reject:
            return inspection.reject
        if inspection.spam is not None:
            await self.content.quarantine(msg, inspection.spam)
            # The message is durable now; counting spam must not turn that into a 4xx.
            try:
                await self._count_spam(user, identity)
            except Exception:
                log.exception("could not count spam or lock %s", user.name)
            return outcomes.quarantined(user.quarantine_response, inspection.spam.rules)
        return await self.content.deliver(msg)

    async def _count_spam(self, user: UserPolicy, identity: str | None) -> None:
        now = self.clock()
        window = self.config["SPAM_WINDOW_SECONDS"]
        threshold = self.config["SPAM_LOCK_THRESHOLD"]
        count = await counters.record_spam_event(self.redis, redis_keys.user_spam(user.id),
                                                 now, window)
        if should_lock(count, enabled=user.automatic_lock, threshold=threshold):
            # The user lock covers every identity behind it; locking the identity as well
            # would only keep it blocked after an administrator unlocks the user.
            await self._in_thread(self._lock_user, user.id, lock_reason(count, window))
            return
        if identity:
            id_count = await counters.record_spam_event(
                self.redis, redis_keys.identity_spam(user.id, identity), now, window)
            if should_lock(id_count, enabled=user.lock_identities_automatically,
                           threshold=threshold):
                await self._in_thread(self._lock_identity, user.id, identity,
                                      lock_reason(id_count, window))

    def _lock_user(self, user_id: int, reason: str) -> None:
        with session_scope(self.sessionmaker) as db:
            target = db.get(OutgoingUser, user_id)
            if target is not None and not target.locked:
                locks.lock(db, self.redis_sync, target, kind=LOCK_AUTOMATIC, reason=reason,
                           actor="proxy")

    def _lock_identity(self, user_id: int, value: str, reason: str) -> None:
        from sqlalchemy import select

        with session_scope(self.sessionmaker) as db:
            target = db.scalar(select(Identity).where(Identity.user_id == user_id,
                                                      Identity.value == value))
            if target is None:
                target = Identity(user_id=user_id, value=value)
                db.add(target)
                db.flush()
            if not target.locked:
                locks.lock(db, self.redis_sync, target, kind=LOCK_AUTOMATIC, reason=reason,
                           actor="proxy")
