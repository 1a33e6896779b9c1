"""Database access for the processes that are not Flask (the proxy and the worker)."""

from __future__ import annotations

import math
from contextlib import contextmanager

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

# How long a statement of the proxy may run, or its session sit idle in a transaction,
# before PostgreSQL ends it (a lock another process holds, a thread of ours stuck): longer
# than any SMTP reply waits (PROXY_DATABASE_TIMEOUT) and than loading the configuration.
PROXY_STATEMENT_MS = 30_000


def engine_options(url: str, timeout: float | None = None) -> dict:
    """Options shared with Flask-SQLAlchemy so every process talks to the DB the same way.
    ``timeout`` (the proxy's PROXY_DATABASE_TIMEOUT): bounds that bring a thread blocked on
    the database back by itself, since one waiting for an answer that never comes (a
    network black hole, a frozen server) neither returns nor raises."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 30 if timeout is None else timeout}}
    if timeout is None:
        return {"pool_pre_ping": True}
    return {"pool_pre_ping": True, "connect_args": {
        "connect_timeout": max(2, math.ceil(timeout)),  # libpq's minimum is 2 s
        "options": f"-c statement_timeout={PROXY_STATEMENT_MS} "
                   f"-c idle_in_transaction_session_timeout={PROXY_STATEMENT_MS}",
        # A peer gone silent: unacknowledged data, or an idle connection whose keepalives
        # go unanswered, ends the connection (and the call waiting on it) with an error.
        "tcp_user_timeout": PROXY_STATEMENT_MS, "keepalives": 1, "keepalives_idle": 10,
        "keepalives_interval": 5, "keepalives_count": 3}}


def _sqlite_pragmas(dbapi_connection, _record):
    # WAL lets the web, the proxy and the worker read while one of them writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def install_sqlite_pragmas(engine: Engine) -> None:
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)


def make_engine(url: str, timeout: float | None = None) -> Engine:
    engine = create_engine(url, **engine_options(url, timeout))
    install_sqlite_pragmas(engine)
    return engine


def make_sessionmaker(url: str, timeout: float | None = None) -> sessionmaker[Session]:
    return sessionmaker(make_engine(url, timeout), expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]):
    """One unit of work: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
