"""The per-connection SMTP object: built from a template (each connection its own state),
strict RFC 5321 paths whose mailbox is the exact text the client sent, the fast path agreeing
with the strict grammar, and the connection counts shared by the proxy processes."""

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from proxy.connections import ConnectionCounts, client_key
from proxy.protocol import _PLAIN_PATH, LimitedSMTP, parse_path, protocol_factory, unterminated


class Handler:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

    async def auth_CUSTOM(self, server, args):  # a handler-provided AUTH mechanism
        return None


def build(count: int, **extra) -> tuple[LimitedSMTP, list[LimitedSMTP]]:
    async def make():
        options = dict(hostname="proxy.test", auth_require_tls=False,
                       command_call_limit={"NOOP": 5, "*": 100}, enable_SMTPUTF8=True,
                       connections=ConnectionCounts(1), **extra)
        return LimitedSMTP(Handler(), **options), [protocol_factory(Handler(), **options)()
                                                    for _ in range(count)]
    return asyncio.run(make())


def test_each_connection_gets_its_own_state_bound_to_itself():
    direct, (first, second) = build(2)
    for proto in (first, second):
        assert all(method.__self__ is proto for method in proto._smtp_methods.values())
        assert proto._auth_methods["PLAIN"].method.__self__ is proto
        assert proto._auth_methods["PLAIN"].is_builtin
        assert not proto._auth_methods["CUSTOM"].is_builtin
    assert first._stream_reader is not second._stream_reader
    assert first._closed is not second._closed
    assert first._held_lines is not second._held_lines
    assert first._call_limit_base is not second._call_limit_base
    # The same tables as a LimitedSMTP made by aiosmtpd's own __init__.
    assert sorted(first._smtp_methods) == sorted(direct._smtp_methods)
    assert sorted(first._auth_methods) == sorted(direct._auth_methods)
    assert sorted(first._handle_hooks) == sorted(direct._handle_hooks)
    assert first.hostname == "proxy.test" and first._call_limit_base == {"NOOP": 5, "*": 100}
    assert first._stream_reader._limit == direct._stream_reader._limit


# (path as the client sent it after "FROM:", what the handler gets, the parameters)
ACCEPTED = [
    ("<a@b.example>", "a@b.example", ""),
    ("<a@b.example> SIZE=100 BODY=8BITMIME", "a@b.example", "SIZE=100 BODY=8BITMIME"),
    ("  <a.b+c@d-e.example>  ", "a.b+c@d-e.example", ""),
    ("<>", "<>", ""),
    ("<> SIZE=1", "<>", "SIZE=1"),
    ('<"quoted local"@b.example>', '"quoted local"@b.example', ""),
    ('<"a\\"b\\\\c"@b.example>', '"a\\"b\\\\c"@b.example', ""),
    ('<"">@b.example>'[:0] + '<""@b.example>', '""@b.example', ""),
    ("<@relay.example,@other.example:a@b.example>", "a@b.example", ""),  # route dropped
    ("a@b.example SIZE=1", "a@b.example", "SIZE=1"),  # a bare mailbox, as Postfix takes it
    ('"a b"@b.example', '"a b"@b.example', ""),
    ("<a@[127.0.0.1]>", "a@[127.0.0.1]", ""),
    ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]", ""),
    ("<a@[IPv6:::ffff:192.0.2.1]>", "a@[IPv6:::ffff:192.0.2.1]", ""),
    ("<a@[x-tag:any]>", "a@[x-tag:any]", ""),
    ("<ü@bücher.example>", "ü@bücher.example", ""),
    ('<"ü x"@b.example>', '"ü x"@b.example', ""),
]
MALFORMED = [
    "<A@B.C>x", "<a..b@c.example>", "<.a@b.example>", "<a.@b.example>", "<a@b.example>>",
    "<a @b.example>", "<a@b .example>", "<a@-b.example>", "<a@b-.example>", "<a@b.example.>",
    "<a@b..example>", "<a@>", "<@b.example>", "<a>", "a", "<a@b.example>(c)",
    "<a@[300.1.1.1]>", "<a@[1.2.3]>", "<a@[IPv6:::1%eth0]>", "<a@[IPv6:1::2::3]>",
    "<a@[b.example]>", '<"a"b@c.example>', '<"a\\é"@b.example>', "<@relay:>",
    "<@relay.example:<a@b.example>>", "<a@b.example,c@d.example>", "<a@b@c.example>",
    "<a(comment)@b.example>", "<a@b.example (comment)>", "<\udcff@b.example>",
    "<\x85@b.example>", "<<a@b.example>>", "a@b.example>",
]


def test_paths_give_the_handler_the_exact_text_of_the_mailbox():
    for path, address, params in ACCEPTED:
        assert _PROTO._getaddr(path) == (address, params), path
        assert address == "<>" or address in path  # a substring: nothing was re-written


def test_malformed_paths_are_refused():
    for path in MALFORMED:
        assert _PROTO._getaddr(path) == (None, None), path
        assert parse_path(path) is None, path


def test_utf8_needs_an_smtputf8_server_and_the_null_path_is_only_for_mail():
    assert parse_path("<ü@b.example>", utf8=False) is None
    assert parse_path("<>", null=False) is None
    assert parse_path("<ab@b.example>", local_part_limit=1) is None


def test_control_characters_are_never_part_of_a_path():
    for char in [*map(chr, range(32)), "\x7f"]:
        for path in (f"<a{char}b@c.example>", f'<"a{char}b"@c.example>',
                     f"<a@c.exam{char}ple>", f"<a@c.example> SIZE=1{char}"):
            assert parse_path(path) is None, repr(path)


def test_unterminated_paths_are_told_apart():
    for path in ("<", "<a", "<a@b.example", "<a@b.example SIZE=1", '<"a>b"@c.example',
                 '<"a\\">b@c.example'):
        assert unterminated(path), path
    for path in ("<a@b.example>", "<a@b.example>>", "a@b.example", "<a>b", '<"a">'):
        assert not unterminated(path), path


@given(st.text(alphabet="ab.@<>()\" \t=-_+!#é:[]\\,", max_size=30))
def test_the_fast_path_agrees_with_the_strict_grammar(path):
    match = _PLAIN_PATH.fullmatch(path)
    if match is not None:
        assert parse_path(path) == (match.group(1), match.group(2) or "")


def test_over_the_junk_command_cap_and_connection_counts_each_connection_has_its_own():
    _, (first, second) = build(2, max_junk_commands=3)
    first._junk_commands = 2
    assert second._junk_commands == 0 and second.max_junk_commands == 3
    assert first.connections is second.connections  # one shared table per process


def test_connection_counts_sum_over_all_processes_and_a_dead_one_is_forgotten():
    counts = ConnectionCounts(workers=2)
    slots = []
    for worker in (0, 1, 0):
        counts.worker = worker
        slots.append(counts.acquire("192.0.2.1", 3))
    assert None not in slots
    counts.worker = 1
    assert counts.acquire("192.0.2.1", 3) is None  # the fourth, in any process
    assert counts.acquire("192.0.2.2", 3) is not None  # another address has its own count
    counts.clear(0)  # worker 0 died: its two connections are gone
    assert counts.acquire("192.0.2.1", 3) is not None
    counts.release(slots[1])
    assert counts.count(counts.slot("192.0.2.1")) == 1
    assert counts.acquire("192.0.2.1", 0) is not None  # 0: no cap


def test_no_client_can_pick_an_address_that_shares_another_clients_slot():
    """127.0.154.138 has the CRC-32 slot of 127.0.0.5 (found offline, as an attacker would
    search its own /48 for a /64 with a customer server's slot): filling its cap must leave
    the other address its own. The slots are keyed with a secret of each table."""
    counts = ConnectionCounts(key=bytes(range(16)))
    for _ in range(3):
        assert counts.acquire("127.0.154.138", 3) is not None
    assert counts.acquire("127.0.0.5", 3) is not None
    addresses = [f"198.51.100.{n}" for n in range(40)]
    one, other = ConnectionCounts(), ConnectionCounts()
    assert [one.slot(a) for a in addresses] != [other.slot(a) for a in addresses]


def test_an_ipv6_64_is_one_client_and_a_mapped_ipv4_address_is_the_ipv4_client():
    counts = ConnectionCounts()
    for host in (":1", ":2", "ffff:ffff:ffff:fff0"):  # one subscriber's /64, any addresses
        assert counts.acquire(f"2001:db8:0:7:{host}", 3) is not None
    assert counts.acquire("2001:db8:0:7::abcd", 3) is None
    assert counts.acquire("2001:db8:0:8::1", 3) is not None  # the next /64 is someone else
    assert client_key("::ffff:192.0.2.9") == client_key("192.0.2.9") != client_key("192.0.2.10")
    counts.acquire("192.0.2.9", 2)
    counts.acquire("::ffff:192.0.2.9", 2)
    assert counts.acquire("192.0.2.9", 2) is None


_PROTO = build(1)[1][0]
