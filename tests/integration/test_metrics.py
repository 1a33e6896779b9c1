"""Prometheus metrics: the proxy's N processes summed by its parent on METRICS_LISTEN, the
panel's /metrics (RQ queues and failures, message-log lag, locks and unlocks, what the worker
wrote) for the provider only, each parsed with prometheus_client's own parser; and a real
Prometheus scraping the proxy, when Debian's prometheus is installed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from outgoing import locks, message_log
from outgoing.jobs import enqueue
from outgoing.models import LOCK_AUTOMATIC, OutgoingUser
from tests.support import data
from tests.support.mail import client, message, send
from tests.support.services import (
    free_port,
    process_env,
    run_worker_burst,
    start_process,
    stop_process,
    wait_for_port,
)

PASSWORD = "Alice-pass-123"


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of an exposition, through the official parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


# --- the panel -----------------------------------------------------------------------------

def test_panel_metrics_report_queues_failures_locks_and_the_log_lag(app, redis_client, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)

    def lock_and_unlock(session):
        user = session.get(OutgoingUser, alice)
        locks.lock(session, redis_client, user, kind=LOCK_AUTOMATIC, reason="test",
                   actor="test")
        locks.unlock(session, redis_client, user, actor="test", reason="test")
    data.query(lock_and_unlock)
    enqueue(redis_client, "worker.no_such_module.job", retry=None)  # fails in the worker
    for n in range(3):
        redis_client.xadd(message_log.STREAM, message_log.encode(
            {"at": time.time(), "stage": "relay", "verdict": "relayed",
             "mail_from": f"s{n}@example.com"}))
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    before = samples(response.get_data(as_text=True))
    assert value(before, "outbound_guard_redis_up") == 1
    assert value(before, "outbound_guard_locks_total", target="user", kind="automatic") == 1
    assert value(before, "outbound_guard_unlocks_total", target="user", how="manual") == 1
    assert value(before, "outbound_guard_message_log_lag_entries") == 3
    assert value(before, "outbound_guard_queue_jobs", queue="outgoing", state="queued") >= 2

    enqueue(redis_client, "worker.message_log_jobs.write_message_log", None, retry=None)
    result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}"))
    assert result.returncode == 0, result.stderr[-2000:]
    after = samples(app.test_client().get("/metrics").get_data(as_text=True))
    assert value(after, "outbound_guard_queue_jobs", queue="outgoing", state="failed") == 1
    assert value(after, "outbound_guard_queue_jobs", queue="outgoing", state="queued") == 0
    assert value(after, "outbound_guard_message_log_lag_entries") == 0
    assert value(after, "outbound_guard_message_log_lag_seconds") == 0
    assert value(after, "outbound_guard_message_log_written_total") == 3


def test_panel_metrics_are_for_the_provider_only(app, monkeypatch):
    data.add_admin("ops@example.com", "Ops-pass-12345", domain="example.com")
    local = app.test_client()
    assert local.get("/metrics").status_code == 200
    remote = app.test_client()
    remote.environ_base["REMOTE_ADDR"] = "203.0.113.9"
    from tests.support.web import log_in
    log_in(remote, "ops@example.com", "Ops-pass-12345")  # a customer, logged in
    assert remote.get("/metrics").status_code == 404
    # Through a reverse proxy on the same machine the client looks local: still refused.
    assert local.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"}).status_code \
        == 404
    monkeypatch.setitem(app.config, "METRICS_TOKEN", "s3cret-token")
    assert local.get("/metrics").status_code == 404
    assert remote.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code \
        == 404
    assert remote.get("/metrics",
                      headers={"Authorization": "Bearer s3cret-token"}).status_code == 200


# --- the proxy -----------------------------------------------------------------------------

@pytest.fixture
def proxy_processes(instance, sink, tmp_path):
    """``python -m proxy --workers 2`` as a separate process group, metrics on a free port."""
    smtp_port, metrics_port = free_port(), free_port()
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    env = process_env(SMTP_LISTEN=f"127.0.0.1:{smtp_port}",
                      METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
                      UPSTREAM_SMTP=f"127.0.0.1:{sink.port}")
    proc = start_process([sys.executable, "-m", "proxy", "--workers", "2"], env,
                         tmp_path / "smtp.log")
    try:
        wait_for_port(smtp_port, proc=proc)
        wait_for_port(metrics_port, proc=proc)
        yield proc, smtp_port, f"127.0.0.1:{metrics_port}"
    finally:
        stop_process(proc)


def send_some(port: int, count: int) -> None:
    for _ in range(count):  # a connection each, so both processes get some
        with client(port) as smtp:
            smtp.login("alice@example.com", PASSWORD)
            assert send(smtp, message())[0] == 250


def test_proxy_serves_the_sum_of_its_processes(proxy_processes, instance):
    proc, smtp_port, listen = proxy_processes
    send_some(smtp_port, 6)
    deadline = time.monotonic() + 5
    while True:  # the last connection's close reaches its process a moment later
        found = samples(scrape(f"http://{listen}/metrics"))
        active = value(found, "outbound_guard_smtp_connections_active")
        if active == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert value(found, "outbound_guard_smtp_transactions_total", stage="relay",
                 verdict="relayed") == 6
    assert value(found, "outbound_guard_smtp_replies_total", code="250") == 6
    assert value(found, "outbound_guard_relay_duration_seconds_count") == 6
    assert value(found, "outbound_guard_content_check_duration_seconds_count") == 6
    assert value(found, "outbound_guard_smtp_connections_active") == 0

    # A process that dies is replaced; its counts stay, its live gauge is forgotten.
    folder = Path(instance) / f"prometheus-smtp-{smtp_port}"
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)],
                                               capture_output=True, text=True).stdout.split()]
    (victim, live), *_ = [(pid, folder / f"gauge_livesum_{pid}.db") for pid in children
                          if (folder / f"gauge_livesum_{pid}.db").exists()]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while live.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live.exists()  # mark_process_dead
    time.sleep(1.2)  # the parent starts another process after a second
    send_some(smtp_port, 2)
    found = samples(scrape(f"http://{listen}/metrics"))
    assert value(found, "outbound_guard_smtp_transactions_total", stage="relay",
                 verdict="relayed") == 8


def test_a_real_prometheus_scrapes_the_proxy(proxy_processes, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus is not installed (apt-get install prometheus; "
                    ".ci/run installs it)")
    _, smtp_port, listen = proxy_processes
    send_some(smtp_port, 1)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: outbound-guard-proxy\n"
        f"    static_configs:\n      - targets: ['{listen}']\n")
    proc = start_process([binary, f"--config.file={config}",
                          f"--storage.tsdb.path={tmp_path / 'data'}",
                          f"--web.listen-address=127.0.0.1:{port}"], os.environ.copy(),
                         tmp_path / "prometheus.log")
    try:
        wait_for_port(port, proc=proc, timeout=30)
        query = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": 'outbound_guard_smtp_transactions_total{verdict="relayed"}'})
        deadline = time.monotonic() + 30
        result = []
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(query, timeout=5) as response:
                    answer = json.load(response)
                result = answer["data"]["result"]
            except OSError:
                result = []
            if result:
                break
            time.sleep(0.5)
        assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
        (series,) = result
        assert series["metric"]["job"] == "outbound-guard-proxy"
        assert series["metric"]["stage"] == "relay"
        assert float(series["value"][1]) == 1
    finally:
        stop_process(proc)


def test_proxy_shows_the_data_it_holds_against_its_budget(proxy_processes):
    """A message part-sent is held in memory, and shows as such until it is answered; the
    budget is both processes' SMTP_DATA_BUDGET (the default, 256 MiB each)."""
    _proc, smtp_port, listen = proxy_processes

    def held() -> float | None:
        return value(samples(scrape(f"http://{listen}/metrics")),
                     "outbound_guard_smtp_data_held_bytes")

    def eventually(check) -> bool:
        deadline = time.monotonic() + 5
        while not check() and time.monotonic() < deadline:
            time.sleep(0.05)
        return check()

    def budget() -> float | None:
        return value(samples(scrape(f"http://{listen}/metrics")),
                     "outbound_guard_smtp_data_budget_bytes")

    # each process sets its share once it serves: the port may answer before the second does
    assert eventually(lambda: budget() == 2 * 256 * 1024 * 1024)
    assert held() == 0
    with client(smtp_port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt("bob@example.org")[0] == 250
        assert smtp.docmd("DATA")[0] == 354
        smtp.sock.sendall(b"Subject: big\r\n\r\n" + (b"y" * 76 + b"\r\n") * 2800)  # no end
        assert eventually(lambda: held() >= 200_000)
        smtp.sock.sendall(b".\r\n")
        assert smtp.getreply()[0] == 250
        assert eventually(lambda: held() == 0)
