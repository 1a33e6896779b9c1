"""Small helpers the templates share: field attributes for accessibility, and formatting."""

from __future__ import annotations

from datetime import UTC, datetime


def field_attrs(field, help_text: str | None = None, live: bool = False, **extra) -> dict:
    """Attributes of an input: its help and errors announced by screen readers (``live``:
    the errors sit in a message area that checks as-you-type replace)."""
    described = []
    if help_text:
        described.append(f"{field.id}-help")
    if live:
        described.append(f"{field.id}-msg")
    elif field.errors:
        described.append(f"{field.id}-error")
    if field.errors:
        extra["aria-invalid"] = "true"
    if described:
        extra["aria-describedby"] = " ".join(described)
    return extra


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else ""


def short_when(value: datetime | None, now: datetime | None = None) -> str:
    """A date that fits one narrow table cell ("29 Nov 23:11"); the year only when it is
    not this year. The full timestamp goes in the cell's title."""
    if value is None:
        return ""
    now = now or datetime.now(UTC)
    if value.year == now.year:
        return f"{value.day} {value.strftime('%b %H:%M')}"
    return f"{value.day} {value.strftime('%b %Y')}"


def full_when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def when_epoch(seconds: float | None) -> str:
    return when(datetime.fromtimestamp(seconds, UTC)) if seconds else ""


def duration(seconds: float | None) -> str:
    """'in 3 h 12 min' style text for a number of seconds from now."""
    if seconds is None:
        return ""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        value = round(value)
    return f"{value:,}"


def init_app(app) -> None:
    app.jinja_env.globals["field_attrs"] = field_attrs
    app.jinja_env.filters["when"] = when
    app.jinja_env.filters["when_epoch"] = when_epoch
    app.jinja_env.filters["short_when"] = short_when
    app.jinja_env.filters["full_when"] = full_when
    app.jinja_env.filters["duration"] = duration
    app.jinja_env.filters["number"] = number
