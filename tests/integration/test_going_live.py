"""Every setting is documented, and the defaults that are unsafe beyond one's own machine
are named at start-up (README "Going live")."""

from __future__ import annotations

import re

import pytest

from outgoing.config import going_live_problems, known_settings, load_config
from tests.support.services import ROOT


def test_every_setting_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", readme))
    assert sorted(known_settings() - documented) == []


def defaults(tmp_path, **environ):
    return load_config(environ={"INSTANCE_PATH": str(tmp_path), **environ})


def test_nothing_is_said_on_loopback(tmp_path):
    assert going_live_problems(defaults(tmp_path), "127.0.0.1:5000") == []
    assert going_live_problems(defaults(tmp_path, SMTP_LISTEN="[::1]:25"), "localhost:5000") == []


@pytest.mark.parametrize(("smtp", "web"), [("0.0.0.0:25", "127.0.0.1:5000"),
                                           ("127.0.0.1:25", "0.0.0.0:5000"),
                                           ("[::]:25", "127.0.0.1:5000")])
def test_every_unsafe_default_is_named_once_listening_beyond_loopback(tmp_path, smtp, web):
    problems = " | ".join(going_live_problems(
        defaults(tmp_path, SMTP_LISTEN=smtp, SMTP_TRUSTED="true", SMTP_HOSTNAME="vm"), web))
    for name in ("SECRET_KEY", "SMTP_TRUSTED", "PUBLIC_URL", "TLS_CERT", "NOTIFY_FROM",
                 "DATABASE_URL", "REDIS_URL", "SMTP_HOSTNAME is 'vm'"):
        assert name in problems


def test_a_configured_deployment_has_nothing_to_fix(tmp_path):
    config = defaults(tmp_path, SMTP_LISTEN="0.0.0.0:25", SECRET_KEY="x" * 40,
                      PUBLIC_URL="https://og.example.net", TLS_CERT="/etc/og/cert.pem",
                      TLS_KEY="/etc/og/key.pem", NOTIFY_FROM="postmaster@example.net",
                      DATABASE_URL="postgresql://og@db/og", REDIS_URL="redis://redis:6379/0",
                      SMTP_HOSTNAME="og.example.net")
    assert going_live_problems(config, "0.0.0.0:5000") == []
