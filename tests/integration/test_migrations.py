"""The migrations: they build the schema the models describe, and 0002 fills in the domain of
identities that existed before it."""

from __future__ import annotations

import re
from datetime import UTC, datetime

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


def test_0008_spells_identity_domains_in_a_labels_and_keeps_every_lock(tmp_path, monkeypatch):
    """A Unicode domain's identities are renamed to the spelling the proxy now uses; one user
    holding both spellings keeps one row, with the counts of both and the lock of either."""
    with fresh_database(tmp_path) as url:
        migrate(url, tmp_path, "0007", monkeypatch)
        engine = sa.create_engine(url)
        old = sa.MetaData()
        old.reflect(engine)
        identities = old.tables["identities"]
        early, late = datetime(2026, 11, 1), datetime(2026, 11, 20)
        with engine.begin() as conn:
            domain = insert(conn, old.tables["domains"], name="a.example")
            user = insert(conn, old.tables["outgoing_users"], domain_id=domain, kind="ip",
                          name="192.0.2.1")
            other = insert(conn, old.tables["outgoing_users"], domain_id=domain, kind="ip",
                           name="192.0.2.2")
            insert(conn, identities, user_id=user, domain_id=domain,
                   value="spam@bücher.example", locked=True, lock_kind="manual",
                   lock_id="L1", message_count=3, spam_count=2, first_seen=early,
                   last_seen=early)
            insert(conn, identities, user_id=user, domain_id=domain,
                   value="spam@xn--bcher-kva.example", message_count=4, spam_count=0,
                   first_seen=late, last_seen=late)
            insert(conn, identities, user_id=other, domain_id=domain,
                   value="eve@ｂücher.example", message_count=1)
            for value in ("cust-42", "plain@a.example", "x@a..ü"):
                insert(conn, identities, user_id=other, domain_id=domain, value=value)
            for table in ("held_messages", "quarantined_messages"):
                insert(conn, old.tables[table], user_id=user, domain_id=domain,
                       identity="spam@bücher.example")
        engine.dispose()

        migrate(url, tmp_path, "head", monkeypatch)
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT user_id, value, locked, lock_id, message_count, spam_count, "
                "first_seen, last_seen FROM identities ORDER BY user_id, value")).all()
            # The automatic release skips a locked identity's held mail by this spelling.
            held = [conn.execute(sa.text(f"SELECT identity FROM {table}")).scalar_one()
                    for table in ("held_messages", "quarantined_messages")]
        engine.dispose()
        assert held == ["spam@xn--bcher-kva.example"] * 2
        merged = [r for r in rows if r[0] == user]
        assert len(merged) == 1
        assert merged[0][1:6] == ("spam@xn--bcher-kva.example", True, "L1", 7, 2)
        assert str(merged[0][6]).startswith("2026-11-01")
        assert str(merged[0][7]).startswith("2026-11-20")
        assert sorted(r[1] for r in rows if r[0] == other) == [
            "cust-42", "eve@xn--bcher-kva.example", "plain@a.example", "x@a..ü"]


def test_0009_takes_the_addresses_set_before_it_as_confirmed(tmp_path, monkeypatch):
    """An upgrade must not silently stop the notices an operator relies on: every abuse report
    address, contact email and address username set before 0009 counts as confirmed for its
    domain (spelled as the code compares them), and only for its domain."""
    with fresh_database(tmp_path) as url:
        migrate(url, tmp_path, "0008", monkeypatch)
        engine = sa.create_engine(url)
        old = sa.MetaData()
        old.reflect(engine)
        with engine.begin() as conn:
            one = insert(conn, old.tables["domains"], name="one.example",
                         abuse_report_address=" NOC@Provider.Example ")
            two = insert(conn, old.tables["domains"], name="two.example",
                         abuse_report_address=None)
            insert(conn, old.tables["outgoing_users"], domain_id=two, kind="ip",
                   name="192.0.2.0/24", contact_email="ops@bücher.example")
            insert(conn, old.tables["outgoing_users"], domain_id=two, kind="user",
                   name="bob@two.example", contact_email=None)
        engine.dispose()

        migrate(url, tmp_path, "head", monkeypatch)
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT domain_id, address FROM confirmed_addresses"))
            assert sorted(rows) == sorted([(one, "noc@provider.example"),
                                           (two, "ops@xn--bcher-kva.example"),
                                           (two, "bob@two.example")])
        engine.dispose()


ID_TABLES = ("domains", "admins", "lock_templates", "outgoing_users", "identification_headers",
             "identities", "dkim_keys", "quarantined_messages", "held_messages",
             "archived_messages", "audit_events", "confirmed_addresses", "message_log")


def insert_unique(conn, table: sa.Table, serial: list[int], **values) -> int:
    """Like ``insert``, with every required text column different from any row before, so
    unique constraints (names, emails, stream ids) hold."""
    serial[0] += 1
    for column in table.columns:
        if (column.name not in values and not column.nullable and not column.primary_key
                and column.type.python_type is str):
            values[column.name] = f"v{serial[0]}"
    return insert(conn, table, **values)


def assert_ids_never_given_twice(engine) -> None:
    """In every table whose ids leave their rows: the id of a deleted highest row is not
    given to the next row."""
    tables = sa.MetaData()
    tables.reflect(engine)
    with engine.connect() as conn:  # text unlike any row before this call's
        serial = [1000 * (1 + conn.execute(sa.text("SELECT count(*) FROM domains")).scalar())]
    with engine.begin() as conn:
        domain = insert_unique(conn, tables.tables["domains"], serial)
        user = insert_unique(conn, tables.tables["outgoing_users"], serial, domain_id=domain,
                             kind="user")
    for name in ID_TABLES:
        table = tables.tables[name]
        owners = {key: value for key, value in (("domain_id", domain), ("user_id", user))
                  if key in table.c}
        if name == "message_log":  # on PostgreSQL, a day the migration made a partition for
            owners["at"] = datetime.now(UTC).replace(tzinfo=None)
        with engine.begin() as conn:
            insert_unique(conn, table, serial, **owners)
            highest = insert_unique(conn, table, serial, **owners)
            conn.execute(table.delete().where(table.c.id == highest))
            following = insert_unique(conn, table, serial, **owners)
        assert following > highest, f"{name} gave id {highest} again"


def row_counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {name: conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar()
                for name in ID_TABLES}


def test_0010_sqlite_never_gives_an_id_twice_and_keeps_every_row(tmp_path, monkeypatch):
    """A release job or an old link carrying the id of a deleted row must never reach another
    customer's row that got the id since. Rebuilding the tables on SQLite keeps every row,
    including those that refer to a rebuilt table (no cascade), and survives a downgrade."""
    with fresh_database(tmp_path) as url:
        migrate(url, tmp_path, "0009", monkeypatch)
        engine = sa.create_engine(url)
        old = sa.MetaData()
        old.reflect(engine)
        serial = [0]
        with engine.begin() as conn:
            domain = insert_unique(conn, old.tables["domains"], serial)
            user = insert_unique(conn, old.tables["outgoing_users"], serial, domain_id=domain,
                                 kind="user")
            insert_unique(conn, old.tables["identities"], serial, user_id=user,
                          domain_id=domain)
            message = insert_unique(conn, old.tables["quarantined_messages"], serial,
                                    user_id=user, domain_id=domain)
        engine.dispose()

        migrate(url, tmp_path, "head", monkeypatch)
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text(
                "SELECT id, user_id, domain_id FROM quarantined_messages")).all() == [
                (message, user, domain)]
            assert conn.execute(sa.text("SELECT count(*) FROM identities")).scalar() == 1
        assert_ids_never_given_twice(engine)
        before = row_counts(engine)
        engine.dispose()

        from flask_migrate import downgrade

        from webapp import create_app
        with create_app().app_context():
            downgrade(revision="0009")
        migrate(url, tmp_path, "head", monkeypatch)
        engine = sa.create_engine(url)
        assert row_counts(engine) == before
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert [d for d in diff if not _expected_extra(d)] == []
        assert_ids_never_given_twice(engine)
        engine.dispose()


def test_tables_created_from_the_models_never_give_an_id_twice(tmp_path):
    """The schema a tool builds from the models (``create_all``, as the benchmarks do) is
    the one the migrations build."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'models.db'}")
    Base.metadata.create_all(engine)
    assert_ids_never_given_twice(engine)
    engine.dispose()
