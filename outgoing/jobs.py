"""The one helper through which the web app and the proxy hand work to the RQ worker.

Jobs are named by their import path, so nothing here imports ``worker``; arguments are ids
and strings, never objects.
"""

from __future__ import annotations

from datetime import datetime

from rq import Queue, Retry

RETRY = Retry(max=5, interval=[10, 30, 60, 300, 900])


def queue(redis, name: str = "outgoing") -> Queue:
    return Queue(name, connection=redis)


def enqueue(redis, func: str, *args, queue_name: str = "outgoing", at: datetime | None = None,
            job_id: str | None = None):
    """Enqueue ``func`` (``"worker.jobs.notify_lock"``) now or at ``at`` (UTC)."""
    q = queue(redis, queue_name)
    if at is not None:
        return q.enqueue_at(at, func, *args, retry=RETRY, job_id=job_id)
    return q.enqueue(func, *args, retry=RETRY, job_id=job_id)
