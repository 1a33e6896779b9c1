"""The SMTP protocol object of each client connection: aiosmtpd's SMTP, adjusted.

Everything here is about the wire (line limits, reply batching, address parsing, the cost of
a new connection); policy stays in the handler.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import types
from collections.abc import Callable

from aiosmtpd.smtp import SMTP, Session, _AuthMechAttr

log = logging.getLogger("proxy")

# Commands a client may send per connection before it is cut off with 421: generous for real
# mail (MAIL, RCPT, DATA are bounded by the message limits), tight for the junk commands.
COMMAND_CALL_LIMITS = {
    "AUTH": 10, "HELO": 20, "EHLO": 20, "STARTTLS": 3, "VRFY": 20, "EXPN": 20, "HELP": 20,
    "NOOP": 1000, "*": 1_000_000,
}

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABELS = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# <local@domain>, then (after spaces) the ESMTP parameters; a "(" would start a comment.
_PLAIN_PATH = re.compile(rf"[ \t]*<({_ATOM}(?:\.{_ATOM})*@{_LABELS})>[ \t]*(?![ \t(])(.*)",
                         re.DOTALL)


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
    plain addresses parsed without the e-mail header parser, and a word to the handler when
    the connection ends (to give back what the session reserved)."""

    command_size_limit = 512

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._held_lines: list[bytes] = []

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

    def _getaddr(self, arg: str):
        """aiosmtpd parses every MAIL FROM and RCPT TO path with the e-mail package's header
        parser (about 0.1 ms each). A plain ``<dot-atom@domain>`` yields the same address
        and rest with one regex; anything else (quoted local parts, comments, UTF-8, source
        routes, the null path) still goes to aiosmtpd's parser, which fails on some junk
        (``MAIL FROM:<`` raises IndexError): that is a malformed address (553), not a 451
        from an internal error."""
        match = _PLAIN_PATH.fullmatch(arg)
        if match is None or self.local_part_limit:
            try:
                return super()._getaddr(arg)
            except Exception:
                return None, None
        return match.group(1), match.group(2)

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
        self._session_ended()
        super().connection_lost(error)


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

    def own(value, obj):
        if inspect.ismethod(value) and value.__self__ is template:
            return types.MethodType(value.__func__, obj)
        if isinstance(value, _AuthMechAttr):
            return value._replace(method=own(value.method, obj))
        if isinstance(value, dict):
            return {k: own(v, obj) for k, v in value.items()}
        if isinstance(value, list):
            return [own(v, obj) for v in value]
        return value

    def factory() -> LimitedSMTP:
        obj = LimitedSMTP.__new__(LimitedSMTP)
        vars(obj).update({k: own(v, obj) for k, v in state.items()})
        asyncio.StreamReaderProtocol.__init__(
            obj, asyncio.StreamReader(loop=loop, limit=obj.line_length_limit),
            client_connected_cb=obj._cb_client_connected, loop=loop)
        return obj

    return factory
