"""The "lock template": the mail a sender receives when their outgoing mail is locked.

Templates are edited by panel users, so they are untrusted. They are rendered in Jinja2's
SandboxedEnvironment with StrictUndefined, and before that their syntax tree is checked against
a small allow-list: placeholders, text, ``{% if %}``, comparisons, ``~``/``+``/``-`` and a few
string filters. Loops, attribute access, calls and the multiplying operators are refused, which
rules out both sandbox escapes (``user.__class__``) and templates that eat CPU or memory.

``validate_template`` is for save time: it renders against SAMPLE_CONTEXT and returns a message
for the form. ``render_lock_template`` is for send time: it never raises; on any problem it
renders the default template instead and reports the problem in ``error``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, nodes
from jinja2.sandbox import SandboxedEnvironment

PLACEHOLDERS: dict[str, str] = {
    "user": "The outgoing user that was locked (IP or range, username or domain).",
    "identity": "The sender identity that was locked; empty when the whole user was locked.",
    "reason": "Why sending was locked, e.g. how many messages were classified as spam.",
    "lock_time": "When the lock started (UTC).",
    "unlock_time": "When sending resumes automatically (UTC); empty if only an admin can unlock.",
    "domain": "The domain the outgoing user sends for.",
    "automatic_unlocks_used": "How many times this lock has already been lifted automatically.",
    "max_unlocks": "The most automatic unlocks allowed before an admin has to unlock.",
}

DEFAULT_SUBJECT = "Outgoing mail from {{ identity if identity else user }} is paused"

DEFAULT_BODY = """\
Hello,

We have paused outgoing mail from {{ identity if identity else user }}\
{% if domain %} ({{ domain }}){% endif %} since {{ lock_time }}.

Why: {{ reason }}

While the pause lasts, our mail server refuses new messages from this sender, so they are
not delivered. Nothing you sent before the pause is affected.

{% if unlock_time %}
Sending resumes automatically at {{ unlock_time }}.
{% else %}
Sending stays paused until an administrator lifts the pause.
{% endif %}

What to do now:
- Look through your recently sent mail for messages you did not write.
- If someone else may know your mail password, change it.
- Check the computers, phones and websites that send mail as you for malware.
- If you think the pause is a mistake, contact your mail administrator and quote the reason
  above.

This message was sent automatically; replies to it are not read.
"""

SAMPLE_CONTEXT: dict[str, object] = {
    "user": "shop.example.com",
    "identity": "newsletter@shop.example.com",
    "reason": "5 messages classified as spam within 10 minutes",
    "lock_time": datetime(2025, 3, 4, 9, 15, tzinfo=UTC),
    "unlock_time": datetime(2025, 3, 4, 10, 15, tzinfo=UTC),
    "domain": "shop.example.com",
    "automatic_unlocks_used": 1,
    "max_unlocks": 3,
}

MAX_SUBJECT_SOURCE = 1_000
MAX_BODY_SOURCE = 20_000
MAX_SUBJECT_LENGTH = 250
MAX_BODY_LENGTH = 50_000

_ALLOWED_FILTERS = frozenset(
    {"upper", "lower", "title", "capitalize", "trim", "default", "d", "truncate"}
)
_ALLOWED_TESTS = frozenset({"defined", "undefined", "none", "number", "string"})
_ALLOWED_NODES = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.Const, nodes.If,
    nodes.Compare, nodes.Operand, nodes.And, nodes.Or, nodes.Not, nodes.CondExpr,
    nodes.Concat, nodes.Add, nodes.Sub, nodes.Keyword,
)
_REFUSED_NAMES = {
    nodes.For: "loops ({% for %})",
    nodes.Getattr: "attribute access (a.b)",
    nodes.Getitem: "item access (a[b])",
    nodes.Call: "function calls",
    nodes.Assign: "{% set %}",
    nodes.AssignBlock: "{% set %}",
    nodes.Macro: "macros",
    nodes.CallBlock: "{% call %}",
    nodes.Include: "{% include %}",
    nodes.Import: "{% import %}",
    nodes.FromImport: "{% import %}",
    nodes.Extends: "{% extends %}",
    nodes.Block: "{% block %}",
    nodes.Mul: "the * operator",
    nodes.Pow: "the ** operator",
    nodes.Div: "the / operator",
    nodes.FloorDiv: "the // operator",
    nodes.Mod: "the % operator",
}

_env = SandboxedEnvironment(
    undefined=StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


class TemplateProblem(Exception):
    """A lock template that cannot be used; the message is meant for the person editing it."""


@dataclass(frozen=True)
class RenderedTemplate:
    """Text to send. ``used_default`` is true when the default text replaced the subject or
    body (blank or broken template); ``error`` says what was wrong with a broken one."""

    subject: str
    body: str
    used_default: bool
    error: str | None


def validate_template(subject: str | None, body: str | None) -> str | None:
    """Return a message describing what is wrong, or None if the template can be saved.

    A blank subject or body is valid and means "use the default".
    """
    context = _prepare_context(SAMPLE_CONTEXT)
    for label, source, max_source, max_output, clean in (
        ("Subject", subject, MAX_SUBJECT_SOURCE, MAX_SUBJECT_LENGTH, _one_line),
        ("Body", body, MAX_BODY_SOURCE, MAX_BODY_LENGTH, _no_change),
    ):
        if _is_blank(source):
            continue
        try:
            _render(source, context, max_source, max_output, clean)
        except TemplateProblem as exc:
            return f"{label}: {exc}"
    return None


def render_lock_template(
    subject: str | None, body: str | None, context: dict
) -> RenderedTemplate:
    """Render the user's template for ``context``; never raises.

    ``context`` holds the PLACEHOLDERS (missing ones and None render as empty text;
    datetimes render as UTC). On any problem both parts come from the defaults and ``error``
    says why, for the caller to log or show. The body uses "\\n" line endings.
    """
    ctx = _prepare_context(context)
    error = None
    rendered_subject = rendered_body = None
    try:
        part = "subject"
        if not _is_blank(subject):
            rendered_subject = _render(
                subject, ctx, MAX_SUBJECT_SOURCE, MAX_SUBJECT_LENGTH, _one_line
            )
        part = "body"
        if not _is_blank(body):
            rendered_body = _render(body, ctx, MAX_BODY_SOURCE, MAX_BODY_LENGTH, _no_change)
    except TemplateProblem as exc:
        error = f"lock template {part}: {exc}"
        rendered_subject = rendered_body = None
    used_default = rendered_subject is None or rendered_body is None
    if rendered_subject is None:
        rendered_subject = _render_default(DEFAULT_SUBJECT, ctx, MAX_SUBJECT_LENGTH, _one_line)
    if rendered_body is None:
        rendered_body = _render_default(DEFAULT_BODY, ctx, MAX_BODY_LENGTH, _no_change)
    return RenderedTemplate(rendered_subject, rendered_body, used_default, error)


def _render(
    source: str, context: dict, max_source: int, max_output: int, clean
) -> str:
    if len(source) > max_source:
        raise TemplateProblem(f"the template is longer than {max_source} characters")
    template = _compile(source)
    try:
        text = clean(template.render(context))
    except Exception as exc:
        # SecurityError and UndefinedError, but also e.g. TypeError from "user - 1": a user's
        # template must never break sending.
        raise TemplateProblem(f"cannot be rendered: {exc}") from exc
    if len(text) > max_output:
        raise TemplateProblem(f"the result is longer than {max_output} characters")
    return text


def _render_default(source: str, context: dict, max_output: int, clean) -> str:
    """The defaults only use allowed syntax and every placeholder is present, so this
    renders; over-long placeholder values are cut rather than refused."""
    text = clean(_compile(source).render(context))
    return text if len(text) <= max_output else text[: max_output - 1] + "…"


@functools.lru_cache(maxsize=256)
def _compile(source: str):
    """Jinja's parser, ``_check_tree`` and Python's compiler of the generated code recurse or
    count once per level of nesting: a few hundred brackets or ``{% if %}`` blocks inside
    each other raise RecursionError or SyntaxError, and the lexer's int() a ValueError for a
    number over 4,300 digits. None of these is a TemplateSyntaxError."""
    try:
        tree = _env.parse(source)
        _check_tree(tree)
        return _env.from_string(tree)
    except TemplateSyntaxError as exc:
        raise TemplateProblem(f"syntax error on line {exc.lineno}: {exc.message}") from exc
    except TemplateError as exc:
        raise TemplateProblem(f"cannot be compiled: {exc}") from exc
    except (RecursionError, SyntaxError) as exc:
        raise TemplateProblem("brackets, {% if %} blocks or operators are nested too "
                              "deeply") from exc
    except ValueError as exc:
        raise TemplateProblem("a number has too many digits") from exc


def _check_tree(node: nodes.Node) -> None:
    """Refuse anything outside the allow-list, naming the first offending construct."""
    where = f" (line {node.lineno})" if getattr(node, "lineno", None) else ""
    if isinstance(node, nodes.Name):
        if node.ctx != "load":
            raise TemplateProblem(f"assigning to {node.name!r} is not allowed{where}")
        if node.name not in PLACEHOLDERS:
            available = ", ".join(PLACEHOLDERS)
            raise TemplateProblem(
                f"unknown placeholder {{{{ {node.name} }}}}{where}; available: {available}"
            )
    elif isinstance(node, nodes.Filter):
        if node.name not in _ALLOWED_FILTERS:
            allowed = ", ".join(sorted(_ALLOWED_FILTERS))
            raise TemplateProblem(
                f"the filter {node.name!r} is not available{where}; available: {allowed}"
            )
    elif isinstance(node, nodes.Test):
        if node.name not in _ALLOWED_TESTS:
            raise TemplateProblem(f"the test {node.name!r} is not available{where}")
    elif not isinstance(node, _ALLOWED_NODES):
        what = _REFUSED_NAMES.get(type(node), f"'{type(node).__name__}'")
        raise TemplateProblem(f"{what} cannot be used in lock templates{where}")
    for child in node.iter_child_nodes():
        _check_tree(child)


def _prepare_context(context: dict) -> dict:
    """Exactly the documented placeholders, as text or numbers the sandbox can handle."""
    prepared = {}
    for name in PLACEHOLDERS:
        value = context.get(name)
        if value is None:
            value = ""
        elif isinstance(value, datetime):
            if value.tzinfo is not None:
                value = value.astimezone(UTC)
            value = value.strftime("%Y-%m-%d %H:%M UTC")
        elif isinstance(value, bool) or not isinstance(value, int | float | str):
            value = str(value)
        prepared[name] = value
    return prepared


def _one_line(text: str) -> str:
    """Subjects become one line: a CR or LF in a header would start a new header."""
    return " ".join(" ".join(text.splitlines()).split())


def _no_change(text: str) -> str:
    return text


def _is_blank(source: str | None) -> bool:
    return source is None or not source.strip()
