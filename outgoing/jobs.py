"""The one helper through which the web app and the proxy hand work to the RQ worker.

Jobs are named by their import path, so nothing here imports ``worker``; arguments are ids
and strings, never objects.

Periodic jobs (the sweep of expired locks, the daily quarantine report). The worker runs as
``rq worker --with-scheduler outgoing`` and nothing else. RQ 3's own periodic features do not
fit that command: ``CronScheduler`` needs a separate ``rq cron`` process, and ``Repeat`` runs a
job a fixed number of times, only after successes, at intervals counted from each completion.
So each periodic job runs through ``worker.jobs.run_periodic``, which first schedules the next
run and then calls the job's function with the run's due time.
Job ids are the name plus the due time (``og-sweep-locks-1741080000``), so two chains can never
exist side by side: whoever schedules the same run produces the same id. ``ensure_periodic``
(called when the web app starts, when the proxy starts and whenever something is locked) puts
a chain back if Redis lost it. A run that fell due while no worker ran is started by the
worker's built-in scheduler as soon as a worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from rq import Queue, Retry
from rq.job import Job

from outgoing.redis_conn import rq_connection

RETRY = Retry(max=5, interval=[10, 30, 60, 300, 900])


def queue(redis, name: str = "outgoing") -> Queue:
    """``redis`` is the caller's data client; RQ gets its own single Redis from it
    (``RQ_REDIS_URL``, see ``outgoing.redis_conn``), also when the data is on a cluster."""
    return Queue(name, connection=rq_connection(redis))


def _aware(moment: datetime) -> datetime:
    """Our datetimes are naive UTC; RQ takes a naive datetime as the server's local time."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def enqueue(redis, func: str, *args, queue_name: str = "outgoing", at: datetime | None = None,
            job_id: str | None = None, **options):
    """Enqueue ``func`` (``"worker.jobs.notify_lock"``) now or at ``at`` (UTC)."""
    q = queue(redis, queue_name)
    options.setdefault("retry", RETRY)
    if at is not None:
        return q.enqueue_at(_aware(at), func, *args, job_id=job_id, **options)
    return q.enqueue(func, *args, job_id=job_id, **options)


@dataclass(frozen=True)
class Periodic:
    """A job due every ``every`` seconds, ``offset`` seconds into each period (UTC)."""

    func: str
    every: int
    offset: int = 0
    # Run at once when the chain is (re)created, instead of waiting for the next period.
    catch_up: bool = False


SWEEP_EVERY = 300
# Each function takes one argument: its run's due time (ISO 8601, UTC).
PERIODIC = {
    "sweep-locks": Periodic("worker.jobs.sweep_expired_locks", every=SWEEP_EVERY,
                            catch_up=True),
    "quarantine-report": Periodic("worker.jobs.send_quarantine_reports", every=86400,
                                  offset=6 * 3600),
    "expire-stored-messages": Periodic("worker.quarantine_jobs.expire_stored_messages",
                                       every=3600, offset=15 * 60),
    "newly-registered-import": Periodic("worker.content_jobs.import_newly_registered",
                                        every=86400, offset=5 * 3600),
    # The message log: the proxy's Redis stream written to the database every few seconds
    # (each run at most a few seconds long, see worker/message_log_jobs.py), and retention.
    "message-log": Periodic("worker.message_log_jobs.write_message_log", every=5,
                            catch_up=True),
    # Held mail (compromise detection): automatic release once a sender calmed down, and
    # the paced release of queued messages (at most each user's pace per minute).
    "release-held": Periodic("worker.held_jobs.release_when_calm", every=60, catch_up=True),
    # Held mail's retention (HELD_RETENTION_DAYS): released and refused rows and bodies.
    "held-retention": Periodic("worker.held_jobs.expire_held_mail", every=3600,
                               offset=25 * 60),
    "message-log-retention": Periodic("worker.message_log_jobs.expire_message_log",
                                      every=3600, offset=20 * 60, catch_up=True),
}
RUNNER = "worker.jobs.run_periodic"


def period_start(name: str, now: datetime) -> datetime:
    """The due time of the period ``now`` falls in."""
    spec = PERIODIC[name]
    now = _aware(now)
    seconds = int(now.timestamp()) - spec.offset
    return datetime.fromtimestamp(seconds - seconds % spec.every + spec.offset, UTC)


def next_due(name: str, now: datetime) -> datetime:
    return period_start(name, now) + timedelta(seconds=PERIODIC[name].every)


def periodic_job_id(name: str, due: datetime) -> str:
    return f"og-{name}-{int(_aware(due).timestamp())}"


def schedule_periodic(redis, name: str, due: datetime) -> str | None:
    """Schedule run ``due`` of ``name`` unless it exists; return the job id if scheduled.

    Its result is kept for two periods, so ``ensure_periodic`` can tell that the current
    period already ran.
    """
    spec = PERIODIC[name]
    job_id = periodic_job_id(name, due)
    if Job.exists(job_id, connection=rq_connection(redis)):
        return None
    enqueue(redis, RUNNER, name, _aware(due).isoformat(), at=due, job_id=job_id,
            result_ttl=2 * spec.every, failure_ttl=7 * 86400)
    return job_id


def ensure_periodic(redis, now: datetime | None = None) -> list[str]:
    """Make sure every periodic chain exists; cheap (an EXISTS or two per chain when it does).

    A chain that catches up runs the current period at once unless the chain is there: its
    next run scheduled (a run schedules the period after the one it ran in, which is the
    current one's when it ran after a boundary) or the current period's run kept."""
    now = _aware(now or datetime.now(UTC))
    scheduled = []
    for name, spec in PERIODIC.items():
        due = next_due(name, now)
        if spec.catch_up and not Job.exists(periodic_job_id(name, due),
                                            connection=rq_connection(redis)):
            due = period_start(name, now)
        job_id = schedule_periodic(redis, name, due)
        if job_id:
            scheduled.append(job_id)
    return scheduled


DELIVERY_REPORT_JOB = "worker.content_jobs.send_delivery_report"
REPORTED_HEADER_BYTES = 64 * 1024  # the original's header block quoted in a report, at most


def enqueue_delivery_report(redis, mail_from: str, refused: dict[str, tuple[int, str]],
                            head: bytes, arrival_iso: str, hostname: str):
    """Have the worker tell ``mail_from`` which recipients will not get its message (a DSN
    quoting ``head``, the message's header block)."""
    return enqueue(redis, DELIVERY_REPORT_JOB, mail_from,
                   [[rcpt, code, text] for rcpt, (code, text) in sorted(refused.items())],
                   head[:REPORTED_HEADER_BYTES], arrival_iso, hostname)
