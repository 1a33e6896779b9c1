"""``GET /metrics``: the panel's Prometheus endpoint, for the provider's monitoring only.

What it reports is read from Redis at each scrape, so every gunicorn worker answers the
same: RQ's queues (jobs waiting, scheduled, running, failed) and workers, the message log's
lag, and the counts several processes add to (``outgoing/metrics.py``: locks, unlocks, rows
the worker wrote). RQ's jobs run in short-lived work horses, which is why the worker's
figures come through Redis rather than from an HTTP server of its own.

Access: with ``METRICS_TOKEN`` set, a request must bring ``Authorization: Bearer <token>``;
without it, only a client on loopback that did not come through a reverse proxy (no
forwarding header). Anyone else, a logged-in domain admin included, gets 404: these figures
are the provider's, across all domains.
"""

from __future__ import annotations

import hmac
import ipaddress

from flask import Blueprint, Response, abort, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from rq import Worker

from outgoing import jobs, message_log
from outgoing import metrics as shared_metrics

bp = Blueprint("metrics", __name__)

FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def allowed() -> bool:
    token = current_app.config.get("METRICS_TOKEN") or ""
    if token:
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())
    if any(request.headers.get(name) for name in FORWARDING_HEADERS):
        return False
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


class RedisFigures:
    """A prometheus_client collector that reads everything at collect time."""

    def __init__(self, redis, queue_name: str):
        self.redis = redis
        self.queue_name = queue_name

    def collect(self):
        up = GaugeMetricFamily("outbound_guard_redis_up",
                               "1 when the panel could read Redis for these metrics")
        try:
            families = list(self._families())
        except Exception as exc:
            current_app.logger.warning("metrics: Redis unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self):
        queue = jobs.queue(self.redis, self.queue_name)
        states = GaugeMetricFamily("outbound_guard_queue_jobs",
                                   "RQ jobs by queue and state (queued: waiting for a worker)",
                                   labels=["queue", "state"])
        states.add_metric([queue.name, "queued"], queue.count)
        states.add_metric([queue.name, "scheduled"], queue.scheduled_job_registry.count)
        states.add_metric([queue.name, "started"], queue.started_job_registry.count)
        states.add_metric([queue.name, "deferred"], queue.deferred_job_registry.count)
        states.add_metric([queue.name, "failed"], queue.failed_job_registry.count)
        yield states
        workers = GaugeMetricFamily("outbound_guard_workers", "RQ workers serving the queue",
                                    labels=["queue"])
        workers.add_metric([queue.name], Worker.count(queue=queue))
        yield workers

        lag = message_log.lag(self.redis)
        yield GaugeMetricFamily("outbound_guard_message_log_lag_entries",
                                "Message-log records in Redis not yet in the database",
                                value=lag.entries)
        yield GaugeMetricFamily("outbound_guard_message_log_lag_seconds",
                                "Age of the oldest message-log record not yet in the database",
                                value=lag.seconds)
        yield GaugeMetricFamily("outbound_guard_message_log_stream_entries",
                                "Entries in the message-log stream (capped by "
                                "MESSAGE_LOG_STREAM_MAXLEN)", value=lag.length)

        counts = shared_metrics.counts(self.redis)
        locks = CounterMetricFamily("outbound_guard_locks", "Locks by target and kind",
                                    labels=["target", "kind"])
        unlocks = CounterMetricFamily("outbound_guard_unlocks",
                                      "Unlocks by target and how (manual or timed)",
                                      labels=["target", "how"])
        for name, value in sorted(counts.items()):
            parts = name.split(":")
            if len(parts) == 3 and parts[0] == "locks":
                locks.add_metric(parts[1:], value)
            elif len(parts) == 3 and parts[0] == "unlocks":
                unlocks.add_metric(parts[1:], value)
        yield locks
        yield unlocks
        yield CounterMetricFamily("outbound_guard_message_log_written",
                                  "Message-log rows the worker wrote to the database",
                                  value=counts.get("message_log_written", 0))


@bp.get("/metrics")
def metrics():
    if not allowed():
        abort(404)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisFigures(current_app.extensions["og_redis"],
                                   current_app.config["RQ_QUEUE"]))
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
