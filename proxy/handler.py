"""The aiosmtpd handler: one hook per SMTP moment, each returning the reply as a string.

Stages, as the design names them: authenticate (AUTH or client IP), limit (MAIL, RCPT),
identify and inspect (DATA), then quarantine or sign and relay. Policy decisions come from
``scoring``; this module does the I/O around them. Any unexpected fault answers 4xx so the
sender keeps the message and retries: nothing is lost, nothing slips through.

Redis round trips per one-recipient message: one at MAIL (the user's lock, every connection
window and one recipient reserved in advance, in one script) and one after DATA (the user's
lock again, for a lock set since MAIL, the identity's lock and its message count, in one
script), plus one with compromise detection on (proxy/detection.py, after inspection: score,
decay, rung). A message without an identity makes the one after DATA for the user's lock
alone. Redis unreachable means 451 for new mail, or no checks at all with
``REDIS_FAIL_OPEN``; both recover by themselves.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from base64 import b64decode
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial

from aiosmtpd.proxy_protocol import V2_CMD
from aiosmtpd.smtp import AuthResult, LoginPassword
from redis.exceptions import RedisError

from outgoing import audit, held, locks
from outgoing.db import session_scope
from outgoing.models import LOCK_AUTOMATIC, Identity, OutgoingUser
from outgoing.passwords import stand_in_hash, verify_password
from outgoing.redis_conn import is_cluster
from outgoing.snapshot import UserPolicy
from proxy import counters, detection, metrics, throttle
from proxy import identities as identity_store
from proxy import message_log as mlog
from proxy.anonymous_records import AnonymousRecords
from proxy.connections import client_key
from proxy.content import ContentPipeline, Message
from proxy.database import DatabaseTimeout
from proxy.directory import Directory, login_key
from scoring import identity as identities
from scoring import outcomes, risk
from scoring.fingerprint import body_of, fingerprint
from scoring.limits import RECIPIENTS, refusal_at
from scoring.locks import lock_reason, should_lock
from scoring.message import (
    MAX_HEADER_FIELDS,
    CrlfLines,
    HeaderLineTooLong,
    crlf_lines,
    fit_long_lines,
    line_not_a_field,
    lines_end_in_crlf,
    normalise_line_endings,
    parse_headers,
    starts_folded,
    subject_of,
)
from scoring.trace import received_header, with_keyword

log = logging.getLogger(__name__)

MAX_RECIPIENTS_PER_MESSAGE = 1000
MAX_AUTH_BLOB = 2048  # decoded bytes of AUTH PLAIN data (authzid, login, password)
MAX_AUTH_FIELD = 1024  # decoded bytes of one AUTH LOGIN answer
# scrypt's threads, its own: CPU-bound, so more than the cores only queue in the kernel, and
# shared with nothing, so that no other work (the database hung) can keep logins waiting.
SCRYPT_THREADS = 2


@dataclass
class SessionState:
    """What the proxy knows about one SMTP connection beyond aiosmtpd's session."""

    auth_user_id: int | None = None
    auth_login: str | None = None
    counted_user_ids: set[int] = field(default_factory=set)
    # Users this connection is owed to but not counted for yet: with no connection limit
    # nothing can refuse it, so it is counted in the round trip of the user's first MAIL, or
    # when the connection ends without one (``_count_connection``).
    owed_user_ids: set[int] = field(default_factory=set)
    closed: bool = False  # the connection has ended (``session_closed``)
    user_id: int | None = None  # the user the current message is attributed to
    # A recipient counted at MAIL for the first RCPT: (user id, hash field). Given back with
    # the next MAIL or when the connection ends if no RCPT used it.
    reserved: tuple[int, str] | None = None
    # The message-log record of the transaction open since MAIL (outgoing/message_log.py).
    txn: dict | None = None
    tried_login: str | None = None  # the login of the AUTH under way, for its record
    active: bool = False  # counted in outbound_guard_smtp_connections_active
    # Compromise detection's authentication signals, scored once with the session's first
    # message: failed AUTH before this success, and a network new for this login.
    auth_failed: bool = False
    auth_new_network: bool = False


def _state(session) -> SessionState:
    state = getattr(session, "og_state", None)
    if state is None:
        state = SessionState()
        session.og_state = state
    return state


def _verify(password_hash: str | None, password: str) -> bool:
    """scrypt, in a worker thread, counted. ``None`` (no such login) is checked against the
    stand-in hash and is never right: a refused login costs the same whether it exists or not,
    so the time of a 535 does not tell which logins (other customers' too) exist."""
    metrics.PASSWORD_CHECKS.inc()
    if password_hash is None:
        verify_password(stand_in_hash(), password)
        return False
    return verify_password(password_hash, password)


def _client_ip(session) -> str:
    peer = session.peer
    return peer[0] if isinstance(peer, tuple) else "127.0.0.1"


def _balancers_own(session) -> bool:
    """A connection the load balancer opened for itself (PROXY v2 LOCAL: its health check);
    its address is the balancer's, no customer's."""
    data = getattr(session, "proxy_data", None)
    return data is not None and getattr(data, "command", None) == V2_CMD.LOCAL


class RateLimitedLog:
    """Log a recurring fault once per ``every`` seconds, not once per message."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self._last: dict[str, float] = {}

    def warning(self, key: str, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) >= self.every:
            self._last[key] = now
            log.warning(message, *args)


class OutboundHandler:
    def __init__(self, *, config: dict, directory: Directory, redis, redis_sync,
                 sessionmaker, clock, flusher: identity_store.IdentityFlusher | None = None):
        self.config = config
        self.directory = directory
        self.redis = redis
        self.redis_sync = redis_sync
        self.sessionmaker = sessionmaker
        self.clock = clock
        self.fail_open = bool(config.get("REDIS_FAIL_OPEN"))
        self.throttle = throttle.ThrottlePolicy.from_config(config)
        self.local_throttle = throttle.LocalThrottle(self.throttle)
        self.flusher = flusher or identity_store.IdentityFlusher(
            redis, sessionmaker, clock, float(config.get("IDENTITY_FLUSH_SECONDS", 2.0)))
        self.content = ContentPipeline(config=config, sessionmaker=sessionmaker, redis=redis,
                                       redis_sync=redis_sync, clock=clock)
        self.database = self.content.database
        self._scrypt = ThreadPoolExecutor(SCRYPT_THREADS, thread_name_prefix="scrypt")
        self._verified: dict[tuple[int, str], bytes] = {}
        # Sessions that owe a connection count (``_owe``), by id: counted at shutdown.
        self._owing: dict[int, SessionState] = {}
        # Verifications under way, by ``_verification_key``: (user id, hash, password
        # digest), or (None, login, password digest) for a login that does not exist.
        self._verifying: dict[tuple, asyncio.Future] = {}
        # AUTHs whose throttle check is under way or whose password is being checked, by
        # ``_verification_key``: the leader's verification, once its check let it through.
        self._guesses: dict[tuple, asyncio.Future] = {}
        self._faults = RateLimitedLog()
        self._tasks: set[asyncio.Task] = set()
        self.half_life = float(config.get("DETECTION_HALF_LIFE_SECONDS", 3600))
        self.campaigns = detection.CampaignCounts()
        self.answers = detection.Answers()
        self.log = mlog.MessageLog(redis, maxlen=int(config["MESSAGE_LOG_STREAM_MAXLEN"]),
                                   faults=self._faults)
        self.anonymous_records = AnonymousRecords(
            int(config["MESSAGE_LOG_ANONYMOUS_PER_MINUTE"]), client_key)

    # -- helpers ---------------------------------------------------------------------------
    def _redis_down(self, where: str, exc: Exception) -> bool:
        """Log a Redis fault; True when the deployment chose to let mail through anyway."""
        metrics.REDIS_ERRORS.labels(where).inc()
        if self.fail_open:
            self._faults.warning(where, "Redis unavailable at %s (%s); REDIS_FAIL_OPEN lets "
                                 "mail through unchecked", where, exc)
        else:
            self._faults.warning(where, "Redis unavailable at %s (%s); answering 4xx", where,
                                 exc)
        return self.fail_open

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        """Background work's failure is logged here, as nobody awaits it."""
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if isinstance(error, DatabaseTimeout):
            self._faults.warning("database", "background work: %s", error)
        elif error is not None:
            log.error("background work failed", exc_info=error)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's last resort: never show the client a Python error."""
        if isinstance(error, ValueError) and "limit" in str(error):
            return outcomes.LINE_TOO_LONG  # an AUTH answer longer than a line may be
        log.error("unexpected error in the SMTP session", exc_info=error)
        return outcomes.TEMPORARY

    def session_replaced(self, old, new) -> None:
        """STARTTLS began a new session on the same connection: the connection stays counted,
        and a recipient reserved before it is given back with the new session's first MAIL
        (or when the connection ends)."""
        state = getattr(old, "og_state", None)
        if state is None:
            return
        fresh = _state(new)
        fresh.counted_user_ids |= state.counted_user_ids
        fresh.owed_user_ids |= state.owed_user_ids
        state.owed_user_ids = set()  # owed once, by the session that goes on
        if self._owing.pop(id(state), None) is not None:
            self._owing[id(fresh)] = fresh
        fresh.active, state.active = state.active, False
        fresh.txn, state.txn = state.txn, None
        fresh.auth_failed, fresh.auth_new_network = state.auth_failed, state.auth_new_network
        if state.reserved is not None:
            fresh.reserved, state.reserved = state.reserved, None

    async def _count_connection(self, session, user: UserPolicy, code: int) -> str | None:
        """Count this connection for ``user`` (each user once per connection); the reply
        refusing it when a window is full. With Redis down it is left to MAIL, which answers
        451 (or, with REDIS_FAIL_OPEN, lets it through). A user with no connection limit (the
        default) cannot be refused here, so the count waits for the user's first MAIL, whose
        round trip counts it too (``counters.check_mail``), or for the end of a connection
        that sent none: one round trip a connection less for a client that sends one message
        per connection."""
        state = _state(session)
        if user.id in state.counted_user_ids:
            return None
        if not user.limits:
            self._owe(state, user.id)
            return None
        try:
            decision = await counters.count_connection(self.redis, user.id, user.limits,
                                                       self.clock())
        except RedisError as exc:
            self._redis_down("connect", exc)
            return None
        return self._counted_connection(session, user, decision, code)

    def _counted_connection(self, session, user: UserPolicy, decision, code: int) -> str | None:
        if not decision.allowed:
            log.info("connection of %s refused: %s limit", user.name, decision.window)
            return str(refusal_at(decision, code))
        _state(session).counted_user_ids.add(user.id)
        return None

    async def handle_connect(self, session) -> str | None:
        """Before the greeting: a client in an IP/Range user's range opens one of that user's
        connections ("connections that can be opened"); over a limit it gets 421."""
        state = _state(session)
        state.active = True
        metrics.CONNECTIONS.inc()
        user = None
        try:
            if not self.directory.ready:
                return None
            user = self._ip_user(session)
            if user is None:
                return None
            refusal = await self._count_connection(session, user, 421)
        except Exception:
            log.exception("counting a connection failed")
            return None
        if refusal:
            self._log_refusal(session, "connect", refusal, user)
        return refusal

    # -- the message log ---------------------------------------------------------------------
    def connection_refused(self, session, reply: str) -> None:
        """Refused before ``handle_connect`` (too many connections from one address)."""
        try:
            user = self._ip_user(session) if self.directory.ready else None
        except Exception:
            user = None
        self._log_refusal(session, "connect", reply, user)

    def _log_refusal(self, session, stage: str, reply: str, user=None, **fields) -> None:
        """The record of a transaction that ended before it began (connect, AUTH, MAIL); of
        one nobody is known for, only within the client network's budget a minute."""
        ip, now = _client_ip(session), self.clock()
        if user is None:
            recorded, first = self.anonymous_records.allow(ip, now)
            if not recorded:
                metrics.MESSAGE_LOG_UNRECORDED.inc()
                if first:
                    log.info("%s: more than %d refusals this minute, the rest of the minute "
                             "unrecorded in the message log", client_key(ip),
                             self.anonymous_records.per_minute)
                else:
                    self._faults.warning("anonymous-records", "refusals of unknown clients "
                                         "over the message log's budget go unrecorded")
                return
        self.log.write(mlog.finish(mlog.new_record(now, ip, user, stage=stage, **fields),
                                   reply))

    def data_refused(self, session, reply: str) -> None:
        """DATA refused before the message reached the handler (over the size limit, a line
        too long, the process's DATA budget): its record says so, not "abandoned"."""
        state = getattr(session, "og_state", None)
        record = state.txn if state is not None else None
        if record is None:
            return
        state.txn = None
        record["stage"] = "data"
        self.log.write(mlog.finish(record, reply))

    def _end_transaction(self, session) -> None:
        """A transaction that ended without DATA (RSET, a new MAIL, QUIT, a dropped
        connection): refused at RCPT when we refused a recipient, else abandoned."""
        state = getattr(session, "og_state", None)
        record = state.txn if state is not None else None
        if record is None:
            return
        state.txn = None
        if record.get("refused_count"):
            record.update(stage="rcpt", verdict="refused")
            reply = record.pop("rcpt_reply", "")
        else:
            record.update(stage="rcpt" if record["rcpt_count"] else "mail",
                          verdict="abandoned")
            reply = ""
        self.log.write(mlog.finish(record, reply))

    def session_closed(self, session) -> None:
        """The connection ended: give back a recipient reserved at MAIL but never used, and
        count the connection for users it is still owed to (no MAIL of theirs counted it)."""
        state = getattr(session, "og_state", None)
        if state is not None:
            state.closed = True
        if state is not None and state.active:
            state.active = False
            metrics.CONNECTIONS.dec()
        self._end_transaction(session)
        if state is not None and state.reserved is not None:
            user_id, field_name = state.reserved
            state.reserved = None
            self._background(self._give_back(user_id, field_name))
        if state is not None:
            self._count_what_is_owed(state)

    def _owe(self, state: SessionState, user_id: int) -> None:
        state.owed_user_ids.add(user_id)
        self._owing[id(state)] = state

    def _count_what_is_owed(self, state: SessionState) -> None:
        """The connection ends (or the proxy stops): count it for the users it is still owed
        to, once."""
        self._owing.pop(id(state), None)
        if state.owed_user_ids:
            owed, state.owed_user_ids = state.owed_user_ids - state.counted_user_ids, set()
            state.counted_user_ids |= owed
            for user_id in owed:
                self._background(self._count_owed(user_id))

    def _settle_owed(self, state: SessionState, user_id: int, call: asyncio.Future) -> None:
        """MAIL's script has run: when it counted no connection (refused, locked, failed),
        the user is owed one still, counted at once if the connection has ended."""
        if not call.cancelled() and call.exception() is None:
            check = call.result()
            if check.lock is None and check.decision.allowed:
                return
        if state.closed:
            self._background(self._count_owed(user_id))
        else:
            self._owe(state, user_id)

    async def _count_owed(self, user_id: int) -> None:
        try:
            await counters.count_connection(self.redis, user_id, {}, self.clock())
        except Exception as exc:
            self._faults.warning("count-owed", "could not count a connection that sent no "
                                 "mail (%s)", exc)

    async def _give_back(self, user_id: int, field_name: str) -> None:
        try:
            await counters.give_back(self.redis, user_id, field_name, self.clock())
        except Exception as exc:
            self._faults.warning("give-back", "could not give back a reserved recipient "
                                 "(%s); it counts until its window passes", exc)

    def _password_digest(self, password: str) -> bytes:
        return hmac.new(self.config["SECRET_KEY"].encode(), password.encode(),
                        hashlib.sha256).digest()

    def _password_known(self, user: UserPolicy, password: str) -> bool:
        """Did this process verify this very password for this user's current hash?"""
        cached = self._verified.get((user.id, user.password_hash or ""))
        return cached is not None and hmac.compare_digest(cached, self._password_digest(password))

    def _verification_key(self, user: UserPolicy | None, login: str, password: str) -> tuple:
        """What simultaneous checks of one password share (``_verification``). No such login:
        the login as the directory looks it up, so that unknown logins merge exactly as
        existing ones do (by user) and the replies' timing does not tell them apart."""
        digest = self._password_digest(password)
        if user is None or not user.password_hash:
            return (None, login_key(login), digest)
        return (user.id, user.password_hash, digest)

    def _verification(self, user: UserPolicy | None, login: str,
                      password: str) -> asyncio.Future:
        """The password's check in a thread (scrypt is slow), shared by simultaneous logins
        with the same password: they wait for one verification instead of each running
        scrypt (a fleet of connections opening at once). No such login (``user`` None, or
        without a password): the stand-in hash (``_verify``), shared the same way."""
        key = self._verification_key(user, login, password)
        pending = self._verifying.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(
                self._scrypt, _verify, user.password_hash if key[0] is not None else None,
                password)
            self._verifying[key] = pending
            pending.add_done_callback(lambda _: self._verifying.pop(key, None))
        return pending

    async def _check_password(self, user: UserPolicy | None, login: str, password: str,
                              pending: asyncio.Future | None = None) -> bool:
        """The verification's result (``pending``, or one started or joined now); a success
        is remembered for this exact hash."""
        if user is not None and user.password_hash and self._password_known(user, password):
            return True
        ok = await asyncio.shield(pending or self._verification(user, login, password))
        if ok and user is not None:
            if len(self._verified) > 10000:
                self._verified.clear()
            self._verified[(user.id, user.password_hash or "")] = \
                self._password_digest(password)
        return ok

    async def _settle_reservation(self, pending: asyncio.Future, ip: str, login: str,
                                  now: float, check: throttle.AuthCheck, token: str,
                                  redis_up: bool) -> None:
        """An AUTH whose client left while its password was checked: its slot is held until
        the check ends (other connections may be waiting for the same verification and
        learn its result), then given back, or counted as the failure it was."""
        try:
            ok = await asyncio.shield(pending)
        except Exception:
            ok = True  # nothing was decided
        try:
            if not redis_up:
                raise RedisError("unavailable at the check")
            if ok:
                await throttle.release(self.redis, ip, login, token)
            else:
                await throttle.record_failure(self.redis, ip, login, now, self.throttle,
                                              known_network=check.known_network,
                                              release=token)
        except RedisError:
            if ok:
                self.local_throttle.release(ip, login, token)
            else:
                self.local_throttle.record_failure(ip, login, now,
                                                   known_network=check.known_network,
                                                   release=token)

    # -- AUTH ------------------------------------------------------------------------------
    async def _throttle_check(self, session, user: UserPolicy | None, ip: str, login: str,
                              now: float, known: bool,
                              token: str | None) -> tuple[throttle.AuthCheck, bool]:
        """The throttle's check before the password (and, for a ``known`` password, the
        success's record), reserving ``token``'s slot; in this process's memory while Redis
        is down. Also whether Redis answered: after one failure, this AUTH does not wait on
        it again."""
        # On one Redis server that call counts the connection too, for a user with limits.
        count = counters.connection_call(user.id, user.limits, now) \
            if known and user.limits and user.id not in _state(session).counted_user_ids \
            and not is_cluster(self.redis) else None
        try:
            return await throttle.check(self.redis, ip, login, now, self.throttle,
                                        success=known,
                                        ask_failures=known and user.detection.enabled,
                                        count=count, reserve=token), True
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("AUTH").inc()
            self._faults.warning("AUTH", "Redis unavailable at AUTH (%s); throttling failed "
                                 "logins in this process only", exc)
            return self.local_throttle.check(ip, login, now, reserve=token, limited=known), False

    def _lead(self, key, slot: asyncio.Future | None, pending: asyncio.Future | None) -> None:
        """The leader's check is over: tell the AUTHs waiting on it which verification
        decides their guess (None: the leader was refused, and so are they). It stays the
        guess's leader until that verification ends."""
        if slot is None:
            return
        slot.set_result(pending)

        def forget(_=None):
            if self._guesses.get(key) is slot:
                del self._guesses[key]

        if pending is None:
            forget()
        else:
            pending.add_done_callback(forget)

    async def _authenticate(self, server, login: bytes, password: bytes) -> AuthResult:
        session = server.session
        ip = _client_ip(session)
        login_text = login.decode("utf-8", "replace")
        _state(session).tried_login = login_text[:320]
        if not self.directory.ready:
            return AuthResult(success=False, handled=False, message=outcomes.AUTH_TEMPORARY)
        now = self.clock()
        user = None
        try:
            password_text = password.decode("utf-8")
            user = self.directory.user_for_login(login.decode("utf-8"))
        except UnicodeDecodeError:
            password_text = password.decode("utf-8", "replace")
        # A password this process verified before is right without scrypt: the throttle's
        # check and the recording of the success are then one round trip, not two.
        known = user is not None and bool(user.password_hash) and \
            self._password_known(user, password_text)
        # Any other password holds a slot toward the failure limit while it is checked
        # (``throttle.check``), unless this process is checking the same password for the same
        # login already (the leader): the same guess, decided by the leader's verification
        # under the leader's slot, so a fleet logging in at once takes one slot, not one each.
        key = None if known else self._verification_key(user, login_text, password_text)
        leader = self._guesses.get(key) if key is not None else None
        slot = None
        if key is not None and leader is None:
            slot = self._guesses[key] = asyncio.get_running_loop().create_future()
        token = None if known or leader is not None else secrets.token_hex(8)
        try:
            check, redis_up = await self._throttle_check(session, user, ip, login_text, now,
                                                         known, token)
        except BaseException:
            self._lead(key, slot, None)
            raise
        if check.blocked is not None:
            self._lead(key, slot, None)
            log.info("AUTH refused for %r from %s: %s is blocked after failed attempts",
                     login_text[:100], ip, check.blocked)
            return AuthResult(success=False, handled=False, message=outcomes.AUTH_BLOCKED)
        if known:
            pending = None
        elif leader is not None:
            pending = await asyncio.shield(leader)
            if pending is None:  # the leader was refused: its slot could not be had
                return AuthResult(success=False, handled=False, message=outcomes.AUTH_BLOCKED)
        else:
            pending = self._verification(user, login_text, password_text)
            self._lead(key, slot, pending)
        try:
            ok = True if known else await self._check_password(user, login_text, password_text,
                                                                  pending)
        except asyncio.CancelledError:
            if token is not None:  # the client left: the slot outlives this coroutine
                self._background(self._settle_reservation(pending, ip, login_text, now, check,
                                                          token, redis_up))
            raise
        except Exception:
            log.exception("could not verify the password of %r", login_text[:100])
            if token is not None:
                self._background(self._settle_reservation(pending, ip, login_text, now, check,
                                                          token, redis_up))
            return AuthResult(success=False, handled=False, message=outcomes.AUTH_TEMPORARY)
        if ok:
            # Where the owner logs in from: the username's block never applies there.
            self.local_throttle.record_success(ip, login_text, now)
            if token is not None and not redis_up:
                self.local_throttle.release(ip, login_text, token)
            if redis_up and not check.succeeded:
                # (A block made while scrypt ran applies from the next AUTH: this one
                # passed the check.) The same call gives back the attempt's slot.
                check = await self._record_success(user, ip, login_text, now, check, token)
            if check.connection is not None:
                refusal = self._counted_connection(session, user, check.connection.decision,
                                                   454)
            elif redis_up:
                refusal = await self._count_connection(session, user, 454)
            else:
                refusal = None
            if refusal:
                return AuthResult(success=False, handled=False, message=refusal)
            state = _state(session)
            state.auth_user_id = user.id
            state.auth_login = login_text
            state.auth_failed = check.failed_before
            state.auth_new_network = redis_up and not check.known_network
            return AuthResult(success=True, auth_data=LoginPassword(login, b""))
        log.info("AUTH failed for %r from %s%s", login_text[:100], ip,
                 " (a network it logged in from before)" if check.known_network else "")
        try:
            if not redis_up:
                raise RedisError("unavailable at the check")
            newly = await throttle.record_failure(self.redis, ip, login_text, now,
                                                  self.throttle,
                                                  known_network=check.known_network,
                                                  release=token)
        except RedisError:
            newly = self.local_throttle.record_failure(ip, login_text, now,
                                                       known_network=check.known_network,
                                                       release=token)
        if newly:
            log.warning("blocking AUTH for %s after %d failures in %d s", ", ".join(newly),
                        self.throttle.limit, self.throttle.window)
        if not await self.directory.database_reachable(timeout=self.database.timeout):
            # The cached view may not know a user added or changed meanwhile.
            return AuthResult(success=False, handled=False, message=outcomes.AUTH_TEMPORARY)
        return AuthResult(success=False, handled=False, message=outcomes.AUTH_INVALID)

    async def _record_success(self, user: UserPolicy, ip: str, login: str, now: float,
                              check: throttle.AuthCheck,
                              token: str | None = None) -> throttle.AuthCheck:
        """After scrypt: remember the login's network, give back the attempt's slot
        (``token``), and tell whether the address, or the login from this network, failed
        AUTH shortly before this success (compromise detection's "failed AUTH followed by
        success", asked only when detection is on for the user)."""
        try:
            return await throttle.check(self.redis, ip, login, now, self.throttle,
                                        success=True, checked=True,
                                        ask_failures=user.detection.enabled, reserve=token)
        except RedisError as exc:
            self._faults.warning("AUTH-success", "Redis unavailable after AUTH (%s); this "
                                 "login's network is remembered in this process only", exc)
            return check

    def _logged_auth(self, server, result: AuthResult) -> AuthResult:
        """A refused AUTH is a transaction of its own in the message log (no user: nobody
        has authenticated, so only super admins see it)."""
        if not result.success and not result.handled and result.message:
            self._log_refusal(server.session, "auth", result.message,
                              login=_state(server.session).tried_login)
        return result

    async def auth_PLAIN(self, server, args):
        if server.envelope.mail_from is not None:
            return _in_transaction()
        _state(server.session).tried_login = None
        return self._logged_auth(server, await self._auth_plain(server, args))

    async def auth_LOGIN(self, server, args):
        if server.envelope.mail_from is not None:
            return _in_transaction()
        _state(server.session).tried_login = None
        return self._logged_auth(server, await self._auth_login(server, args))

    async def _auth_plain(self, server, args):
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = _initial_response(args[1])
            except (binascii.Error, ValueError):
                return AuthResult(success=False, handled=False,
                                  message=outcomes.AUTH_BAD_BASE64)
        if len(blob) > MAX_AUTH_BLOB:
            return AuthResult(success=False, handled=False, message=outcomes.AUTH_TOO_LONG)
        parts = blob.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            return AuthResult(success=False, handled=False, message=outcomes.AUTH_MALFORMED)
        authzid, login, password = parts
        if authzid and login_key(authzid.decode("utf-8", "replace")) != login_key(
                login.decode("utf-8", "replace")):
            # RFC 4616: acting as another identity is not something we authorise. Refused
            # before any password is looked at, for every login alike, so nothing was guessed
            # and nothing is counted against the throttle.
            _state(server.session).tried_login = login.decode("utf-8", "replace")[:320]
            return AuthResult(success=False, handled=False,
                              message=outcomes.AUTH_OTHER_IDENTITY)
        return await self._authenticate(server, login, password)

    async def _auth_login(self, server, args):
        if len(args) == 1:
            login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
            if not isinstance(login, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = _initial_response(args[1])
            except (binascii.Error, ValueError):
                return AuthResult(success=False, handled=False,
                                  message=outcomes.AUTH_BAD_BASE64)
        if len(login) > MAX_AUTH_FIELD:
            return AuthResult(success=False, handled=False, message=outcomes.AUTH_TOO_LONG)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        if len(password) > MAX_AUTH_FIELD:
            return AuthResult(success=False, handled=False, message=outcomes.AUTH_TOO_LONG)
        if not login:
            return AuthResult(success=False, handled=False, message=outcomes.AUTH_MALFORMED)
        return await self._authenticate(server, login, password)

    # -- EHLO ------------------------------------------------------------------------------
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        """aiosmtpd's EHLO reply, offering PIPELINING (RFC 2920) as Postfix does: a client
        that pipelines (Postfix's smtp client, for one) sends MAIL, its RCPTs and DATA in one
        write and waits for their replies once, a round trip each instead of one a command.
        aiosmtpd reads commands one by one from its buffer, so pipelined input is answered
        in order whether offered or not; the offer only tells clients they may."""
        session.host_name = hostname  # what aiosmtpd does itself when no hook is set
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    # -- MAIL ------------------------------------------------------------------------------
    def _ip_user(self, session) -> UserPolicy | None:
        """The IP/Range user whose range holds the client; none for the load balancer's own
        connections. A customer's range that held the balancer's address had every health
        check counted as its connection: at its connection limit the checks got 421 and the
        balancer took every proxy out of service, for all customers."""
        if _balancers_own(session):
            return None
        return self.directory.user_for_ip(_client_ip(session))

    def _resolve_user(self, session, mail_from: str) -> UserPolicy | None:
        state = _state(session)
        if state.auth_user_id is not None:
            return self.directory.user(state.auth_user_id)
        ip_user = self._ip_user(session)
        if ip_user is None:
            return None
        return self.directory.reauthentication_target(ip_user, mail_from) or ip_user

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self._end_transaction(session)
        try:
            reply = await self._mail(session, envelope, address, mail_options)
        except Exception:
            log.exception("MAIL failed")
            reply = outcomes.TEMPORARY
        state = _state(session)
        if reply.startswith("2"):
            user = self.directory.user(state.user_id or -1)
            state.txn = mlog.new_record(self.clock(), _client_ip(session), user,
                                        mail_from=address, login=state.auth_login)
        else:
            try:
                user = self._resolve_user(session, address)
            except Exception:
                user = None
            self._log_refusal(session, "mail", reply, user, mail_from=address,
                              login=state.auth_login)
        return reply

    async def _mail(self, session, envelope, address, mail_options):
        if not self.directory.ready:
            return outcomes.TEMPORARY
        user = self._resolve_user(session, address)
        if user is None:
            return outcomes.AUTH_REQUIRED
        state = _state(session)
        state.user_id = None
        pending, state.reserved = state.reserved, None
        give_back = None
        if pending is not None:
            if pending[0] == user.id:
                give_back = pending[1]  # rides along with this MAIL's round trip
            else:
                await self._give_back(*pending)
        first_message = user.id not in state.counted_user_ids
        call = counters.check_mail(
            self.redis, user.id, self.clock(),
            connection_limits=user.limits if first_message else None,
            maximum_recipients_per_day=user.maximum_recipients_per_day,
            give_back=give_back)
        if first_message and user.id in state.owed_user_ids:
            # The script counts the connection owed to the user. Whether it did is known
            # only once it has run, which it does even when the client leaves meanwhile
            # (shielded): a MAIL followed at once by a hang-up would otherwise count the
            # connection here and again at the close, or not at all.
            state.owed_user_ids.discard(user.id)
            call = asyncio.ensure_future(call)
            call.add_done_callback(partial(self._settle_owed, state, user.id))
            call = asyncio.shield(call)
        try:
            check = await call
        except RedisError as exc:
            if not self._redis_down("MAIL", exc):
                return outcomes.TEMPORARY
            check = None
        if check is not None:
            if check.lock is not None:
                return outcomes.user_locked(user.name, _reason(check.lock))
            if not check.decision.allowed:
                log.info("MAIL of %s refused: %s limit", user.name, check.decision.window)
                return str(check.decision.reply)
            if first_message:
                state.counted_user_ids.add(user.id)
            if RECIPIENTS in check.fields:
                state.reserved = (user.id, check.fields[RECIPIENTS])
        refusal = await self.content.check_sender(user, address)
        if refusal:
            return refusal
        state.user_id = user.id
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return outcomes.OK

    # -- RCPT ------------------------------------------------------------------------------
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        try:
            reply = await self._rcpt(session, envelope, address, rcpt_options)
        except Exception:
            log.exception("RCPT failed")
            reply = outcomes.TEMPORARY
        record = _state(session).txn
        if record is not None:
            if reply.startswith("2"):
                mlog.add_recipient(record, address)
            else:
                record["refused_count"] += 1
                record["rcpt_reply"] = reply
        return reply

    async def _rcpt(self, session, envelope, address, rcpt_options):
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS_PER_MESSAGE:
            return outcomes.TOO_MANY_RECIPIENTS
        state = _state(session)
        user = self.directory.user(state.user_id or -1)
        if user is None:
            return "503 5.5.1 Error: need MAIL command"
        if state.reserved is not None and state.reserved[0] == user.id:
            # Counted at MAIL already, in the round trip that checked the lock: a lock set
            # since is caught by the next RCPT's call or the one after DATA.
            state.reserved = None
        else:
            try:
                check = await counters.check_rcpt(
                    self.redis, user.id, user.maximum_recipients_per_day, self.clock())
            except RedisError as exc:
                if not self._redis_down("RCPT", exc):
                    return outcomes.TEMPORARY
            else:
                if check.lock is not None:  # locked since MAIL: what MAIL would say now
                    return outcomes.user_locked(user.name, _reason(check.lock))
                if not check.decision.allowed:
                    return str(check.decision.reply)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return outcomes.OK

    # -- DATA ------------------------------------------------------------------------------
    async def handle_DATA(self, server, session, envelope):
        state = _state(session)
        if state.txn is None:  # DATA without a logged MAIL (cannot happen; keep the shape)
            state.txn = mlog.new_record(self.clock(), _client_ip(session))
        try:
            reply = await self._data(session, envelope)
        except DatabaseTimeout as exc:  # an outage: one line now and then, not a traceback
            self._faults.warning("database", "DATA: %s; answering 4xx", exc)
            reply = outcomes.TEMPORARY
        except Exception:
            log.exception("DATA failed")
            reply = outcomes.TEMPORARY
        record, state.txn = state.txn, None
        if record is not None:
            record.pop("rcpt_reply", None)
            self.log.write(mlog.finish(record, reply))
        return reply

    async def _identify(self, user: UserPolicy, state: SessionState, envelope, headers,
                        check: bool = True):
        """The identity of this message, or the reply refusing it (locked, Redis down).
        ``check`` False: only find it (compromise detection checks and counts it later, in
        its own call). A message without an identity has only the user's lock checked, as
        no later call would see a lock set since MAIL."""
        found = identities.extract_identity(
            user.identification_method, mail_from=envelope.mail_from or "",
            auth_user=state.auth_login, headers=headers, rules=user.identity_rules)
        if found.conflicting:
            return found, outcomes.ambiguous_identity(found.source, found.conflicting)
        if not found.value:
            log.info("no identity (%s) in a message of %s; attributing it to the user",
                     found.source, user.name)
            return found, await self._check_identity(user, None)
        return found, (await self._check_identity(user, found.value) if check else None)

    async def _check_identity(self, user: UserPolicy, identity: str | None) -> str | None:
        """Refuse the message of a user locked since MAIL, or of a locked identity, else
        count it (one round trip): the reply, or None."""
        try:
            found = await identity_store.check_and_count(self.redis, user.id, identity)
        except RedisError as exc:
            return None if self._redis_down("DATA", exc) else outcomes.TEMPORARY
        if found is not None:
            whose, lock = found
            if whose == identity_store.USER:
                return outcomes.user_locked(user.name, _reason(lock))
            return outcomes.identity_locked(identity or "", _reason(lock))
        if identity:
            self.flusher.mark(user.id)
        return None

    async def _data(self, session, envelope):
        state = _state(session)
        user = self.directory.user(state.user_id or -1)
        if user is None:
            return outcomes.TEMPORARY
        raw = envelope.original_content or b""
        if lines_end_in_crlf(raw):
            data = CrlfLines(raw)  # nothing bare: skip the regular expression (0.15 ms per 5 KB)
        else:
            endings = normalise_line_endings(raw)
            if self.config["BARE_LINE_ENDINGS"] == "reject":
                return outcomes.BARE_LINE_ENDING
            data = endings.data
        if starts_folded(data):  # our Received: field would take that line in as its own
            return outcomes.STARTS_FOLDED
        not_a_field = line_not_a_field(data)
        if not_a_field is not None:
            return outcomes.not_a_header_field(not_a_field)
        try:
            data = fit_long_lines(data)
        except HeaderLineTooLong:
            return outcomes.HEADER_LINE_TOO_LONG
        headers = parse_headers(data, MAX_HEADER_FIELDS + 1)
        if len(headers) > MAX_HEADER_FIELDS:  # those past the limit would go unchecked
            return outcomes.TOO_MANY_HEADER_FIELDS
        record = state.txn if state.txn is not None else {}
        record.update(size=len(data), subject=subject_of(headers)[:300] or None,
                      message_id=_message_id(headers))

        # With compromise detection on, its one call per message also checks and counts the
        # identity (after the content check, which it needs): one round trip, not two.
        folded = user.detection.enabled
        found, refusal = await self._identify(user, state, envelope, headers, check=not folded)
        if refusal:
            return refusal
        identity = found.value
        record["identity"] = identity

        queue_id = secrets.token_hex(5).upper()
        record["queue_id"] = queue_id
        data = crlf_lines(self._trace(session, state, user, envelope, queue_id), data)
        msg = Message(user=user, mail_from=envelope.mail_from or "",
                      rcpt_tos=tuple(envelope.rcpt_tos), data=data, headers=tuple(headers),
                      identity=identity, client_ip=_client_ip(session),
                      remove_headers=found.remove_headers,
                      smtputf8=envelope.smtp_utf8)
        started = time.perf_counter()
        inspection = await self.content.inspect(msg)
        metrics.CONTENT_SECONDS.observe(time.perf_counter() - started)
        if inspection.reject:
            record.update(stage="content")
            if folded and identity:  # a locked identity hears it is locked, as before
                return await self._check_identity(user, identity) or inspection.reject
            return inspection.reject
        if identity and folded:
            ruling = await self._detect(user, state, msg, inspection, data, record)
            if ruling is not None:
                return ruling
        if inspection.spam is not None:
            record.update(stage="content", verdict="quarantined", score=inspection.spam.score,
                          rules=list(inspection.spam.rules), stored_kind="quarantine")
            record["stored_id"] = await self.content.quarantine(msg, inspection.spam)
            # The message is durable now; counting spam must not turn that into a 4xx.
            try:
                await self._count_spam(user, identity)
            except Exception:
                log.exception("could not count spam or lock %s", user.name)
            return outcomes.quarantined(user.quarantine_response, inspection.spam.rules)
        refused_before = record.get("refused_count", 0)
        reply = await self.content.deliver(msg, record)
        permanent = record.pop("refused_permanent", 0)
        if identity and user.detection.enabled:
            temporary = record.get("refused_count", 0) - refused_before - permanent
            answered, refused = detection.answered_by_next_hop(reply, len(msg.rcpt_tos),
                                                               permanent, temporary)
            self.answers.add(user.id, identity, answered, refused, self.clock())
        return reply

    # -- compromise detection ----------------------------------------------------------------
    async def _detect(self, user: UserPolicy, state: SessionState, msg: Message,
                      inspection, data: bytes, record: dict) -> str | None:
        """Check and count the identity, score the message (one round trip) and apply the
        rung: the reply when the identity is locked or the ladder throttles, holds or locks
        it, None to carry on. A Redis fault is the identity check's: 4xx, or on with
        REDIS_FAIL_OPEN (unscored)."""
        settings = user.detection
        if settings.half_life != self.half_life:
            settings = replace(settings, half_life=self.half_life)
        spam = inspection.spam
        evidence = detection.Evidence(
            identity=msg.identity or "", recipients=msg.rcpt_tos,
            fingerprint=fingerprint(record.get("subject") or "", body_of(data)),
            auth_failed=state.auth_failed, auth_new_network=state.auth_new_network,
            spam=spam is not None, spam_score=spam.score if spam else inspection.score,
            spam_threshold=float(self.config["SPAM_THRESHOLD"]))
        try:
            found = await detection.measure(self.redis, user.id, evidence, settings,
                                            self.clock(), self.campaigns, self.answers,
                                            check_identity=True)
        except RedisError as exc:
            return None if self._redis_down("DATA", exc) else outcomes.TEMPORARY
        if found.user_lock is not None:  # locked since MAIL
            return outcomes.user_locked(user.name, _reason(found.user_lock))
        if found.lock is not None:
            return outcomes.identity_locked(msg.identity or "", _reason(found.lock))
        self.flusher.mark(user.id)
        state.auth_failed = state.auth_new_network = False  # once per session
        if found.throttled:
            record.update(stage="content", verdict="throttled")
            return outcomes.DETECTION_THROTTLED
        rung = found.rung
        if rung == found.previous_rung and (settings.shadow or spam is not None
                                            or rung in (risk.OBSERVE, risk.THROTTLE)):
            return None  # most messages: no rung change to record, nothing to enforce
        decision = risk.decide(found.identity_risk, found.user_risk, settings, found.signals)
        if found.rung != found.previous_rung:
            self._background(self.database.call(self._audit_rung, user, msg.identity, found,
                                                decision))
        if spam is not None or decision.effective in (risk.OBSERVE, risk.THROTTLE):
            return None  # spam goes to the quarantine as before
        if decision.effective == risk.LOCK:
            reason = risk.lock_reason(decision)
            if found.identity_rung[1] != risk.LOCK:  # many senders of the user together
                await self.database.call(self._lock_user, user.id, reason)
                record.update(stage="content")
                return outcomes.user_locked(user.name, reason)
            await self.database.call(self._lock_identity, user.id, msg.identity, reason)
            record.update(stage="content")
            return outcomes.identity_locked(msg.identity or "", reason)
        row_id = await self.database.write(self._hold, msg, decision)
        record.update(stage="content", verdict="held")
        del row_id
        return outcomes.QUEUED

    def _hold(self, waiter, msg: Message, decision: risk.Decision) -> int:
        row_id = self.content.store_durably(waiter, partial(
            held.hold_message, store=self.content.store, domain_id=msg.user.domain_id,
            user_id=msg.user.id, mail_from=msg.mail_from, rcpt_tos=msg.rcpt_tos,
            data=msg.data, subject=subject_of(list(msg.headers)), identity=msg.identity,
            client_ip=msg.client_ip, risk_value=max(decision.identity_risk, decision.user_risk),
            signals=decision.signals,
            received_at=datetime.fromtimestamp(self.clock(), UTC).replace(tzinfo=None)))
        log.info("held message %s of %s (%s): %s", row_id, msg.user.name, msg.identity,
                 risk.describe(decision.signals))
        return row_id

    def _audit_rung(self, user: UserPolicy, identity: str | None, found, decision) -> None:
        """Every rung change is an audit event with its signals; "would have" in shadow."""
        action = f"detection_{found.rung}"
        if decision.shadow:
            action = f"detection_would_{found.rung}"
        with session_scope(self.sessionmaker) as db:
            audit.record(db, actor="proxy", action=action, target_type="identity",
                         target_id=None, domain_id=user.domain_id, name=identity,
                         user=user.name, user_id=user.id, previous=found.previous_rung,
                         rung=found.rung, shadow=decision.shadow,
                         identity_risk=decision.identity_risk, user_risk=decision.user_risk,
                         signals=decision.signals,
                         note=("would have " if decision.shadow else "") + found.rung)

    def _trace(self, session, state: SessionState, user: UserPolicy, envelope,
               queue_id: str) -> bytes:
        """Our ``Received:`` header (RFC 5321 §4.4), first in the message so that the
        quarantine, the archive, DKIM and the next hop all see it."""
        authenticated = state.auth_user_id is not None
        protocol = with_keyword(esmtp=bool(session.extended_smtp), tls=session.ssl is not None,
                                authenticated=authenticated)
        rcpt_tos = envelope.rcpt_tos
        return received_header(
            helo=session.host_name, client_ip=_client_ip(session),
            by_host=self.config["SMTP_HOSTNAME"], protocol=protocol,
            queue_id=queue_id,
            user_kind="authenticated as" if authenticated else "IP/Range user",
            user_name=state.auth_login if authenticated else user.name,
            when=datetime.fromtimestamp(self.clock(), UTC),
            recipient=rcpt_tos[0] if len(rcpt_tos) == 1 else None,
            anonymous=self.config["RECEIVED_HEADER"] == "anonymous")

    async def _count_spam(self, user: UserPolicy, identity: str | None) -> None:
        now = self.clock()
        window = self.config["SPAM_WINDOW_SECONDS"]
        threshold = self.config["SPAM_LOCK_THRESHOLD"]
        if identity:
            await identity_store.count_spam(self.redis, user.id, identity)
            self.flusher.mark(user.id)
        count = await counters.record_spam_event(self.redis, counters.spam_key(user.id),
                                                 now, window)
        if should_lock(count, enabled=user.automatic_lock, threshold=threshold):
            # The user lock covers every identity behind it; locking the identity as well
            # would only keep it blocked after an administrator unlocks the user.
            await self.database.call(self._lock_user, user.id, lock_reason(count, window))
            return
        if identity:
            id_count = await counters.record_spam_event(
                self.redis, counters.spam_key(user.id, identity), now, window)
            if should_lock(id_count, enabled=user.lock_identities_automatically,
                           threshold=threshold):
                await self.database.call(self._lock_identity, user.id, identity,
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

    async def close(self) -> None:
        """Finish background work: the counts of connections still open that sent no mail
        (a restart ends them), give-backs in flight, the message log's queued records and a
        last identity flush."""
        for state in list(self._owing.values()):
            self._count_what_is_owed(state)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self.log.close(), timeout=3)
        except Exception as exc:
            log.warning("message log records not sent at shutdown (%s)", exc)
        try:
            await self.flusher.flush()
        except Exception as exc:
            log.warning("last identity flush failed (%s); counts stay in Redis", exc)
        close = getattr(self.content, "close", None)
        if close is not None:
            await close()
        self._scrypt.shutdown(wait=False, cancel_futures=True)


def _initial_response(text: str) -> bytes:
    """An AUTH command's initial response: "=" is an empty one (RFC 4954 4), else base64."""
    return b"" if text == "=" else b64decode(text.encode(), validate=True)


def _in_transaction() -> AuthResult:
    """RFC 4954 4: no AUTH once MAIL has begun a transaction (the message would be attributed
    to one user and traced as another)."""
    return AuthResult(success=False, handled=False, message=outcomes.AUTH_IN_TRANSACTION)


def _message_id(headers) -> str | None:
    for name, value in headers:
        if name.lower() == "message-id":
            return " ".join(value.split())[:320] or None
    return None


def _reason(lock_json: str) -> str | None:
    try:
        return json.loads(lock_json).get("reason")
    except (ValueError, AttributeError):
        return None
