"""Serving the proxy's metrics from the parent process (multiprocess mode).

``prepare_multiprocess`` runs before anything imports prometheus_client: it gives this run a
fresh ``PROMETHEUS_MULTIPROC_DIR`` under the instance folder, one per SMTP port (files of an
earlier run would add old counts to the new ones). The parent then serves the children's sum on
``METRICS_LISTEN`` and marks a dead child's files so its gauges stop counting.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def multiprocess_dir(config: dict) -> Path:
    """Per listening port: two proxies on one machine (deploy/haproxy-one-machine.cfg) must
    not wipe or sum each other's files."""
    port = config["SMTP_LISTEN"].rpartition(":")[2]
    return Path(config["INSTANCE_PATH"]) / f"prometheus-smtp-{port}"


_pid = os.getpid()


def _renew_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew_pid)


def process_identifier() -> int:
    """This process's id, kept: in multiprocess mode prometheus_client asks for it on every
    update of every metric (to notice a fork), and ``os.getpid`` is a system call each time
    (a dozen per message). It changes only at a fork, where it is renewed."""
    return _pid


def prepare_multiprocess(config: dict) -> Path:
    path = multiprocess_dir(config)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue(process_identifier)
    return path


def serve(config: dict):
    """Start the HTTP server of the metrics in a thread; None when METRICS_LISTEN is empty."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    from outgoing.config import parse_hostport

    if not config.get("METRICS_LISTEN"):
        return None
    host, port = parse_hostport("METRICS_LISTEN", config["METRICS_LISTEN"])
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        # Mail matters more than its figures: an occupied port must not stop the proxy.
        log.error("cannot serve metrics on %s (%s); the proxy runs without them",
                  config["METRICS_LISTEN"], exc)
        return None
    log.info("metrics on http://%s/metrics", config["METRICS_LISTEN"])
    global _server
    _server = server
    return server


_server = None


def close_inherited() -> None:
    """In a forked child: close its copy of the parent's metrics socket, so the port is
    free again once the parent is gone, whatever its children do."""
    if _server is not None:
        _server.socket.close()


def child_died(pid: int) -> None:
    """Forget the live gauges of a dead process (its counters keep counting)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
