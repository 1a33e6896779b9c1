"""Hand a message to the next hop and report exactly what it said.

aiosmtplib opens each connection (EHLO, STARTTLS, AUTH). A next hop that offers PIPELINING
(Postfix does) gets MAIL, every RCPT and DATA in one write (``proxy.pipelining``); one that
does not is spoken to one command at a time through aiosmtplib.

One :class:`Relay` per proxy process keeps a few idle connections to the next hop (STARTTLS
whenever the next hop offers it, AUTH when ``UPSTREAM_USERNAME`` is set), because the TLS
handshake and EHLO cost more than the transaction itself. A reused connection that turns out
to be dead before DATA is replaced once by a fresh one; once DATA has started, nothing is
retried here: the sender gets 451 and retries, so a message is never sent twice by us. A
client that hangs up mid-relay costs its connection to the next hop (``_abort``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib.protocol import normalize_message_line_endings

from proxy.pipelining import NextHopGone, PipelinedConnection
from scoring import outcomes
from scoring.message import lines_end_in_crlf

log = logging.getLogger(__name__)

# What aiosmtplib refuses to put in a command (CR, LF, NUL and the other controls).
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")

# An idle connection older than this is closed instead of reused (next hops often drop idle
# clients after a minute or so; Postfix's default is 300 s).
IDLE_SECONDS = 30.0


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    timeout: float
    local_hostname: str | None = None
    username: str = ""
    password: str = ""
    pool_size: int = 4

    @classmethod
    def from_config(cls, config: dict) -> Upstream:
        host, _, port = config["UPSTREAM_SMTP"].rpartition(":")
        return cls(host=host.strip("[]"), port=int(port), timeout=config["UPSTREAM_TIMEOUT"],
                   local_hostname=config.get("SMTP_HOSTNAME") or None,
                   username=config.get("UPSTREAM_USERNAME") or "",
                   password=config.get("UPSTREAM_PASSWORD") or "",
                   pool_size=max(0, int(config.get("UPSTREAM_POOL_SIZE") or 0)))


@dataclass(frozen=True)
class RelayResult:
    delivered: bool  # the next hop took the message for at least one recipient
    reply: str  # the one reply the client gets after DATA
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    accepted: tuple[str, ...] = ()
    next_hop_reply: str = ""  # what the next hop said last ("" when it never answered)


class _Retry(Exception):
    """A reused connection died before the transaction started: try a fresh one."""


def _all_refused(refused: dict[str, tuple[int, str]]) -> str:
    """Nothing accepted: a temporary refusal anywhere keeps the whole message temporary, so
    the sender retries instead of bouncing a recipient that would have worked later."""
    codes = [code for code, _ in refused.values()]
    first_temp = next(((c, m) for c, m in refused.values() if c < 500), None)
    if first_temp is not None or not codes:
        code, message = first_temp or (451, "no recipient accepted")
        return outcomes.next_hop_refused(code, message)
    code, message = next(iter(refused.values()))
    return outcomes.next_hop_refused(code, message)


def _readable(text: str) -> str:
    """A next hop's reply text as aiosmtplib decoded it, with what was not UTF-8 (a
    Latin-1 "ü") as U+FFFD, as ``proxy.pipelining`` reads it: the text goes on to our
    client's reply and the sender's delivery report, which cannot hold lone surrogates."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _path(address: str, encoding: str) -> bytes:
    """The path exactly as the client's MAIL or RCPT gave it (the null path stays ``<>``)."""
    return b"<>" if address == "<>" else b"<" + address.encode(encoding) + b">"


async def _mail(client: aiosmtplib.SMTP, mail_from: str, options: list[str],
                encoding: str) -> None:
    """MAIL FROM with the checked path as it is: aiosmtplib's ``mail()`` re-parses the
    address (``email.utils.parseaddr``), which can turn a quoted local part into another
    address. Raises what ``mail()`` raises."""
    await client._ehlo_or_helo_if_needed()  # what mail() does first
    response = await client.execute_command(
        b"MAIL", b"FROM:" + _path(mail_from, encoding),
        *(option.encode("ascii") for option in options))
    if response.code != 250:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, mail_from)


async def _rcpt(client: aiosmtplib.SMTP, rcpt: str, encoding: str) -> None:
    """RCPT TO with the checked path as it is (see :func:`_mail`)."""
    response = await client.execute_command(b"RCPT", b"TO:" + _path(rcpt, encoding))
    if response.code not in (250, 251):
        raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, rcpt)


def dot_stuffed(data: bytes) -> bytes:
    """``data`` (CRLF line endings) as it goes after DATA: a dot doubled at the start of
    each line, a CRLF at the end, then the end-of-data line."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


async def _data(client: aiosmtplib.SMTP, data: bytes, timeout: float) -> aiosmtplib.SMTPResponse:
    """DATA with data whose line endings are already CRLF: dot-stuffed with one
    ``bytes.replace`` instead of aiosmtplib's two regular expressions over the whole message
    (normalising what is normal already: most of what aiosmtplib cost the proxy). Anything
    else goes through ``client.data``. Raises what ``client.data`` raises."""
    if not lines_end_in_crlf(data):
        return await client.data(data)
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    # No await between the write and read_response, which marks the reply as expected
    # before anything can arrive (aiosmtplib drops replies it does not expect).
    protocol.write(dot_stuffed(data))
    try:
        response = await protocol.read_response(timeout=timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()
        raise
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


def _needs_utf8(mail_from: str, rcpt_tos: list[str]) -> bool:
    return any(not s.isascii() for s in [mail_from, *rcpt_tos])


def _envelope_options(supports, mail_from: str, rcpt_tos: list[str], data: bytes,
                      smtputf8: bool = False) -> tuple[list[str], str] | RelayResult:
    """MAIL's options and the paths' encoding for what the next hop ``supports``; the
    refusal when it cannot take the addresses. ``smtputf8``: the client's MAIL said
    SMTPUTF8 (RFC 6531: its header fields may hold UTF-8), passed on where it is offered."""
    options = []
    encoding = "ascii"
    if _needs_utf8(mail_from, rcpt_tos):
        if not supports("smtputf8"):
            return RelayResult(False, "550 5.6.7 The next hop does not accept "
                                      "internationalised addresses (SMTPUTF8)")
        options.append("SMTPUTF8")
        encoding = "utf-8"
    elif smtputf8 and supports("smtputf8"):
        options.append("SMTPUTF8")
    if supports("size"):
        options.append(f"SIZE={len(data)}")
    if not data.isascii() and supports("8bitmime"):
        options.append("BODY=8BITMIME")
    return options, encoding


Connection = aiosmtplib.SMTP | PipelinedConnection


def _usable(client: Connection) -> bool:
    return client.usable if isinstance(client, PipelinedConnection) else client.is_connected


def _abort(client: Connection) -> None:
    """Drop a connection mid-transaction, unsent bytes and all: what a client that hung up
    leaves (aiosmtpd cancels its handler). Nobody will hear the next hop's answer, so the
    connection is neither pooled nor left open; the client, which got no reply, sends the
    message again. Aborting rather than finishing means a copy of the message reaches the
    next hop twice only when its last line had left already, as when a connection breaks."""
    transport = client.transport
    if transport is not None:
        transport.abort()
    client.close()


class Relay:
    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self.connections_opened = 0  # for the benchmark and the logs

    async def _connect(self) -> aiosmtplib.SMTP:
        up = self.upstream
        client = aiosmtplib.SMTP(hostname=up.host, port=up.port, timeout=up.timeout,
                                 local_hostname=up.local_hostname, start_tls=None,
                                 validate_certs=False)
        await client.connect()
        try:
            if up.username:
                await client.login(up.username, up.password)
            connection = (PipelinedConnection.take_over(client)
                          if client.supports_extension("pipelining") else client)
        except BaseException:
            client.close()
            raise
        self.connections_opened += 1
        return connection

    async def _acquire(self) -> tuple[Connection, bool]:
        now = time.monotonic()
        while self._idle:
            client, since = self._idle.pop()
            if _usable(client) and now - since < IDLE_SECONDS:
                return client, True
            client.close()
        return await self._connect(), False

    def _release(self, client: Connection) -> None:
        if _usable(client) and len(self._idle) < self.upstream.pool_size:
            self._idle.append((client, time.monotonic()))
        else:
            client.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client, _ in idle:
            try:
                await asyncio.wait_for(client.quit(), 2)
            except Exception:  # closing anyway
                client.close()

    async def send(self, *, mail_from: str, rcpt_tos: list[str], data: bytes,
                   smtputf8: bool = False) -> RelayResult:
        """Deliver to the next hop; ``delivered`` only when it took the message for someone.
        ``smtputf8``: the client asked for SMTPUTF8 at MAIL."""
        for _attempt in range(2):
            try:
                client, reused = await self._acquire()
            except aiosmtplib.SMTPAuthenticationError as exc:
                log.error("next hop refused our login (UPSTREAM_USERNAME): %s %s", exc.code,
                          exc.message)
                return RelayResult(False, outcomes.NEXT_HOP_DOWN)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                log.warning("next hop %s:%s unavailable: %s", self.upstream.host,
                            self.upstream.port, exc)
                return RelayResult(False, outcomes.NEXT_HOP_DOWN)
            transaction = (self._pipelined if isinstance(client, PipelinedConnection)
                           else self._transaction)
            try:
                return await transaction(client, reused, mail_from, rcpt_tos, data,
                                         smtputf8)
            except _Retry:
                continue
            except asyncio.CancelledError:
                _abort(client)
                raise
        return RelayResult(False, outcomes.NEXT_HOP_DOWN)

    async def _transaction(self, client: aiosmtplib.SMTP, reused: bool, mail_from: str,
                           rcpt_tos: list[str], data: bytes,
                           smtputf8: bool = False) -> RelayResult:
        """One command at a time, through aiosmtplib (a next hop without PIPELINING)."""
        envelope = _envelope_options(client.supports_extension, mail_from, rcpt_tos, data,
                                     smtputf8)
        if isinstance(envelope, RelayResult):
            self._release(client)
            return envelope
        options, encoding = envelope
        started = False
        try:
            await _mail(client, mail_from, options, encoding)
            refused: dict[str, tuple[int, str]] = {}
            accepted = []
            for rcpt in rcpt_tos:
                try:
                    await _rcpt(client, rcpt, encoding)
                    accepted.append(rcpt)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    refused[rcpt] = (exc.code, _readable(exc.message))
            if not accepted:
                await self._reset(client)
                code, text = next(iter(refused.values()), (451, ""))
                return RelayResult(False, _all_refused(refused), refused,
                                   next_hop_reply=_said(code, text))
            started = True
            response = await _data(client, data, self.upstream.timeout)
        except aiosmtplib.SMTPResponseException as exc:
            # A real answer (MAIL or DATA refused): the connection is still good after RSET.
            await self._reset(client)
            message = _readable(exc.message)
            return RelayResult(False, outcomes.next_hop_refused(exc.code, message),
                               next_hop_reply=_said(exc.code, message))
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
            client.close()
            if reused and not started and not isinstance(exc, ValueError):
                raise _Retry() from exc
            log.warning("relay to next hop failed%s: %s",
                        " during DATA" if started else "", exc)
            return RelayResult(False, outcomes.NEXT_HOP_DOWN)
        self._release(client)
        return _taken(response.code, _readable(response.message), refused, accepted)

    async def _pipelined(self, conn: PipelinedConnection, reused: bool, mail_from: str,
                         rcpt_tos: list[str], data: bytes,
                         smtputf8: bool = False) -> RelayResult:
        """MAIL, every RCPT and DATA in one write, the replies read in order (RFC 2920); the
        message only after the 354, so a connection that dies before it is retried once when
        it was a reused one, as in :meth:`_transaction`."""
        envelope = _envelope_options(conn.supports, mail_from, rcpt_tos, data, smtputf8)
        if isinstance(envelope, RelayResult):
            self._release(conn)
            return envelope
        options, encoding = envelope
        commands = [b" ".join([b"MAIL FROM:" + _path(mail_from, encoding),
                               *(option.encode("ascii") for option in options)]),
                    *(b"RCPT TO:" + _path(rcpt, encoding) for rcpt in rcpt_tos), b"DATA"]
        if any(_CONTROL.search(command) for command in commands):
            # what aiosmtplib refuses to send (ValueError): nothing was sent
            self._release(conn)
            log.warning("relay to next hop failed: a control character in a path")
            return RelayResult(False, outcomes.NEXT_HOP_DOWN)
        timeout = self.upstream.timeout
        replies: list[tuple[int, str]] = []
        try:
            conn.send(b"\r\n".join(commands) + b"\r\n")
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(timeout) as deadline:
                while len(replies) < len(commands):
                    replies.append(await conn.reply())
                    # each reply has the timeout to come, as each command had through
                    # aiosmtplib (a next hop may take its time over every RCPT)
                    deadline.reschedule(loop.time() + timeout)
        except (NextHopGone, OSError, TimeoutError) as exc:
            conn.close()
            if replies and replies[0][0] != 250:  # MAIL refused, then the next hop left
                return RelayResult(False, outcomes.next_hop_refused(*replies[0]),
                                   next_hop_reply=_said(*replies[0]))
            if reused:
                raise _Retry() from exc
            log.warning("relay to next hop failed: %s", _why(exc))
            return RelayResult(False, outcomes.NEXT_HOP_DOWN)
        mail, *answers, start = replies
        accepted = [rcpt for rcpt, (code, _) in zip(rcpt_tos, answers, strict=True)
                    if code in (250, 251)]
        refused = {rcpt: answer for rcpt, answer in zip(rcpt_tos, answers, strict=True)
                   if answer[0] not in (250, 251)}
        if start[0] == 354 and mail[0] != 250:
            conn.close()  # DATA opened without a sender: abort it, sending nothing at all
        elif start[0] == 354 and not accepted:
            # DATA opened after every recipient was refused (RFC 2920 says it must not be):
            # end it with nothing in it, as RFC 2920 says, and do not trust the connection.
            await self._end_empty(conn)
        if mail[0] != 250:
            await self._reset_pipelined(conn)
            return RelayResult(False, outcomes.next_hop_refused(*mail),
                               next_hop_reply=_said(*mail))
        if not accepted:
            await self._reset_pipelined(conn)
            return RelayResult(False, _all_refused(refused), refused,
                               next_hop_reply=_said(*next(iter(refused.values()), (451, ""))))
        if start[0] != 354:
            await self._reset_pipelined(conn)
            return RelayResult(False, outcomes.next_hop_refused(*start),
                               next_hop_reply=_said(*start))
        if not lines_end_in_crlf(data):
            data = normalize_message_line_endings(data)
        try:
            conn.send(dot_stuffed(data))
            async with asyncio.timeout(timeout):
                done = await conn.reply()
        except (NextHopGone, OSError, TimeoutError) as exc:
            conn.close()
            log.warning("relay to next hop failed during DATA: %s", _why(exc))
            return RelayResult(False, outcomes.NEXT_HOP_DOWN)
        if done[0] != 250:
            await self._reset_pipelined(conn)
            return RelayResult(False, outcomes.next_hop_refused(*done),
                               next_hop_reply=_said(*done))
        self._release(conn)
        return _taken(*done, refused, accepted)

    async def _end_empty(self, conn: PipelinedConnection) -> None:
        try:
            conn.send(b".\r\n")
            async with asyncio.timeout(self.upstream.timeout):
                await conn.reply()
        except (NextHopGone, OSError, TimeoutError):
            pass
        conn.close()

    async def _reset_pipelined(self, conn: PipelinedConnection) -> None:
        """RSET after a refusal: the connection is reused only when it answers 250."""
        if not conn.usable:
            conn.close()
            return
        try:
            conn.send(b"RSET\r\n")
            async with asyncio.timeout(self.upstream.timeout):
                code, _ = await conn.reply()
        except (NextHopGone, OSError, TimeoutError):
            conn.close()
            return
        if code == 250:
            self._release(conn)
        else:
            conn.close()

    async def _reset(self, client: aiosmtplib.SMTP) -> None:
        try:
            await client.rset()
        except Exception:  # a broken connection is simply not reused
            client.close()
            return
        self._release(client)


def _taken(code: int, message: str, refused: dict[str, tuple[int, str]],
           accepted: list[str]) -> RelayResult:
    """The next hop took the message (for ``accepted``): our 250 quotes its reply."""
    reply = f"250 2.0.0 Accepted by next hop: {message}"[:400]
    return RelayResult(True, " ".join(reply.split()), refused, tuple(accepted),
                       next_hop_reply=_said(code, message))


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__  # a TimeoutError says nothing of itself


def _said(code: int, message: str) -> str:
    return " ".join(f"{code} {message}".split())[:400]


async def relay(*, host: str, port: int, mail_from: str, rcpt_tos: list[str], data: bytes,
                timeout: float, local_hostname: str | None = None) -> RelayResult:
    """One delivery on a connection of its own (no reuse), for callers without a Relay."""
    one = Relay(Upstream(host=host, port=port, timeout=timeout, local_hostname=local_hostname,
                         pool_size=0))
    return await one.send(mail_from=mail_from, rcpt_tos=rcpt_tos, data=data)
