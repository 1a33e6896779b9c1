"""Message log at scale on PostgreSQL: Log Search's server time, and the writer's throughput.

Creates a database, runs the real migrations (the table partitioned by day), loads N rows
spread over 30 days (COPY, one partition per day; 10,000 senders, 2,000 users in 200
domains, a unique Message-ID each), ANALYZEs, then times with EXPLAIN ANALYZE (server time,
no network or rendering) the exact queries Log Search sends (``outgoing.message_log
.search_query``): a sender over one day, the same for a domain admin, a Message-ID over all
30 days, and the unfiltered first page. Then the worker's write path on the loaded table:
``insert_rows`` in batches of ``worker.message_log_jobs.BATCH`` (insert throughput), and the
whole path (XADD into a Redis stream, then ``write_batches``: XREADGROUP, insert, XACK).
Figures are printed, never asserted. The issue's target: under 100 ms at 10 million rows,
and inserts faster than the proxy's peak rate (compare bench/bench_proxy.py's messages/s).

Run (a few minutes; the database is dropped afterwards):
    REDIS_URL=redis://127.0.0.1:6379/4 .venv/bin/python bench/bench_message_log.py \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres

The issue's size (about 10-15 minutes to load on 2 cores):
    ... bench/bench_message_log.py --database-url postgresql://... --rows 10000000

Options: --rows N (default 1,000,000), --runs N (queries per kind, default 20),
--insert-rows N (rows for the throughput figures, default 100,000), --keep (leave the
database for a look afterwards).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.dialects import postgresql  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

DAYS = 30
SENDERS = 10_000
USERS = 2_000
DOMAINS = 200
COPY_CHUNK = 200_000
COLUMNS = ("at", "stream_id", "stage", "verdict", "client_ip", "domain_id", "user_id",
           "user_name", "identity", "mail_from", "rcpt_count", "refused_count", "recipients",
           "message_id", "subject", "size", "reply", "next_hop_reply", "queue_id",
           "relay_seconds")
VERDICTS = ["relayed"] * 90 + ["quarantined"] * 3 + ["refused"] * 5 + ["deferred"] * 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""),
                        help="PostgreSQL server (a database is created on it for the run)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--insert-rows", type=int, default=100_000)
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    return parser.parse_args()


def fresh_database(base: str) -> tuple[str, callable]:
    url = make_url(base.replace("postgres://", "postgresql://", 1))
    name = f"og_bench_log_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop():
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False), drop


def migrate(url: str) -> None:
    from flask_migrate import upgrade

    os.environ["INSTANCE_PATH"] = tempfile.mkdtemp(prefix="og-bench-")
    os.environ["DATABASE_URL"] = url
    from webapp import create_app

    app = create_app()
    with app.app_context():
        upgrade()
        from webapp.extensions import db
        db.engine.dispose()


def sender(n: int) -> str:
    return f"sender{n}@d{n % DOMAINS}.example"


def load(engine, rows: int, start: datetime) -> None:
    """COPY ``rows`` random transactions over DAYS days into the partitioned table."""
    from sqlalchemy.orm import Session

    from outgoing import message_log

    with Session(engine) as session:
        message_log.ensure_partitions(session, [start.date() + timedelta(days=d)
                                                for d in range(DAYS + 1)])
        session.commit()
    rng = random.Random(12)
    span = DAYS * 86400
    raw = engine.raw_connection()
    started = time.perf_counter()
    try:
        cursor = raw.cursor()
        done = 0
        while done < rows:
            chunk = min(COPY_CHUNK, rows - done)
            buffer = io.StringIO()
            for n in range(done, done + chunk):
                s = rng.randrange(SENDERS)
                user = s % USERS
                at = start + timedelta(seconds=rng.random() * span)
                verdict = rng.choice(VERDICTS)
                buffer.write("\t".join((
                    at.isoformat(sep=" "), f"{n}-0", "relay", verdict, "192.0.2.1",
                    str(user % DOMAINS + 1), str(user + 1), f"user{user}@d{user % DOMAINS}",
                    sender(s), sender(s), "1", "0", f"rcpt{rng.randrange(10**6)}@example.org",
                    f"<{n}.{s}@d{s % DOMAINS}.example>", f"Subject {rng.randrange(1000)}",
                    "4200", "250 2.0.0 Message accepted", "250 2.0.0 Ok: queued",
                    f"{n:010X}", "0.004")) + "\n")
            buffer.seek(0)
            with cursor.copy(f"COPY message_log ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                copy.write(buffer.read())
            raw.commit()
            done += chunk
            rate = done / (time.perf_counter() - started)
            print(f"  {done:,} rows loaded ({rate:,.0f}/s)", flush=True)
        cursor.execute("ANALYZE message_log")
        raw.commit()
    finally:
        raw.close()


def server_ms(conn, query) -> float:
    compiled = query.compile(dialect=postgresql.dialect(),
                             compile_kwargs={"literal_binds": True})
    plan = conn.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled}")).scalar()
    return float(plan[0]["Execution Time"])


def one_day(rng, start: datetime) -> tuple[datetime, datetime]:
    """A random whole day of the loaded 30."""
    since = start.replace(hour=0, minute=0, second=0, microsecond=0) + \
        timedelta(days=rng.randrange(1, DAYS))
    return since, since + timedelta(days=1)


def time_searches(engine, start: datetime, runs: int, ids: list[str]) -> None:
    from outgoing.message_log import LogSearch, search_query

    rng = random.Random(7)

    def by_sender(domain_admin: bool):
        s = rng.randrange(SENDERS)
        since, until = one_day(rng, start)
        return (LogSearch(sender=sender(s), since=since, until=until),
                (s % USERS) % DOMAINS + 1 if domain_admin else None)

    def by_verdict():
        since, until = one_day(rng, start)
        return LogSearch(verdict="quarantined", since=since, until=until), None

    kinds = {
        "sender, one day (super admin)": lambda: by_sender(False),
        "sender, one day (domain admin)": lambda: by_sender(True),
        "Message-ID, all 30 days": lambda: (LogSearch(message_id=rng.choice(ids)), None),
        "first page, no filter (super admin)": lambda: (LogSearch(), None),
        "first page, one domain": lambda: (LogSearch(), rng.randrange(DOMAINS) + 1),
        "verdict quarantined, one day": by_verdict,
    }
    print(f"\n{'Log Search query (server time, EXPLAIN ANALYZE)':44} {'median ms':>10} "
          f"{'max ms':>8}")
    with engine.connect() as conn:
        for label, make in kinds.items():
            times = []
            for _ in range(runs):
                criteria, domain_id = make()
                times.append(server_ms(conn, search_query(criteria, domain_id=domain_id)))
            print(f"{label:44} {statistics.median(times):10.2f} {max(times):8.2f}", flush=True)


def message_ids(engine, count: int) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text(
            "SELECT message_id FROM message_log TABLESAMPLE SYSTEM (1) LIMIT :n"),
            {"n": count}).scalars())


def time_inserts(engine, url: str, count: int) -> None:
    import redis as redis_lib
    from sqlalchemy.orm import sessionmaker

    from outgoing import message_log
    from worker import message_log_jobs

    now = datetime.now(UTC)
    entries = [message_log.encode({
        "at": now.timestamp() + n / 1000, "stage": "relay", "verdict": "relayed",
        "client_ip": "192.0.2.7", "user_id": 1, "domain_id": 1, "user_name": "alice@x.example",
        "identity": "alice@x.example", "mail_from": "alice@x.example",
        "recipients": ["bob@example.org"], "rcpt_count": 1, "message_id": f"<b{n}@x>",
        "subject": "Benchmark", "size": 4200, "reply": "250 2.0.0 Message accepted",
        "next_hop_reply": "250 2.0.0 Ok: queued", "queue_id": f"{n:010X}",
        "relay_seconds": 0.004}) for n in range(count)]
    factory = sessionmaker(create_engine(url), expire_on_commit=False)
    batch = message_log_jobs.BATCH

    rows = [message_log.row_from_entry(f"9{n:012d}-0", fields)
            for n, fields in enumerate(entries)]
    started = time.perf_counter()
    for first in range(0, count, batch):
        with factory() as session:
            message_log.insert_rows(session, rows[first:first + batch])
            session.commit()
    elapsed = time.perf_counter() - started
    print(f"\ninsert_rows, batches of {batch:,} into the loaded table: {count:,} rows in "
          f"{elapsed:.1f} s = {count / elapsed:,.0f} rows/s", flush=True)

    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/4")
    client = redis_lib.from_url(redis_url)
    stream = f"og:bench:{uuid.uuid4().hex[:8]}"
    message_log_jobs.STREAM = stream  # a stream of its own: never the product's
    try:
        pipe = client.pipeline(transaction=False)
        for fields in entries:
            pipe.xadd(stream, fields)
        pipe.execute()
        started = time.perf_counter()
        written = 0
        while written < count:
            written += message_log_jobs.write_batches(client, factory, consumer="bench",
                                                      claim_idle=3600, budget=3600)
        elapsed = time.perf_counter() - started
        print(f"worker path (XREADGROUP + insert + XACK): {count:,} entries in {elapsed:.1f} s "
              f"= {count / elapsed:,.0f} rows/s", flush=True)
    finally:
        client.delete(stream)
        client.close()


def main() -> None:
    args = parse_args()
    if not args.database_url.startswith(("postgresql", "postgres://")):
        sys.exit("bench_message_log.py needs --database-url postgresql://... (partitioning)")
    url, drop = fresh_database(args.database_url)
    try:
        print(f"Migrating {url.split('@')[-1]} ...", flush=True)
        migrate(url)
        engine = create_engine(url)
        start = (datetime.now(UTC) - timedelta(days=DAYS)).replace(tzinfo=None)
        print(f"Loading {args.rows:,} rows over {DAYS} days ...", flush=True)
        load(engine, args.rows, start)
        time_searches(engine, start, args.runs, message_ids(engine, max(args.runs, 1)))
        time_inserts(engine, url, args.insert_rows)
        engine.dispose()
    finally:
        if args.keep:
            print(f"kept {url}")
        else:
            drop()


if __name__ == "__main__":
    main()
