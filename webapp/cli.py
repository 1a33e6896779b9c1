"""``flask --app webapp create-admin EMAIL --password PW [--domain DOMAIN [--create-domain]]``,
``create-domain NAME`` and ``create-user DOMAIN (--ip RANGE | --username NAME |
--domain-login) [--password PW] [--confirm-overlap]``."""

import click
from email_validator import EmailNotValidError, validate_email
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy import select

from outgoing import audit
from outgoing.changes import announce_config_change
from outgoing.models import KIND_DOMAIN, KIND_IP, KIND_USER, Admin, Domain
from outgoing.passwords import hash_password, weakness
from outgoing.users import (
    Authority,
    UserError,
    confirmed_overlaps,
    create_outgoing_user,
    get_or_create_domain,
    normalise_domain,
)
from webapp.extensions import db


def admin_email(text: str) -> str:
    """A valid address, lower-cased as logins compare. ``@localhost`` is allowed (the first
    admin of a local install, which dev.py creates) though it is a special-use name."""
    text = (text or "").strip()
    local, at, host = text.rpartition("@")
    local_only = bool(at) and host.lower() == "localhost"
    try:
        checked = validate_email(f"{local}@example.com" if local_only else text,
                                 check_deliverability=False)
    except EmailNotValidError as exc:
        raise click.BadParameter(f"not a valid email address: {exc}",
                                 param_hint="EMAIL") from None
    return (f"{checked.local_part}@localhost" if local_only else checked.normalized).lower()


def _admin_domain(name: str, create: bool) -> Domain:
    """The domain of a new domain admin: an existing one, unless ``create`` (a typo must
    not leave a stray domain behind)."""
    try:
        if create:
            return get_or_create_domain(db.session, name)
        domain = db.session.scalar(select(Domain).where(Domain.name == normalise_domain(name)))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--domain") from None
    if domain is None:
        raise click.BadParameter(
            f"there is no domain {name.strip()!r}; check the spelling, or add it with "
            "create-domain or --create-domain", param_hint="--domain")
    return domain


@click.command("create-admin")
@click.argument("email")
@click.option("--password", required=True,
              help="The admin's password: at least 10 characters, mixing letters, digits "
                   "or symbols.")
@click.option("--domain", default=None, help="Make a domain admin of this existing domain.")
@click.option("--create-domain", is_flag=True, help="Add the --domain first if it is new.")
@with_appcontext
def create_admin(email: str, password: str, domain: str | None, create_domain: bool) -> None:
    """Create (or reset the password of) a super admin, or a domain admin with --domain.

    As strict as the panel: a valid address and a password the panel would accept."""
    email = admin_email(email)
    problem = weakness(password)
    if problem:
        raise click.BadParameter(problem, param_hint="--password")
    if create_domain and not domain:
        raise click.UsageError("--create-domain needs --domain")
    dom = _admin_domain(domain, create_domain) if domain else None
    admin = db.session.scalar(select(Admin).where(Admin.email == email))
    if admin is None:
        admin = Admin(email=email)
        db.session.add(admin)
    else:
        admin.end_sessions()  # a reset password ends the sessions of the old one
    admin.password_hash = hash_password(password)
    admin.domain_id = dom.id if dom else None
    db.session.commit()
    scope = f"domain admin of {dom.name}" if dom else "super admin"
    click.echo(f"{email}: {scope}")


@click.command("create-domain")
@click.argument("name")
@with_appcontext
def create_domain(name: str) -> None:
    """Add a domain (idempotent)."""
    try:
        domain = get_or_create_domain(db.session, name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    db.session.commit()
    click.echo(domain.name)


@click.command("create-user")
@click.argument("domain")
@click.option("--ip", "ip_range", default=None, help="Add an Authenticating IP or Range.")
@click.option("--username", default=None, help="Add an Authenticating User.")
@click.option("--domain-login", is_flag=True, help="Add the Authenticating Domain.")
@click.option("--password", default=None, help="The SMTP AUTH password (user, domain).")
@click.option("--confirm-overlap", is_flag=True,
              help="Add a range although it overlaps another domain's (audited).")
@with_appcontext
def create_user(domain: str, ip_range: str | None, username: str | None, domain_login: bool,
                password: str | None, confirm_overlap: bool) -> None:
    """Add an outgoing user with the default settings, under the same rules as the panel's
    super admin (no whole address space; overlaps with another domain only confirmed)."""
    chosen = [(KIND_IP, ip_range), (KIND_USER, username), (KIND_DOMAIN, domain_login)]
    chosen = [(kind, value) for kind, value in chosen if value]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --ip, --username, --domain-login")
    kind, value = chosen[0]
    try:
        dom = get_or_create_domain(db.session, domain)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="DOMAIN") from None
    try:
        user = create_outgoing_user(db.session, domain=dom, kind=kind,
                                    name=dom.name if kind == KIND_DOMAIN else value,
                                    password=password,
                                    authority=Authority(confirm_overlap=confirm_overlap))
    except UserError as exc:
        db.session.rollback()
        hint = " (add --confirm-overlap to go ahead)" if exc.needs_confirm else ""
        raise click.ClickException(f"{exc}{hint}") from None
    audit.record(db.session, actor="cli", action="create", target_type="user",
                 target_id=user.id, domain_id=dom.id, name=user.name, kind=user.kind,
                 after={"name": user.name, "kind": user.kind_label, "domain": dom.name},
                 **confirmed_overlaps(db.session, user))
    db.session.commit()
    try:  # the proxies pick the new user up at once (else within their periodic reload)
        announce_config_change(current_app.extensions["og_redis"])
    except Exception as exc:
        click.echo(f"note: could not tell the proxies ({exc}); they reload within a minute")
    click.echo(f"{user.kind_label} {user.name} in {dom.name}")


def init_app(app) -> None:
    app.cli.add_command(create_admin)
    app.cli.add_command(create_domain)
    app.cli.add_command(create_user)
