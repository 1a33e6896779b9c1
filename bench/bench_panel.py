"""Server time of the control panel's big lists: outgoing users and identities.

Loads 100,000 outgoing users in 1,000 domains and 1,000,000 identities into a fresh database
(bulk inserts through SQLAlchemy Core executemany), then requests each page through the real
app (Flask test client: routing, queries, template rendering) and prints the median and 95th
percentile per page. Figures are printed, never asserted; the target is a median under 50 ms.

Run (SQLite, a temporary file):
    REDIS_URL=redis://127.0.0.1:6379/4 .venv/bin/python bench/bench_panel.py

Run (PostgreSQL; a database is created for the run and dropped after):
    REDIS_URL=redis://127.0.0.1:6379/4 .venv/bin/python bench/bench_panel.py \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres

Options: --users N --identities N --domains N --runs N (defaults 100000, 1000000, 1000, 30),
--no-analyze (measure without planner statistics, as a database nobody ANALYZEd).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, insert, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

PASSWORD = "Bench-pass-123"
CHUNK = 20_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="", help="PostgreSQL server (default: SQLite)")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--identities", type=int, default=1_000_000)
    parser.add_argument("--domains", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-analyze", action="store_true",
                        help="skip ANALYZE after loading (planner without statistics)")
    return parser.parse_args()


def fresh_database(base: str, workdir: str) -> tuple[str, callable]:
    """A new, empty database and the function that removes it."""
    if not base:
        return f"sqlite:///{workdir}/bench.db", lambda: None
    url = make_url(base.replace("postgres://", "postgresql://", 1))
    name = f"og_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop():
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False), drop


def load(engine, args) -> dict:
    """Bulk-insert domains, users and identities; returns names the scenarios use."""
    from outgoing.models import Domain, Identity, OutgoingUser
    from outgoing.passwords import hash_password

    started = time.perf_counter()
    password_hash = hash_password(PASSWORD)
    per_domain = max(1, args.users // args.domains)
    with engine.begin() as conn:
        conn.execute(insert(Domain), [{"name": f"customer{d:04d}.example"}
                                      for d in range(args.domains)])
        domain_ids = dict(conn.execute(select(Domain.name, Domain.id)).all())
    users = []
    ip = 0x0A000000  # 10.0.0.0, one /28 per IP user
    for i in range(args.users):
        domain = f"customer{i // per_domain % args.domains:04d}.example"
        slot = i % per_domain
        # executemany wants the same keys in every row
        row = {"domain_id": domain_ids[domain], "locked": i % 97 == 0, "password_hash": None,
               "ip_family": None, "ip_first": None, "ip_last": None,
               "lock_kind": "automatic" if i % 97 == 0 else None,
               "lock_reason": "5 messages classified as spam within 10 minutes"
               if i % 97 == 0 else None}
        if slot == 0:
            row.update(kind="domain", name=domain, password_hash=password_hash)
        elif slot % 5 == 0:
            first, ip = ip, ip + 16
            text_ = f"{first >> 24}.{first >> 16 & 255}.{first >> 8 & 255}.{first & 255}/28"
            row.update(kind="ip", name=text_, ip_family=4, ip_first=f"{first:032x}",
                       ip_last=f"{first + 15:032x}")
        else:
            row.update(kind="user", name=f"{_word(i)}{slot}@{domain}",
                       password_hash=password_hash)
        users.append(row)
    with engine.begin() as conn:
        for start in range(0, len(users), CHUNK):
            conn.execute(insert(OutgoingUser), users[start:start + CHUNK])
        owners = conn.execute(select(OutgoingUser.id, OutgoingUser.domain_id)
                              .order_by(OutgoingUser.id)).all()
        user_ids = [user_id for user_id, _ in owners]
        domain_of = dict(owners)
    print(f"  {len(users):,} users in {time.perf_counter() - started:.1f} s", flush=True)
    per_user = max(1, args.identities // len(user_ids))
    batch = []
    with engine.begin() as conn:
        for n in range(args.identities):
            user_id = user_ids[n // per_user % len(user_ids)]
            batch.append({"user_id": user_id, "domain_id": domain_of[user_id],
                          "value": f"{_word(n * 7 + 3)}.{n % per_user}@s{n // per_user}.example",
                          "locked": n % 1009 == 0})
            if len(batch) == CHUNK:
                conn.execute(insert(Identity), batch)
                batch = []
        if batch:
            conn.execute(insert(Identity), batch)
    if not args.no_analyze:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    print(f"  {args.identities:,} identities, loaded in {time.perf_counter() - started:.1f} s",
          flush=True)
    middle = users[len(users) // 2]
    domain = f"customer{args.domains // 2:04d}.example"  # the domain admin's, mid-range
    domain_user = next(u for u in users if u["domain_id"] == domain_ids[domain]
                       and u["kind"] == "user")
    return {"domain": domain, "user_prefix": middle["name"][:4],
            "user_name": domain_user["name"], "ip": "10.0.3.7"}


def _word(i: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = (i * 2654435761) % (26 ** 5)
    out = ""
    for _ in range(5):
        i, r = divmod(i, 26)
        out += letters[r]
    return out


def log_in(app, email: str):
    client = app.test_client()
    page = client.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', page).group(1)
    response = client.post("/login", data={"email": email, "password": PASSWORD,
                                           "csrf_token": token})
    assert response.status_code == 302, "login failed"
    return client


def measure(client, url: str, runs: int, headers: dict | None = None) -> tuple[float, float, int]:
    response = client.get(url, headers=headers or {})  # warm caches and templates
    assert response.status_code == 200, (url, response.status_code)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        response = client.get(url, headers=headers or {})
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    times.sort()
    rows = response.get_data(as_text=True).count("<tr id=")
    return statistics.median(times), times[int(len(times) * 0.95) - 1], rows


def main() -> None:
    args = parse_args()
    if not os.environ.get("REDIS_URL"):
        sys.exit("set REDIS_URL (the settings page reads usage counters from Redis)")
    workdir = tempfile.mkdtemp(prefix="og-bench-")
    url, drop = fresh_database(args.database_url, workdir)
    os.environ.update(INSTANCE_PATH=workdir, DATABASE_URL=url)
    try:
        from flask_migrate import upgrade

        from outgoing.db import make_engine
        from outgoing.models import OutgoingUser
        from tests.support import data
        from webapp import create_app

        app = create_app()
        with app.app_context():
            upgrade()
        engine = make_engine(url)
        dialect = engine.dialect.name
        print(f"Loading into {dialect} ({url.split('@')[-1]}) ...", flush=True)
        names = load(engine, args)
        data.add_admin("root@bench.example", PASSWORD)
        data.add_admin("ops@bench.example", PASSWORD, domain=names["domain"])
        with engine.connect() as conn:
            middle = conn.execute(select(OutgoingUser.name, OutgoingUser.id)
                                  .order_by(OutgoingUser.name, OutgoingUser.id)
                                  .offset(args.users // 2).limit(1)).one()
            user_id = conn.scalar(select(OutgoingUser.id).where(
                OutgoingUser.name == names["user_name"]))
        engine.dispose()
        cursor = f"{middle.id}:{middle.name}"
        root, ops = log_in(app, "root@bench.example"), log_in(app, "ops@bench.example")
        htmx = {"HX-Request": "true", "HX-Target": "user-list"}
        scenarios = [
            ("users: first page (all domains)", root, "/outgoing/users", None),
            ("users: page in the middle", root, f"/outgoing/users?after={cursor}", None),
            ("users: search name prefix", root, f"/outgoing/users?q={names['user_prefix']}",
             None),
            ("users: search as you type (HTMX)", root,
             f"/outgoing/users?q={names['user_prefix']}", htmx),
            ("users: search by domain", root, f"/outgoing/users?q={names['domain']}", None),
            ("users: search IP in a range", root, f"/outgoing/users?q={names['ip']}", None),
            ("users: search, no match", root, "/outgoing/users?q=zzzz-nothing", None),
            ("users: domain admin, first page", ops, "/outgoing/users", None),
            ("users: domain admin, search", ops,
             f"/outgoing/users?q={names['user_name'][:3]}", None),
            ("identities: first page (all)", root, "/outgoing/identities", None),
            ("identities: search prefix", root, "/outgoing/identities?q=mmm", None),
            ("identities: of one user", root, f"/outgoing/identities?user={user_id}", None),
            ("identities: domain admin", ops, "/outgoing/identities", None),
            ("user settings page", root, f"/outgoing/users/{user_id}", None),
        ]
        print(f"\n{dialect}: {args.users:,} outgoing users, {args.identities:,} identities, "
              f"{args.runs} requests each")
        print(f"{'page':40} {'median ms':>10} {'p95 ms':>8} {'rows':>5}")
        for label, client, page_url, headers in scenarios:
            median, p95, rows = measure(client, page_url, args.runs, headers)
            print(f"{label:40} {median:10.1f} {p95:8.1f} {rows:5d}", flush=True)
    finally:
        drop()


if __name__ == "__main__":
    main()
