"""The relay pipelines MAIL, RCPT and DATA to a next hop that offers PIPELINING (RFC 2920),
and reads every reply, in order, whatever way they arrive.

The next hop here is a raw socket server that follows a script, so that it can do what
aiosmtpd never does: answer nothing until it has the whole envelope (a relay that waited
for the MAIL reply would wait forever), answer a byte at a time, open DATA after refusing
every recipient, drop the connection half way, or answer with something that is not SMTP.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.relay import Relay, Upstream
from scoring import outcomes

MESSAGE = b"From: a@x.test\r\nSubject: s\r\n\r\n.dot\r\nbody\r\n"


class ScriptedHop:
    """Greets, answers EHLO with PIPELINING, then runs ``transaction(reader, writer)`` for
    each connection; records what each connection received."""

    def __init__(self, transaction, pipelining: bool = True):
        self.transaction = transaction
        self.pipelining = pipelining
        self.connections = 0
        self.received: list[bytes] = []
        self.quits = 0

    async def __aenter__(self) -> ScriptedHop:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        writer.write(b"220-hop.test ESMTP\r\n220 ready\r\n")
        await reader.readline()
        writer.write(b"250-hop.test\r\n" + (b"250-PIPELINING\r\n" if self.pipelining else b"")
                     + b"250-SIZE 1000000\r\n250 8BITMIME\r\n")
        try:
            await self.transaction(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def until(self, reader, marker: bytes) -> bytes:
        data = await reader.readuntil(marker)
        self.received.append(data)
        return data

    async def take_message(self, reader, writer) -> None:
        """After the 354: read the message, take it, then answer RSET and QUIT."""
        await self.until(reader, b"\r\n.\r\n")
        writer.write(b"250 2.0.0 taken\r\n")
        await self.rest(reader, writer)

    async def rest(self, reader, writer) -> None:
        """After a transaction: RSET gets 250, QUIT 221, until the client leaves."""
        while line := await reader.readline():
            if line.upper().startswith(b"QUIT"):
                self.quits += 1
                writer.write(b"221 bye\r\n")
                return
            writer.write(b"250 reset\r\n" if line.upper().startswith(b"RSET")
                         else b"500 what\r\n")


def exchange(transaction, *envelopes: tuple[str, list[str]], timeout: float = 5.0,
             pipelining: bool = True):
    """``transaction`` plays the next hop; MESSAGE goes through one Relay once per (sender,
    recipients); then the relay closes and the hop has a moment to see the connection end.
    Returns (hop, relay, results)."""
    async def main():
        async with ScriptedHop(transaction, pipelining) as hop:
            relay = Relay(Upstream(host="127.0.0.1", port=hop.port, timeout=timeout,
                                   pool_size=2))
            results = [await relay.send(mail_from=sender, rcpt_tos=rcpts, data=MESSAGE)
                       for sender, rcpts in envelopes]
            await asyncio.sleep(0.1)
            await relay.close()
            await asyncio.sleep(0.05)
            return hop, relay, results

    return asyncio.run(main())


async def trickle(writer, data: bytes) -> None:
    """Send ``data`` a byte at a time, each in its own segment."""
    for i in range(len(data)):
        writer.write(data[i:i + 1])
        await writer.drain()
        await asyncio.sleep(0)


def test_the_envelope_goes_in_one_write_and_replies_are_read_in_order():
    async def transaction(hop, reader, writer):
        envelope = await hop.until(reader, b"DATA\r\n")  # nothing answered before this
        assert envelope.count(b"\r\n") == 5, envelope
        await trickle(writer, b"250 2.1.0 sender ok\r\n250-2.1.5 first\r\n250 2.1.5 ok\r\n"
                              b"251 2.1.5 forwarded\r\n451 4.2.0 later\r\n354 go ahead\r\n")
        await hop.until(reader, b"\r\n.\r\n")
        await trickle(writer, b"250-2.0.0 queued\r\n250 2.0.0 as ABC123\r\n")
        await hop.rest(reader, writer)

    hop, _, (result,) = exchange(transaction, ("a@x.test", ["b@y.test", "c@y.test", "d@y.test"]))
    assert result.delivered, result.reply
    assert result.accepted == ("b@y.test", "c@y.test")
    assert result.refused == {"d@y.test": (451, "4.2.0 later")}
    assert result.next_hop_reply == "250 2.0.0 queued 2.0.0 as ABC123"
    assert hop.received[0] == (b"MAIL FROM:<a@x.test> SIZE=42\r\nRCPT TO:<b@y.test>\r\n"
                               b"RCPT TO:<c@y.test>\r\nRCPT TO:<d@y.test>\r\nDATA\r\n")
    assert hop.received[1] == MESSAGE.replace(b"\r\n.dot", b"\r\n..dot") + b".\r\n"
    assert hop.quits == 1


def test_a_refused_sender_is_reported_and_the_connection_reused_after_rset():
    async def transaction(hop, reader, writer):
        await hop.until(reader, b"DATA\r\n")
        writer.write(b"553 5.1.8 sender refused\r\n503 5.5.1 no sender\r\n"
                     b"503 5.5.1 no valid recipients\r\n")
        await hop.until(reader, b"RSET\r\n")
        writer.write(b"250 2.0.0 reset\r\n")
        await hop.until(reader, b"DATA\r\n")
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await hop.take_message(reader, writer)

    hop, relay, (first, second) = exchange(transaction, ("bad@x.test", ["b@y.test"]),
                                           ("a@x.test", ["b@y.test"]))
    assert not first.delivered
    assert first.reply == outcomes.next_hop_refused(553, "5.1.8 sender refused")
    assert first.next_hop_reply == "553 5.1.8 sender refused"
    assert second.delivered, second.reply
    assert hop.connections == relay.connections_opened == 1


def test_data_opened_after_every_recipient_was_refused_is_ended_empty():
    """RFC 2920 says a next hop must refuse DATA then; one that opens it gets a lone dot
    (never the message) and the connection is not used again."""
    async def transaction(hop, reader, writer):
        await hop.until(reader, b"DATA\r\n")
        writer.write(b"250 ok\r\n550 5.1.1 no such user\r\n354 go ahead anyway\r\n")
        hop.received.append(await reader.read(1000))
        writer.write(b"554 5.5.1 no valid recipients\r\n")
        hop.received.append(await reader.read(1000))  # EOF: no RSET, no QUIT

    hop, _, (result,) = exchange(transaction, ("a@x.test", ["b@y.test"]))
    assert not result.delivered
    assert result.refused == {"b@y.test": (550, "5.1.1 no such user")}
    assert result.reply.startswith("550")
    assert hop.received[1:] == [b".\r\n", b""]


def test_a_reused_connection_that_dies_before_the_data_is_replaced_once():
    """The message is sent once, on a fresh connection."""
    async def transaction(hop, reader, writer):
        await hop.until(reader, b"DATA\r\n")
        if hop.connections == 1 and len(hop.received) > 2:
            return  # the second transaction on the first connection: hang up, say nothing
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await hop.until(reader, b"\r\n.\r\n")
        writer.write(b"250 2.0.0 taken\r\n")
        await transaction(hop, reader, writer)

    hop, relay, (first, second) = exchange(transaction, ("a@x.test", ["b@y.test"]),
                                           ("a@x.test", ["c@y.test"]))
    assert first.delivered and second.delivered, (first.reply, second.reply)
    assert relay.connections_opened == hop.connections == 2
    assert sum(1 for data in hop.received if data.endswith(b"\r\n.\r\n")) == 2


@pytest.mark.parametrize("answer", [b"hello there\r\n", b"", b"2x0 ok\r\n"],
                         ids=["not-smtp", "silence", "bad-code"])
def test_a_next_hop_that_does_not_answer_in_smtp_gets_a_temporary_failure(answer):
    async def transaction(hop, reader, writer):
        await hop.until(reader, b"DATA\r\n")
        writer.write(answer)
        await reader.read(1000)

    _, _, (result,) = exchange(transaction, ("a@x.test", ["b@y.test"]), timeout=0.5)
    assert not result.delivered
    assert result.reply == outcomes.NEXT_HOP_DOWN


def test_a_control_character_in_a_path_is_not_sent():
    async def transaction(hop, reader, writer):
        await hop.rest(reader, writer)

    hop, _, (result,) = exchange(transaction, ("a@x.test", ["b@y.test\r\nRCPT TO:<c>"]))
    assert result.reply == outcomes.NEXT_HOP_DOWN
    assert hop.received == []


def test_a_sender_refused_before_the_next_hop_hangs_up_is_its_refusal():
    """421 to MAIL and the connection closed: the sender hears the 421, not "unavailable"."""
    async def transaction(hop, reader, writer):
        await hop.until(reader, b"DATA\r\n")
        writer.write(b"421 4.7.0 too many messages from you\r\n")

    _, _, (result,) = exchange(transaction, ("a@x.test", ["b@y.test"]))
    assert not result.delivered
    assert result.next_hop_reply == "421 4.7.0 too many messages from you"
    assert result.reply == outcomes.next_hop_refused(421, "4.7.0 too many messages from you")


def test_each_reply_has_the_timeout_not_the_whole_envelope():
    """A next hop that takes its time over every RCPT (a policy service, recipient checks)
    gets the timeout per reply, as it had when each command went on its own."""
    async def transaction(hop, reader, writer):
        await hop.until(reader, b"DATA\r\n")
        writer.write(b"250 ok\r\n")
        for _ in range(6):
            await asyncio.sleep(0.25)
            writer.write(b"250 ok\r\n")
        writer.write(b"354 go\r\n")
        await hop.take_message(reader, writer)

    _, _, (result,) = exchange(transaction, ("a@x.test", [f"r{i}@y.test" for i in range(6)]),
                               timeout=1.0)
    assert result.delivered, result.reply


def test_data_opened_after_the_sender_was_refused_is_aborted_not_ended():
    """The next hop refused MAIL yet took a recipient and opened DATA: a lone dot could
    deliver an empty message; the connection is closed instead."""
    async def transaction(hop, reader, writer):
        await hop.until(reader, b"DATA\r\n")
        writer.write(b"550 5.1.8 sender refused\r\n250 ok\r\n354 go ahead anyway\r\n")
        hop.received.append(await reader.read(1000))  # EOF: nothing more

    hop, _, (result,) = exchange(transaction, ("a@x.test", ["b@y.test"]))
    assert not result.delivered
    assert result.next_hop_reply == "550 5.1.8 sender refused"
    assert hop.received[1:] == [b""]


def test_no_recipients_is_a_temporary_refusal_not_a_crash():
    async def transaction(hop, reader, writer):
        await hop.until(reader, b"DATA\r\n")
        writer.write(b"250 ok\r\n503 5.5.1 no valid recipients\r\n")
        await hop.rest(reader, writer)

    _, _, (result,) = exchange(transaction, ("a@x.test", []))
    assert not result.delivered and result.reply.startswith("451")


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_reply_that_is_not_utf8_is_passed_on_readable(pipelining):
    """A next hop's refusal in Latin-1 ("ungültig" with an 0xFC) is still its refusal: the
    client hears the 554 (it got 451, the proxy failing to write the reply), and the
    recipient refused in Latin-1 has a text its delivery report can carry."""
    async def transaction(hop, reader, writer):
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"RCPT" and b"<c@y.test>" in line:
                writer.write(b"550 5.1.1 unbekannt \xe9\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                await hop.until(reader, b"\r\n.\r\n")
                first = len(hop.received) == 1  # the first message is taken, the second not
                writer.write(b"250 2.0.0 taken\r\n" if first else b"554 5.7.1 ung\xfcltig\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")

    _, _, (partial, refused) = exchange(transaction, ("a@x.test", ["b@y.test", "c@y.test"]),
                                        ("a@x.test", ["b@y.test"]), pipelining=pipelining)
    assert partial.delivered and partial.refused == {"c@y.test": (550, "5.1.1 unbekannt \ufffd")}
    assert not refused.delivered and refused.reply == "554 5.7.1 ung\ufffdltig"
    assert refused.reply.encode("utf-8") and refused.next_hop_reply.encode("utf-8")
