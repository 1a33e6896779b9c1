"""All real processes (gunicorn, the proxy, RQ workers) and a real Chromium via Playwright."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.services import (
    ROOT,
    free_port,
    process_env,
    run_worker_burst,
    start_process,
    stop_process,
    wait_for_port,
)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    """Per module: Playwright's sync API holds an event loop open while it runs."""
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium")
        pytest.skip("browser tests need Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        yield browser
        browser.close()


PAGE_TIMEOUT_MS = 30_000


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    # How long a step may wait for the page, not a speed target: with the suite spread over
    # the cores, a loaded 2-core machine has taken more than 10 s for a first page.
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    yield page
    context.close()


@dataclass
class Stack:
    env: dict
    web_url: str
    smtp_port: int
    logs: Path

    def flask(self, *args: str) -> str:
        out = subprocess.run([str(Path(sys.executable).parent / "flask"), "--app", "webapp",
                              *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                             check=True)
        return out.stdout

    def worker_burst(self) -> subprocess.CompletedProcess:
        return run_worker_burst(self.env)


@pytest.fixture
def stack(instance, sink, redis_client, tmp_path):
    """Web (gunicorn, as the Procfile runs it) and the proxy as separate processes."""
    web_port, smtp_port = free_port(), free_port()
    env = process_env(
        PORT=web_port, SMTP_LISTEN=f"127.0.0.1:{smtp_port}",
        UPSTREAM_SMTP=f"127.0.0.1:{sink.port}", CONFIG_REFRESH_SECONDS="0.2",
        PUBLIC_URL=f"http://127.0.0.1:{web_port}", WEB_CONCURRENCY="1",
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    web = start_process([str(Path(sys.executable).parent / "gunicorn"), "webapp:create_app()"],
                        env, logs / "web.log")
    smtp = start_process([sys.executable, "-m", "proxy", "--workers", "1"], env,
                         logs / "smtp.log")
    try:
        wait_for_port(web_port, proc=web)
        wait_for_port(smtp_port, proc=smtp)
        yield Stack(env, f"http://127.0.0.1:{web_port}", smtp_port, logs)
    finally:
        stop_process(web)
        stop_process(smtp)
        for log in logs.iterdir():
            sys.stderr.write(f"--- {log.name} (last lines)\n")
            sys.stderr.write("\n".join(log.read_text(errors="replace").splitlines()[-15:]))
            sys.stderr.write("\n")
