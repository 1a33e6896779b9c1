"""``decode_words`` returns a value without encoded words at once: what the e-mail package
would have given for it, and for every other value what the package gives."""

from email.header import decode_header, make_header

from hypothesis import example, given, settings
from hypothesis import strategies as st

from scoring.message import decode_words, parse_headers

_WORDS = st.sampled_from(["=?utf-8?q?caf=C3=A9?=", "=?UTF-8?B?w6lsw6h2ZQ==?=", "=?", "?=",
                          "=?bad?x?zz?=", "=?utf-8?q?", "=?iso-8859-1?q?=E9t=E9?=", " ", "\t",
                          "Réunion", "plain", "a=b", "?", "=", "\udcff"])
_VALUES = st.lists(st.one_of(_WORDS, st.text(max_size=12)), max_size=8).map("".join)


def _package(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except Exception:
        return value


@settings(max_examples=2000)
@given(_VALUES)
@example("=?utf-8?q?caf=C3=A9?= au lait")
@example("Subject with no words at all")
def test_decode_words_is_the_packages_decoding(value):
    assert decode_words(value) == _package(value)


def test_encoded_words_are_decoded_and_a_plain_value_is_itself():
    headers = parse_headers(b"Subject: =?utf-8?q?caf=C3=A9?=\r\nFrom: a@b.example\r\n\r\nbody")
    assert headers == [("Subject", "café"), ("From", "a@b.example")]
