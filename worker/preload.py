"""The RQ worker class the Procfile runs: every job's module is imported before it forks.

``rq worker`` forks a work horse for each job, and whatever the horse imports dies with it:
the next job imports SQLAlchemy, the models and the mail code all over again, about half a
second of CPU each time. Imported here, in the worker's own process, they are inherited by
every horse. Nothing connects at import: the database and Redis clients (``worker.context``)
are made on first use, inside the horse.
"""

from __future__ import annotations

import rq

from worker import content_jobs, held_jobs, jobs, message_log_jobs, quarantine_jobs

JOB_MODULES = (content_jobs, held_jobs, jobs, message_log_jobs, quarantine_jobs)


class Worker(rq.Worker):
    """``rq.Worker`` started with the job modules already imported (see above)."""
