"""Which messages the proxy checks and signs on its event loop: small ones with few MIME
parts. A crafted 64 KB message of empty parts costs the checks 80-96 ms, so it goes to a
thread, where it cannot hold up every other session of the process for that long."""

from __future__ import annotations

from bench.bench_content import fifty_kb_message
from proxy.content import INLINE_CHECK_BYTES, on_the_loop

HEAD = b"From: a@x.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"


def test_an_ordinary_message_with_an_attachment_stays_on_the_loop():
    assert on_the_loop(fifty_kb_message())
    assert on_the_loop(b"From: a@x.test\r\n\r\n" + b"-- \r\nsignature\r\n")


def test_a_big_message_goes_to_a_thread():
    assert not on_the_loop(b"From: a@x.test\r\n\r\n" + b"x" * INLINE_CHECK_BYTES)


def test_a_small_message_of_many_parts_goes_to_a_thread():
    assert not on_the_loop(HEAD + b"--b\r\n\r\nx\r\n" * 2000)
    assert not on_the_loop(HEAD + b"--b\r\nx\r\n" * 100)
