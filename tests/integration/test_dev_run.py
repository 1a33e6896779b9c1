"""``python3 dev.py run`` as a user starts it, and stops it with one signal to dev.py alone:
every process it started (honcho, gunicorn, the proxy, the worker, the embedded Redis) ends
and every port closes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.services import ROOT, free_port, wait_for_port


def processes_with(marker: str) -> set[int]:
    """Processes whose environment carries ``marker`` (everything dev.py started has it)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_one_signal_to_dev_py_stops_the_whole_product(tmp_path, sig):
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc to find the processes dev.py started")
    web, smtp = free_port(), free_port()
    marker = f"OG_DEV_RUN_TEST={tmp_path.name}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "RQ_REDIS_URL", "DATABASE_URL")}
    env.update(INSTANCE_PATH=str(tmp_path / "instance"), PORT=str(web),
               SMTP_LISTEN=f"127.0.0.1:{smtp}", UPSTREAM_SMTP=f"127.0.0.1:{free_port()}",
               SMTP_WORKERS="2", OG_DEV_RUN_TEST=tmp_path.name)
    log = open(tmp_path / "dev.log", "wb")  # noqa: SIM115 - closed below
    dev = subprocess.Popen([sys.executable, str(ROOT / "dev.py"), "run"], cwd=ROOT, env=env,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(web, timeout=90, proc=dev)
        wait_for_port(smtp, timeout=30, proc=dev)
        started = processes_with(marker)
        assert len(started) >= 5  # dev.py, redis, honcho, gunicorn, proxy, worker ...

        os.kill(dev.pid, sig)  # dev.py alone, not its group
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (
                processes_with(marker) or listening(web) or listening(smtp)):
            time.sleep(0.2)
        left = processes_with(marker)
        assert not left, f"still running: {left}\n{(tmp_path / 'dev.log').read_text()[-3000:]}"
        assert not listening(web) and not listening(smtp)
        assert dev.wait(timeout=1) == 0
        assert not (tmp_path / "instance" / "redis.sock").exists() or not processes_with(marker)
    finally:
        for pid in processes_with(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


def test_a_typo_in_the_settings_stops_dev_py_run_with_its_one_line(tmp_path):
    """What the README promises: one line naming the setting; dev.py added a traceback of
    its own (CalledProcessError of the database upgrade) after it."""
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "config.py").write_text("SMTP_WORKRS = 2\n")
    env = dict(os.environ, INSTANCE_PATH=str(instance), REDIS_URL="redis://127.0.0.1:1/0")
    result = subprocess.run([sys.executable, str(ROOT / "dev.py"), "run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "unknown setting SMTP_WORKRS" in output
    assert "Traceback" not in output, output
