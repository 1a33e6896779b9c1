"""Shared fixtures: a real Redis, a real database (SQLite, or PostgreSQL when DATABASE_URL
points at one), the app built by the same factory as production, and real SMTP peers."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.support.services import Clock, InProcessProxy, Sink, TcpForwarder

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def pytest_configure(config):
    """Under pytest-xdist each worker is a test session of its own: its own database already
    (``database_url``), and here its own Redis database (REDIS_URL's, plus the worker's
    number), because every test empties Redis. Set in the environment, so that the proxies,
    workers and apps the tests start use it too."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    url = os.environ.get("REDIS_URL", "")
    if not worker.startswith("gw") or not url:
        return
    os.environ["REDIS_URL"] = worker_redis_url(url)


def worker_redis_url(url: str) -> str:
    """REDIS_URL with its database number moved up by the xdist worker's number (in the path,
    or in ``?db=`` for a unix socket, as the embedded Redis of ``dev.py test`` is)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    index = int(os.environ["PYTEST_XDIST_WORKER"][2:])
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = dict(parse_qsl(parts.query))
        query["db"] = str(int(query.get("db") or 0) + index)
        return f"unix://{parts.netloc}{parts.path}?{urlencode(query)}"
    base = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{base + index}"))


def pytest_collection_modifyitems(items):
    """Fast feedback first: unit, then integration, then end-to-end."""
    order = {"unit": 0, "integration": 1, "e2e": 2}
    items.sort(key=lambda item: order.get(item.path.parent.name, 1))


def pytest_report_header(config):
    return [f"redis: {os.environ.get('REDIS_URL', '(unset)')}",
            f"database: {os.environ.get('DATABASE_URL', 'sqlite (per session)')}"]


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.fail("REDIS_URL is not set: run the tests with `python3 dev.py test`")
    return url


@pytest.fixture
def redis_client(redis_url):
    client = redis_lib.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@contextmanager
def fresh_database(folder):
    """A new, empty database: on the PostgreSQL server of DATABASE_URL when it names one
    (dropped afterwards), else a SQLite file in ``folder``."""
    base = os.environ.get("DATABASE_URL", "")
    if base.startswith(("postgresql", "postgres://")):
        base = base.replace("postgres://", "postgresql://", 1)
        url = make_url(base)
        name = f"og_test_{uuid.uuid4().hex[:10]}"
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    else:
        yield f"sqlite:///{folder / 'test.db'}"


@pytest.fixture(scope="session")
def database_url(tmp_path_factory):
    """A fresh database for this test session, dropped afterwards."""
    with fresh_database(tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture(scope="session")
def migrated(database_url, tmp_path_factory):
    """Run the real migrations once per session (the same path as `flask db upgrade`)."""
    from flask_migrate import upgrade

    instance = tmp_path_factory.mktemp("migrate-instance")
    os.environ["INSTANCE_PATH"] = str(instance)
    os.environ["DATABASE_URL"] = database_url
    from webapp import create_app

    app = create_app()
    with app.app_context():
        upgrade()
    return database_url


@pytest.fixture
def instance(tmp_path, monkeypatch, migrated, redis_url):
    """An instance folder and the environment every process of the product reads."""
    path = tmp_path / "instance"
    path.mkdir()
    monkeypatch.setenv("INSTANCE_PATH", str(path))
    monkeypatch.setenv("DATABASE_URL", migrated)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("RQ_REDIS_URL", redis_url)
    _empty_tables(migrated)
    # Every test starts from an empty Redis too: throttles, windows and locks must not leak.
    client = redis_lib.from_url(redis_url)
    client.flushdb()
    client.close()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _empty_tables(url: str) -> None:
    from outgoing.models import Base

    engine = create_engine(url)
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    engine.dispose()


@pytest.fixture
def app(instance, redis_client):
    from webapp import create_app

    app = create_app({"TESTING": True})
    yield app


@pytest.fixture
def db_session(app):
    from webapp.extensions import db

    with app.app_context():
        yield db.session


@pytest.fixture
def sink():
    server = Sink().start()
    yield server
    server.stop()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def proxy_config(instance, sink):
    """Configuration of a proxy whose next hop is the sink; tests may adjust it."""
    from outgoing.config import load_config

    config = load_config({"UPSTREAM_SMTP": f"127.0.0.1:{sink.port}",
                          "UPSTREAM_TIMEOUT": 5.0, "CONFIG_REFRESH_SECONDS": 0.2})
    config["SMTP_LISTEN"] = "127.0.0.1:0"  # any free port: InProcessProxy learns it on bind
    return config


@pytest.fixture
def start_proxy(proxy_config, clock, redis_client):
    started = []

    def start(**overrides) -> InProcessProxy:
        config = dict(proxy_config, **overrides)
        proxy = InProcessProxy(config, clock).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def database_behind_a_cable(migrated):
    """The test database reached through a TCP relay the test can cut or freeze (PostgreSQL only:
    SQLite is a local file and has no outage of this kind): the relay and its URL."""
    url = make_url(os.environ["DATABASE_URL"])
    if url.get_backend_name() != "postgresql":
        pytest.skip("a database outage needs a networked database (run with PostgreSQL)")
    relay = TcpForwarder(url.host or "127.0.0.1", url.port or 5432).start()
    yield relay, url.set(host="127.0.0.1", port=relay.port).render_as_string(
        hide_password=False)
    relay.stop()
