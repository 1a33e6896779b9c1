"""The proxy's Prometheus metrics.

``python -m proxy`` runs N processes; prometheus_client's multiprocess mode lets each write
its samples to files in ``PROMETHEUS_MULTIPROC_DIR`` and the parent serve their sum on
``METRICS_LISTEN`` (``proxy/metrics_server.py``). The directory must be set before
prometheus_client creates a value, which ``prepare_multiprocess`` sees to.

Names follow Prometheus conventions: ``outbound_guard_`` prefix, ``_total`` counters, seconds.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TRANSACTIONS = Counter(
    "outbound_guard_smtp_transactions_total",
    "SMTP transactions by the stage where they ended and their verdict (one per message-log "
    "record)", ["stage", "verdict"])
REPLIES = Counter(
    "outbound_guard_smtp_replies_total",
    "Final replies of SMTP transactions by reply code", ["code"])
RELAY_SECONDS = Histogram(
    "outbound_guard_relay_duration_seconds",
    "Time to hand a message to the next hop (sign and relay)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
CONTENT_SECONDS = Histogram(
    "outbound_guard_content_check_duration_seconds",
    "Time to inspect a message (attachments, spam)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
REDIS_ERRORS = Counter(
    "outbound_guard_redis_errors_total",
    "Redis calls of the proxy that failed, by where", ["where"])
NEXT_HOP_ERRORS = Counter(
    "outbound_guard_next_hop_errors_total",
    "Messages the next hop did not take: unavailable, or refused temporarily or permanently",
    ["kind"])
CONNECTIONS = Gauge(
    "outbound_guard_smtp_connections_active",
    "Open SMTP connections", multiprocess_mode="livesum")
DATA_HELD = Gauge(
    "outbound_guard_smtp_data_held_bytes",
    "Bytes of DATA held in memory while messages are read and checked (all processes); "
    "DATA that would pass a process's SMTP_DATA_BUDGET gets 452", multiprocess_mode="livesum")
DATA_BUDGET = Gauge(
    "outbound_guard_smtp_data_budget_bytes",
    "SMTP_DATA_BUDGET summed over the live processes (0: no budget)",
    multiprocess_mode="livesum")
MESSAGE_LOG_ERRORS = Counter(
    "outbound_guard_message_log_append_errors_total",
    "Message-log records that could not be appended to the Redis stream (lost)")
MESSAGE_LOG_BATCHES = Counter(
    "outbound_guard_message_log_batches_total",
    "Round trips that appended message-log records to the Redis stream (several records "
    "each under load)")
MESSAGE_LOG_UNRECORDED = Counter(
    "outbound_guard_message_log_unrecorded_refusals_total",
    "Refusals of clients nobody is known for (no AUTH, no IP/Range user) over "
    "MESSAGE_LOG_ANONYMOUS_PER_MINUTE, not recorded in the message log")
PASSWORD_CHECKS = Counter(
    "outbound_guard_auth_password_checks_total",
    "Passwords checked with scrypt at AUTH: of existing logins, and of unknown ones against a "
    "stand-in hash so that both cost the same")
