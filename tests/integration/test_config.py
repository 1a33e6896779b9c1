"""Start-up refuses bad configuration with one line naming the setting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from outgoing.config import ConfigError, load_config
from tests.support.services import ROOT, process_env


def test_generated_secret_key_is_persisted(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path))
    monkeypatch.delenv("SECRET_KEY", raising=False)
    first = load_config()["SECRET_KEY"]
    assert first == load_config()["SECRET_KEY"]
    assert (tmp_path / "secret_key").read_text() == first


def test_unknown_setting_in_instance_config_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path))
    (tmp_path / "config.py").write_text("SMTP_LISTN = '0.0.0.0:25'\n")
    with pytest.raises(ConfigError, match="SMTP_LISTN"):
        load_config()


@pytest.mark.parametrize("name,value", [
    ("DATABASE_URL", "mysql://nope"),
    ("DATABASE_URL", "not a url"),
    ("REDIS_URL", "http://127.0.0.1:6379"),
    ("REDIS_URL", "redis://127.0.0.1:notaport"),
    ("UPSTREAM_SMTP", "mail.example.com"),
    ("DEFER_RETRY_SECONDS", "5 minutes"),
    ("DEFER_RETRY_SECONDS", ""),
    ("AUTH_BLOCK_SECONDS", "nan"),  # every comparison with it false: never blocked
    ("AUTH_FAILURE_WINDOW_SECONDS", "inf"),
    ("SMTP_DATA_BUDGET", "-1"),
    ("SMTP_MAX_CONNECTIONS", "-1"),  # every connection refused
    ("SMTP_DRAIN_SECONDS", "-5"),
    ("SMTP_DATA_BUDGET", "256M"),
    ("SMTP_DATA_BUDGET", "1000000"),  # less than one message of MAX_MESSAGE_SIZE: 452 for ever
    ("MESSAGE_STORE", "databse"),  # the panel started; the proxy died at its first store
])
def test_malformed_setting_is_named(tmp_path, name, value):
    with pytest.raises(ConfigError, match=name):
        load_config(environ={"INSTANCE_PATH": str(tmp_path), name: value})


def test_environment_overrides_instance_file(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path))
    (tmp_path / "config.py").write_text("SMTP_LISTEN = '127.0.0.1:2525'\n")
    monkeypatch.setenv("SMTP_LISTEN", "127.0.0.1:2626")
    assert load_config()["SMTP_LISTEN"] == "127.0.0.1:2626"


def test_proxy_stops_with_one_line_for_a_bad_url(tmp_path):
    env = process_env(INSTANCE_PATH=tmp_path, REDIS_URL="http://nope")
    result = subprocess.run([sys.executable, "-m", "proxy"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "REDIS_URL" in result.stderr


def test_public_url_follows_port_so_unlock_links_reach_the_panel(tmp_path):
    from worker.jobs import unlock_link

    config = load_config(environ={"INSTANCE_PATH": str(tmp_path), "PORT": "5100"})
    assert config["PUBLIC_URL"] == "http://127.0.0.1:5100"
    assert unlock_link(config, "user", 1, "lock-1").startswith("http://127.0.0.1:5100/unlock/")
    assert load_config(environ={"INSTANCE_PATH": str(tmp_path)})["PUBLIC_URL"] == \
        "http://127.0.0.1:5000"


def test_a_public_url_that_is_set_wins_over_port(tmp_path):
    config = load_config(environ={"INSTANCE_PATH": str(tmp_path), "PORT": "5100",
                                  "PUBLIC_URL": "https://panel.example.com"})
    assert config["PUBLIC_URL"] == "https://panel.example.com"
