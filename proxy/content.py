"""The content stages of a message: check the sender's domain (MAIL), inspect (attachments,
spam), quarantine, and deliver (sign, relay, archive).

The handler decides who sent a message and whether they may; this module decides what
happens to the message itself. Every path that answers 250 has either handed the message to
the next hop or stored it durably in the quarantine first.

Stages and what each says:

- ``check_sender``: "Reject messages from newly registered domains" -> 550 5.7.1 at MAIL.
- ``inspect``: attachments ("Block attachments with macros for senders", "Block potentially
  unwanted attachments") -> 550 5.7.1 naming the file; then the spam verdict (rspamd when
  ``RSPAMD_URL`` is set, the built-in scorer otherwise or when rspamd fails).
- ``quarantine``: body + row durable, then the ARF job is enqueued (an enqueue failure is
  logged and never changes the reply: the message is already safe).
- ``deliver``: identity headers removed, DKIM-signed with the user's selector and the
  domain's key, relayed; 250 only when the next hop accepted. One reply after DATA cannot
  speak per recipient, so when the next hop took some recipients and refused others, those it
  refused for now (4xx) are handed to the worker to retry (``scoring/retry.py``), and those it
  refused for good get a delivery status notification (DSN) to the envelope sender; when the
  worker's Redis cannot take that, the reply is 451 and the client sends it again. An
  archive copy is filed afterwards when "Message archiving for senders" is on; a failure to
  archive is logged but cannot turn the accepted message into a 4xx (the sender would send it
  twice).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property, partial

import httpx
import sqlalchemy.exc

from outgoing.archive import ToArchive, archive_messages
from outgoing.db import session_scope
from outgoing.dkim import DkimError, SigningKey, load_signing_key, sign_with
from outgoing.jobs import enqueue, enqueue_delivery_report
from outgoing.models import DKIM_DEFAULT
from outgoing.quarantine import Abandoned, quarantine_message, remove_messages
from outgoing.snapshot import UserPolicy
from outgoing.storage import store_for
from proxy import metrics, rspamd
from proxy.batches import Batches
from proxy.database import Database
from proxy.relay import Relay, Upstream
from proxy.sender_domains import RegistrationDates
from scoring import outcomes
from scoring.attachments import AttachmentVerdict, inspect_attachments
from scoring.message import header_block, remove_headers, subject_of
from scoring.newdomains import newly_registered_verdict, registrable_domain
from scoring.retry import next_attempt_at, parse_delays, split_refusals
from scoring.spam import SpamVerdict, score_message

log = logging.getLogger(__name__)

ABUSE_REPORT_JOB = "worker.jobs.send_abuse_report"
RETRY_JOB = "worker.content_jobs.retry_deferred_recipients"
DKIM_KEY_TTL = 60.0  # seconds a loaded (or missing) key is trusted before asking again
DKIM_KEY_RETRY = 10.0  # seconds a cached key serves alone after its reload failed


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
    smtputf8: bool = False  # the client's MAIL said SMTPUTF8

    @cached_property
    def on_the_loop(self) -> bool:
        """Its checks and signature run on the event loop (decided once a message)."""
        return on_the_loop(self.data)


@dataclass(frozen=True)
class Inspection:
    reject: str | None = None  # a full SMTP reply when a policy refuses the message
    spam: SpamVerdict | None = None  # set when the message belongs in the quarantine
    score: float = 0.0  # the spam score of a message below the threshold (detection)


# Faults of the database or the disk rather than of one message's data.
_STORE_FAULTS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                 sqlalchemy.exc.InternalError, sqlalchemy.exc.ProgrammingError, OSError)

# Messages up to this size are checked and signed on the event loop itself (see
# ContentPipeline._off_loop): about 1 ms for 48 KB with an attachment (the MIME parse, the
# spam score, the DKIM signature), less than the hops to a thread and back cost the loop in
# waits for the interpreter's lock (48 KB with every policy: 235-249 msg/s with a thread,
# 259-263 inline).
INLINE_CHECK_BYTES = 64 * 1024
INLINE_PART_LINES = 64  # lines starting "--" (boundaries, mostly): more go to a thread


def local_checks(data: bytes, *, mail_from: str, rcpt_tos: list[str], block_macros: bool,
                 block_unwanted: bool, builtin_spam: bool,
                 threshold: float) -> tuple[AttachmentVerdict | None, SpamVerdict | None]:
    """The CPU-bound part of ``inspect`` in one call, so it costs one thread hop."""
    attachments = None
    if block_macros or block_unwanted:
        attachments = inspect_attachments(data, block_macros=block_macros,
                                          block_unwanted=block_unwanted)
        if attachments.blocked:
            return attachments, None
    spam = None
    if builtin_spam:
        spam = score_message(data, mail_from=mail_from, rcpt_tos=rcpt_tos, threshold=threshold)
    return attachments, spam


def on_the_loop(data: bytes) -> bool:
    """Whether the checks and the signature of ``data`` run on the event loop (see
    ``ContentPipeline._off_loop``)."""
    return len(data) <= INLINE_CHECK_BYTES and data.count(b"\n--") <= INLINE_PART_LINES


class ContentPipeline:
    def __init__(self, *, config: dict, sessionmaker, redis, redis_sync, clock):
        self.config = config
        self.sessionmaker = sessionmaker
        self.redis = redis
        self.redis_sync = redis_sync
        self.clock = clock
        self.store = store_for(config)
        self.relay = Relay(Upstream.from_config(config))
        self.upstream = (self.relay.upstream.host, self.relay.upstream.port)
        self.dates = RegistrationDates(config, redis)
        self.rspamd_url = (config.get("RSPAMD_URL") or "").strip()
        self._http: httpx.AsyncClient | None = None
        self._keys: dict[tuple[int, str], tuple[float, SigningKey | None]] = {}
        self.archives = Batches(self._archive)
        self.database = Database(float(config["PROXY_DATABASE_TIMEOUT"]))

    async def _in_thread(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args, **kwargs))

    async def _off_loop(self, msg: Message, fn, *args, **kwargs):
        """Run CPU-bound work on ``msg`` (a check, the DKIM signature): in a thread when the
        message is big, or made of many MIME parts (the checks' cost grows with the parts:
        64 KB of empty parts took 80-96 ms), so that it cannot stall every other session of
        this process; inline otherwise, where the work takes about a millisecond and the hop
        to a thread and back would cost more than it saves."""
        if msg.on_the_loop:
            return fn(*args, **kwargs)
        return await self._in_thread(fn, *args, **kwargs)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC).replace(tzinfo=None)

    async def close(self) -> None:
        await self.archives.close()
        await self.relay.close()
        await self.dates.close()
        if self._http is not None:
            await self._http.aclose()
        self.database.close()

    # -- MAIL ------------------------------------------------------------------------------
    async def check_sender(self, user: UserPolicy, mail_from: str) -> str | None:
        """MAIL-time checks of the sender's domain; a reply refuses it."""
        if not user.reject_newly_registered_domains:
            return None
        domain = registrable_domain(mail_from or "")
        if domain is None:
            return None
        registered = await self.dates.registered_at(domain)
        return newly_registered_verdict(domain, registered, self.clock())

    # -- DATA ------------------------------------------------------------------------------
    async def inspect(self, msg: Message) -> Inspection:
        user = msg.user
        attachments, spam = await self._off_loop(
            msg, local_checks, msg.data, mail_from=msg.mail_from,
            rcpt_tos=list(msg.rcpt_tos),
            block_macros=user.block_macro_attachments,
            block_unwanted=user.block_unwanted_attachments,
            builtin_spam=not self.rspamd_url, threshold=self.config["SPAM_THRESHOLD"])
        if attachments is not None and attachments.blocked:
            log.info("refused a message of %s: attachment %r (%s)", user.name,
                     attachments.filename, attachments.reason)
            return Inspection(reject=attachments.reply)
        if spam is None:
            spam = await self._rspamd_or_builtin(msg)
        return Inspection(spam=spam) if spam.is_spam else Inspection(score=spam.score)

    async def _rspamd_or_builtin(self, msg: Message) -> SpamVerdict:
        if self._http is None:
            self._http = httpx.AsyncClient()
        try:
            return await rspamd.check(
                self._http, self.rspamd_url, msg.data, mail_from=msg.mail_from,
                rcpt_tos=msg.rcpt_tos, client_ip=msg.client_ip, user=msg.user.name,
                timeout=self.config["RSPAMD_TIMEOUT"])
        except rspamd.RspamdError as exc:
            log.warning("%s; using the built-in scorer", exc)
        return await self._off_loop(msg, score_message, msg.data,
                                    mail_from=msg.mail_from, rcpt_tos=list(msg.rcpt_tos),
                                    threshold=self.config["SPAM_THRESHOLD"])

    async def quarantine(self, msg: Message, verdict: SpamVerdict) -> int:
        """Store durably; returns (the row's id) only when the message is safe in the
        quarantine."""
        reason = f"spam ({verdict.engine}): " + (", ".join(verdict.rules) or "score")

        def store(waiter) -> int:
            row_id = self.store_durably(waiter, partial(
                quarantine_message, store=self.store, domain_id=msg.user.domain_id,
                user_id=msg.user.id, mail_from=msg.mail_from, rcpt_tos=list(msg.rcpt_tos),
                data=msg.data, subject=subject_of(list(msg.headers)), identity=msg.identity,
                client_ip=msg.client_ip, reason=reason, score=verdict.score,
                rules=verdict.rules, received_at=self._now()))
            try:
                enqueue(self.redis_sync, ABUSE_REPORT_JOB, row_id)
            except Exception:
                log.exception("quarantined message %s: could not enqueue its abuse report",
                              row_id)
            return row_id

        row_id = await self.database.write(store)
        log.info("quarantined message %s of %s (%s, score %s)", row_id, msg.user.name,
                 reason, verdict.score)
        return row_id

    def store_durably(self, waiter, write) -> int:
        """``write(db, wanted=...)`` stores a message durably (the quarantine's or the held
        mail's ``store_durably``): its row's id once the sender will hear of it. When the
        sender was answered 4xx meanwhile (``Database.write``), the commit is rolled back,
        or the row and its body removed if it was made already (``Abandoned``): the sender
        sends the message again."""
        with session_scope(self.sessionmaker) as db:
            row = write(db, wanted=waiter.waiting)
            model, row_id = type(row), row.id
        if waiter.done():
            return row_id
        log.warning("%s %s was stored after its sender got 4xx; removing it", model.__name__,
                    row_id)
        try:
            with session_scope(self.sessionmaker) as db:
                remove_messages(db, self.config, filter(None, [db.get(model, row_id)]))
        except Exception:
            log.exception("could not remove %s %s: it stays, and the sender's next attempt "
                          "is stored beside it", model.__name__, row_id)
        raise Abandoned(f"{model.__name__} {row_id} removed")

    # -- after DATA ------------------------------------------------------------------------
    def _load_key(self, domain_id: int, selector: str) -> SigningKey | None:
        with session_scope(self.sessionmaker) as db:
            return load_signing_key(db, domain_id, selector,
                                    self.config["DKIM_DEFAULT_SELECTOR"])

    async def signing_key(self, user: UserPolicy) -> SigningKey | None:
        """The user's DKIM key, cached per (domain, selector) for ``DKIM_KEY_TTL`` seconds; a
        database outage (or a database that does not answer in time) keeps serving the last
        key it had, asking again every ``DKIM_KEY_RETRY`` seconds, not for every message."""
        selector = (user.dkim_selector or "").strip().lower()
        if not selector:
            return None
        cache_key = (user.domain_id, selector)
        cached = self._keys.get(cache_key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            key = await self.database.call(self._load_key, user.domain_id, selector)
        except Exception:
            if cached is not None:
                log.warning("could not reload the DKIM key %s of %s; using the cached one",
                            selector, user.domain, exc_info=True)
                self._keys[cache_key] = (time.monotonic() + DKIM_KEY_RETRY, cached[1])
                return cached[1]
            raise
        if key is None and selector != DKIM_DEFAULT:
            log.warning("%s has DKIM selector %r but %s has no key for it; relaying unsigned",
                        user.name, selector, user.domain)
        self._keys[cache_key] = (time.monotonic() + DKIM_KEY_TTL, key)
        return key

    async def prepare(self, msg: Message) -> bytes:
        """The bytes to relay: identity headers removed, then DKIM-signed."""
        data = remove_headers(msg.data, set(msg.remove_headers)) if msg.remove_headers \
            else msg.data
        key = await self.signing_key(msg.user)
        if key is None:
            return data
        try:
            return await self._off_loop(msg, sign_with, data, key)
        except DkimError as exc:
            log.warning("not DKIM-signing a message of %s: %s", msg.user.name, exc)
            return data

    async def deliver(self, msg: Message, record: dict | None = None) -> str:
        """Sign and relay; the reply is the next hop's verdict. ``record`` (the message log's)
        gets the next hop's reply, the latency and, when archived, the archive's id."""
        record = {} if record is None else record
        started = time.perf_counter()
        data = await self.prepare(msg)
        result = await self.relay.send(mail_from=msg.mail_from, rcpt_tos=list(msg.rcpt_tos),
                                       data=data, smtputf8=msg.smtputf8)
        elapsed = time.perf_counter() - started
        metrics.RELAY_SECONDS.observe(elapsed)
        record.update(stage="relay", relay_seconds=round(elapsed, 6),
                      next_hop_reply=result.next_hop_reply or None)
        if not result.delivered:
            metrics.NEXT_HOP_ERRORS.labels(_error_kind(result)).inc()
            return result.reply
        if result.refused:
            record["refused_count"] = record.get("refused_count", 0) + len(result.refused)
            record["refused_permanent"] = sum(1 for code, _ in result.refused.values()
                                              if code >= 500)
            if len(result.refused) < len(msg.rcpt_tos):
                record["verdict"] = "partial"
            if not await self._in_thread(self._after_partial_refusal, msg, data,
                                         result.refused):
                record["verdict"] = "deferred"
                return outcomes.TEMPORARY
        if msg.user.message_archiving:
            try:
                # Bounded: a hung database must not hold the reply to a relayed message (the
                # copy is still filed when it answers; only its id is not waited for).
                record["stored_id"] = await asyncio.wait_for(self.archives.add(ToArchive(
                    domain_id=msg.user.domain_id, user_id=msg.user.id, mail_from=msg.mail_from,
                    rcpt_tos=list(msg.rcpt_tos), data=data,
                    subject=subject_of(list(msg.headers)), received_at=self._now(),
                    by_sender=msg.user.shared_smarthost)), self.database.timeout)
                record["stored_kind"] = "archive"
            except Exception:
                log.exception("relayed a message of %s but could not archive it",
                              msg.user.name)
        return outcomes.QUEUED

    def _archive(self, messages: list[ToArchive]) -> list[int | Exception]:
        """Archive ids, one transaction for the batch; when a message's data fails it, each
        message on its own, so that one message's fault costs only its own copy. When the
        database or the disk fails it, every message of the batch gets that error at once:
        filing them one by one would make each session wait for every attempt in turn (a
        locked SQLite waits PROXY_DATABASE_TIMEOUT an attempt) while its message is already
        relayed."""
        try:
            return self._archive_together(messages)
        except _STORE_FAULTS:
            raise
        except Exception:
            if len(messages) == 1:
                raise
            log.warning("could not archive a batch of %d; filing them one by one",
                        len(messages), exc_info=True)
        results: list[int | Exception] = []
        for message in messages:
            try:
                results += self._archive_together([message])
            except Exception as exc:
                results.append(exc)
        return results

    def _archive_together(self, messages: list[ToArchive]) -> list[int]:
        with session_scope(self.sessionmaker) as db:
            return [row.id for row in archive_messages(db, self.store, messages)]

    def _after_partial_refusal(self, msg: Message, data: bytes,
                               refused: dict[str, tuple[int, str]]) -> bool:
        """The next hop took the message for some recipients: retry the ones it refused for
        now (the worker holds the relayed bytes), report the ones it refused for good. True
        when every refused recipient was handed over that way.

        False (the jobs' Redis is down) means the client gets 451 and sends the whole
        message again, so the recipients the next hop already took get it twice: the price
        of never losing the others, which any MTA pays when it fails after a partial
        delivery. A retry that cannot be queued is such a fault whoever the sender is: a
        bounce (null sender) owes nobody a report, but its deferred recipients are still
        owed the message."""
        log.warning("next hop refused %d of %d recipient(s) of a message of %s: %s",
                    len(refused), len(msg.rcpt_tos), msg.user.name, refused)
        final, later = split_refusals(refused)
        if later:
            handed = self._defer(msg, data, list(later))
            if handed is None:  # no time left to retry: refused for good
                final.update({r: refused[r] for r in later})
            elif not handed:
                return False
        return not final or self._report_refused(msg, data, final)

    def _defer(self, msg: Message, data: bytes, rcpt_tos: list[str]) -> bool | None:
        """Hand recipients to the worker's retries: True when queued, False when the queue
        cannot be reached (the client must keep the message), None when
        DEFER_GIVE_UP_SECONDS leaves no time to retry (they are given up at once)."""
        now = self._now()
        due = next_attempt_at(attempt=1, arrival=now, now=now,
                              delays=parse_delays(self.config["DEFER_RETRY_SECONDS"]),
                              give_up_seconds=self.config["DEFER_GIVE_UP_SECONDS"])
        if due is None:
            log.warning("DEFER_GIVE_UP_SECONDS leaves no time to retry; reporting %d "
                        "recipient(s) to the sender", len(rcpt_tos))
            return None
        try:
            # plain bytes in the job: the mark of CrlfLines means nothing to the worker
            enqueue(self.redis_sync, RETRY_JOB, msg.mail_from, rcpt_tos, bytes(data),
                    now.isoformat(), 1, at=None if due <= now else due)
        except Exception:
            log.exception("could not hand %d deferred recipient(s) to the worker; answering "
                          "451 so that the client sends the message again", len(rcpt_tos))
            return False
        return True

    def _report_refused(self, msg: Message, data: bytes,
                        refused: dict[str, tuple[int, str]]) -> bool:
        """Tell the sender which recipients will not get the message, through a DSN the
        worker sends; never for a null sender (nothing is owed then). False when the report
        could not be queued."""
        if not msg.mail_from or msg.mail_from == "<>":
            return True
        head, _ = header_block(data)
        try:
            enqueue_delivery_report(self.redis_sync, msg.mail_from, refused, head,
                                    self._now().isoformat(), self.config["SMTP_HOSTNAME"])
        except Exception:
            log.exception("could not enqueue the delivery report to %s; answering 451 so "
                          "that the client sends the message again", msg.mail_from)
            return False
        return True


def _error_kind(result) -> str:
    """The next-hop error metric's label: no answer at all, or a 4xx or 5xx refusal."""
    if not result.next_hop_reply:
        return "unavailable"
    return "refused_temporary" if result.next_hop_reply.startswith("4") else \
        "refused_permanent"
