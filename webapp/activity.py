"""A sender's activity charts and its "Why?" panel, for outgoing users and identities.

Both are HTMX partials: the settings page (and an identity's page) load the charts when they
open and the charts refresh themselves every minute; "Why?" swaps the panel in. Without
script each URL is a page of its own. Scoped like everything: another domain's user or
identity is a 404.
"""

from __future__ import annotations

import time

from flask import Blueprint, abort, current_app, render_template, request, url_for
from flask_login import login_required

from outgoing import activity, explain
from outgoing.models import Identity, OutgoingUser
from scoring.activity import SPANS, message_ceiling, recipient_ceiling, totals
from webapp import charts, scope
from webapp.extensions import db, htmx
from webapp.services import redis_client

bp = Blueprint("activity", __name__, url_prefix="/outgoing")

COLORS = {"messages": "#1559b7", "recipients": "#8db8ec", "spam": "#b42318",
          "refusals": "#d08700", "message_limit": "#0f2a47", "recipient_limit": "#5b6b82"}
REFRESH = "every 60s"


def _span():
    span = SPANS.get(request.args.get("span", "hour"))
    if span is None:
        abort(404)
    return span


def chart_context(user: OutgoingUser, identity: Identity | None, span) -> dict:
    """The two charts of one span: volume with the limits drawn, and spam with refusals."""
    found = activity.buckets(db.session, user_id=user.id, span=span, now=time.time(),
                             identity=identity.value if identity is not None else None,
                             domain_id=scope.domain_id())
    starts = [b.start for b in found]
    prefix = f"identity-{identity.id}" if identity is not None else f"user-{user.id}"
    lines = []
    ceiling = message_ceiling(user.limits, span)
    if ceiling is not None:
        lines.append(charts.Line(ceiling.label, ceiling.value, COLORS["message_limit"]))
    ceiling = recipient_ceiling(user.maximum_recipients_per_day, span)
    if ceiling is not None:
        lines.append(charts.Line(ceiling.label, ceiling.value, COLORS["recipient_limit"]))

    def series(name: str, label: str) -> charts.Series:
        return charts.Series(name, label, COLORS[name], [b.value(name) for b in found])

    every = f"per {span.name}, last {span.count} {span.name}s"
    volume = charts.bar_chart(
        chart_id=f"{prefix}-volume-{span.name}", title=f"Messages and recipients {every}",
        unit=f"messages / recipients per {span.name}", starts=starts,
        bucket_seconds=span.seconds, lines=lines,
        series=[series("messages", "Messages"), series("recipients", "Recipients")])
    trouble = charts.bar_chart(
        chart_id=f"{prefix}-trouble-{span.name}", title=f"Spam and refusals {every}",
        unit=f"per {span.name}", starts=starts, bucket_seconds=span.seconds,
        series=[series("spam", "Spam"), series("refusals", "Refusals")])
    if identity is not None:
        url = url_for("activity.identity_charts", identity_id=identity.id)
    else:
        url = url_for("activity.user_charts", user_id=user.id)
    return dict(span=span, spans=SPANS, volume=volume, trouble=trouble, url=url,
                totals=totals(found), refresh=REFRESH, user=user, identity=identity)


def _charts(user: OutgoingUser, identity: Identity | None):
    context = chart_context(user, identity, _span())
    if htmx:
        return render_template("_partials/activity_charts.html", **context)
    return render_template("activity/charts.html", title="Activity", **context)


def _why(target: OutgoingUser | Identity):
    found = explain.explain(db.session, redis_client(), target, now=time.time(),
                            config=current_app.config)
    if htmx:
        return render_template("_partials/why.html", e=found)
    return render_template("activity/why.html", e=found, title="Why?")


@bp.get("/users/<int:user_id>/charts")
@login_required
def user_charts(user_id: int):
    return _charts(scope.outgoing_user_or_404(user_id), None)


@bp.get("/users/<int:user_id>/why")
@login_required
def user_why(user_id: int):
    return _why(scope.outgoing_user_or_404(user_id))


@bp.get("/identities/<int:identity_id>")
@login_required
def identity(identity_id: int):
    """An identity's page: its charts and its Why? (the list has one row per identity)."""
    found = scope.identity_or_404(identity_id)
    return render_template("activity/identity.html", identity=found, user=found.user,
                           title=f"Identity {found.value}")


@bp.get("/identities/<int:identity_id>/charts")
@login_required
def identity_charts(identity_id: int):
    found = scope.identity_or_404(identity_id)
    return _charts(found.user, found)


@bp.get("/identities/<int:identity_id>/why")
@login_required
def identity_why(identity_id: int):
    return _why(scope.identity_or_404(identity_id))
