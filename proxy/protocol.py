"""The SMTP protocol object of each client connection: aiosmtpd's SMTP, adjusted.

Everything here is about the wire (line limits, reply batching, strict envelope paths, caps on
connections per client IP and on commands that send no mail, the cost of a new connection);
policy stays in the handler.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import re
import types
from collections.abc import Callable

from aiosmtpd.proxy_protocol import V2_CMD, get_proxy
from aiosmtpd.smtp import MISSING, SMTP, Session, TLSSetupException, _AuthMechAttr, syntax

from proxy import data_stream
from proxy.connections import ConnectionCounts, OpenConnections
from proxy.data_budget import DataBudget
from proxy.data_stream import DataState

log = logging.getLogger("proxy")

# Commands a client may send per connection before it is cut off with 421: generous for real
# mail (MAIL, RCPT, DATA are bounded by the message limits), tight for the junk commands.
COMMAND_CALL_LIMITS = {
    "AUTH": 10, "HELO": 20, "EHLO": 20, "STARTTLS": 3, "VRFY": 20, "EXPN": 20, "HELP": 20,
    "NOOP": 1000, "*": 1_000_000,
}

TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address"
TOO_MANY_IN_ALL = "421 4.7.0 Too many connections, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down"
TLS_ALREADY_ACTIVE = "503 5.5.1 TLS already active"
PROXY_REFUSED = "554 5.7.0 PROXY protocol header not accepted from your address"
PROXY_HEADER_TIMEOUT = 5.0  # seconds a load balancer has to send its header
# Seconds a TLS connection that is ending waits for the client's close_notify (asyncio's and
# uvloop's default is 30: a client that never answers would hold its connection, and its slot
# of the per-IP cap, that long after QUIT). Postfix does not wait for it at all.
TLS_SHUTDOWN_TIMEOUT = 5.0
# What a session learns of its TLS layer (aiosmtpd's ``session.ssl``: the transport's extras).
_TLS_EXTRA = ("sslcontext", "peercert", "cipher", "compression", "ssl_object")
TOO_MANY_JUNK_COMMANDS = "421 4.7.0 Too many commands without sending mail"
# aiosmtpd's words after DATA, kept: clients and tests know them.
DATA_FAULTS = {DataState.TOO_LONG: "500 Line too long (see RFC5321 4.5.3.1.6)",
               DataState.TOO_MUCH: "552 Error: Too much mail data",
               DataState.NO_ROOM: "452 4.3.1 Insufficient system storage, try again later"}
# The bulk reader works on asyncio's StreamReader buffer, as aiosmtpd itself does for
# STARTTLS; on a StreamReader without one, DATA is read aiosmtpd's way.
_BULK_DATA = all(hasattr(asyncio.StreamReader, name)
                 for name in ("_wait_for_data", "_maybe_resume_transport"))
# Refusals of a MAIL or RCPT path at that very command (RFC 3463: 5.1.7 bad sender's
# mailbox syntax, 5.1.3 bad destination mailbox syntax).
PATH_REFUSALS = {
    "FROM:": {"control": "501 5.1.7 Control characters are not allowed in the sender address",
              "open": '501 5.1.7 The sender address has no closing ">"'},
    "TO:": {"control": "501 5.1.3 Control characters are not allowed in the recipient address",
            "open": '501 5.1.3 The recipient address has no closing ">"'},
}

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_LABELS = rf"{_LABEL}(?:\.{_LABEL})*"
# <local@domain>, then (after a space) the ESMTP parameters: the common case, one regex.
_PLAIN_PATH = re.compile(rf" *<({_ATOM}(?:\.{_ATOM})*@{_LABELS})>(?: +(.*)|)", re.DOTALL)
# C0 controls and DEL: a bare CR or LF in a path can turn into a second command line at a
# next hop that re-parses or re-writes the address (RFC 5321 allows none of them in a path).
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _path_grammar(utf8: bool) -> re.Pattern:
    """RFC 5321 4.1.2 (Reverse-path / Forward-path, then the parameters), with RFC 6531's
    UTF-8 in atoms, quoted strings and domain labels when ``utf8``. C1 controls and lone
    surrogates (what undecodable bytes become) are never part of an address."""
    u = "\u00a0-\ud7ff\ue000-\U0010ffff" if utf8 else ""
    atext = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{u}-]"
    dot_string = rf"{atext}+(?:\.{atext}+)*"
    quoted = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{u}]|\\[\x20-\x7e])*"'
    label = rf"[A-Za-z0-9{u}](?:[A-Za-z0-9{u}-]*[A-Za-z0-9{u}])?"
    domain = rf"{label}(?:\.{label})*"
    literal = r"\[[\x21-\x5a\x5e-\x7e]+\]"  # dcontent; checked further in _literal_ok

    def mailbox(tag: str) -> str:
        return rf"(?P<{tag}local>{dot_string}|{quoted})@(?P<{tag}domain>{domain}|{literal})"

    route = rf"@{domain}(?:,@{domain})*:"
    return re.compile(rf" *(?:<(?:(?P<null>)|(?:{route})?{mailbox('')})>|{mailbox('bare')})"
                      r"(?: +(?P<rest>.*)|)", re.DOTALL)


_PATH = {False: _path_grammar(False), True: _path_grammar(True)}
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
_SNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_SNUM}(?:\.{_SNUM}){{3}}")


def _literal_ok(literal: str) -> bool:
    """An address literal: IPv4, ``IPv6:`` and a valid IPv6 address, or a general one
    (``tag:content``)."""
    inner = literal[1:-1]
    if _IPV4.fullmatch(inner):
        return True
    if inner[:5].lower() == "ipv6:":
        text = inner[5:]
        if "%" in text:  # ipaddress takes a scope id; RFC 5321 has none
            return False
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return False
        return True
    return _GENERAL_LITERAL.fullmatch(inner) is not None


def parse_path(arg: str, *, utf8: bool = True, null: bool = True,
               local_part_limit: int = 0) -> tuple[str, str] | None:
    """The mailbox of an RFC 5321 path and the text after it (the ESMTP parameters), or None
    when the path is malformed.

    A source route (``<@relay:user@example.com>``) is accepted and dropped (RFC 5321 C);
    ``<>`` is the null reverse-path (returned as ``"<>"``, as aiosmtpd does) when ``null``;
    a bare mailbox without angle brackets is accepted, as Postfix does by default. The
    mailbox returned is a substring of ``arg``: what is relayed is exactly what was checked.
    """
    if CONTROL.search(arg):
        return None
    match = _PATH[utf8].fullmatch(arg)
    if match is None:
        return None
    rest = match.group("rest") or ""
    if match.group("null") is not None:
        return ("<>", rest) if null else None
    if match.group("local") is not None:
        local, domain = match.group("local", "domain")
    else:
        local, domain = match.group("barelocal", "baredomain")
    if domain.startswith("[") and not _literal_ok(domain):
        return None
    if local_part_limit and len(local) > local_part_limit:
        return None
    return f"{local}@{domain}", rest


def unterminated(arg: str) -> bool:
    """``<`` opens a path that no ``>`` (outside a quoted string) closes."""
    text = arg.lstrip(" ")
    if not text.startswith("<"):
        return False
    quoted = escaped = False
    for char in text[1:]:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return False
    return True


class QuietSession(Session):
    """aiosmtpd sets the deprecated ``login_data`` on every successful AUTH and logs a
    warning each time; we never read it, so store it without the noise."""

    @property
    def login_data(self):
        return self._login_data

    @login_data.setter
    def login_data(self, value) -> None:
        self._login_data = value


class LimitedSMTP(SMTP):
    """aiosmtpd's SMTP with a bounded command line, multi-line replies sent in one write,
    strict envelope paths, caps on connections per client IP and on commands that send no
    mail, and a word to the handler when the connection ends (to give back what the session
    reserved)."""

    command_size_limit = 512

    def __init__(self, *args, connections: ConnectionCounts | None = None,
                 open_connections: OpenConnections | None = None,
                 data_budget: DataBudget | None = None,
                 max_connections_per_ip: int = 0, max_junk_commands: int = 0,
                 line_length_limit: int | None = None, proxy_protocol_from=(),
                 proxy_protocol_timeout: float = PROXY_HEADER_TIMEOUT,
                 tls_shutdown_timeout: float = TLS_SHUTDOWN_TIMEOUT, **kwargs):
        if line_length_limit is not None:  # before aiosmtpd sizes its stream reader
            self.line_length_limit = line_length_limit
        super().__init__(*args, **kwargs)
        self._held_lines: list[bytes] = []
        self.connections = connections
        self.open_connections = open_connections
        self._over_process_limit = False
        self.data_budget = data_budget
        self._data_held = 0  # what this connection's DATA took from the budget
        self.max_connections_per_ip = max_connections_per_ip
        self.max_junk_commands = max_junk_commands
        self._connection_slot: int | None = None
        self._over_connection_limit = False
        self._junk_commands = 0
        self._forward_path = False
        self.proxy_protocol_from = tuple(proxy_protocol_from)
        self.proxy_protocol_timeout = proxy_protocol_timeout
        self.tls_shutdown_timeout = tls_shutdown_timeout
        self._behind_balancer = False
        self._real_peer = None
        self._proxy_data = None
        self._lost = False  # connection_lost ran
        # The message is in and its reply waits on the handler (the next hop, the
        # quarantine): a drain lets it finish past SMTP_DRAIN_SECONDS (``OpenConnections``).
        self.answering = False

    # -- connections per client IP ----------------------------------------------------------
    def connection_made(self, transport):
        """aiosmtpd has no connect hook: count the connection here (not again when STARTTLS
        makes a new transport for it). Behind a load balancer the client is known only once
        its PROXY header is read: counted then (``_handle_client``)."""
        if self.transport is None:
            if self.open_connections is not None:
                self._over_process_limit = not self.open_connections.add(self)
            peer = transport.get_extra_info("peername")
            ip = str(peer[0] if isinstance(peer, tuple) else peer)
            self._behind_balancer = _in_networks(ip, self.proxy_protocol_from)
            if not self._behind_balancer:
                self._count_connection(ip)
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self._handler_coroutine.add_done_callback(self._served)
        if self._real_peer is not None:  # STARTTLS made a new session: still the real client
            self.session.peer = self._real_peer
            self.session.proxy_data = self._proxy_data

    def _count_connection(self, ip: str) -> None:
        if self.connections is None:
            return
        slot = self.connections.acquire(ip, self.max_connections_per_ip)
        if slot is None:
            self._over_connection_limit = True
            log.info("%s: over %d connections, refused", ip, self.max_connections_per_ip)
        else:
            self._connection_slot = slot

    # -- PROXY protocol (SMTP_PROXY_PROTOCOL_FROM) -------------------------------------------
    async def _read_proxy_header(self) -> bool:
        """A connection from a load balancer must start with a PROXY header (v1 or v2, parsed
        by aiosmtpd); the client it names becomes the session's peer, so IP authentication,
        AUTH throttling, the per-IP cap and the Received: header all see the real client.
        Without a valid header the connection is closed before the greeting. A v2 LOCAL
        header (the balancer's own health check) keeps the balancer's address."""
        self._reset_timeout(self.proxy_protocol_timeout)
        try:
            data = await get_proxy(self._reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        peer = None
        if not data.error and data.version == 2 and data.command == V2_CMD.LOCAL:
            peer = self.session.peer  # whatever addresses it carries (they are to be ignored)
        elif data.valid and isinstance(data.src_addr, ipaddress.IPv4Address
                                       | ipaddress.IPv6Address):
            peer = (str(data.src_addr), data.src_port)
        if peer is None:
            log.warning("%r: no valid PROXY header from the load balancer (%s)",
                        self.session.peer, data.error or "unsupported address")
            return False
        self._real_peer, self._proxy_data = peer, data
        self.session.peer, self.session.proxy_data = peer, data
        self._reset_timeout()
        return True

    @syntax("PROXY")
    async def smtp_PROXY(self, arg):
        """A PROXY v1 header from an address that is not a load balancer: someone choosing
        the address we would see. (A v2 header ends in QUIT, by design, for the same case.)"""
        log.warning("%r: PROXY header from outside SMTP_PROXY_PROTOCOL_FROM refused",
                    self.session.peer)
        await self.push(PROXY_REFUSED)
        if self.transport is not None:
            self.transport.close()

    def _served(self, _task) -> None:
        """Nobody serves the connection once its handler has ended, so close it. aiosmtpd
        closes it only from its command loop; a client that leaves (EOF cancels the handler)
        before that loop runs, even before the handler's first step, would otherwise keep its
        transport, and its slot of the per-IP cap, until the idle timeout (five minutes)."""
        if self.transport is not None:
            self.transport.close()

    async def _handle_client(self) -> None:
        if self._behind_balancer:
            if not await self._read_proxy_header():
                if self.transport is not None:
                    self.transport.close()
                return
            self._count_connection(str(self.session.peer[0]))
        refusal = None
        if self._draining():
            refusal = SHUTTING_DOWN  # accepted just before the listening socket closed
        elif self._over_process_limit:
            log.warning("%r: the process serves %d connections (SMTP_MAX_CONNECTIONS), "
                        "refused", self.session.peer, len(self.open_connections))
            refusal = TOO_MANY_IN_ALL
        elif self._over_connection_limit:
            refusal = TOO_MANY_CONNECTIONS
        connect = getattr(self.event_handler, "handle_connect", None)
        if refusal is None and connect is not None:
            refusal = await connect(self.session)  # e.g. an IP user's connection limits
            if refusal is None and self._draining():
                refusal = SHUTTING_DOWN  # the drain began while that ran: no greeting now
        elif refusal is not None and hasattr(self.event_handler, "connection_refused"):
            self.event_handler.connection_refused(self.session, refusal)  # the message log
        if refusal is not None:
            try:
                await self.push(refusal)
            finally:
                if self.transport is not None:
                    self.transport.close()
            return
        await super()._handle_client()

    def _release_connection(self) -> None:
        slot, self._connection_slot = self._connection_slot, None
        if slot is not None and self.connections is not None:
            self.connections.release(slot)

    # -- shutdown (OpenConnections.drain) -----------------------------------------------------
    def _draining(self) -> bool:
        return self.open_connections is not None and self.open_connections.draining

    def _in_transaction(self) -> bool:
        envelope = getattr(self, "envelope", None)
        return envelope is not None and envelope.mail_from is not None

    def drain(self) -> None:
        """The proxy is stopping: a session waiting for its next command outside a
        transaction ends now, with 421 (RFC 5321 3.8); any other ends after its next reply
        that leaves no transaction open (``push``)."""
        reader = getattr(self, "_reader", None)
        waiting = getattr(reader, "_waiter", None) is not None if reader is not None else True
        if waiting and not self._in_transaction():
            self.shut_down()

    def shut_down(self) -> None:
        """421 and close, whatever the session is doing."""
        if self.transport is None or self.transport.is_closing():
            return
        self._held_lines = []
        if self._original_transport is not None and self._tls_protocol is None:
            self.transport.close()  # mid-handshake: no plaintext reply inside the TLS stream
            return
        self.transport.write(SHUTTING_DOWN.encode() + b"\r\n")
        self.transport.close()

    def _after_reply(self, status: bytes) -> None:
        """While draining, a final reply that leaves no transaction open ends the session
        (the 250 after DATA, a refused MAIL, RSET, EHLO...). Not a 220 (the greeting,
        STARTTLS's go-ahead) or 3xx (more to come), nor a reply that ends it anyway."""
        if (status[:1] in (b"2", b"4", b"5") and status[:3] not in (b"220", b"221")
                and not status.startswith(b"421") and not self._in_transaction()):
            self.shut_down()

    # -- commands that send no mail ----------------------------------------------------------
    async def _no_progress(self) -> bool:
        """Count a NOOP/RSET/VRFY/EXPN/HELP or a refused MAIL; past the cap, 421 and close.
        Only a finished DATA starts the count afresh, so a client cannot idle forever on
        NOOPs (each one resets the idle timeout) or RSETs between aborted transactions."""
        self._junk_commands += 1
        if not self.max_junk_commands or self._junk_commands <= self.max_junk_commands:
            return False
        log.info("%r: too many commands without mail", self.session.peer)
        await self.push(TOO_MANY_JUNK_COMMANDS)
        if self.transport is not None:
            self.transport.close()
        return True

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg):
        if not await self._no_progress():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg):
        if not await self._no_progress():
            await super().smtp_RSET(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg):
        if not await self._no_progress():
            await super().smtp_VRFY(arg)

    async def smtp_EXPN(self, arg):
        if not await self._no_progress():
            await super().smtp_EXPN(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg):
        if not await self._no_progress():
            await super().smtp_HELP(arg)

    # -- AUTH ---------------------------------------------------------------------------------
    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg):
        """The mechanism's name whatever its case (``auth login``, as some clients write it
        and Postfix and Exim accept; aiosmtpd answered 504). The credentials are untouched."""
        if arg:
            mechanism, *rest = arg.split(None, 1)
            arg = " ".join([mechanism.upper(), *rest])
        await super().smtp_AUTH(arg)

    # -- STARTTLS ----------------------------------------------------------------------------
    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg):
        """STARTTLS through the event loop's own TLS layer (``loop.start_tls``: uvloop's, in
        C, where installed), not aiosmtpd's, which builds asyncio's pure-Python SSLProtocol
        by hand: that layer cost about half a millisecond of CPU per STARTTLS connection
        (2.8 against 2.3 ms a message with STARTTLS + AUTH, bench/bench_proxy.py's load).
        The rest is aiosmtpd's: RFC 3207 4.2 (what the client sent before the handshake is
        thrown away; a new session, which knows nothing of the one before), the STARTTLS
        hook, a failed handshake ending the connection. A second STARTTLS gets 503
        (aiosmtpd said 220 and tried TLS inside TLS, which killed the connection)."""
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context:  # not offered; asked for anyway
            await self.push("454 4.7.0 TLS not available")
            return
        if self._tls_protocol is not None:  # no TLS inside TLS: the connection would die
            await self.push(TLS_ALREADY_ACTIVE)
            return
        await self.push("220 Ready to start TLS")
        plain = self.transport
        if plain is None or plain.is_closing():
            return
        # Anything read so far was sent in the clear after STARTTLS (a command injection):
        # dropped here, before the TLS layer takes the socket, and never after the handshake,
        # by when the client's first protected command may already be in the buffer.
        self._reader._buffer.clear()
        # Nor may the reader pause the plain transport: the TLS layer reads it from here on,
        # and asyncio's feeds the reader the commands that came with the client's Finished
        # before start_tls returns; a pause of the plain transport was never undone.
        self._reader._transport, self._reader._paused = None, False
        self._original_transport = plain
        try:
            tls = await self.loop.start_tls(plain, self, self.tls_context, server_side=True,
                                            ssl_shutdown_timeout=self.tls_shutdown_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error
        if tls is None or tls.is_closing():  # the idle timeout closed it during the handshake
            self.connection_lost(None)
            return
        self._tls_protocol = tls  # aiosmtpd asks only whether there is one
        self.transport = self._transport = tls
        self._reader._transport = self._writer._transport = tls
        if len(self._reader._buffer) > 2 * self._reader._limit:  # fed during the handshake
            tls.pause_reading()
            self._reader._paused = True
        self._over_ssl = True
        self._set_rset_state()
        self.session = self._create_session()
        self.session.peer = self._real_peer or tls.get_extra_info("peername")
        self.session.proxy_data = self._proxy_data
        self.session.ssl = {key: tls.get_extra_info(key) for key in _TLS_EXTRA}
        self._reset_timeout()
        hook = self._handle_hooks.get("STARTTLS")
        self._tls_handshake_okay = True if hook is None else hook(self, self.session,
                                                                 self.envelope)
        if self._draining():
            self.shut_down()  # the drain began during the handshake, which no reply follows

    async def handle_exception(self, error):
        """A failed STARTTLS handshake is a client's doing, which any client can repeat: one
        line in the log, not an error with a traceback (aiosmtpd closes the connection)."""
        if isinstance(error, TLSSetupException):
            log.info("%r: STARTTLS handshake failed: %s", self.session.peer,
                     error.__cause__ or error)
            return "421 4.7.0 TLS handshake failed"  # never sent: the connection is closed
        return await super().handle_exception(error)

    # -- DATA, read in bulk ----------------------------------------------------------------
    # False: aiosmtpd's own reader (the tests compare the two), which keeps no DATA budget.
    bulk_data = _BULK_DATA

    @syntax("DATA")
    async def smtp_DATA(self, arg):
        envelope = self.envelope
        if self.bulk_data:
            await self._bulk_DATA(arg)
        else:
            await super().smtp_DATA(arg)
        if self.envelope is not envelope:  # the message was read: a transaction completed
            self._junk_commands = 0

    async def _bulk_DATA(self, arg) -> None:
        """aiosmtpd's ``smtp_DATA`` with the stream read by :mod:`proxy.data_stream`."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:  # the DATA budget is given back however this ends (reply, hang-up, fault)
            await self._receive_message()
        finally:
            self._give_back_data()

    async def _receive_message(self) -> None:
        try:
            body, state = await self._read_data()
        except asyncio.CancelledError:
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        if body is not None:
            state = data_stream.check(body, self.data_size_limit, self.line_length_limit)
        if state is not DataState.NOMINAL:
            refused = getattr(self.event_handler, "data_refused", None)
            if refused is not None:
                refused(self.session, DATA_FAULTS[state])  # the message log
            await self.push(DATA_FAULTS[state])
            self._set_post_data_state()
            return
        original = data_stream.unstuff(body)
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        else:
            content = original
        self.envelope.content = content
        self.envelope.original_content = original
        self.answering = True
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self.answering = False
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> tuple[bytes | None, DataState]:
        """The data up to the end-of-data line, taken from the reader's buffer as segments
        arrive. Past the size limit (plus a line) without an end, the rest is drained, kept
        nowhere, and the data is None with the limit crossed first (:meth:`_drain_data`).
        What the buffer grows by is taken from the process's DATA budget; once that is
        spent, the rest is drained the same way and the answer is 452 (``NO_ROOM``)."""
        reader = self._reader
        buffer = reader._buffer
        bound = (self.data_size_limit + self.line_length_limit + len(data_stream.END)
                 if self.data_size_limit else None)
        searched = 0
        while (found := data_stream.end_of_data(buffer, searched)) is None:
            searched = len(buffer)
            if bound is not None and searched > bound:
                return await self._drain_data()
            if not self._hold_data(searched):
                return await self._drain_data(DataState.NO_ROOM)
            if reader._eof:  # the connection is going: eof_received cancels this task
                raise asyncio.CancelledError
            await reader._wait_for_data("DATA")
        body_end, consumed = found
        if not self._hold_data(consumed):
            return await self._drain_data(DataState.NO_ROOM)
        body = bytes(buffer[:body_end])
        del buffer[:consumed]
        reader._maybe_resume_transport()
        return body, DataState.NOMINAL

    def _hold_data(self, size: int) -> bool:
        """Hold ``size`` bytes of DATA in all, taking what is new from the budget; False, with
        everything this DATA held given back, when the budget cannot take it."""
        budget, held = self.data_budget, self._data_held
        if budget is None or size <= held:
            return True
        if budget.take(size - held):
            self._data_held = size
            return True
        self._give_back_data()
        log.warning("%r: DATA refused with 452, the process holds %d bytes of DATA "
                    "(SMTP_DATA_BUDGET %d)", self.session.peer, budget.held, budget.limit)
        return False

    def _give_back_data(self) -> None:
        held, self._data_held = self._data_held, 0
        if held and self.data_budget is not None:
            self.data_budget.give_back(held)

    async def _drain_data(self, otherwise: DataState = DataState.TOO_MUCH
                          ) -> tuple[None, DataState]:
        """Over the size limit or the DATA budget: aiosmtpd's line-by-line reading, keeping
        nothing, to find the end and which limit was crossed first (``otherwise`` when
        none was: the budget)."""
        limit, counted, state = self.data_size_limit, 0, DataState.NOMINAL
        fragments = False
        while True:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                if state is DataState.NOMINAL:
                    state = DataState.TOO_LONG
                line = await self._reader.read(exc.consumed)
            if not fragments and line == b".\r\n":
                break
            counted += len(line)
            if state is DataState.NOMINAL and limit and counted > limit:
                state = DataState.TOO_MUCH
            fragments = not line.endswith(b"\r\n")
            if (not fragments and state is DataState.NOMINAL
                    and len(line) > self.line_length_limit):
                state = DataState.TOO_LONG
        return None, (state if state is not DataState.NOMINAL else otherwise)

    # -- envelope paths -----------------------------------------------------------------------
    async def _path_refused(self, arg: str | None, keyword: str) -> bool:
        """Refuse, at MAIL or RCPT itself, a path with a control character or without its
        closing ``>``; aiosmtpd's own checks follow for everything else."""
        if arg is None or arg[:len(keyword)].upper() != keyword:
            return False
        path = arg[len(keyword):]
        if CONTROL.search(path):
            await self.push(PATH_REFUSALS[keyword]["control"])
            return True
        if _PLAIN_PATH.fullmatch(path.strip(" ")) is None and unterminated(path):
            await self.push(PATH_REFUSALS[keyword]["open"])
            return True
        return False

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg):
        """A refused MAIL starts no transaction, so it counts as a command without progress:
        else a client that never authenticates could send a million of them on one
        connection, each one a 530 and a record in the message log."""
        nested = self.envelope.mail_from is not None  # aiosmtpd's 503: counted by its DATA
        if not await self._path_refused(arg, "FROM:"):
            await super().smtp_MAIL(arg)
        if not nested and self.envelope.mail_from is None:
            await self._no_progress()

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg):
        if await self._path_refused(arg, "TO:"):
            return
        self._forward_path = True
        try:
            await super().smtp_RCPT(arg)
        finally:
            self._forward_path = False

    async def push(self, status):
        """aiosmtpd sends each line of a reply on its own (EHLO: seven writes, each a
        syscall and, under TLS, a record); hold "250-" lines and send them with the last."""
        if isinstance(status, str):
            status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        if status[3:4] == b"-" and status[:3].isdigit():
            self._held_lines.append(status)
            return
        if self._held_lines:
            status = b"\r\n".join([*self._held_lines, status])
            self._held_lines = []
        await super().push(status)
        if self._draining():  # only then can a reply end the session (``_after_reply``)
            self._after_reply(status.rsplit(b"\r\n", 1)[-1])

    def _getaddr(self, arg: str):
        """aiosmtpd parses paths with the e-mail package's header parser, which is lenient
        (it drops a CR inside a quoted local part, takes ``<a`` for ``a``) and slow (about
        0.1 ms). A plain ``<dot-atom@domain>`` takes one regex; anything else goes to the
        strict RFC 5321 grammar of :func:`parse_path`. The address returned is the exact
        text the client sent, so the relay can send it on unchanged. A malformed path is
        (None, None): aiosmtpd answers 553."""
        if not arg:
            return "", ""  # aiosmtpd answers 501 Syntax
        match = _PLAIN_PATH.fullmatch(arg)
        if match is not None and not self.local_part_limit:
            return match.group(1), match.group(2) or ""
        parsed = parse_path(arg, utf8=self.enable_SMTPUTF8, null=not self._forward_path,
                            local_part_limit=self.local_part_limit)
        return parsed if parsed is not None else (None, None)

    def _session_ended(self) -> None:
        closed = getattr(self.event_handler, "session_closed", None)
        if closed is not None and getattr(self, "session", None) is not None:
            try:
                closed(self.session)
            except Exception:
                log.exception("session_closed failed")

    def _create_session(self):
        session = QuietSession(self.loop)
        replaced = getattr(self.event_handler, "session_replaced", None)
        if replaced is not None and getattr(self, "session", None) is not None:
            replaced(self.session, session)  # STARTTLS: a new session, the same connection
        return session

    def connection_lost(self, error):
        """Every way a connection ends comes here (QUIT, 421, timeout, reset, TLS failure;
        aiosmtpd may call it twice, and so does a failed STARTTLS handshake: its TLS layer
        and aiosmtpd each report it): give back the session's reservations and the count,
        once."""
        if self._lost:
            return
        self._lost = True
        try:
            self._session_ended()
        finally:
            self._release_connection()
            if self.open_connections is not None:
                self.open_connections.discard(self)
        super().connection_lost(error)


def _in_networks(ip: str, networks) -> bool:
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    # An IPv4 balancer reaching a dual-stack listener ([::]) is ::ffff:a.b.c.d there.
    addresses = [address]
    if address.version == 6 and address.ipv4_mapped is not None:
        addresses.append(address.ipv4_mapped)
    return any(a.version == net.version and a in net for a in addresses for net in networks)


def protocol_factory(handler, **options) -> Callable[[], LimitedSMTP]:
    """The ``create_server`` factory: a LimitedSMTP per connection, built from a template.

    aiosmtpd's ``SMTP.__init__`` introspects the handler and itself on every connection
    (``inspect.getmembers``, ``dir``, ``inspect.signature``): about 0.2 ms, a sixth of the
    proxy's CPU per message when each message comes on a new connection. The answers never
    change, so the real ``__init__`` runs once for a template; each connection gets a copy of
    its state with a fresh stream-reader protocol base, fresh containers, and the template's
    own bound methods (the command and AUTH tables) bound to the new object instead.
    """
    template = LimitedSMTP(handler, **options)
    loop = template.loop
    base = asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop,
                                        client_connected_cb=lambda reader, writer: None)
    state = {k: v for k, v in vars(template).items() if k not in vars(base)}

    def plan(value):
        """How a connection gets its own ``value``, worked out once for the template: None
        when it is shared as it is, else a function of the new object (a method rebound to
        it, a fresh container)."""
        if inspect.ismethod(value) and value.__self__ is template:
            func = value.__func__
            return lambda obj: types.MethodType(func, obj)
        if isinstance(value, _AuthMechAttr):
            method = plan(value.method)
            return (lambda obj: value._replace(method=method(obj))) if method else None
        if isinstance(value, dict):
            items = [(k, v, plan(v)) for k, v in value.items()]
            return lambda obj: {k: make(obj) if make else v for k, v, make in items}
        if isinstance(value, list):
            items = [(v, plan(v)) for v in value]
            return lambda obj: [make(obj) if make else v for v, make in items]
        return None

    shared = {k: v for k, v in state.items() if plan(v) is None}
    own = [(k, make) for k, make in ((k, plan(v)) for k, v in state.items()) if make]

    def factory() -> LimitedSMTP:
        obj = LimitedSMTP.__new__(LimitedSMTP)
        attributes = vars(obj)
        attributes.update(shared)
        for name, make in own:
            attributes[name] = make(obj)
        asyncio.StreamReaderProtocol.__init__(
            obj, asyncio.StreamReader(loop=loop, limit=obj.line_length_limit),
            client_connected_cb=obj._cb_client_connected, loop=loop)
        return obj

    return factory
