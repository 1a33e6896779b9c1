"""The relay's own DATA (dot-stuffing with ``bytes.replace`` for data already in CRLF) against
aiosmtplib's ``data()``: the same random messages reach a real next hop as the same bytes, and
the next hop's refusal of the data is reported as before; both with a next hop that offers
PIPELINING (the relay's own transaction) and one that does not (aiosmtplib's)."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.relay import Relay, Upstream, dot_stuffed
from tests.support.content import NextHop


@pytest.fixture(scope="module", params=[True, False], ids=["pipelining", "one-by-one"])
def hop(request):
    server = NextHop(pipelining=request.param).start()
    yield server
    server.stop()


async def _both(port: int, data: bytes) -> None:
    """The message once through the relay, once through aiosmtplib's own data()."""
    relay = Relay(Upstream(host="127.0.0.1", port=port, timeout=10, pool_size=1))
    result = await relay.send(mail_from="a@x.test", rcpt_tos=["b@y.test"], data=data)
    assert result.delivered, result.reply
    await relay.close()
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
        await client.sendmail("a@x.test", ["b@y.test"], data)


LINE = st.one_of(st.sampled_from([b"", b".", b"..", b". x", b".\t", b"...end", b"a.b"]),
                 st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
LINES = st.lists(LINE, min_size=1, max_size=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=LINES, ending=st.sampled_from([b"\r\n", b"\n", b"\r"]), last=st.booleans())
def test_the_next_hop_receives_what_aiosmtplib_would_send(hop, lines, ending, last):
    data = ending.join(lines) + (ending if last else b"")
    hop.handler.messages.clear()
    asyncio.run(_both(hop.port, data))
    ours, theirs = hop.handler.messages
    assert ours.data == theirs.data


def test_dot_stuffing_of_crlf_data():
    assert dot_stuffed(b".a\r\n.\r\nb.\r\n..") == b"..a\r\n..\r\nb.\r\n...\r\n.\r\n"
    assert dot_stuffed(b"") == b"\r\n.\r\n"


def test_a_refused_data_is_the_next_hops_answer(hop):
    hop.handler.refuse_data = "554 5.7.1 Not today"
    try:
        relay = Relay(Upstream(host="127.0.0.1", port=hop.port, timeout=10, pool_size=1))
        result = asyncio.run(relay.send(mail_from="a@x.test", rcpt_tos=["b@y.test"],
                                        data=b"Subject: x\r\n\r\nbody\r\n"))
    finally:
        hop.handler.refuse_data = None
    assert not result.delivered
    assert result.next_hop_reply == "554 5.7.1 Not today"
