"""The proxy on a real Redis Cluster (3 masters, 1 replica each, started here): limits, spam
detection and its lock, and AUTH throttling run their scripts and transactions on the
cluster; jobs go to the single Redis of RQ_REDIS_URL. Then one master crashes under load:
no message is accepted beyond the limit, senders get 4xx while its slots have no master, and
the proxy recovers by itself once the replica took over."""

from __future__ import annotations

import base64
import smtplib
import threading
import time

import pytest
from rq import Queue

from outgoing import redis_conn, redis_keys
from outgoing.changes import announce_config_change
from scoring.locks import auth_network
from tests.support import data
from tests.support.cluster import RedisClusterProcesses, missing_binaries
from tests.support.mail import GTUBE, message, send

pytestmark = pytest.mark.skipif(missing_binaries() is not None,
                                reason=missing_binaries() or "")
PASSWORD = "Alice-pass-123"


@pytest.fixture
def cluster(tmp_path):
    nodes = RedisClusterProcesses(tmp_path / "cluster")
    nodes.folder.mkdir()
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.fixture
def cluster_proxy(start_proxy, cluster, redis_url):
    def start(**overrides):
        return start_proxy(REDIS_URL=cluster.url, RQ_REDIS_URL=redis_url, **overrides)
    return start


def plain_client(port: int, source: str) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(source, 0))
    smtp.ehlo("client.example.com")
    return smtp


def one_message(port: int, source: str, body: str = "Hello.\n") -> tuple[int, str]:
    try:
        with plain_client(port, source) as smtp:
            code, reply = send(smtp, message(body=body))
            return code, reply.decode(errors="replace")
    except smtplib.SMTPResponseException as exc:  # e.g. 421 at the greeting
        return exc.smtp_code, exc.smtp_error.decode(errors="replace")
    except (OSError, smtplib.SMTPException) as exc:
        return 0, str(exc)


def test_limits_spam_lock_and_auth_throttle_run_on_the_cluster(instance, cluster,
                                                               cluster_proxy, sink,
                                                               redis_client):
    limited = data.add_user("example.com", "ip", "127.0.0.0/24", maximum_recipients_per_day=5)
    data.add_user("example.net", "ip", "127.0.1.0/24", automatic_lock=True)
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    proxy = cluster_proxy(SPAM_LOCK_THRESHOLD=2, AUTH_FAILURE_LIMIT=2, SMTP_TRUSTED=True)

    # Limits: 5 recipients a day, 8 messages: exactly 5 accepted, counted on the cluster.
    codes = [one_message(proxy.port, "127.0.0.9")[0] for _ in range(8)]
    assert codes.count(250) == 5 and set(codes) - {250} and 451 not in codes
    client = redis_conn.connect(cluster.url)
    assert client.hgetall(redis_keys.user_limits(limited))

    # Spam detection: the second GTUBE message (refused, quarantined) locks the sender (lock
    # key on the cluster, the lock notice job on RQ's own Redis); its next message is refused.
    for _ in range(2):
        assert one_message(proxy.port, "127.0.1.9", body=GTUBE + "\n")[0] == 550
    code, reply = one_message(proxy.port, "127.0.1.9")
    assert code == 550 and "is locked" in reply
    assert Queue("outgoing", connection=redis_client).count >= 1

    # A successful AUTH remembers its network and, detection being on, asks for earlier
    # failures in the same pipeline.
    good = base64.b64encode(f"\0alice@example.com\0{PASSWORD}".encode()).decode()
    with plain_client(proxy.port, "127.0.4.9") as smtp:
        assert smtp.docmd("AUTH", f"PLAIN {good}")[0] == 235
    assert client.zscore(redis_keys.auth_networks("alice@example.com"),
                         auth_network("127.0.4.9"))

    # AUTH throttling: two failures block the address ({auth} slot, MULTI/EXEC on it).
    blob = base64.b64encode(b"\0alice@example.com\0wrong").decode()
    answers = []
    for _ in range(3):
        with plain_client(proxy.port, "127.0.2.9") as smtp:
            answers.append(smtp.docmd("AUTH", f"PLAIN {blob}")[0])
    assert answers == [535, 535, 454]
    assert client.zscore(redis_keys.AUTH_BLOCKS, redis_keys.auth_subject_ip("127.0.2.9"))

    # A configuration change announced on the cluster reaches the proxy.
    data.add_user("example.org", "ip", "127.0.3.0/24")
    announce_config_change(client)
    deadline = time.monotonic() + 10
    while one_message(proxy.port, "127.0.3.9")[0] != 250:
        assert time.monotonic() < deadline, "the new user never reached the proxy"
        time.sleep(0.2)
    client.close()


def test_a_master_crash_under_load_costs_4xx_never_a_message_over_the_limit(
        instance, cluster, cluster_proxy, sink, clock):
    limit = 60
    # Compromise detection off: a new sender's burst would be throttled (451), and this is
    # about the limit's counts across a failover.
    user_id = data.add_user("example.com", "ip", "127.0.0.0/24",
                            maximum_recipients_per_day=limit, compromise_detection=False)
    proxy = cluster_proxy()
    victim = cluster.master_of(redis_keys.user_limits(user_id))
    lock = threading.Lock()
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def sender(source: str) -> None:
        while not stop.is_set():
            code, reply = one_message(proxy.port, source)
            with lock:
                results.append((time.monotonic(), code, reply))
                definitive = sum(1 for _, c, r in results if c == 250 or c >= 500
                                 or (400 <= c < 500 and "4.3.0" not in r and c != 421))
            if definitive >= limit + 10:
                stop.set()

    threads = [threading.Thread(target=sender, args=(f"127.0.0.{10 + i}",), daemon=True)
               for i in range(4)]
    for thread in threads:
        thread.start()
    while True:  # crash the master of the user's slot a third of the way in
        with lock:
            if sum(1 for _, c, _ in results if c == 250) >= limit // 3:
                break
        time.sleep(0.01)
    crashed_at = time.monotonic()
    cluster.kill(victim)
    for thread in threads:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in threads), "the proxy never recovered"

    accepted = [t for t, code, _ in results if code == 250]
    temporary = [t for t, code, reply in results if code in (451, 421) or "4.3.0" in reply]
    last_4xx = max(temporary, default=crashed_at)
    after = [t for t in accepted if t > last_4xx]
    print(f"\nfailover: limit {limit}, accepted {len(accepted)}, 4xx {len(temporary)} "
          f"(the last {last_4xx - crashed_at:.2f} s after the crash), first 250 after them "
          f"{(min(after) - crashed_at) if after else float('nan'):.2f} s after the crash, "
          f"refused over the limit {len(results) - len(accepted) - len(temporary)}")
    assert len(accepted) <= limit  # never a message over the limit
    assert temporary, "the crash went unnoticed: no 4xx"
    assert after, "nothing accepted after the crash: no recovery"
    assert all(code in (250, 451, 421) or 400 <= code < 600 for _, code, _ in results)
    assert len(sink.handler.messages) == len(accepted)
    for _, code, reply in results:
        assert code != 0, f"a connection failed outright: {reply}"
    cluster.wait_ok(cluster.live_ports())  # the replica serves the victim's slots now

    # Configuration changes still reach the proxy after the failover.
    data.add_user("example.org", "ip", "127.0.3.0/24")
    client = redis_conn.connect(cluster.url)
    announce_config_change(client)
    client.close()
    deadline = time.monotonic() + 15
    while one_message(proxy.port, "127.0.3.9")[0] != 250:
        assert time.monotonic() < deadline, "configuration changes stopped after the failover"
        time.sleep(0.2)
