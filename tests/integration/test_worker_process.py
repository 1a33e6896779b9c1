"""The worker process as the Procfile runs it (``rq worker`` with our worker class)."""

from __future__ import annotations

from rq import Queue

from tests.support import worker


def test_a_job_runs_in_a_horse_that_inherited_the_job_modules(instance, redis_client, sink):
    """RQ forks a horse per job; the modules of our jobs (SQLAlchemy and the models with
    them) are imported once in the worker process, not again in every horse."""
    names = ["worker.jobs", "worker.held_jobs", "worker.content_jobs", "sqlalchemy"]
    job = Queue("outgoing", connection=redis_client).enqueue(
        "tests.support.probe_jobs.modules_already_loaded", names)
    worker.burst(sink)
    job.refresh()
    assert job.return_value() == dict.fromkeys(names, True)
