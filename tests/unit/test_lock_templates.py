"""Lock templates are edited by panel users: refuse bad ones on save, survive them on send."""

from datetime import UTC, datetime

import pytest

from outgoing.lock_templates import (
    DEFAULT_BODY,
    DEFAULT_SUBJECT,
    PLACEHOLDERS,
    SAMPLE_CONTEXT,
    render_lock_template,
    validate_template,
)

CONTEXT = {
    "user": "shop.example.com",
    "identity": "news@shop.example.com",
    "reason": "5 spam messages in 10 minutes",
    "lock_time": datetime(2025, 3, 4, 9, 15, tzinfo=UTC),
    "unlock_time": None,
    "domain": "shop.example.com",
    "automatic_unlocks_used": 2,
    "max_unlocks": 3,
}


def test_every_placeholder_renders_its_value():
    body = " | ".join(f"{{{{ {name} }}}}" for name in PLACEHOLDERS)

    rendered = render_lock_template("Locked: {{ identity }}", body, CONTEXT)

    assert rendered.error is None and not rendered.used_default
    assert rendered.subject == "Locked: news@shop.example.com"
    assert rendered.body == (
        "shop.example.com | news@shop.example.com | 5 spam messages in 10 minutes | "
        "2025-03-04 09:15 UTC |  | shop.example.com | 2 | 3"
    )


def test_conditionals_and_filters_are_available():
    body = "{% if unlock_time %}until {{ unlock_time }}{% else %}ask {{ domain|upper }}{% endif %}"

    assert render_lock_template("s", body, CONTEXT).body == "ask SHOP.EXAMPLE.COM"


def test_default_template_passes_validation_and_mentions_reason():
    assert validate_template(DEFAULT_SUBJECT, DEFAULT_BODY) is None

    rendered = render_lock_template(None, None, CONTEXT)

    assert rendered.used_default and rendered.error is None
    assert "5 spam messages in 10 minutes" in rendered.body
    assert "news@shop.example.com" in rendered.subject


def test_valid_custom_template_passes_validation():
    assert validate_template("Paused: {{ user }}", "Because {{ reason }}.\n") is None


@pytest.mark.parametrize(
    ("subject", "body", "expected"),
    [
        ("{{ user", "ok", "syntax error"),
        ("ok", "{% if user %}no end", "syntax error"),
        ("ok", "Hello {{ customer }}", "unknown placeholder {{ customer }}"),
        ("{{ user.__class__ }}", "ok", "attribute access"),
        ("ok", "{{ user.__class__.__mro__[1].__subclasses__() }}", "cannot be used"),
        ("ok", "{{ user['__class__'] }}", "item access"),
        ("ok", "{{ user|attr('__class__') }}", "filter 'attr' is not available"),
        ("ok", "{{ range(10) }}", "function calls"),
        ("ok", "{% for x in reason %}{{ x }}{% endfor %}", "loops"),
        ("ok", "{{ reason * 100000 }}", "the * operator"),
        ("ok", "{{ user - 1 }}", "cannot be rendered"),
    ],
)
def test_broken_or_unsafe_template_is_refused_with_a_reason(subject, body, expected):
    error = validate_template(subject, body)

    assert error is not None
    assert expected in error
    assert error.startswith("Subject:" if subject != "ok" else "Body:")


def test_template_whose_output_is_too_long_is_refused():
    long_text = "x" * 300

    assert "longer than" in validate_template(long_text, "ok")


def test_sample_context_covers_every_placeholder():
    assert set(SAMPLE_CONTEXT) == set(PLACEHOLDERS)


def test_broken_template_falls_back_to_default_at_send_time():
    rendered = render_lock_template("Hi {{ user }}", "{{ user.__class__ }}", CONTEXT)

    default = render_lock_template(None, None, CONTEXT)
    assert rendered.used_default
    assert "body" in rendered.error
    assert (rendered.subject, rendered.body) == (default.subject, default.body)


def test_value_that_breaks_a_template_falls_back_instead_of_raising():
    rendered = render_lock_template("s", "{{ max_unlocks - automatic_unlocks_used }}",
                                    {**CONTEXT, "max_unlocks": None})

    assert rendered.used_default
    assert "cannot be rendered" in rendered.error


@pytest.mark.parametrize("body", ["{{ " + "(" * 400 + "user" + ")" * 400 + " }}",
                                  "{% if user %}" * 100 + "x" + "{% endif %}" * 100,
                                  "{{ " + "9" * 5000 + " }}"])
def test_a_template_jinja_cannot_compile_falls_back_instead_of_raising(body):
    rendered = render_lock_template("s", body, CONTEXT)

    assert rendered.used_default
    assert rendered.error.startswith("lock template body: ")


def test_line_breaks_are_removed_from_subject():
    rendered = render_lock_template(
        "Paused\r\nBcc: victim@example.org {{ identity }}", "ok",
        {**CONTEXT, "identity": "a@b.example\nX-Injected: yes"},
    )

    assert "\r" not in rendered.subject and "\n" not in rendered.subject
    assert rendered.subject == "Paused Bcc: victim@example.org a@b.example X-Injected: yes"
