"""The rspamd engine: a real rspamd (Debian's) scanning through /checkv2, and the fallback to
the built-in scorer when rspamd is unreachable or too slow."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from outgoing.models import QuarantinedMessage
from tests.support import data
from tests.support.mail import GTUBE, client, message, send
from tests.support.services import free_port, wait_for_port

PASSWORD = "Alice-pass-123"
RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"

CONFIG = """
.include "$CONFDIR/common.conf"
options {{
    pidfile = "{run}/rspamd.pid";
    .include "$CONFDIR/options.inc"
    # No network here: an unreachable resolver makes every DNS-based rule give up at once.
    dns {{ nameserver = ["127.0.0.1:9"]; timeout = 0.2s; retransmits = 1; }}
}}
logging {{ type = "file"; filename = "{run}/rspamd.log"; level = "error"; }}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    count = 1;
    .include "$CONFDIR/worker-normal.inc"
}}
"""


@pytest.fixture(scope="module")
def rspamd_url(tmp_path_factory, request):
    """Our own rspamd on a free loopback port with a minimal configuration."""
    if not Path(RSPAMD).exists():
        pytest.skip("rspamd is not installed (apt-get install rspamd); .ci/run installs it")
    run = tmp_path_factory.mktemp("rspamd")
    # Compiled regular expressions are cached between runs: the first start takes seconds.
    cache = (request.config.cache.mkdir("rspamd-db") if getattr(request.config, "cache", None)
             else run / "db")
    port = free_port()
    conf = run / "rspamd.conf"
    conf.write_text(CONFIG.format(run=run, port=port))
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    args = [RSPAMD, "-f", "-c", str(conf), "-u", user, "-g", group,
            "--var", f"LOCAL_CONFDIR={run}/local", "--var", f"DBDIR={cache}",
            "--var", f"RUNDIR={run}", "--var", f"LOGDIR={run}"]
    if os.getuid() == 0:
        args.insert(2, "-i")  # rspamd refuses to run workers as root without it
    log = open(run / "stdout.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, timeout=120, proc=proc)
        url = f"http://127.0.0.1:{port}"
        _wait_until_scanning(url, proc)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def _wait_until_scanning(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """The main process listens before its scanner worker is ready; /ping answers then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("rspamd did not start scanning in time")


@pytest.fixture
def alice(instance):
    return data.add_user("example.com", "user", "alice@example.com", PASSWORD)


def submit(proxy, msg: bytes) -> tuple[int, bytes]:
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        return send(smtp, msg)


def quarantined():
    return data.query(lambda s: [(q.reason, q.score, q.rules)
                                 for q in s.scalars(select(QuarantinedMessage))])


def test_rspamd_verdict_quarantines_gtube_with_its_rules(alice, start_proxy, sink, rspamd_url):
    proxy = start_proxy(RSPAMD_URL=rspamd_url)
    code, reply = submit(proxy, message(subject="Offer", body=GTUBE))
    assert code == 550 and b"GTUBE" in reply
    [(reason, score, rules)] = quarantined()
    assert reason.startswith("spam (rspamd)")
    assert "GTUBE" in rules and score > 0
    assert sink.handler.messages == []


def test_rspamd_lets_an_ordinary_message_through(alice, start_proxy, sink, rspamd_url):
    proxy = start_proxy(RSPAMD_URL=rspamd_url)
    assert submit(proxy, message())[0] == 250
    assert len(sink.handler.messages) == 1
    assert quarantined() == []


def test_unreachable_rspamd_falls_back_to_the_built_in_scorer(alice, start_proxy, sink):
    proxy = start_proxy(RSPAMD_URL=f"http://127.0.0.1:{free_port()}")
    assert submit(proxy, message(body=GTUBE))[0] == 550
    assert submit(proxy, message())[0] == 250
    [(reason, _, rules)] = quarantined()
    assert reason.startswith("spam (builtin)") and "GTUBE" in rules


def test_rspamd_that_never_answers_falls_back_after_the_timeout(alice, start_proxy, sink):
    with socket.socket() as silent:  # accepts connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        proxy = start_proxy(RSPAMD_URL=f"http://127.0.0.1:{silent.getsockname()[1]}",
                            RSPAMD_TIMEOUT=0.5)
        assert submit(proxy, message(body=GTUBE))[0] == 550
    [(reason, _, _)] = quarantined()
    assert reason.startswith("spam (builtin)")


@pytest.mark.parametrize("action,spam", [("reject", True), ("add header", True),
                                         ("rewrite subject", True), ("soft reject", False),
                                         ("greylist", False), ("no action", False)])
def test_rspamd_actions_map_to_spam_or_not(action, spam):
    from proxy.rspamd import verdict_from

    verdict = verdict_from({"action": action, "score": 7.5, "symbols": {
        "BAD": {"score": 5.0}, "WORSE": {"score": 6.0}, "GOOD": {"score": -1.0}}})
    assert verdict.is_spam is spam and verdict.engine == "rspamd"
    assert verdict.rules == ("WORSE", "BAD") and verdict.score == 7.5


@pytest.mark.parametrize("answer", [None, [], {"score": 3}, {"action": "reject", "score": "x"}])
def test_malformed_rspamd_answer_is_an_error_not_a_verdict(answer):
    from proxy.rspamd import RspamdError, verdict_from

    with pytest.raises(RspamdError):
        verdict_from(answer)
