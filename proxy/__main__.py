"""``python -m proxy [--workers N]``: the SMTP proxy sidecar."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from outgoing.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy", description=__doc__)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes sharing the port (default: SMTP_WORKERS or the cores)")
    args = parser.parse_args(argv)
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level,
                        format="%(asctime)s smtp %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        # aiosmtpd logs every command line at INFO: a dozen log lines per message, and
        # addresses in them. Its warnings and errors still show.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"outbound-guard: configuration error: {exc}", file=sys.stderr)
        return 2
    workers = args.workers or config["SMTP_WORKERS"] or os.cpu_count() or 1
    # Prometheus' multiprocess mode must be on before prometheus_client is imported (it
    # is, through proxy.server's imports).
    from proxy.metrics_server import prepare_multiprocess

    prepare_multiprocess(config)
    from proxy.server import run

    run(config, workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
