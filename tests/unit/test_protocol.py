"""The per-connection SMTP object: built from a template, and its fast address parsing,
must behave exactly as aiosmtpd's own."""

import asyncio

from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol import LimitedSMTP, protocol_factory


class Handler:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

    async def auth_CUSTOM(self, server, args):  # a handler-provided AUTH mechanism
        return None


def build(count: int) -> tuple[LimitedSMTP, list[LimitedSMTP]]:
    async def make():
        options = dict(hostname="proxy.test", auth_require_tls=False,
                       command_call_limit={"NOOP": 5, "*": 100})
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


PATHS = [
    "<a@b.example>", "<a@b.example> SIZE=100 BODY=8BITMIME", "  <a.b+c@d-e.example>  ",
    "<A@B.C>x", "<>", "<a..b@c.example>", "<\"quoted local\"@b.example>", "<a@b.example> (c)",
    "<@route:a@b.example>", "a@b.example SIZE=1", "<a@[127.0.0.1]>", "<ü@b.example>",
    "<a@b.example", "<a@b.example>>", "<a @b.example>", "", " ", "<a@b.example>\t\tX=1  ",
]


def aiosmtpd_getaddr(proto, path):
    try:
        return SMTP._getaddr(proto, path)
    except Exception:  # the stdlib parser raises IndexError on "<": we answer 501 instead
        return None, None


def test_plain_paths_parse_exactly_as_aiosmtpd_parses_them():
    proto = _PROTO
    for path in PATHS:
        assert proto._getaddr(path) == aiosmtpd_getaddr(proto, path), path
    assert proto._getaddr("<a@b.example> SIZE=1") == ("a@b.example", "SIZE=1")
    assert proto._getaddr("<") == (None, None)


@given(st.text(alphabet="ab.@<>()\" \t=-_+!#é:[]", max_size=30))
def test_any_path_parses_exactly_as_aiosmtpd_parses_it(path):
    assert _PROTO._getaddr(path) == aiosmtpd_getaddr(_PROTO, path)


_PROTO = build(1)[1][0]
