"""``flask --app webapp create-admin EMAIL --password PW [--domain DOMAIN]``."""

import click
from flask.cli import with_appcontext
from sqlalchemy import select

from outgoing.models import Admin
from outgoing.passwords import hash_password
from outgoing.users import get_or_create_domain
from webapp.extensions import db


@click.command("create-admin")
@click.argument("email")
@click.option("--password", required=True, help="The admin's password.")
@click.option("--domain", default=None, help="Make a domain admin of this domain.")
@with_appcontext
def create_admin(email: str, password: str, domain: str | None) -> None:
    """Create (or reset the password of) a super admin, or a domain admin with --domain."""
    email = email.strip().lower()
    if "@" not in email:
        raise click.BadParameter("expected an email address", param_hint="EMAIL")
    try:
        dom = get_or_create_domain(db.session, domain) if domain else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--domain") from None
    admin = db.session.scalar(select(Admin).where(Admin.email == email))
    if admin is None:
        admin = Admin(email=email)
        db.session.add(admin)
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


def init_app(app) -> None:
    app.cli.add_command(create_admin)
    app.cli.add_command(create_domain)
