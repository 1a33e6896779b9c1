"""Several machines, played on one: a real HAProxy (send-proxy-v2, health checks) in front of
two proxies (each its own process group, as on two hosts), counters on a real Redis Cluster,
RQ on its own Redis with two workers, and the database of DATABASE_URL (PostgreSQL in CI).

Two customers' servers (127.0.0.2 and 127.1.0.3) are authenticated through HAProxy by their
own IP ranges; HAProxy itself connects from 127.9.9.9, which authenticates nobody. A limit of
N holds exactly across both proxies, and killing one proxy mid-stream loses no message that
got a 250."""

from __future__ import annotations

import email
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rq import Queue

from outgoing import jobs, redis_conn
from outgoing.changes import announce_config_change
from tests.support import data
from tests.support.cluster import RedisClusterProcesses, missing_binaries
from tests.support.mail import message, send
from tests.support.services import ROOT, free_port, process_env, stop_process, wait_for_port

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy"
                                      if os.path.exists("/usr/sbin/haproxy") else None)
pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install "
                                               "haproxy; .ci/run does)"),
    pytest.mark.skipif(missing_binaries() is not None, reason=missing_binaries() or ""),
]
BALANCER_SOURCE = "127.9.9.9"
CUSTOMER_A, CUSTOMER_B = "127.0.0.2", "127.1.0.3"
LIMIT = 20


def haproxy_config(front: int, backends: list[int], stats: Path) -> str:
    servers = "\n".join(
        f"  server p{i} 127.0.0.1:{port} send-proxy-v2 check check-send-proxy inter 300ms "
        f"fall 2 rise 2" for i, port in enumerate(backends, 1))
    return f"""global
  maxconn 2000
  stats socket {stats} level admin
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  retries 3
  option redispatch
frontend smtp
  bind 127.0.0.1:{front}
  default_backend proxies
backend proxies
  balance roundrobin
  source {BALANCER_SOURCE}
  option smtpchk EHLO haproxy.invalid
{servers}
"""


def haproxy_stat(stats: Path) -> dict[str, dict[str, str]]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    lines = raw.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return {row["svname"]: row for row in rows if row.get("pxname") == "proxies"}


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


class Machine:
    """One proxy host: ``python -m proxy --workers 2`` in its own process group."""

    def __init__(self, env: dict, log: Path):
        self.port = free_port()
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--workers", "2"], cwd=ROOT,
            env=dict(env, SMTP_LISTEN=f"127.0.0.1:{self.port}",
                     METRICS_LISTEN=f"127.0.0.1:{free_port()}"), stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """The host dies: every process of the group at once, no goodbye."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def deployment(instance, sink, redis_url, tmp_path):
    folder = tmp_path / "cluster"
    folder.mkdir()
    cluster = RedisClusterProcesses(folder).start()
    env = process_env(REDIS_URL=cluster.url, RQ_REDIS_URL=redis_url,
                      UPSTREAM_SMTP=f"127.0.0.1:{sink.port}",
                      SMTP_PROXY_PROTOCOL_FROM=BALANCER_SOURCE, CONFIG_REFRESH_SECONDS="0.5")
    machines = [Machine(env, tmp_path / f"proxy{i}.log") for i in (1, 2)]
    workers = [subprocess.Popen([str(Path(sys.executable).parent / "rq"), "worker",
                                 "--with-scheduler", "outgoing"], cwd=ROOT, env=env,
                                stdout=open(tmp_path / f"worker{i}.log", "wb"),  # noqa: SIM115
                                stderr=subprocess.STDOUT, start_new_session=True)
               for i in (1, 2)]
    front, stats = free_port(), tmp_path / "haproxy.sock"
    (tmp_path / "haproxy.cfg").write_text(haproxy_config(front, [m.port for m in machines],
                                                          stats))
    balancer = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")],
                                stdout=open(tmp_path / "haproxy.log", "wb"),  # noqa: SIM115
                                stderr=subprocess.STDOUT)
    try:
        for machine in machines:
            wait_for_port(machine.port, proc=machine.proc)
        wait_for_port(front, proc=balancer)
        wait_until(lambda: all(row["status"] == "UP" for name, row in haproxy_stat(stats)
                               .items() if name.startswith("p")), 20,
                   "HAProxy never saw both proxies healthy")
        yield {"front": front, "stats": stats, "machines": machines, "env": env,
               "cluster": cluster, "workers": workers, "logs": tmp_path}
    finally:
        stop_process(balancer)
        for machine in machines:
            machine.stop()
        for worker in workers:
            stop_process(worker)
        cluster.stop()


def one_message(port: int, source: str, subject: str) -> tuple[int, str]:
    """One connection, one message, as a customer's MTA sends it; (0, error) when the
    connection broke (the MTA would try again later)."""
    try:
        import smtplib

        with smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0)) as smtp:
            smtp.ehlo("client.example.com")
            code, reply = send(smtp, message(subject=subject))
            return code, reply.decode(errors="replace")
    except (OSError, EOFError) as exc:
        return 0, repr(exc)
    except Exception as exc:  # smtplib's own: a 421, a dropped connection
        return getattr(exc, "smtp_code", 0), repr(exc)


def subjects_at(sink) -> list[str]:
    return [email.message_from_bytes(m.data)["Subject"] for m in sink.handler.messages]


def received_of(sink, subject: str) -> str:
    for m in sink.handler.messages:
        parsed = email.message_from_bytes(m.data)
        if parsed["Subject"] == subject:
            return " ".join(parsed["Received"].split())
    raise LookupError(subject)


def test_two_proxies_behind_haproxy_share_limits_and_lose_nothing(deployment, sink,
                                                                  redis_url):
    data.add_user("a.example", "ip", "127.0.0.0/24", maximum_recipients_per_day=LIMIT)
    data.add_user("b.example", "ip", "127.1.0.0/24")
    client = redis_conn.connect(deployment["cluster"].url)
    announce_config_change(client)  # as the panel does, on the cluster
    client.close()
    front = deployment["front"]

    # Both proxies know the new users (straight to each, from a customer's address, which
    # needs no PROXY header)...
    # Each proxy runs 2 processes and the kernel spreads connections over them: several
    # 250s in a row make it all but certain that both have reloaded.
    for i, machine in enumerate(deployment["machines"]):
        wait_until(lambda port=machine.port, i=i: all(one_message(
            port, CUSTOMER_B, f"b-direct-{i}")[0] == 250 for _ in range(8)), 15,
            "a proxy never saw the users")
    # ...and each customer is authenticated by its own range, through HAProxy.
    assert one_message(front, CUSTOMER_B, "b-hello")[0] == 250
    assert "([127.1.0.3])" in received_of(sink, "b-hello")
    assert "(IP/Range user 127.1.0.0/24)" in received_of(sink, "b-hello")

    # A limit of N, N+10 messages over both proxies (round robin): exactly N accepted.
    codes = [one_message(front, CUSTOMER_A, f"a-{i}")[0] for i in range(LIMIT + 10)]
    accepted = codes.count(250)
    print(f"\nlimit {LIMIT}: {accepted} of {len(codes)} accepted across two proxies; "
          f"others {sorted(set(codes) - {250})}")
    assert accepted == LIMIT
    assert codes[:LIMIT] == [250] * LIMIT
    assert "([127.0.0.2])" in received_of(sink, "a-0")
    assert "(IP/Range user 127.0.0.0/24)" in received_of(sink, "a-0")
    served = {name: int(row["stot"]) for name, row in haproxy_stat(deployment["stats"]).items()
              if name.startswith("p")}
    assert all(count >= LIMIT // 2 for count in served.values()), served

    # Kill one proxy host mid-stream: every message that got a 250 reaches the next hop.
    total, results, lock = 40, {}, threading.Lock()
    pending = [f"b-{i}" for i in range(total)]

    def customer() -> None:
        while True:
            with lock:
                if not pending:
                    return
                subject = pending.pop(0)
            code, _ = one_message(front, CUSTOMER_B, subject)
            with lock:
                results.setdefault(subject, []).append(code)
                if code != 250:
                    pending.append(subject)  # an MTA tries again later
            if code != 250:
                time.sleep(0.2)

    threads = [threading.Thread(target=customer, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: sum(250 in codes for codes in results.values()) >= total // 4, 30,
               "no traffic before the kill")
    deployment["machines"][0].kill()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in threads), "traffic never recovered"
    got_250 = {subject for subject, codes in results.items() if 250 in codes}
    failed = sum(code != 250 for codes in results.values() for code in codes)
    at_sink = set(subjects_at(sink))
    print(f"kill: {len(got_250)} messages got 250, {failed} attempts failed and were retried,"
          f" {len(got_250 - at_sink)} of the 250'd missing at the next hop")
    assert got_250 == {f"b-{i}" for i in range(total)}
    assert got_250 <= at_sink

    # The two RQ workers (on RQ's own Redis) ran the proxies' periodic sweep against the
    # cluster and the database: any run of it, not the current period's (the run the proxies
    # started may have run just after a period boundary, and a run schedules the period after
    # the one it runs in, so the current period's never exists: CI failed on that).
    connection = jobs.rq_connection(_rq(redis_url))
    finished = Queue("outgoing", connection=connection).finished_job_registry
    sweep = jobs.periodic_job_id("sweep-locks", jobs.datetime.now(jobs.UTC)).rsplit("-", 1)[0]

    def swept() -> bool:
        return any(job_id.rsplit("-", 1)[0] == sweep for job_id in finished.get_job_ids())
    wait_until(swept, 30, "the workers never ran the sweep")
    assert Queue("outgoing", connection=connection).failed_job_registry.get_job_ids() == [] or \
        all("sweep" not in j for j in Queue("outgoing", connection=connection)
            .failed_job_registry.get_job_ids())


def _rq(url: str):
    import redis

    return redis.from_url(url)
