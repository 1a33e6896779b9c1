"""Benchmark of the content stage (prints figures; never a test).

1. The content pipeline for one 50 KB message with one attachment: header parse, attachment
   inspection (macros + unwanted), the built-in spam verdict and DKIM signing (RSA 2048 and
   Ed25519), as the proxy runs them per message. Target: median under 5 ms.
2. Relay throughput through the real proxy (in-process, real sockets, SQLite, Redis) to an
   aiosmtpd next hop: a user with every content policy on (attachments, spam, DKIM, archive)
   against a bare user, and the bare relay without connection reuse.

    REDIS_URL=redis://127.0.0.1:6379/6 python bench/bench_content.py [--messages 300]

The Redis database in REDIS_URL is FLUSHED (the proxy's counters live there).
"""

from __future__ import annotations

import argparse
import email.policy
import os
import statistics
import sys
import tempfile
import threading
import time
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def fifty_kb_message() -> bytes:
    """A 50 KB message: a text body and one 30 KB PDF-like attachment (base64 in transit)."""
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "Quarterly report"
    msg["Date"] = "Sun, 29 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<bench@example.com>"
    paragraph = ("The figures for the quarter are attached; see https://example.com/q3 for "
                 "the interactive version. ") * 4 + "\n\n"
    msg.set_content(paragraph * 20)
    pdf = b"%PDF-1.7\n" + os.urandom(29 * 1024) + b"\n%%EOF\n"
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="report.pdf")
    return msg.as_bytes(policy=email.policy.SMTP)


def pipeline_figures(rounds: int) -> None:
    from outgoing.dkim import SigningKey, generate_key, sign_with
    from proxy.content import local_checks
    from scoring.message import normalise_line_endings, parse_headers

    raw = fifty_kb_message()
    keys = {}
    for algorithm in ("rsa", "ed25519"):
        pair = generate_key(algorithm)
        keys[algorithm] = SigningKey("example.com", "bench", algorithm, pair.private_pem)

    def once(key) -> None:
        data = normalise_line_endings(raw).data
        parse_headers(data)
        attachments, spam = local_checks(data, mail_from="alice@example.com",
                                         rcpt_tos=["bob@example.org"], block_macros=True,
                                         block_unwanted=True, builtin_spam=True, threshold=5.0)
        assert attachments is not None and not attachments.blocked and not spam.is_spam
        sign_with(data, key)

    print(f"content pipeline, {len(raw) / 1024:.1f} KB message with one attachment "
          f"({rounds} rounds)")
    for algorithm, key in keys.items():
        for _ in range(20):
            once(key)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            once(key)
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        print(f"  parse + attachments + spam + DKIM {algorithm:8s}: median "
              f"{statistics.median(times):.2f} ms, p95 {times[int(len(times) * 0.95)]:.2f} ms")
    stages = {
        "parse headers": lambda: parse_headers(raw),
        "attachments (macros+unwanted)": lambda: local_checks(
            raw, mail_from="a@example.com", rcpt_tos=["b@example.org"], block_macros=True,
            block_unwanted=True, builtin_spam=False, threshold=5.0),
        "built-in spam verdict": lambda: local_checks(
            raw, mail_from="a@example.com", rcpt_tos=["b@example.org"], block_macros=False,
            block_unwanted=False, builtin_spam=True, threshold=5.0),
        "DKIM sign rsa-2048": lambda: sign_with(raw, keys["rsa"]),
    }
    for name, fn in stages.items():
        times = []
        for _ in range(max(50, rounds // 2)):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        print(f"    {name:32s} median {statistics.median(times):.2f} ms")


def relay_figures(messages: int, clients: int) -> None:
    import redis

    from tests.support.services import Clock, InProcessProxy, Sink, free_port, wait_for_port

    url = os.environ.get("REDIS_URL")
    if not url:
        print("relay throughput: skipped (set REDIS_URL; its database is flushed)")
        return
    redis.from_url(url).flushdb()
    instance = Path(tempfile.mkdtemp(prefix="og-bench-"))
    os.environ.update(INSTANCE_PATH=str(instance), REDIS_URL=url,
                      DATABASE_URL=f"sqlite:///{instance / 'bench.db'}")
    from flask_migrate import upgrade

    from webapp import create_app

    app = create_app()
    with app.app_context():
        upgrade()

    from outgoing.config import load_config
    from outgoing.db import make_sessionmaker, session_scope
    from outgoing.dkim import generate_key
    from outgoing.models import DkimKey
    from outgoing.users import create_outgoing_user, get_or_create_domain

    factory = make_sessionmaker(os.environ["DATABASE_URL"])
    # Compromise detection scores every message but, in shadow mode, holds none: a new user
    # enforces by default, and a throughput run is a burst by any measure.
    shadow = dict(compromise_detection=True, detection_shadow_mode=True)
    with session_scope(factory) as db:
        domain = get_or_create_domain(db, "example.com")
        create_outgoing_user(db, domain=domain, kind="user", name="bare@example.com",
                             password="Bench-pass-123", **shadow)
        create_outgoing_user(db, domain=domain, kind="user", name="full@example.com",
                             password="Bench-pass-123", **shadow, block_macro_attachments=True,
                             block_unwanted_attachments=True, dkim_selector="bench",
                             message_archiving=True)
        key = generate_key("rsa")
        db.add(DkimKey(domain_id=domain.id, selector="bench", algorithm="rsa",
                       private_key_pem=key.private_pem, public_key_b64=key.public_b64))
    raw = fifty_kb_message()

    def run(user: str, **overrides) -> float:
        sink = Sink().start()
        config = load_config({"SMTP_LISTEN": f"127.0.0.1:{free_port()}",
                              "UPSTREAM_SMTP": f"127.0.0.1:{sink.port}",
                              "SMTP_TRUSTED": True, **overrides})
        proxy = InProcessProxy(config, Clock(time.time())).start()
        wait_for_port(proxy.port)
        per_client = messages // clients
        errors = []

        def client_loop() -> None:
            import smtplib

            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
                smtp.login(user, "Bench-pass-123")
                for _ in range(per_client):
                    try:
                        smtp.sendmail(user, ["bob@example.org"], raw.replace(
                            b"alice@example.com", user.encode()))
                    except smtplib.SMTPException as exc:
                        errors.append(exc)

        start = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        delivered = len(sink.handler.wait_for(per_client * clients, timeout=5))
        proxy.stop()
        sink.stop()
        if errors or delivered != per_client * clients:
            print(f"    ({user}: {len(errors)} errors, {delivered} delivered; first: "
                  f"{errors[:1]})")
        return delivered / elapsed

    print(f"relay throughput, {messages} messages of {len(raw) / 1024:.1f} KB over "
          f"{clients} client connections (one proxy process)")
    bare = run("bare@example.com")
    full = run("full@example.com")
    no_pool = run("bare@example.com", UPSTREAM_POOL_SIZE=0)
    print(f"  bare relay                          {bare:7.1f} msg/s")
    print(f"  all policies on (attach, spam, DKIM, archive) {full:7.1f} msg/s  "
          f"= {full / bare:.2f} x bare")
    print(f"  bare relay, no next-hop connection reuse {no_pool:7.1f} msg/s  "
          f"= {no_pool / bare:.2f} x bare")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    pipeline_figures(args.rounds)
    relay_figures(args.messages, args.clients)


if __name__ == "__main__":
    main()
