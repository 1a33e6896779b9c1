"""The migrations: they build the schema the models describe, and 0002 fills in the domain of
identities that existed before it."""

from __future__ import annotations

import re
from datetime import datetime

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from outgoing.models import Base
from tests.conftest import fresh_database


def migrate(url: str, instance, revision: str, monkeypatch) -> None:
    from flask_migrate import upgrade

    from webapp import create_app

    monkeypatch.setenv("INSTANCE_PATH", str(instance))
    monkeypatch.setenv("DATABASE_URL", url)
    app = create_app()
    with app.app_context():
        upgrade(revision=revision)
        from webapp.extensions import db
        db.engine.dispose()


def insert(conn, table: sa.Table, **values) -> int:
    """A row with ``values`` and a plain value in every other required column."""
    for column in table.columns:
        if column.name in values or column.nullable or column.primary_key:
            continue
        kind = column.type.python_type
        values[column.name] = {bool: False, int: 0, str: "x", float: 0.0}.get(
            kind, datetime(2026, 11, 29))
    return conn.execute(table.insert().values(**values)).inserted_primary_key[0]


def _expected_extra(diff) -> bool:
    """Tables the models do not describe: Alembic's own, and the day partitions of the
    message log on PostgreSQL (with their copies of the parent's indexes)."""
    if diff[0] not in ("remove_table", "remove_index"):
        return False
    table = diff[1] if diff[0] == "remove_table" else diff[1].table
    return table.name == "alembic_version" or re.fullmatch(r"message_log_\d{8}", table.name)


def test_0002_gives_existing_identities_their_users_domain(tmp_path, monkeypatch):
    with fresh_database(tmp_path) as url:
        migrate(url, tmp_path, "0001", monkeypatch)
        engine = sa.create_engine(url)
        old = sa.MetaData()
        old.reflect(engine)
        with engine.begin() as conn:
            domains = [insert(conn, old.tables["domains"], name=f"d{n}.example")
                       for n in range(2)]
            users = [insert(conn, old.tables["outgoing_users"], domain_id=d, kind="user",
                            name=f"u@d{n}.example") for n, d in enumerate(domains)]
            for user in users:
                for value in ("a@x.example", "b@x.example"):
                    insert(conn, old.tables["identities"], user_id=user, value=value)
        engine.dispose()

        migrate(url, tmp_path, "head", monkeypatch)
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT user_id, domain_id FROM identities")).all()
            assert sorted(rows) == sorted([(users[0], domains[0])] * 2
                                          + [(users[1], domains[1])] * 2)
            # ... and the migrated schema is exactly what the models describe.
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert [d for d in diff if not _expected_extra(d)] == []
        engine.dispose()
